"""The ImageNet-track evaluator: ADM .npz batches, reference statistics and caching, sharded
extraction (batch size / process count invariance, a real 2-process gloo run), and FID / sFID /
IS / P / R / KDD end to end, each checked against an independent recomputation from features."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from conftest import random_inception
from evaluations import imagenet as IN
from evaluations import metrics as M
from evaluations.features import FeatureExtractor
from evaluations.npz import NpzArrayReader, ReferenceFileError, SampleFileError, open_image_batch

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


class ProjectionExtractor(FeatureExtractor):
    """A cheap deterministic stand-in: each image's features depend on that image only (float64)."""

    name = "projection"
    input_resolution = None
    feature_names = ("pool", "logits", "spatial")

    def __init__(self, pixels: int, dim: int = 6, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal((pixels, dim)) / math.sqrt(pixels)
        self.v = rng.standard_normal((pixels, 4 * 3)) / math.sqrt(pixels)
        self.identity = {"network": self.name, "weights_sha256": f"projection-{seed}"}

    def _extract_batch(self, images):
        pool, logits, spatial = [], [], []
        for img in images:  # one image at a time: no batch-size-dependent BLAS paths
            x = img.reshape(-1).astype(np.float64) / 255.0
            pool.append(x @ self.w)
            logits.append(np.concatenate([x @ self.w, -(x @ self.w)]))
            spatial.append((x @ self.v).reshape(4, 3))
        return {"pool": np.array(pool), "logits": np.array(logits), "spatial": np.array(spatial)}


def _images(n, res=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------
# .npz reading
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_reader_reads_slices_of_stored_and_compressed_files(tmp_path, compressed):
    images = _images(23, res=5)
    path = tmp_path / "batch.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images, mu=np.arange(3.0))
    with NpzArrayReader(path) as reader:
        assert reader.shape == images.shape and reader.dtype == np.uint8 and len(reader) == 23
        for start, stop in [(0, 5), (5, 23), (3, 4), (20, 30), (0, 23), (7, 7)]:
            np.testing.assert_array_equal(reader.read(start, stop), images[start:stop])
        np.testing.assert_array_equal(reader.read_other("mu"), np.arange(3.0))
        assert reader.read_other("sigma") is None


def test_npz_reader_refuses_unusable_files(tmp_path):
    with pytest.raises(SampleFileError, match="missing.npz: file not found"):
        NpzArrayReader(tmp_path / "missing.npz", error=SampleFileError)
    np.savez(tmp_path / "obj.npz", arr_0=np.array([object()], dtype=object))
    with pytest.raises(SampleFileError, match="obj.npz: arr_0 is an object array"):
        NpzArrayReader(tmp_path / "obj.npz", error=SampleFileError)
    np.savez(tmp_path / "noarr.npz", images=_images(2))
    with pytest.raises(SampleFileError, match=r"noarr.npz: no 'arr_0' array \(found \['images'\]\)"):
        NpzArrayReader(tmp_path / "noarr.npz", error=SampleFileError)
    np.savez(tmp_path / "fortran.npz", arr_0=np.asfortranarray(_images(2)))
    with pytest.raises(SampleFileError, match="fortran.npz: arr_0 is stored in Fortran order"):
        NpzArrayReader(tmp_path / "fortran.npz", error=SampleFileError)
    np.savez(tmp_path / "ok.npz", arr_0=_images(4))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:600])
    with pytest.raises(SampleFileError, match="cut.npz: not a readable .npz"):
        NpzArrayReader(tmp_path / "cut.npz", error=SampleFileError)
    # one changed byte inside arr_0 of a stored file: the slice reads cannot see it, the CRC-32 can
    np.savez(tmp_path / "big.npz", arr_0=_images(8, res=32))  # larger than zipfile's first read
    data = bytearray((tmp_path / "big.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flip.npz").write_bytes(bytes(data))
    with NpzArrayReader(tmp_path / "big.npz", error=SampleFileError) as ok:
        ok.verify_checksum()
    with NpzArrayReader(tmp_path / "flip.npz", error=SampleFileError) as flipped:
        assert flipped.read(0, 8).shape == (8, 32, 32, 3)
        with pytest.raises(SampleFileError, match="flip.npz: arr_0 fails its CRC-32 check"):
            flipped.verify_checksum()


def test_image_batch_checks_name_the_file_and_the_problem(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=_images(4, res=16))
    open_image_batch(tmp_path / "s.npz", 16, 3, 4).close()
    cases = [((32, 3, 4), "s.npz: samples are 16x16, the track's resolution is 32x32"),
             ((16, 3, 5), "s.npz: 4 samples, the protocol requires exactly 5"),
             ((16, 1, 4), r"s.npz: arr_0 has shape \(4, 16, 16, 3\), expected \[N, 16, 16, 1\]")]
    for (res, ch, n), message in cases:
        with pytest.raises(SampleFileError, match=message):
            open_image_batch(tmp_path / "s.npz", res, ch, n)
    np.savez(tmp_path / "f.npz", arr_0=_images(4).astype(np.float32))
    with pytest.raises(SampleFileError, match="f.npz: arr_0 has dtype float32, expected uint8"):
        open_image_batch(tmp_path / "f.npz", 16, 3, 4)


# ---------------------------------------------------------------------------
# reference batch
# ---------------------------------------------------------------------------


def _ref_stats(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((IN.POOL_DIM, 8))
    b = rng.standard_normal((IN.SPATIAL_DIM, 8))
    return dict(mu=rng.standard_normal(IN.POOL_DIM), sigma=a @ a.T + np.eye(IN.POOL_DIM),
                mu_s=rng.standard_normal(IN.SPATIAL_DIM), sigma_s=b @ b.T + np.eye(IN.SPATIAL_DIM))


def test_reference_batch_statistics_resolution_and_checksum(tmp_path):
    from evaluations.weights import sha256_file
    stats = _ref_stats()
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=_images(6), **stats)
    ref = IN.load_reference_batch(path, 16, expected_sha256=sha256_file(path))
    np.testing.assert_array_equal(ref.statistics["pool"][0], stats["mu"])
    np.testing.assert_array_equal(ref.statistics["spatial"][1], stats["sigma_s"])
    assert len(ref.images) == 6
    with pytest.raises(ReferenceFileError, match="VIRTUAL_ref.npz: reference images are 16x16, the track's "
                                                 "resolution is 256x256"):
        IN.load_reference_batch(path, 256)
    with pytest.raises(ReferenceFileError, match="VIRTUAL_ref.npz: 6 reference images, the protocol requires "
                                                 "exactly 10000"):
        IN.load_reference_batch(path, 16, num_images=10000)
    with pytest.raises(ReferenceFileError, match="VIRTUAL_ref.npz: sha256 .* does not match the track's"):
        IN.load_reference_batch(path, 16, expected_sha256="0" * 64)
    with pytest.raises(ReferenceFileError, match="nowhere.npz: reference batch not found.*openaipublic"):
        IN.load_reference_batch(tmp_path / "nowhere.npz", 16)
    np.savez(tmp_path / "half.npz", arr_0=_images(6), mu=stats["mu"])
    with pytest.raises(ReferenceFileError, match="half.npz: has mu but not sigma"):
        IN.load_reference_batch(tmp_path / "half.npz", 16)
    np.savez(tmp_path / "dims.npz", arr_0=_images(6), mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ReferenceFileError, match=r"dims.npz: mu/sigma have shapes \(64,\)/\(64, 64\), "
                                                 r"expected \(2048,\)/\(2048, 2048\)"):
        IN.load_reference_batch(tmp_path / "dims.npz", 16)
    np.savez(tmp_path / "bare.npz", arr_0=_images(6))
    assert IN.load_reference_batch(tmp_path / "bare.npz", 16).statistics == {"pool": None, "spatial": None}


# ---------------------------------------------------------------------------
# sharded extraction
# ---------------------------------------------------------------------------


class _ArrayReader:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def read(self, start, stop):
        return self.images[start:stop]


def _simulated(images, consumers, batch_size, world_size):
    """world_size processes, each on its shard, gathered through the same wire format as a real run."""
    reader = _ArrayReader(images)
    parts = [IN.extract_shard(reader, consumers, IN.shard_range(len(images), r, world_size), batch_size)
             for r in range(world_size)]
    return IN.merge_shards([IN._from_wire(IN._to_wire(p)) for p in parts])


def test_statistics_do_not_depend_on_batch_size_or_process_count():
    images = _images(37)
    ext = ProjectionExtractor(16 * 16 * 3)
    consumers = [IN.Consumer("inception", ext, keep=("pool", "logits"), stats=("pool", "spatial"))]
    feats = ext.extract(images)
    mu, sigma = feats["pool"].mean(0), np.cov(feats["pool"], rowvar=False)
    sp = feats["spatial"].reshape(37, -1)
    runs = [_simulated(images, consumers, b, w) for b, w in [(1, 1), (4, 1), (64, 1), (3, 2), (5, 3), (2, 8), (1, 40)]]
    for run in runs:
        assert run.count == 37
        s = run.stats["inception"]
        np.testing.assert_allclose(s["pool"].mean(), mu, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(s["pool"].covariance(), sigma, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(s["spatial"].covariance(), np.cov(sp, rowvar=False), rtol=1e-11, atol=1e-14)
        # kept rows are in file order (IS uses consecutive splits)
        np.testing.assert_array_equal(run.arrays["inception"]["logits"], feats["logits"].astype(np.float32))


def test_real_network_features_are_batch_size_independent_to_float32_precision():
    model = random_inception(divisor=16, logits_scale=0.3)
    from evaluations.features import get_feature_extractor
    ext = get_feature_extractor("inception_adm", model=model, device="cpu")
    images = _images(4, res=24, seed=5)
    consumers = [IN.Consumer("inception", ext, keep=("pool",), stats=("pool",))]
    a = _simulated(images, consumers, 4, 1)
    b = _simulated(images, consumers, 1, 3)
    fa = M.frechet_distance(a.stats["inception"]["pool"].mean(), a.stats["inception"]["pool"].covariance(),
                            np.zeros(model.pool_dim), np.eye(model.pool_dim))
    fb = M.frechet_distance(b.stats["inception"]["pool"].mean(), b.stats["inception"]["pool"].covariance(),
                            np.zeros(model.pool_dim), np.eye(model.pool_dim))
    assert fa == pytest.approx(fb, rel=1e-6)
    np.testing.assert_allclose(a.arrays["inception"]["pool"], b.arrays["inception"]["pool"], rtol=1e-5, atol=1e-6)


def test_two_real_gloo_processes_match_one_process(tmp_path):
    """accelerate launch with 2 CPU processes (gloo): the gathered result equals a 1-process run."""
    images = _images(11, res=8, seed=3)
    np.savez(tmp_path / "batch.npz", arr_0=images)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_inception_imagenet import ProjectionExtractor
        from evaluations import imagenet as IN
        from evaluations.npz import NpzArrayReader
        dist = IN.Distributed.from_environment()
        ext = ProjectionExtractor(8 * 8 * 3)
        out = IN.extract_features(NpzArrayReader({str(tmp_path / 'batch.npz')!r}),
                                  [IN.Consumer("inception", ext, keep=("logits",), stats=("pool",))], 2, dist,
                                  progress=False)
        s = out.stats["inception"]["pool"]
        np.savez({str(tmp_path)!r} + f"/rank{{dist.rank}}.npz", world=dist.world_size, count=out.count,
                 mean=s.mean(), cov=s.covariance(), logits=out.arrays["inception"]["logits"])
    """))
    import socket
    with socket.socket() as sock:  # a free port for the rendezvous (a fixed one may be taken)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(port), str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ext = ProjectionExtractor(8 * 8 * 3)
    feats = ext.extract(images)
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as r:
            assert int(r["world"]) == 2 and int(r["count"]) == 11
            np.testing.assert_allclose(r["mean"], feats["pool"].mean(0), rtol=1e-12)
            np.testing.assert_allclose(r["cov"], np.cov(feats["pool"], rowvar=False), rtol=1e-11)
            np.testing.assert_array_equal(r["logits"], feats["logits"].astype(np.float32))


def test_reference_features_are_cached_by_content_and_network(tmp_path, monkeypatch):
    np.savez(tmp_path / "ref.npz", arr_0=_images(9))
    ref = IN.load_reference_batch(tmp_path / "ref.npz", 16)
    cache = tmp_path / "cache"
    consumers = [IN.Consumer("inception", ProjectionExtractor(768), keep=("pool",), stats=("pool", "spatial"))]
    first, hit1 = IN.reference_features(ref, consumers, 4, cache, progress=False)
    second, hit2 = IN.reference_features(ref, consumers, 4, cache, progress=False)
    assert (hit1, hit2) == (False, True) and len(list(cache.iterdir())) == 1
    np.testing.assert_array_equal(first.arrays["inception"]["pool"], second.arrays["inception"]["pool"])
    np.testing.assert_array_equal(first.stats["inception"]["spatial"].covariance(),
                                  second.stats["inception"]["spatial"].covariance())
    other = [IN.Consumer("inception", ProjectionExtractor(768, seed=1), keep=("pool",), stats=("pool", "spatial"))]
    third, hit3 = IN.reference_features(ref, other, 4, cache, progress=False)
    assert not hit3 and len(list(cache.iterdir())) == 2
    assert not np.array_equal(third.arrays["inception"]["pool"], first.arrays["inception"]["pool"])
    # another file with the same name and size but other content is another cache entry
    np.savez(tmp_path / "ref.npz", arr_0=_images(9, seed=1))
    _, hit4 = IN.reference_features(IN.load_reference_batch(tmp_path / "ref.npz", 16), consumers, 4, cache,
                                    progress=False)
    assert not hit4
    # features cached by other evaluation code (another checkout sharing the cache) are not reused
    current = IN.load_reference_batch(tmp_path / "ref.npz", 16)
    assert IN.reference_features(current, consumers, 4, cache, progress=False)[1]
    monkeypatch.setattr(IN, "evaluation_code_sha256", lambda: "0" * 64)
    assert not IN.reference_features(current, consumers, 4, cache, progress=False)[1]
    monkeypatch.undo()
    # a damaged cache file is recomputed, not trusted: not a zip, cut short, one byte changed
    current = IN.load_reference_batch(tmp_path / "ref.npz", 16)
    fresh, _ = IN.reference_features(current, consumers, 4, cache, progress=False)
    flip = (lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF]) + b[len(b) // 2 + 1:])
    for damage in (lambda b: b"damaged", lambda b: b[:len(b) // 2], flip):
        for f in cache.iterdir():
            f.write_bytes(damage(f.read_bytes()))
        again, hit5 = IN.reference_features(current, consumers, 4, cache, progress=False)
        assert not hit5
        np.testing.assert_array_equal(again.arrays["inception"]["pool"], fresh.arrays["inception"]["pool"])


def test_a_cache_that_cannot_be_written_costs_only_time(tmp_path, capsys):
    """The cache only saves time: where it cannot be written (here under a file; a full disk, a
    read-only checkout) the reference features are still returned, and the reason printed."""
    np.savez(tmp_path / "ref.npz", arr_0=_images(9))
    ref = IN.load_reference_batch(tmp_path / "ref.npz", 16)
    consumers = [IN.Consumer("inception", ProjectionExtractor(768), keep=("pool",), stats=("pool",))]
    (tmp_path / "a_file").write_text("not a folder")
    got, hit = IN.reference_features(ref, consumers, 4, tmp_path / "a_file" / "cache", progress=False)
    want, _ = IN.reference_features(ref, consumers, 4, tmp_path / "cache", progress=False)
    assert not hit and "reference features not cached" in capsys.readouterr().err
    np.testing.assert_array_equal(got.arrays["inception"]["pool"], want.arrays["inception"]["pool"])


def test_every_rank_takes_the_cache_or_none_does(tmp_path, monkeypatch):
    """A rank that finds the cache while another does not must extract too: the extraction
    gathers across ranks, and a rank that skipped it would pair its sample gather with the
    others' reference gather (seen with two gloo processes and a cache only one could see)."""
    np.savez(tmp_path / "ref.npz", arr_0=_images(9))
    ref = IN.load_reference_batch(tmp_path / "ref.npz", 16)
    consumers = [IN.Consumer("inception", ProjectionExtractor(768), keep=("pool",), stats=("pool", "spatial"))]
    first, _ = IN.reference_features(ref, consumers, 4, tmp_path / "cache", progress=False)  # this rank's cache
    extracted = []
    monkeypatch.setattr(IN, "extract_features", lambda *a, **k: extracted.append(1) or first)
    for other_has_it, hit in ((True, True), (False, False)):
        extracted.clear()
        two_ranks = IN.Distributed(rank=0, world_size=2, gather_fn=lambda objs, o=other_has_it: objs + [o])
        out, from_cache = IN.reference_features(ref, consumers, 4, tmp_path / "cache", dist=two_ranks,
                                                progress=False)
        assert from_cache is hit and bool(extracted) is not hit
        assert (out is first) is not hit


# ---------------------------------------------------------------------------
# metrics end to end
# ---------------------------------------------------------------------------


def _track(tmp_path, n_samples, ref_path, kd=True):
    """An ImageNet-style track whose reference batch is `ref_path` (<dataset.dir>/<reference>.npz)."""
    evaluation = {"feature_network": "inception_adm", "num_samples": n_samples,
                  "reference": Path(ref_path).stem, "reference_sha256": None,
                  "inception_score_split_size": 5, "precision_recall_k": 3, "batch_size": 4,
                  "metrics": ["fid", "sfid", "is", "precision", "recall"] + (["kd"] if kd else [])}
    if kd:
        evaluation["kernel_distance"] = {"num_subsets": 7, "subset_size": 6, "seed": 3}
    return {"name": "imagenet-test", "evaluation": evaluation,
            "dataset": {"name": "test", "resolution": 24, "channels": 3, "dir": str(Path(ref_path).parent)}}


def test_imagenet_metrics_match_an_independent_recomputation(tmp_path, monkeypatch):
    """The pipeline with cheap stand-in networks (the real ones are tested in test_inception*.py,
    test_kdd.py): every number equals a recomputation from the networks' features."""
    samples, ref_images = _images(10, res=24, seed=1), _images(8, res=24, seed=2)
    inc = ProjectionExtractor(24 * 24 * 3, dim=6, seed=0)
    dino = ProjectionExtractor(24 * 24 * 3, dim=5, seed=1)
    networks = {"inception": inc, "dinov2": dino}
    fs, fr = inc.extract(samples), inc.extract(ref_images)
    # reference file: pool statistics given (not those of arr_0), spatial statistics absent
    rng = np.random.default_rng(0)
    g = rng.standard_normal((6, 3))
    ref_mu, ref_sigma = rng.standard_normal(6), g @ g.T + np.eye(6)
    monkeypatch.setattr(IN, "POOL_DIM", 6)  # the stand-in's dimensions
    monkeypatch.setattr(IN, "SPATIAL_DIM", 12)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu=ref_mu, sigma=ref_sigma)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    # a forged sample file: its statistics must be ignored
    np.savez(tmp_path / "forged.npz", arr_0=samples, mu=ref_mu, sigma=ref_sigma, mu_s=np.zeros(12),
             sigma_s=np.eye(12))
    track = _track(tmp_path, 10, tmp_path / "ref.npz")
    report = IN.evaluate_imagenet(tmp_path / "samples.npz", track, extractors=networks,
                                  cache_dir=tmp_path / "cache", progress=False)
    forged = IN.evaluate_imagenet(tmp_path / "forged.npz", track, extractors=networks,
                                  cache_dir=tmp_path / "cache", progress=False)
    got = report["metrics"]
    assert set(got) == {"fid", "sfid", "is", "is_std", "precision", "recall", "kd", "kd_std"}
    assert got == forged["metrics"]
    assert report["provenance"]["reference"]["statistics"] == {"pool": "from the reference file",
                                                               "spatial": "computed from arr_0"}
    assert (report["provenance"]["reference"]["features_from_cache"],
            forged["provenance"]["reference"]["features_from_cache"]) == (False, True)

    def fd_sqrtm(a_mu, a_sigma, b_mu, b_sigma):  # ADM's route, written out
        covmean = scipy.linalg.sqrtm(a_sigma @ b_sigma).real
        return float(np.sum((a_mu - b_mu) ** 2) + np.trace(a_sigma) + np.trace(b_sigma) - 2 * np.trace(covmean))

    assert got["fid"] == pytest.approx(fd_sqrtm(fs["pool"].mean(0), np.cov(fs["pool"], rowvar=False),
                                                ref_mu, ref_sigma), rel=1e-9)
    s_s, s_r = fs["spatial"].reshape(10, -1), fr["spatial"].reshape(8, -1)
    assert got["sfid"] == pytest.approx(fd_sqrtm(s_s.mean(0), np.cov(s_s, rowvar=False),
                                                 s_r.mean(0), np.cov(s_r, rowvar=False)), rel=1e-6)
    # IS over consecutive chunks of the protocol's split size (5: two chunks), written out
    logits = fs["logits"].astype(np.float32).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = [np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1)))
              for part in (p[:5], p[5:])]
    assert got["is"] == pytest.approx(np.mean(scores), rel=1e-9)
    # precision / recall: reference = real (radii of the reference set), samples = fake
    pr = M.precision_recall(fr["pool"], fs["pool"], k=3, fp16_matmul="fp32_accumulate")  # the CPU mode
    assert (got["precision"], got["recall"]) == pr
    assert (got["precision"], got["recall"]) != M.precision_recall(fs["pool"], fr["pool"], k=3)
    # KD: the second network's features, reference vs samples, with the protocol's subsets
    kd = M.kernel_distance(dino.extract(ref_images)["pool"], dino.extract(samples)["pool"],
                           num_subsets=7, subset_size=6, seed=3)
    assert (got["kd"], got["kd_std"]) == pytest.approx(kd, rel=1e-6)
    definition = report["definitions"]["kd"]
    for part in ("(x.y/d + 1)^3", "DINOv2 ViT-L/14", "CLS", "224x224", "bicubic", "ImageNet mean/std",
                 "7 subsets of 6", "seed 3", "unbiased MMD^2"):
        assert part in definition, part
    # evaluate_samples (score_samples without the provenance; what train.py and eval.sh call) returns
    # the same numbers, and only numbers;
    # train.py calls it on rank 0 alone, so it must not join the other processes (no collectives)
    from evaluations import evaluate

    def no_collectives(cls):
        raise AssertionError("evaluate_samples must score in this process alone")
    monkeypatch.setattr(IN.Distributed, "from_environment", classmethod(no_collectives))
    again = evaluate.evaluate_samples(tmp_path / "samples.npz", track, extractors=networks,
                                      cache_dir=tmp_path / "cache", progress=False)
    assert again == got and all(isinstance(v, float) for v in again.values())


IMAGENET_TRACKS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "records" / "tracks").glob("*.json")
                         if json.loads(p.read_text())["evaluation"]["feature_network"] == "inception_adm")


@pytest.mark.parametrize("name", IMAGENET_TRACKS)
def test_committed_imagenet_tracks_are_scored_as_they_stand(tmp_path, monkeypatch, name):
    """Each committed ImageNet track's evaluation block goes through the evaluator unchanged: its
    reference batch is found by name in the dataset folder, every metric it lists comes out (KD
    with its own kernel_distance settings, IS with ADM's chunks), DINOv2 is built for KD, and a
    missing reference says where to download it. Only the data (folder, size, count) and the
    networks (stand-ins) are replaced."""
    from evaluations import evaluate, features
    from train import load_track
    track = load_track(name)
    protocol = track["evaluation"]
    built = {}
    monkeypatch.setattr(features, "get_feature_extractor", lambda network, **kw: built.setdefault(network, kw))
    IN.build_extractors(protocol)
    assert set(built) == {"inception_adm", "dinov2_vitl14"}
    track["dataset"] |= {"dir": str(tmp_path), "resolution": 24}
    protocol["num_samples"] = 12
    np.savez(tmp_path / "samples.npz", arr_0=_images(12, res=24, seed=1))
    with pytest.raises(ReferenceFileError, match=f"{protocol['reference']}.npz: reference batch not found; "
                                                 f"download it from {protocol['reference_url']}"):
        evaluate.evaluate_samples(tmp_path / "samples.npz", track, extractors={}, progress=False)
    ref_images = _images(9, res=24, seed=2)
    np.savez(tmp_path / f"{protocol['reference']}.npz", arr_0=ref_images)
    monkeypatch.setattr(IN, "POOL_DIM", 6)
    monkeypatch.setattr(IN, "SPATIAL_DIM", 12)
    inc, dino = ProjectionExtractor(24 * 24 * 3, dim=6, seed=0), ProjectionExtractor(24 * 24 * 3, dim=5, seed=1)
    got = evaluate.evaluate_samples(tmp_path / "samples.npz", track, extractors={"inception": inc, "dinov2": dino},
                                    cache_dir=tmp_path / "cache", progress=False)
    assert set(protocol["metrics"]) <= set(got)
    kd = protocol["kernel_distance"]
    assert (got["kd"], got["kd_std"]) == pytest.approx(M.kernel_distance(
        dino.extract(ref_images)["pool"], dino.extract(_images(12, res=24, seed=1))["pool"],
        num_subsets=kd["num_subsets"], subset_size=kd["subset_size"], seed=kd["seed"]), rel=1e-6)
    logits = inc.extract(_images(12, res=24, seed=1))["logits"]
    assert got["is"] == pytest.approx(M.inception_score(logits, splits=1)[0], rel=1e-6)  # 12 < 5000: one chunk
    # without the KD network a listed metric would be missing: refused, not dropped
    with pytest.raises(ValueError, match=r"lists the metrics \['kd'\]"):
        evaluate.evaluate_samples(tmp_path / "samples.npz", track, extractors={"inception": inc},
                                  cache_dir=tmp_path / "cache", progress=False)


def test_cli_scores_an_imagenet_track_and_rejects_bad_input(tmp_path, capsys):
    """The real (width-reduced, random) Inception port from a converted weights file, via the CLI."""
    from safetensors.torch import save_file

    from evaluations import evaluate
    from evaluations import inception as I
    from evaluations.weights import sha256_file
    model = random_inception(divisor=16, logits_scale=0.3)
    weights = tmp_path / "inception_adm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"format": I.FORMAT, "source_sha256": "cd" * 32})
    np.savez(tmp_path / "ref.npz", arr_0=_images(6, res=24, seed=4))
    np.savez(tmp_path / "samples.npz", arr_0=_images(8, res=24, seed=5))
    track = _track(tmp_path, 8, tmp_path / "ref.npz", kd=False)
    track["evaluation"]["inception"] = {"weights": str(weights), "sha256": sha256_file(weights), "backend": "torch"}
    (tmp_path / "track.json").write_text(json.dumps(track | {"budget": {}, "train_defaults": {},
                                                             "primary_metric": "fid"}))
    out = tmp_path / "metrics.json"
    assert evaluate.main([str(tmp_path / "samples.npz"), "--track", str(tmp_path / "track.json"), "--out", str(out),
                          "--cache_dir", str(tmp_path / "cache")]) == 0
    result = json.loads(out.read_text())
    assert {"fid", "sfid", "is", "is_std", "precision", "recall"} == set(result) - {"provenance"}
    assert result["provenance"]["networks"]["inception"]["source_sha256"] == "cd" * 32
    assert result["provenance"]["scored_on"]["device"].startswith("cpu: ")
    assert result["fid"] > 0 and result["sfid"] > 0 and 1 <= result["is"] <= 1008
    np.savez(tmp_path / "small.npz", arr_0=_images(8, res=16))
    assert evaluate.main([str(tmp_path / "small.npz"), "--track", str(tmp_path / "track.json")]) == 1
    assert "small.npz: samples are 16x16, the track's resolution is 24x24" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path / "samples.npz"), "--track", str(tmp_path / "track.json"),
                          "--inception_weights", str(tmp_path / "nope.pb")]) == 1
    assert "nope.pb: Inception weights" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# float16 distances with a float32-accumulated product (the CPU mode of the ImageNet evaluator)
# ---------------------------------------------------------------------------


def test_fp32_accumulated_float16_distances_match_the_float16_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    y = (rng.standard_normal((200, 64)) * 1.3).astype(np.float32)
    got = M.pairwise_squared_distances(x, y, fp16_matmul="fp32_accumulate")
    # independent: float16 inputs, float16 squares summed then rounded, exact dot rounded to float16,
    # then ADM's |x|^2 - 2 x.y + |y|^2 with every operation rounded to float16, clipped at 0
    h = np.float16
    x16, y16 = x.astype(h), y.astype(h)
    nx = (x16 * x16).astype(np.float64).sum(1).astype(h)[:, None]
    ny = (y16 * y16).astype(np.float64).sum(1).astype(h)[None, :]
    dot = (x16.astype(np.float64) @ y16.astype(np.float64).T).astype(h)
    ref = np.maximum((nx - (h(2) * dot)).astype(h) + ny, h(0)).astype(np.float32)
    ulp = np.spacing(np.abs(ref).astype(h)).astype(np.float32)
    off = np.abs(got - ref) > 0
    assert np.all(np.abs(got - ref) <= 2 * ulp + 1e-6)  # summation order only
    assert off.mean() < 0.01
    native = M.pairwise_squared_distances(x, y)
    assert np.mean(native != got) < 0.01
    # the metrics agree with the default mode on data without near-ties
    real, fake = x[:150], y[:180]
    assert M.precision_recall(real, fake, fp16_matmul="fp32_accumulate", batch_size=64) == \
        M.precision_recall(real, fake, batch_size=64)
    np.testing.assert_array_equal(M.manifold_radii(real, fp16_matmul="fp32_accumulate", batch_size=50),
                                  M.manifold_radii(real, batch_size=50))
    with pytest.raises(ValueError, match="fp16_matmul must be one of"):
        M.precision_recall(real, fake, fp16_matmul="fp8")


def test_frechet_distance_cholesky_and_square_root_routes_agree_with_sqrtm():
    """frechet_distance takes a Cholesky factor of a positive definite S1 and sqrt(S1) otherwise;
    both equal ADM's scipy.linalg.sqrtm route."""
    rng = np.random.default_rng(7)
    d = 48
    a, b = rng.standard_normal((d, 3 * d)), rng.standard_normal((d, 3 * d))
    s1, s2 = a @ a.T / (3 * d), b @ b.T / (3 * d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    by_sqrt = M._similar_symmetric_product(s1, s2, cholesky=False)
    by_chol = M._similar_symmetric_product(s1, s2)
    np.testing.assert_allclose(np.linalg.eigvalsh(by_chol), np.linalg.eigvalsh(by_sqrt), rtol=1e-10, atol=1e-12)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(M.frechet_distance_sqrtm(mu1, s1, mu2, s2),
                                                                  rel=1e-10)
    # a singular S1 (5 dimensions without variance): Cholesky fails, the sqrt(S1) route is taken
    s1_singular = s1.copy()
    s1_singular[-5:, :] = 0.0
    s1_singular[:, -5:] = 0.0
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(s1_singular)
    eig = np.linalg.eigvals(s1_singular @ s2)  # independent: the spectrum of the product itself
    tr_sqrt = np.sum(np.sqrt(np.clip(eig.real, 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1_singular) + np.trace(s2) - 2 * tr_sqrt
    assert M.frechet_distance(mu1, s1_singular, mu2, s2) == pytest.approx(expected, rel=1e-9)
