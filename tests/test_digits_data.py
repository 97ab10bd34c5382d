"""The digits dataset, the shard format v1 and the identity encoder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing import digits
from preprocessing.encoders import IdentityEncoder, get_encoder
from preprocessing.shards import (
    FORMAT,
    ShardDataset,
    ShardFormatError,
    read_manifest,
    write_dataset,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "digits"
    manifest_path = digits.build_digits(root)
    assert manifest_path == root / "manifest.json"
    return root


@pytest.fixture(scope="module")
def source():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target)


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def _files(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_split_counts_and_stratification(built):
    train = ShardDataset(built, "train")
    held = ShardDataset(built, "heldout")
    assert len(train) == digits.TRAIN_COUNT == 1297
    assert len(held) == digits.HELDOUT_COUNT == 500
    assert np.bincount(held.labels, minlength=10).tolist() == [50] * 10
    assert train.num_classes == held.num_classes == 10
    assert train.image_shape == (8, 8, 1)
    assert train.latent_shape == (1, 8, 8)
    assert train.labels.dtype == np.int64
    assert train.num_shards == 2  # 1297 images at 1024 per shard


def test_split_indices_partition_and_rule(source):
    _, labels = source
    train_idx, held_idx = digits.split_indices(labels)
    assert len(np.intersect1d(train_idx, held_idx)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, held_idx])), np.arange(1797))
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(held_idx) > 0)
    # The documented rule, re-implemented independently.
    rng = np.random.Generator(np.random.PCG64(20261125))
    expected = []
    for c in range(10):
        expected += list(rng.permutation(np.sort(np.where(labels == c)[0]))[:50])
    assert np.array_equal(held_idx, np.sort(np.array(expected)))


def test_contents_match_source(built, source):
    values, labels = source
    expected = np.array(
        [round(float(v) * 255 / 16) for v in values.reshape(-1)], dtype=np.uint8
    ).reshape(-1, 8, 8, 1)
    train_idx, held_idx = digits.split_indices(labels)
    for split, idx in (("train", train_idx), ("heldout", held_idx)):
        ds = ShardDataset(built, split)
        images = ds.get_images(np.arange(len(ds)))
        assert images.dtype == np.uint8 and images.shape == (len(idx), 8, 8, 1)
        assert np.array_equal(images, expected[idx])
        assert np.array_equal(ds.labels, labels[idx])
        latents = ds.get_latents(np.arange(len(ds)))
        assert latents.dtype == np.float32 and latents.shape == (len(idx), 1, 8, 8)
        assert np.array_equal(latents, expected[idx].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)


def test_reference_batch(built):
    held = ShardDataset(built, "heldout")
    with np.load(built / "reference.npz", allow_pickle=False) as ref:
        assert sorted(ref.files) == ["arr_0", "labels"]
        assert ref["arr_0"].dtype == np.uint8 and ref["arr_0"].shape == (500, 8, 8, 1)
        assert np.array_equal(ref["arr_0"], held.get_images(np.arange(500)))
        assert np.array_equal(ref["labels"], held.labels)


def test_manifest_fields_and_checksums(built):
    text = (built / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    assert manifest["format"] == FORMAT == "speedrun-shards-v1"
    assert manifest["name"] == "digits"
    assert manifest["resolution"] == 8 and manifest["image_channels"] == 1
    assert manifest["latent_shape"] == [1, 8, 8]
    assert manifest["latent_encoder"] == "identity" and manifest["latent_scale"] == 1.0
    assert manifest["class_names"] == [str(i) for i in range(10)]
    assert manifest["metadata"]["split_seed"] == digits.SPLIT_SEED
    n_files = 0
    for split, record in manifest["splits"].items():
        assert record["count"] == sum(s["count"] for s in record["shards"])
        for shard in record["shards"]:
            for kind in ("images", "latents", "labels"):
                entry = shard[kind]
                data = (built / entry["path"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == entry["sha256"]
                assert entry["shape"][0] == shard["count"]
                n_files += 1
    assert n_files == 9
    ref = manifest["extras"]["reference.npz"]
    assert hashlib.sha256((built / "reference.npz").read_bytes()).hexdigest() == ref["sha256"]


def test_rebuild_is_byte_identical(built, tmp_path):
    other = tmp_path / "again"
    digits.build_digits(other)
    assert _files(other) == _files(built)
    # Rebuilding in place over an existing dataset is also identical and leaves no temp dirs.
    digits.build_digits(other)
    assert _files(other) == _files(built)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_tampered_shard_is_rejected(built, tmp_path):
    root = _copy(built, tmp_path)
    path = root / "train" / "images-00001.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match="checksum mismatch") as info:
        ShardDataset(root, "train", verify=True)
    assert str(path) in str(info.value)
    # Other splits are unaffected; without verification the shard still opens.
    ShardDataset(root, "heldout", verify=True)
    assert len(ShardDataset(root, "train", verify=False)) == 1297
    # ensure_digits notices and rebuilds.
    digits.ensure_digits(root)
    ShardDataset(root, "train", verify=True)


def test_missing_file_is_rejected(built, tmp_path):
    root = _copy(built, tmp_path)
    path = root / "heldout" / "latents-00000.npy"
    path.unlink()
    for verify in (True, False):
        with pytest.raises(ShardFormatError, match="missing file") as info:
            ShardDataset(root, "heldout", verify=verify)
        assert str(path) in str(info.value)


def test_corrupt_manifest_and_wrong_dtype(built, tmp_path):
    root = _copy(built, tmp_path)
    manifest_path = root / "manifest.json"
    good = manifest_path.read_text()
    manifest_path.write_text(good[: len(good) // 2])
    with pytest.raises(ShardFormatError, match="corrupt manifest") as info:
        ShardDataset(root, "train")
    assert str(manifest_path) in str(info.value)
    manifest_path.write_text(good.replace("speedrun-shards-v1", "speedrun-shards-v0"))
    with pytest.raises(ShardFormatError, match="format"):
        read_manifest(root)
    manifest_path.write_text(good)
    with pytest.raises(ShardFormatError, match="no split"):
        ShardDataset(root, "validation")
    labels_path = root / "heldout" / "labels-00000.npy"
    np.save(labels_path, np.load(labels_path).astype(np.int32))
    with pytest.raises(ShardFormatError, match="wrong dtype") as info:
        ShardDataset(root, "heldout", verify=False)
    assert str(labels_path) in str(info.value)
    with pytest.raises(ShardFormatError, match="mismatch"):
        ShardDataset(root, "heldout", verify=True)


def test_ensure_digits_skips_valid_dataset(built, tmp_path, capsys):
    root = _copy(built, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert digits.ensure_digits(root) == root / "manifest.json"
    assert digits.main(["--out", str(root)]) == 0
    assert "skipping" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_write_dataset_refuses_foreign_directory(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    images = np.zeros((3, 4, 4, 1), dtype=np.uint8)
    with pytest.raises(FileExistsError):
        write_dataset(target, "x", {"train": (images, np.zeros(3, dtype=np.int64))}, "identity", ["a"])
    assert (target / "notes.txt").read_text() == "keep me"


def test_identity_round_trip_exact():
    enc = get_encoder("identity")
    assert isinstance(enc, IdentityEncoder) and enc.name == "identity" and enc.scale == 1.0
    assert enc.latent_shape((8, 8, 1)) == (1, 8, 8)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    all_values = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    for batch in (images, all_values):
        latents = enc.encode(batch)
        assert isinstance(latents, np.ndarray) and latents.dtype == np.float32
        assert latents.shape == (batch.shape[0], batch.shape[3], batch.shape[1], batch.shape[2])
        assert latents.min() >= -1.0 and latents.max() <= 1.0
        decoded = enc.decode(torch.from_numpy(latents))
        assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == batch.shape
        assert np.array_equal(decoded.numpy(), batch)
        # torch in -> torch out
        t = enc.encode(torch.from_numpy(batch))
        assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(latents))
    # decode clamps out-of-range latents and rounds to nearest (the one exact tie, 0.0 ->
    # 127.5, goes to the even 128); numpy latents are accepted too.
    x = torch.tensor([-2.0, 2.0, 0.0, -1.0 + 0.3 / 127.5, -1.0 + 0.7 / 127.5]).reshape(1, 1, 1, 5)
    assert enc.decode(x).reshape(-1).tolist() == [0, 255, 128, 0, 1]
    assert enc.decode(x.numpy()).reshape(-1).tolist() == [0, 255, 128, 0, 1]
    with pytest.raises(ValueError):
        enc.encode(images.astype(np.float32))
    with pytest.raises(ValueError):
        get_encoder("nope")


def test_indices_span_shards(tmp_path, source):
    _, labels = source
    train_idx, _ = digits.split_indices(labels)
    digits.build_digits(tmp_path / "small", shard_size=100)
    ds = ShardDataset(tmp_path / "small", "train")
    ref = ShardDataset(tmp_path / "small", "train")
    assert ds.num_shards == 13
    full_images = np.concatenate([np.asarray(a) for a in ds._images])
    full_latents = np.concatenate([np.asarray(a) for a in ds._latents])
    idx = np.array([1296, 0, 99, 100, 101, 550, 99, 1200, 7, 1296, -1])
    images = ds.get_images(idx)
    latents = ds.get_latents(idx)
    assert images.dtype == np.uint8 and images.shape == (len(idx), 8, 8, 1)
    assert latents.dtype == np.float32 and latents.shape == (len(idx), 1, 8, 8)
    assert np.array_equal(images, full_images[idx])
    assert np.array_equal(latents, full_latents[idx])
    assert np.array_equal(latents, IdentityEncoder().encode(images))
    assert np.array_equal(ds.get_images(slice(95, 205)), full_images[95:205])
    assert ds.get_images([]).shape == (0, 8, 8, 1)
    # Same content as the default (two-shard) layout.
    big = digits.build_digits(tmp_path / "big")
    big_ds = ShardDataset(big.parent, "train")
    assert np.array_equal(big_ds.get_images(idx), images)
    assert np.array_equal(big_ds.labels, ref.labels)
    with pytest.raises(IndexError):
        ds.get_images([1297])
