"""INVAE: architecture/key layout, random-init encode/decode at small size, checkpoint loading and checksums,
and `encode` (latents beside the images, statistics, resume, nothing lost on failure)."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from preprocessing.encode import EncodeError, encode_dataset
from preprocessing.encoders import IdentityEncoder, get_encoder
from preprocessing.invae import (
    INVAE,
    CheckpointError,
    INVAEConfig,
    INVAEEncoder,
    convert_checkpoint,
    load_invae,
)
from preprocessing.loader import ShardLoader
from preprocessing.shards import ShardDataset, verify_dataset, write_dataset

TINY = INVAEConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(2,), z_channels=4, norm_groups=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model(seed=0) -> INVAE:
    torch.manual_seed(seed)
    return INVAE(TINY).eval()


def _images(n=3, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _save_safetensors(model, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_published_architecture_layout():
    model = INVAE()  # the f16d32 defaults
    sd = model.state_dict()
    assert tuple(sd["encoder.conv_in.weight"].shape) == (128, 3, 3, 3)
    assert tuple(sd["encoder.conv_out.weight"].shape) == (64, 512, 3, 3)  # 2 x 32 latent channels
    assert tuple(sd["quant_conv.weight"].shape) == (64, 64, 1, 1)
    assert tuple(sd["post_quant_conv.weight"].shape) == (32, 32, 1, 1)
    assert tuple(sd["decoder.conv_in.weight"].shape) == (512, 32, 3, 3)
    assert tuple(sd["encoder.down.2.block.0.nin_shortcut.weight"].shape) == (256, 128, 1, 1)
    assert "encoder.down.4.attn.1.q.weight" in sd and "encoder.down.3.attn.0.q.weight" not in sd
    assert "decoder.up.4.attn.2.proj_out.bias" in sd and "decoder.up.3.attn.0.q.weight" not in sd
    assert "encoder.mid.attn_1.k.weight" in sd and "decoder.mid.block_2.conv2.weight" in sd
    assert "encoder.down.4.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert len([k for k in sd if k.startswith("encoder.down.0.block.")]) == 2 * 8  # 2 blocks per level
    assert len({k.split(".")[4] for k in sd if k.startswith("decoder.up.0.block.")}) == 3  # 3 in the decoder
    with torch.no_grad():
        mean, logvar = model.encode_moments(torch.zeros(1, 3, 32, 32))
    assert mean.shape == logvar.shape == (1, 32, 2, 2)  # 16x downsampling, 32 channels


def test_random_init_encode_decode_small():
    enc = INVAEEncoder(model=_tiny_model(), device="cpu", batch_size=2, posterior="mean")
    images = _images()
    latents = enc.encode(images)
    assert isinstance(latents, np.ndarray) and latents.dtype == np.float32 and latents.shape == (3, 4, 4, 4)
    assert enc.latent_shape((16, 16, 3)) == (4, 4, 4)
    with torch.no_grad():
        mean, _ = enc.model.encode_moments(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.testing.assert_allclose(latents, 0.3099 * mean.numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(enc.encode(images), latents)  # deterministic
    decoded = enc.decode(latents)
    assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == (3, 16, 16, 3)
    # pixels are stored as SR-DiT's generate.py stores them: 255 (x + 1) / 2, clamped, truncated
    with torch.no_grad():
        x = enc.model.decode(torch.from_numpy(latents) / 0.3099).double().permute(0, 2, 3, 1)
    expected = np.floor(np.clip(255 * (x.numpy() + 1) / 2, 0, 255)).astype(np.uint8)
    inside = (x.abs() < 0.99).numpy()
    assert inside.mean() > 0.5 and (decoded.numpy() != np.round(np.clip(127.5 * (x.numpy() + 1), 0, 255)))[inside].any()
    np.testing.assert_array_equal(decoded.numpy(), expected)
    assert torch.is_tensor(enc.encode(torch.from_numpy(images)))
    # decoded by batches of batch_size (a sampling batch of 1000 at 256 px would not fit a GPU at once)
    calls = []
    real = enc.model.decode
    enc.model.decode = lambda z: calls.append(z.shape[0]) or real(z)
    by_batches = enc.decode(latents)
    assert calls == [2, 1] and tuple(by_batches.shape) == (3, 16, 16, 3)
    np.testing.assert_array_equal(by_batches.numpy(), expected)  # the formula above, on the whole batch
    assert tuple(enc.decode(latents[:0]).shape) == (0, 16, 16, 3)
    with pytest.raises(ValueError, match="divisible"):
        enc.latent_shape((18, 18, 3))


def test_the_autoencoder_runs_in_exact_float32_without_changing_its_callers_settings(monkeypatch):
    """The sampler around decode() keeps TF32 (train.py's, as SR-DiT samples); encode() and
    decode() themselves run in float32 with deterministic cuDNN, whoever calls them."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    caller = (True, True, False, True)  # a training process's: TF32 on, cuDNN benchmarking
    monkeypatch.setattr(matmul, "allow_tf32", caller[0])
    monkeypatch.setattr(cudnn, "allow_tf32", caller[1])
    monkeypatch.setattr(cudnn, "deterministic", caller[2])
    monkeypatch.setattr(cudnn, "benchmark", caller[3])
    settings = lambda: (matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark)  # noqa: E731
    enc = INVAEEncoder(model=_tiny_model(), device="cpu", posterior="mean")
    seen = []
    for name in ("encode_moments", "decode"):
        real = getattr(enc.model, name)
        monkeypatch.setattr(enc.model, name, lambda *a, _real=real: seen.append(settings()) or _real(*a))
    enc.decode(enc.encode(_images()))
    assert seen == [(False, False, True, False)] * 2 and settings() == caller


def test_posterior_sample_is_mean_plus_std_times_content_keyed_noise():
    model = _tiny_model()
    images = _images(n=5)
    enc = INVAEEncoder(model=model, device="cpu", batch_size=2)  # the default: a posterior sample
    latents = enc.encode(images)
    with torch.no_grad():
        mean, logvar = model.encode_moments(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    # the noise, rebuilt here from its documented definition
    eps = []
    for image in images:
        digest = hashlib.sha256(b"invae-posterior|0|" + image.tobytes()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        eps.append(torch.randn(tuple(mean.shape[1:]), generator=gen))
    expected = 0.3099 * (mean + torch.exp(0.5 * logvar) * torch.stack(eps))
    np.testing.assert_allclose(latents, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(latents, 0.3099 * mean.numpy(), atol=1e-3)  # the noise is there
    # an image's latent depends on the image and the seed, not on its batch or position
    order = np.array([4, 2, 0, 3, 1])
    one_by_one = INVAEEncoder(model=model, device="cpu", batch_size=1).encode(images[order])
    np.testing.assert_allclose(one_by_one, latents[order], rtol=1e-4, atol=1e-6)
    twice = INVAEEncoder(model=model, device="cpu").encode(images[[1, 1]])
    np.testing.assert_array_equal(twice[0], twice[1])
    other_seed = INVAEEncoder(model=model, device="cpu", seed=1).encode(images)
    assert not np.allclose(other_seed, latents, atol=1e-3)
    assert (enc.describe()["posterior"], enc.describe()["posterior_seed"]) == ("sample", 0)
    mean_encoder = INVAEEncoder(model=model, device="cpu", posterior="mean", seed=3)
    assert (mean_encoder.describe()["posterior"], mean_encoder.describe()["posterior_seed"]) == ("mean", None)
    with pytest.raises(ValueError, match="posterior must be one of"):
        INVAEEncoder(model=model, device="cpu", posterior="mode")


def test_posterior_noise_is_standard_normal():
    from preprocessing.invae import posterior_noise

    images = _images(n=400, size=4)
    eps = posterior_noise(images, 0, (8, 4, 4))
    assert eps.shape == (400, 8, 4, 4) and eps.dtype == torch.float32
    eps = eps.double()
    assert abs(eps.mean().item()) < 4 / (eps.numel() ** 0.5)  # 4 standard errors
    assert abs(eps.std().item() - 1) < 0.03
    per_image = eps.reshape(400, -1)
    # different images draw independent noise: neighbours' noise is uncorrelated
    corr = (per_image[:-1] * per_image[1:]).mean(1) / (per_image[:-1].std(1) * per_image[1:].std(1))
    assert abs(corr.mean().item()) < 4 / (128 * 399) ** 0.5


def test_checkpoint_loading_checksum_and_keys(tmp_path):
    model = _tiny_model(seed=1)
    ckpt = tmp_path / "tiny.safetensors"
    digest = _save_safetensors(model, ckpt)
    loaded = load_invae(ckpt, digest, TINY)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    enc = get_encoder("invae", checkpoint=ckpt, sha256=digest.upper(), config=TINY, device="cpu")
    assert np.array_equal(enc.encode(_images()), INVAEEncoder(model=model, device="cpu").encode(_images()))
    assert enc.describe()["checkpoint_sha256"] == digest

    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_invae(ckpt, "0" * 64, TINY)
    with pytest.raises(CheckpointError, match="64-digit"):
        load_invae(ckpt, "abc", TINY)
    with pytest.raises(CheckpointError, match="needs checkpoint"):
        INVAEEncoder(checkpoint=ckpt, config=TINY)
    pt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(CheckpointError, match="only .safetensors"):
        load_invae(pt, hashlib.sha256(pt.read_bytes()).hexdigest(), TINY)
    renamed = tmp_path / "disguised.safetensors"  # a pickle under a safetensors name
    renamed.write_bytes(pt.read_bytes())
    with pytest.raises(CheckpointError, match="only .safetensors"):
        load_invae(renamed, hashlib.sha256(renamed.read_bytes()).hexdigest(), TINY)

    # a key missing / a wrong shape is named
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd.pop("encoder.mid.attn_1.q.weight")
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.mid\.attn_1\.q\.weight.*unexpected keys: extra"):
        load_invae(bad, hashlib.sha256(bad.read_bytes()).hexdigest(), TINY)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_invae(ckpt, digest, INVAEConfig(ch=8, ch_mult=(1, 2, 4), num_res_blocks=1, attn_levels=(2,),
                                             z_channels=4, norm_groups=4))


def test_convert_pickled_checkpoint(tmp_path):
    model = _tiny_model(seed=2)
    pt = tmp_path / "e2e.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pt)
    pt_sha = hashlib.sha256(pt.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        convert_checkpoint(pt, tmp_path / "x.safetensors", "f" * 64, TINY)
    assert not (tmp_path / "x.safetensors").exists()
    out = tmp_path / "e2e.safetensors"
    digest = convert_checkpoint(pt, out, pt_sha, TINY)
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest()
    loaded = load_invae(out, digest, TINY)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_checkpoint(evil, tmp_path / "evil.safetensors", None, TINY)


# --------------------------------------------------------------------------- encode a dataset


@pytest.fixture
def images_only(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(10, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=10)
    root = tmp_path / "ds"
    write_dataset(root, "tiny", {"train": (images, labels), "val": (images[:3], labels[:3])}, None,
                  ["a", "b", "c"], shard_size=4)
    return root, images


def test_encode_invae_latents_beside_images_with_stats(images_only):
    root, images = images_only
    enc = INVAEEncoder(model=_tiny_model(), device="cpu", batch_size=3)
    encode_dataset(root, enc, batch_size=3, progress=False, log=lambda *a: None)
    manifest = verify_dataset(root)
    assert manifest["latent_encoder"] == "invae" and manifest["latent_scale"] == pytest.approx(0.3099)
    assert manifest["latent_shape"] == [4, 4, 4]
    assert [s["latents"]["path"] for s in manifest["splits"]["train"]["shards"]] == [
        "train/latents-00000.npy", "train/latents-00001.npy", "train/latents-00002.npy"]
    ds = ShardDataset(root, "train")
    stored = ds.get_latents(slice(None))
    # CPU convolutions may round differently for other batch shapes: compare with a tolerance
    np.testing.assert_allclose(stored, enc.encode(images), rtol=1e-4, atol=1e-6)
    # ... but the same shard-by-shard batching reproduces the stored latents exactly
    np.testing.assert_array_equal(stored[:4], enc.encode(images[:4]))
    stats = manifest["metadata"]["latent_stats"]["train"]
    flat = stored.astype(np.float64).transpose(1, 0, 2, 3).reshape(4, -1)
    assert stats["count"] == 10 * 16
    np.testing.assert_allclose(stats["mean"], flat.mean(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["std"], flat.std(axis=1), rtol=1e-10)
    assert not (root / ".encode-state.json").exists() and not (root / "train" / ".encode").exists()
    batch = next(iter(ShardLoader(root, "train", global_batch=4, seed=0, with_images=True)))
    assert batch.latents.shape == (4, 4, 4, 4) and batch.images.dtype == torch.uint8
    with pytest.raises(EncodeError, match="--force"):
        encode_dataset(root, IdentityEncoder(), progress=False, log=lambda *a: None)
    encode_dataset(root, IdentityEncoder(), force=True, progress=False, log=lambda *a: None)
    ds = ShardDataset(root, "train")
    assert ds.latent_encoder == "identity"
    np.testing.assert_array_equal(ds.get_latents(slice(None)), IdentityEncoder().encode(images))


def test_the_trainer_takes_only_shards_encoded_as_the_track_says(images_only):
    from train import ConfigError, check_dataset_fits_track

    root, _ = images_only
    track = {"name": "t", "dataset": {"encoder": "invae", "latent_shape": [4, 4, 4], "resolution": 16,
                                      "channels": 3, "num_classes": 3, "encoder_posterior": "sample",
                                      "encoder_checkpoint_sha256": None}}
    with pytest.raises(ConfigError, match="has no latents yet: run python -m preprocessing encode"):
        check_dataset_fits_track(ShardDataset(root, "train"), track)
    encode_dataset(root, INVAEEncoder(model=_tiny_model(), device="cpu"), progress=False, log=lambda *a: None)
    check_dataset_fits_track(ShardDataset(root, "train"), track)  # a posterior sample, as pinned
    for field, value, message in [("encoder_posterior", "mean", "encoder posterior sample (the track's: mean)"),
                                  ("encoder_checkpoint_sha256", "ab" * 32,
                                   f"encoder checkpoint_sha256 None (the track's: {'ab' * 32})"),
                                  ("num_classes", 1000, "number of classes 3 (the track's: 1000)"),
                                  ("encoder", "identity", "latent encoder invae (the track's: identity)")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_dataset_fits_track(ShardDataset(root, "train"), track | {
                "dataset": track["dataset"] | {field: value}})


def test_samples_decode_with_the_checkpoint_that_encoded_the_training_data(images_only, tmp_path, monkeypatch):
    """train.py records the INVAE checkpoint's sha256 (from the manifest) in the model; sampling
    decodes with $SPEEDRUN_INVAE_WEIGHTS only when it is that file, and a run that could not
    decode its samples is refused before training."""
    import generate
    import train

    root, _ = images_only
    monkeypatch.setitem(INVAEEncoder.__init__.__kwdefaults__, "config", TINY)  # the published architecture, shrunk
    vae = _tiny_model()
    path = tmp_path / "vae.safetensors"
    digest = _save_safetensors(vae, path)
    encode_dataset(root, INVAEEncoder(path, digest, device="cpu"), progress=False, log=lambda *a: None)
    assert train.latent_encoder_info(ShardDataset(root, "train"))["checkpoint_sha256"] == digest
    track = {"name": "t", "dataset": {"encoder": "invae", "latent_shape": [4, 4, 4], "resolution": 16,
                                      "channels": 3, "num_classes": 3},
             "evaluation": {"sampler": "euler", "num_steps": 2, "num_samples": 4, "seed": 0, "labels": "balanced"}}
    torch.manual_seed(0)
    model = train.SiT("SiT-Digits/2", 4, 4, 3)
    model.autoencoder_sha256 = digest
    monkeypatch.delenv("SPEEDRUN_INVAE_WEIGHTS", raising=False)
    with pytest.raises(train.ConfigError, match=rf"could not sample .* set \$SPEEDRUN_INVAE_WEIGHTS .*sha256 {digest}"):
        train.check_run_can_finish(track, model, is_main=False)
    with pytest.raises(ValueError, match="SPEEDRUN_INVAE_WEIGHTS"):
        generate.generate_to_npz(model, track, track["evaluation"], tmp_path / "s.npz")
    other = tmp_path / "other.safetensors"
    _save_safetensors(_tiny_model(seed=1), other)
    monkeypatch.setenv("SPEEDRUN_INVAE_WEIGHTS", str(other))
    with pytest.raises(train.ConfigError, match="other.safetensors.*checksum mismatch"):  # not the data's INVAE
        train.check_run_can_finish(track, model, is_main=False)
    assert not (tmp_path / "s.npz").exists()
    monkeypatch.setenv("SPEEDRUN_INVAE_WEIGHTS", str(path))
    train.check_run_can_finish(track, model, is_main=False)
    generate.generate_to_npz(model, track, track["evaluation"], tmp_path / "s.npz")
    latents, _ = generate.sample_latents(model, range(4), (4, 4, 4), 3, track["evaluation"])
    with np.load(tmp_path / "s.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], INVAEEncoder(model=vae, device="cpu").decode(latents).numpy())
    # the exported model keeps the digest; a model without one cannot be decoded
    train.export_model(tmp_path / "m.safetensors", model, train.Config(model="SiT-Digits/2"), track)
    assert train.load_model(tmp_path / "m.safetensors")[0].autoencoder_sha256 == digest
    model.autoencoder_sha256 = None
    with pytest.raises(train.ConfigError, match="records no INVAE checkpoint sha256"):
        train.check_run_can_finish(track, model, is_main=False)


def test_encode_failure_loses_nothing_and_resumes(images_only):
    root, images = images_only
    manifest_before = (root / "manifest.json").read_bytes()

    class Flaky(IdentityEncoder):
        calls = 0

        def encode(self, batch):
            Flaky.calls += 1
            if Flaky.calls == 3:
                raise RuntimeError("simulated crash")
            return super().encode(batch)

    with pytest.raises(RuntimeError, match="simulated crash"):
        encode_dataset(root, Flaky(), batch_size=4, progress=False, log=lambda *a: None)
    assert (root / "manifest.json").read_bytes() == manifest_before  # still a valid images-only dataset
    verify_dataset(root)
    state = json.loads((root / ".encode-state.json").read_text())
    assert sorted(state["done"]["train"]) == ["0", "1"]

    class Counting(IdentityEncoder):
        seen = 0

        def encode(self, batch):
            Counting.seen += len(batch)
            return super().encode(batch)

    encode_dataset(root, Counting(), batch_size=4, progress=False, log=lambda *a: None)
    assert Counting.seen == 10 - 8 + 3  # train shard 2 (2 images) + val (3); shards 0 and 1 were kept
    np.testing.assert_array_equal(ShardDataset(root, "train").get_latents(slice(None)),
                                  IdentityEncoder().encode(images))


def test_cli_encode(images_only):
    import subprocess
    import sys
    from pathlib import Path

    root, images = images_only
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "preprocessing", "encode", str(root), "--no-progress"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)  # invae without a checkpoint
    assert proc.returncode == 2 and "--vae-sha256" in proc.stderr
    proc = subprocess.run(cmd + ["--encoder", "invae", "--vae", str(root / "none.safetensors"),
                                 "--vae-sha256", "0" * 64], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 2 and "checkpoint file not found" in proc.stderr
    proc = subprocess.run(cmd + ["--encoder", "identity"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(ShardDataset(root, "val").get_latents(slice(None)),
                                  IdentityEncoder().encode(images[:3]))
