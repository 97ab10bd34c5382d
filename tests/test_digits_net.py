"""The digits metric network, its committed weights and the feature-extractor interface."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluations import digits_net
from evaluations.digits_net import (
    DEFAULT_WEIGHTS_PATH,
    DIGITS_NET_HELDOUT_ACCURACY,
    DIGITS_NET_SHA256,
    load_digits_net,
    read_metadata,
    train_digits_net,
)
from evaluations.features import (
    DigitsFeatureExtractor,
    FeatureExtractor,
    available_feature_extractors,
    get_feature_extractor,
)
from preprocessing import digits
from preprocessing.shards import ShardDataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "digits"
    digits.build_digits(root)
    return root


@pytest.fixture(scope="module")
def heldout(data_dir):
    ds = ShardDataset(data_dir, "heldout")
    return ds.get_images(np.arange(len(ds))), np.array(ds.labels)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return get_feature_extractor("digits_net")


def test_committed_weights_checksum_and_metadata():
    assert DEFAULT_WEIGHTS_PATH.is_file()
    data = DEFAULT_WEIGHTS_PATH.read_bytes()
    assert hashlib.sha256(data).hexdigest() == DIGITS_NET_SHA256
    assert len(data) < 200_000
    meta = read_metadata(DEFAULT_WEIGHTS_PATH)
    assert meta["architecture"] == digits_net.ARCH_VERSION
    assert meta["train_seed"] == digits_net.TRAIN_SEED
    assert meta["train_split"] == "train"
    assert meta["heldout_accuracy"] == pytest.approx(DIGITS_NET_HELDOUT_ACCURACY)
    model = load_digits_net()
    assert not model.training
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())


def test_corrupted_copy_is_rejected(tmp_path):
    bad = tmp_path / "digits_net.safetensors"
    shutil.copyfile(DEFAULT_WEIGHTS_PATH, bad)
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0x01  # flip one bit of the last weight
    bad.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ValueError) as info:
        load_digits_net(bad)
    message = str(info.value)
    assert str(bad) in message and actual in message and DIGITS_NET_SHA256 in message
    # Explicitly unverified loading is possible (e.g. for a freshly retrained file).
    load_digits_net(bad, verify=False)
    with pytest.raises(ValueError, match=str(bad)):
        DigitsFeatureExtractor(path=bad)


def test_missing_weights_say_how_to_recreate(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        load_digits_net(missing)
    assert str(missing) in str(info.value)
    assert "python -m evaluations.digits_net train" in str(info.value)


def test_heldout_accuracy(heldout, extractor):
    images, labels = heldout
    feats = extractor.extract(images, batch_size=128)
    accuracy = float((feats["logits"].argmax(1) == labels).mean())
    assert accuracy >= 0.95
    assert abs(accuracy - DIGITS_NET_HELDOUT_ACCURACY) <= 0.01


def test_output_shapes(heldout, extractor):
    images = heldout[0][:37]
    assert isinstance(extractor, DigitsFeatureExtractor)
    assert extractor.name == "digits_net" and "digits_net" in available_feature_extractors()
    assert extractor.input_resolution == 8 and extractor.input_channels == 1
    feats = extractor.extract(images, batch_size=10)
    assert feats["pool"].shape == (37, 64)
    assert feats["logits"].shape == (37, 10)
    assert feats["spatial"].shape == (37, 16, 64)
    assert all(v.dtype == np.float64 for v in feats.values())
    np.testing.assert_allclose(feats["spatial"].mean(axis=1), feats["pool"], rtol=1e-5, atol=1e-6)
    # Batching does not change the result.
    again = extractor.extract(images, batch_size=37)
    np.testing.assert_allclose(again["pool"], feats["pool"], rtol=1e-6, atol=1e-6)
    # The raw module interface.
    out = load_digits_net()(digits_net.preprocess(images))
    assert set(out) == {"pool", "logits", "spatial"}
    assert tuple(out["pool"].shape) == (37, 64)


def test_extractor_validates_input(heldout, extractor):
    images = heldout[0][:4]
    with pytest.raises(ValueError, match="uint8"):
        extractor.extract(images.astype(np.float32))
    with pytest.raises(ValueError, match="channel"):
        extractor.extract(np.repeat(images, 3, axis=3))
    with pytest.raises(ValueError, match="8x8"):
        extractor.extract(np.zeros((4, 16, 16, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match="rank-4"):
        extractor.extract(images[..., 0])
    with pytest.raises(ValueError, match="no images"):
        extractor.extract(images[:0])
    with pytest.raises(ValueError, match="unknown feature extractor"):
        get_feature_extractor("inception-nope")


def test_training_is_deterministic(data_dir, tmp_path):
    det_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    a, info_a = train_digits_net(data_dir, epochs=1, seed=123)
    b, info_b = train_digits_net(data_dir, epochs=1, seed=123)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert info_a["heldout_accuracy"] == info_b["heldout_accuracy"]
    for info in (info_a, info_b):
        info.pop("train_seconds")
    sha_a = digits_net.save_digits_net(a, tmp_path / "a.safetensors", info_a)
    sha_b = digits_net.save_digits_net(b, tmp_path / "b.safetensors", info_b)
    assert sha_a == sha_b  # byte-identical files
    reloaded = load_digits_net(tmp_path / "a.safetensors", expected_sha256=sha_a)
    assert torch.equal(reloaded.state_dict()["conv1.weight"], sa["conv1.weight"])
    assert info_a["train_count"] == 1297 and info_a["train_split"] == "train"
    c, _ = train_digits_net(data_dir, epochs=1, seed=124)
    assert not torch.equal(c.state_dict()["fc.weight"], sa["fc.weight"])
    assert torch.are_deterministic_algorithms_enabled() == det_before
    assert torch.get_num_threads() == threads_before
