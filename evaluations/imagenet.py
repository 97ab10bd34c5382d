"""ImageNet tracks: FID, sFID, IS, Precision, Recall (as the ADM evaluator) and KDD (as dgm-eval's kd).

Inputs are ADM-format batches: a sample ``.npz`` (``arr_0`` = uint8 [N, H, W, 3]) and the track's
reference ``.npz`` (e.g. ``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` with 10k images plus
``mu``/``sigma`` (2048) and ``mu_s``/``sigma_s`` (2023) over the whole training set).

* FID  = Frechet distance between the reference file's ``mu``/``sigma`` and the samples' pool_3
  statistics; sFID the same on ``mu_s``/``sigma_s`` and the samples' ``mixed_6/conv`` features.
  When a reference file has no statistics they are computed from its ``arr_0`` (as ADM does).
  A sample file's own ``mu``/``sigma`` are never read: sample statistics are always recomputed.
* IS   = Inception Score of the samples' logits, consecutive chunks of 5000 as ADM (10 at 50k).
* P, R = ADM's ManifoldEstimator (k = 3) between the reference ``arr_0`` pool features and the
  samples' pool features.
* KD   = kernel distance (SR-DiT's "KDD") on DINOv2 ViT-L/14 features of reference ``arr_0`` and
  samples, when the protocol has a ``kernel_distance`` block (see :func:`kd_definition`; the
  definition is written next to every KD number).

The track names its reference batch: ``evaluation.reference`` is the file's name without ``.npz``,
found in ``dataset.dir`` (or given as ``reference_path``), ``reference_sha256`` pins its digest,
``reference_url`` says where it comes from and ``reference_num_images`` (optional) its size.

Feature extraction is sharded over processes (``accelerate launch -m evaluations.evaluate ...``):
every process takes a contiguous slice of the images, accumulates float64 statistics
(:class:`evaluations.metrics.FeatureStatistics`) and keeps the per-image features it owns; the
pieces are gathered in rank order, so the result depends neither on the batch size nor on the
number of processes (up to float64 round-off).  Reference features are cached by the sha256 of
the reference file and the identity of the feature network (weights sha256, backend).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from evaluations import metrics as M
from evaluations.npz import (NpzArrayReader, ReferenceFileError, SampleFileError,
                             open_image_batch)
from evaluations.weights import sha256_file
from preprocessing.shards import atomic_write

CACHE_FORMAT = "reference-features-v1"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / "data" / "eval_cache"
POOL_DIM = 2048
ADM_IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score: consecutive chunks of 5000 samples
SPATIAL_DIM = 2023


# ---------------------------------------------------------------------------
# KDD definition
# ---------------------------------------------------------------------------


KD_NETWORK = "dinov2_vitl14"


def kd_definition(protocol: dict) -> str:
    """The KD (SR-DiT's KDD) this evaluator computes, in words (written next to every KD number)."""
    kd = protocol.get("kernel_distance", {})
    return (
        "KD (SR-DiT's KDD) = unbiased MMD^2 with the polynomial kernel k(x, y) = (x.y/d + 1)^3, d = 1024, on DINOv2 "
        "ViT-L/14 CLS features after the final norm (timm vit_large_patch14_dinov2 with the torch-hub "
        "dinov2_vitl14 weights and its bicubic position-embedding interpolation); images resized to "
        "224x224 with PIL bicubic, scaled to [0, 1] and normalised with the ImageNet mean/std; mean over "
        f"{int(kd.get('num_subsets', 100))} subsets of {int(kd.get('subset_size', 1000))} reference and "
        f"{int(kd.get('subset_size', 1000))} sample features drawn without replacement "
        f"(numpy PCG64, seed {int(kd.get('seed', 0))}); reference = the reference batch's arr_0; "
        "raw units (no x1000); DINOv2 run in "
        + ("float32 with TF32 tensor-core matmuls (the protocol's opt-in speed-up, not dgm-eval's arithmetic)"
           if kd.get("precision", "fp32") == "tf32" else "plain float32 (no TF32), as dgm-eval runs it"))


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------


@dataclass
class Distributed:
    """Rank, world size and an all-gather of Python objects (rank order)."""

    rank: int = 0
    world_size: int = 1
    gather_fn: Optional[Callable[[list], list]] = None
    device: Optional[object] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        return list(self.gather_fn([obj]))

    @classmethod
    def single(cls) -> "Distributed":
        """This process alone (on its GPU when there is one)."""
        import torch
        return cls(0, 1, None, torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def from_environment(cls) -> "Distributed":
        """accelerate's process state (one process unless started by ``accelerate launch``).

        With several processes the process group is destroyed by :meth:`close`, and at the latest
        when the interpreter exits (``atexit``), while Python can still run other threads: see
        :meth:`close` for why a gloo group must not outlive the interpreter.
        """
        import torch
        from accelerate import PartialState
        state = PartialState(cpu=not torch.cuda.is_available())  # gloo processes on a CPU machine
        if state.num_processes == 1:
            return cls(0, 1, None, state.device)
        from accelerate.utils import gather_object
        atexit.unregister(leave_process_group)  # once per process
        atexit.register(leave_process_group)
        return cls(state.process_index, state.num_processes, gather_object, state.device)

    def close(self) -> None:
        """Leave the process group (a local operation, no collective); call after the last gather.

        A gloo worker thread releases the Python tensors of a finished all-gather after the
        gathering call has returned, and that needs the GIL.  If the process is already finalizing
        its interpreter by then (a short script, or a busy machine that schedules the worker late),
        CPython ends that thread with ``pthread_exit`` inside C++ code that cannot unwind:
        ``terminate called without an active exception`` (SIGABRT) at exit, after correct results.
        Destroying the group joins the worker threads while the interpreter is still alive (torch
        releases the GIL while it waits for them).
        """
        if self.world_size > 1:
            leave_process_group()


def leave_process_group() -> None:
    """Destroys the default process group if there is one (see Distributed.close for why every
    multi-process entry point must, before the interpreter exits)."""
    import torch.distributed as td
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of rows that ``rank`` owns."""
    per = -(-n // world_size)
    return range(min(rank * per, n), min((rank + 1) * per, n))


# ---------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------


@dataclass
class Consumer:
    """What to take from one feature extractor: rows to keep, and features to accumulate statistics of."""

    key: str
    extractor: object
    keep: Tuple[str, ...] = ()
    stats: Tuple[str, ...] = ()


@dataclass
class Extracted:
    arrays: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)
    stats: Dict[str, Dict[str, M.FeatureStatistics]] = field(default_factory=dict)
    count: int = 0


def extract_shard(reader, consumers: Sequence[Consumer], rows: range, batch_size: int,
                  progress: bool = False, desc: str = "features") -> Extracted:
    """Features of rows ``rows`` of ``reader`` (anything with ``read(start, stop)``), batch by batch."""
    from tqdm.auto import tqdm

    out = Extracted(count=len(rows))
    kept: Dict[str, Dict[str, list]] = {c.key: {n: [] for n in c.keep} for c in consumers}
    for c in consumers:
        out.stats[c.key] = {n: M.FeatureStatistics() for n in c.stats}
    bar = tqdm(total=len(rows), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(rows.start, rows.stop, batch_size):
        stop = min(start + batch_size, rows.stop)
        images = reader.read(start, stop)
        for c in consumers:
            feats = c.extractor.extract(images, batch_size=len(images))
            for name in c.stats:
                out.stats[c.key][name].update(feats[name].reshape(len(images), -1))
            for name in c.keep:
                kept[c.key][name].append(np.asarray(feats[name], dtype=np.float32).reshape(len(images), -1))
        bar.update(stop - start)
    bar.close()
    for c in consumers:
        out.arrays[c.key] = {}
        for name in c.keep:
            parts = kept[c.key][name]
            out.arrays[c.key][name] = (np.concatenate(parts, axis=0) if parts
                                       else np.zeros((0, 0), dtype=np.float32))
    return out


def merge_shards(parts: Sequence[Extracted]) -> Extracted:
    """Combine per-process results, in rank order (rows stay in file order)."""
    merged = Extracted(count=sum(p.count for p in parts))
    keys = parts[0].arrays.keys() | parts[0].stats.keys()
    for key in keys:
        merged.stats[key] = {}
        for name in parts[0].stats.get(key, {}):
            total = M.FeatureStatistics()
            for p in parts:
                total.merge(p.stats[key][name])
            merged.stats[key][name] = total
        merged.arrays[key] = {}
        for name in parts[0].arrays.get(key, {}):
            pieces = [p.arrays[key][name] for p in parts if p.count > 0]
            merged.arrays[key][name] = np.concatenate(pieces, axis=0)
    return merged


def _to_wire(part: Extracted) -> dict:
    return {"count": part.count, "arrays": part.arrays,
            "stats": {k: {n: s.state() if s.dim is not None else None for n, s in v.items()}
                      for k, v in part.stats.items()}}


def _from_wire(obj: dict) -> Extracted:
    stats = {k: {n: (M.FeatureStatistics.from_state(s) if s is not None else M.FeatureStatistics())
                 for n, s in v.items()} for k, v in obj["stats"].items()}
    return Extracted(arrays=obj["arrays"], stats=stats, count=obj["count"])


def extract_features(reader, consumers: Sequence[Consumer], batch_size: int,
                     dist: Optional[Distributed] = None, progress: bool = True,
                     desc: str = "features") -> Extracted:
    """All rows of ``reader``, sharded over ``dist``'s processes and gathered (every process gets the result)."""
    dist = dist or Distributed()
    rows = shard_range(len(reader), dist.rank, dist.world_size)
    part = extract_shard(reader, consumers, rows, batch_size, progress=progress and dist.is_main,
                         desc=f"{desc} (rank {dist.rank}/{dist.world_size})" if dist.world_size > 1 else desc)
    if dist.world_size == 1:
        return part
    return merge_shards([_from_wire(p) for p in dist.gather(_to_wire(part))])


# ---------------------------------------------------------------------------
# reference batch
# ---------------------------------------------------------------------------


@dataclass
class ReferenceBatch:
    path: Path
    sha256: str
    images: NpzArrayReader
    statistics: Dict[str, Optional[Tuple[np.ndarray, np.ndarray]]]


def load_reference_batch(path, resolution: int, expected_sha256: Optional[str] = None,
                         num_images: Optional[int] = None, url: Optional[str] = None) -> ReferenceBatch:
    """An ADM reference batch: ``arr_0`` (checked against the track's resolution) and its statistics.

    ``mu``/``sigma`` (pool, 2048) and ``mu_s``/``sigma_s`` (spatial, 2023) are used when present
    (ADM's ``read_statistics``); a missing pair is computed from ``arr_0`` later.  The file's sha256
    is checked against ``expected_sha256`` when the track pins one.
    """
    path = Path(path)
    if not path.is_file():
        raise ReferenceFileError(
            f"{path}: reference batch not found; download it from "
            + (url or "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/ "
               "(ADM's reference batches, e.g. imagenet/256/VIRTUAL_imagenet256_labeled.npz)"))
    sha = sha256_file(path)
    if expected_sha256 and sha != str(expected_sha256).lower():
        raise ReferenceFileError(f"{path}: sha256 {sha} does not match the track's {expected_sha256}; "
                                 "the reference batch is corrupt or not the expected one")
    images = open_image_batch(path, resolution, 3, num_images, error=ReferenceFileError, what="reference images")
    if not expected_sha256:  # no pin to vouch for the bytes: at least the zip's own checksum
        images.verify_checksum()
    stats: Dict[str, Optional[Tuple[np.ndarray, np.ndarray]]] = {}
    for name, (mu_key, sigma_key), dim in (("pool", ("mu", "sigma"), POOL_DIM),
                                           ("spatial", ("mu_s", "sigma_s"), SPATIAL_DIM)):
        mu, sigma = images.read_other(mu_key), images.read_other(sigma_key)
        if mu is None and sigma is None:
            stats[name] = None
            continue
        if mu is None or sigma is None:
            raise ReferenceFileError(f"{path}: has {mu_key if mu is not None else sigma_key} but not "
                                     f"{sigma_key if mu is not None else mu_key}")
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise ReferenceFileError(f"{path}: {mu_key}/{sigma_key} have shapes {mu.shape}/{sigma.shape}, "
                                     f"expected ({dim},)/({dim}, {dim})")
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
            raise ReferenceFileError(f"{path}: {mu_key}/{sigma_key} contain non-finite values")
        stats[name] = (mu.astype(np.float64), sigma.astype(np.float64))
    return ReferenceBatch(path, sha, images, stats)


def evaluation_code_sha256() -> str:
    """A digest of evaluations/*.py, the code that turns images into features: a cache shared by
    several checkouts ($SPEEDRUN_EVAL_CACHE) is not reused by code that may compute other features."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def reference_features(reference: ReferenceBatch, consumers: Sequence[Consumer], batch_size: int,
                       cache_dir: Optional[Path] = None, dist: Optional[Distributed] = None,
                       progress: bool = True) -> Tuple[Extracted, bool]:
    """Reference features, from the cache when the same file was seen with the same networks.

    Returns ``(features, from_cache)``.  The cache key is the reference file's sha256 plus every
    consumer's identity (network, weights sha256, backend, kept/accumulated features) and the
    evaluation code's digest.
    """
    dist = dist or Distributed()
    identity = {"format": CACHE_FORMAT, "code_sha256": evaluation_code_sha256(),
                "reference_sha256": reference.sha256, "count": len(reference.images),
                "consumers": [{"key": c.key, "keep": list(c.keep), "stats": list(c.stats),
                               "extractor": getattr(c.extractor, "identity", {"name": c.extractor.name})}
                              for c in consumers]}
    key = _identity_key(identity)
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(
        os.environ.get("SPEEDRUN_EVAL_CACHE", DEFAULT_CACHE_DIR))
    cache = cache_dir / f"reference-{reference.sha256[:16]}-{key[:16]}.npz"
    cacheable = all(getattr(c.extractor, "identity", {}).get("weights_sha256") for c in consumers)
    loaded = _load_cache(cache, key, consumers) if cacheable and cache.is_file() else None
    # one decision for every rank: the extraction gathers across ranks, and a rank that skipped it
    # (a node-local cache, a cache written between two ranks' checks) would pair its next gather
    # (the samples') with the others' reference gather
    if all(dist.gather(loaded is not None)):
        return loaded, True
    out = extract_features(reference.images, consumers, batch_size, dist, progress, desc="reference")
    if cacheable and dist.is_main:
        try:
            _save_cache(cache, key, identity, out)
        except OSError as e:  # the cache only saves time: a full disk or a read-only checkout keeps the scores
            print(f"[evaluate] reference features not cached ({e}); scoring goes on", file=sys.stderr, flush=True)
    return out, False


def _save_cache(path: Path, key: str, identity: dict, ext: Extracted) -> None:
    arrays = {"key": np.array(key), "identity": np.array(json.dumps(identity, sort_keys=True)),
              "count": np.array(ext.count)}
    for k, named in ext.arrays.items():
        for n, a in named.items():
            arrays[f"arrays/{k}/{n}"] = a
    for k, named in ext.stats.items():
        for n, s in named.items():
            st = s.state()
            arrays[f"stats/{k}/{n}/count"] = st["count"]
            arrays[f"stats/{k}/{n}/mean"] = st["mean"]
            arrays[f"stats/{k}/{n}/m2"] = st["m2"]
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
    atomic_write(path, write)


def _load_cache(path: Path, key: str, consumers: Sequence[Consumer]) -> Optional[Extracted]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            out = Extracted(count=int(data["count"]))
            for c in consumers:
                out.arrays[c.key] = {n: np.asarray(data[f"arrays/{c.key}/{n}"]) for n in c.keep}
                out.stats[c.key] = {n: M.FeatureStatistics.from_state(
                    {"count": data[f"stats/{c.key}/{n}/count"], "mean": data[f"stats/{c.key}/{n}/mean"],
                     "m2": data[f"stats/{c.key}/{n}/m2"]}) for n in c.stats}
            return out
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # unreadable, damaged or stale cache: recompute


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------


def compute_imagenet_metrics(sample: Extracted, reference: Extracted,
                             reference_statistics: Dict[str, Optional[Tuple[np.ndarray, np.ndarray]]],
                             protocol: dict, device=None) -> Dict[str, float]:
    """FID, sFID, IS, precision, recall (and KDD when DINOv2 features are there) from extracted features."""
    from threadpoolctl import threadpool_limits

    out: Dict[str, float] = {}
    inc_s, inc_r = sample.stats["inception"], reference.stats["inception"]
    for metric, name in (("fid", "pool"), ("sfid", "spatial")):
        ref = reference_statistics.get(name)
        if ref is None:
            ref = (inc_r[name].mean(), inc_r[name].covariance())
        if ref[0].shape[0] != inc_s[name].dim:
            raise ValueError(f"reference {name} statistics are {ref[0].shape[0]}-d, the samples' "
                             f"{inc_s[name].dim}-d (different feature networks?)")
        # one BLAS thread: ~1.7 s at d = 2048; multithreaded LAPACK (dsytrd) on a shared machine can
        # stall on descheduled threads (measured on 2 busy cores: 25 s with 2 OpenBLAS threads)
        with threadpool_limits(limits=1, user_api="blas"):
            out[metric] = M.frechet_distance(inc_s[name].mean(), inc_s[name].covariance(), ref[0], ref[1])
    out["is"], out["is_std"] = M.inception_score(
        sample.arrays["inception"]["logits"],
        split_size=int(protocol.get("inception_score_split_size", ADM_IS_SPLIT_SIZE)))
    # float16 distances as ADM; the float16 product is a float32-accumulated GEMM of the float16
    # inputs: 3-6x faster than PyTorch's float16 GEMM on CPUs, and on GPUs it rules out cuBLAS's
    # reduced-precision (float16) split-K reductions; float16 values are exact in float32 and TF32
    mode = protocol.get("precision_recall_fp16_matmul", "fp32_accumulate")
    out["precision"], out["recall"] = M.precision_recall(
        reference.arrays["inception"]["pool"], sample.arrays["inception"]["pool"],
        k=int(protocol.get("precision_recall_k", 3)), batch_size=int(protocol.get("precision_recall_batch", 10000)),
        device=device, fp16_matmul=mode)
    if "dinov2" in sample.arrays:
        kd = protocol.get("kernel_distance", {})
        out["kd"], out["kd_std"] = M.kernel_distance(
            reference.arrays["dinov2"]["pool"], sample.arrays["dinov2"]["pool"],
            num_subsets=int(kd.get("num_subsets", 100)), subset_size=int(kd.get("subset_size", 1000)),
            seed=int(kd.get("seed", 0)))
    return {k: float(v) for k, v in out.items()}


def build_extractors(protocol: dict, backend: Optional[str] = None, device=None,
                     inception_weights=None, dinov2_weights=None) -> Dict[str, object]:
    """The protocol's networks: ``{"inception": ..., "dinov2": ...}`` (DINOv2 only when the protocol
    has a ``kernel_distance`` block)."""
    from evaluations.features import get_feature_extractor

    inc = protocol.get("inception", {})
    out = {"inception": get_feature_extractor(
        "inception_adm", weights=inception_weights or inc.get("weights"), sha256=inc.get("sha256"),
        backend=backend or inc.get("backend", "torch"), device=device)}
    if "kernel_distance" in protocol:
        kd = protocol["kernel_distance"]
        if kd.get("feature_network", KD_NETWORK) != KD_NETWORK:
            raise ValueError(f"kernel_distance.feature_network {kd['feature_network']!r}: the ImageNet "
                             f"evaluator computes KD on {KD_NETWORK!r} features only")
        out["dinov2"] = get_feature_extractor("dinov2_vitl14", weights=dinov2_weights or kd.get("weights"),
                                              sha256=kd.get("sha256"), device=device,
                                              precision=kd.get("precision", "fp32"))
    return out


def reference_batch_path(track: dict) -> Path:
    """The track's reference batch: <dataset.dir>/<evaluation.reference>.npz."""
    protocol, data = track["evaluation"], track["dataset"]
    if not isinstance(protocol.get("reference"), str) or not data.get("dir"):
        raise ReferenceFileError(f"track {track.get('name')!r}: evaluation.reference must name the "
                                 "reference batch (a file <dataset.dir>/<name>.npz), or pass its path")
    return Path(data["dir"]) / f"{protocol['reference']}.npz"


def check_evaluation_files(track: dict) -> None:
    """Everything evaluate_imagenet will read is there and is what the track pins: the reference
    batch (sha256, shape) and the networks' weights (loaded once on the CPU). Raises the error
    evaluate_imagenet would raise, before hours of work that end in it (train.py calls this
    before training)."""
    protocol = track["evaluation"]
    reference = load_reference_batch(reference_batch_path(track), int(track["dataset"]["resolution"]),
                                     protocol.get("reference_sha256"), protocol.get("reference_num_images"),
                                     protocol.get("reference_url"))
    reference.images.close()
    build_extractors(protocol, device="cpu")


def evaluate_imagenet(samples_path, track: dict, *, extractors: Optional[Dict[str, object]] = None,
                      backend: Optional[str] = None, batch_size: Optional[int] = None, cache_dir=None,
                      reference_path=None, dist: Optional[Distributed] = None, progress: bool = True) -> dict:
    """Score a sample batch with an ImageNet track's protocol.

    ``dist`` defaults to this process alone: ``train.py`` scores on rank 0 only, so a collective
    here would wait forever.  The CLI passes ``Distributed.from_environment()`` so that
    ``accelerate launch -m evaluations.evaluate`` shards the extraction; then every process must
    call this.  Returns ``{"metrics": {...numbers}, "definitions": {"kd": ...}, "provenance":
    {...}}`` on every process (metrics on the main process only; ``None`` elsewhere).
    """
    protocol, data = track["evaluation"], track["dataset"]
    dist = dist or Distributed.single()
    resolution = int(data["resolution"])
    reference_path = reference_path or reference_batch_path(track)
    samples = open_image_batch(samples_path, resolution, 3, int(protocol["num_samples"]),
                               error=SampleFileError, what="samples")
    reference = load_reference_batch(reference_path, resolution, protocol.get("reference_sha256"),
                                     protocol.get("reference_num_images"), protocol.get("reference_url"))
    if extractors is None:
        extractors = build_extractors(protocol, backend=backend, device=dist.device)
    batch_size = int(batch_size or protocol.get("batch_size", 64))
    need_ref_stats = ("pool", "spatial")
    ref_consumers: List[Consumer] = [Consumer("inception", extractors["inception"], keep=("pool",),
                                              stats=need_ref_stats)]
    sample_consumers: List[Consumer] = [Consumer("inception", extractors["inception"], keep=("pool", "logits"),
                                                 stats=("pool", "spatial"))]
    if extractors.get("dinov2") is not None:
        ref_consumers.append(Consumer("dinov2", extractors["dinov2"], keep=("pool",)))
        sample_consumers.append(Consumer("dinov2", extractors["dinov2"], keep=("pool",)))
    try:
        ref, from_cache = reference_features(reference, ref_consumers, batch_size, cache_dir, dist, progress)
        sample = extract_features(samples, sample_consumers, batch_size, dist, progress, desc="samples")
        if dist.is_main:
            samples.verify_checksum()
    finally:
        samples.close()
        reference.images.close()
    report = {"metrics": None, "definitions": {}, "provenance": {
        "reference": {"path": str(reference.path), "sha256": reference.sha256,
                      "statistics": {k: ("from the reference file" if v is not None else "computed from arr_0")
                                     for k, v in reference.statistics.items()},
                      "features_from_cache": from_cache},
        "networks": {k: getattr(v, "identity", {}) for k, v in extractors.items() if v is not None},
        "processes": dist.world_size, "batch_size": batch_size}}
    if "dinov2" in sample.arrays:
        report["definitions"]["kd"] = kd_definition(protocol)
    if dist.is_main:
        report["metrics"] = compute_imagenet_metrics(sample, ref, reference.statistics, protocol,
                                                     device=dist.device)
    return report
