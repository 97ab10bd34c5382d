"""The PyTorch port of the ADM Inception graph, without TensorFlow.

Checked against independent references: the TF1 resize formula written out in numpy loops,
torchvision's Inception-v3 (an independent implementation of the same architecture) for every
conv unit's kernel and widths, and explicit recomputations of the head and the sFID flatten order.
The TF parity tests are in test_inception_tf.py.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import random_inception
from evaluations import inception as I
from evaluations.features import get_feature_extractor
from evaluations.weights import WeightsFileError


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------
# TF1 resize
# ---------------------------------------------------------------------------


def tf1_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 resize_bilinear (align_corners=False, half_pixel_centers=False), one pixel at a time."""
    n, in_h, in_w, c = img.shape
    out = np.zeros((n, out_h, out_w, c))
    sy = np.float32(in_h) / np.float32(out_h)
    sx = np.float32(in_w) / np.float32(out_w)
    for y in range(out_h):
        fy = float(np.float32(y) * sy)
        y0, y1 = int(math.floor(fy)), min(int(math.ceil(fy)), in_h - 1)
        ly = fy - math.floor(fy)
        for x in range(out_w):
            fx = float(np.float32(x) * sx)
            x0, x1 = int(math.floor(fx)), min(int(math.ceil(fx)), in_w - 1)
            lx = fx - math.floor(fx)
            top = img[:, y0, x0] + (img[:, y0, x1] - img[:, y0, x0]) * lx
            bottom = img[:, y1, x0] + (img[:, y1, x1] - img[:, y1, x0]) * lx
            out[:, y, x] = top + (bottom - top) * ly
    return out


@pytest.mark.parametrize("shape,out", [((2, 5, 7, 3), (9, 4)), ((1, 8, 8, 3), (13, 13)),
                                       ((1, 40, 31, 3), (17, 23)), ((1, 6, 6, 3), (6, 6))])
def test_resize_matches_tf1_formula(shape, out):
    img = np.random.default_rng(0).integers(0, 256, shape).astype(np.float64)
    got = I.tf1_resize_bilinear(torch.from_numpy(img).float(), out).numpy()
    np.testing.assert_allclose(got, tf1_resize_reference(img, *out), rtol=0, atol=2e-4)


def test_resize_uses_tf1_corner_convention_not_half_pixel():
    """[0, 1] -> 4 pixels: TF1 samples src = dst * 2/4 = 0, .5, 1, 1.5 (clamped) -> 0, .5, 1, 1.
    PyTorch's half-pixel bilinear gives 0, .25, .75, 1."""
    row = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1).expand(1, 2, 2, 1)
    got = I.tf1_resize_bilinear(row, (2, 4))[0, 0, :, 0].tolist()
    assert got == [0.0, 0.5, 1.0, 1.0]
    half_pixel = torch.nn.functional.interpolate(row.permute(0, 3, 1, 2), size=(2, 4), mode="bilinear",
                                                 align_corners=False)[0, 0, 0].tolist()
    assert half_pixel == [0.0, 0.25, 0.75, 1.0]


def test_downsampling_has_no_antialias():
    """512 -> 299: every output pixel mixes at most the 2x2 source pixels around src = dst * 512/299."""
    img = torch.zeros(1, 512, 512, 3)
    img[0, 1::2] = 255.0  # odd rows white: an antialiasing filter would average towards 127.5
    got = I.tf1_resize_bilinear(img, (299, 299))[0, :, 0, 0].numpy()
    src = (np.arange(299, dtype=np.float32) * np.float32(512 / 299)).astype(np.float64)
    y0 = np.floor(src).astype(int)
    frac = src - y0
    expected = np.where(y0 % 2 == 1, 255.0 * (1 - frac), 255.0 * frac)
    np.testing.assert_allclose(got, expected, atol=2e-3)


# ---------------------------------------------------------------------------
# architecture
# ---------------------------------------------------------------------------


def _torchvision_name(tf_name: str) -> str:
    """TF node name -> torchvision Inception-v3 module (the mapping torch-fidelity documents)."""
    stem = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
    if tf_name in stem:
        return stem[tf_name]
    blocks = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
              "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
              "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
    block, rest = tf_name.split("/", 1)
    kind = {"mixed": "A", "mixed_1": "A", "mixed_2": "A", "mixed_3": "B", "mixed_8": "D",
            "mixed_9": "E", "mixed_10": "E"}.get(block, "C")
    table = {
        "A": {"conv": "branch1x1", "tower/conv": "branch5x5_1", "tower/conv_1": "branch5x5_2",
              "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
              "tower_1/conv_2": "branch3x3dbl_3", "tower_2/conv": "branch_pool"},
        "B": {"conv": "branch3x3", "tower/conv": "branch3x3dbl_1", "tower/conv_1": "branch3x3dbl_2",
              "tower/conv_2": "branch3x3dbl_3"},
        "C": {"conv": "branch1x1", "tower/conv": "branch7x7_1", "tower/conv_1": "branch7x7_2",
              "tower/conv_2": "branch7x7_3", "tower_1/conv": "branch7x7dbl_1", "tower_1/conv_1": "branch7x7dbl_2",
              "tower_1/conv_2": "branch7x7dbl_3", "tower_1/conv_3": "branch7x7dbl_4",
              "tower_1/conv_4": "branch7x7dbl_5", "tower_2/conv": "branch_pool"},
        "D": {"tower/conv": "branch3x3_1", "tower/conv_1": "branch3x3_2", "tower_1/conv": "branch7x7x3_1",
              "tower_1/conv_1": "branch7x7x3_2", "tower_1/conv_2": "branch7x7x3_3",
              "tower_1/conv_3": "branch7x7x3_4"},
        "E": {"conv": "branch1x1", "tower/conv": "branch3x3_1", "tower/mixed/conv": "branch3x3_2a",
              "tower/mixed/conv_1": "branch3x3_2b", "tower_1/conv": "branch3x3dbl_1",
              "tower_1/conv_1": "branch3x3dbl_2", "tower_1/mixed/conv": "branch3x3dbl_3a",
              "tower_1/mixed/conv_1": "branch3x3dbl_3b", "tower_2/conv": "branch_pool"},
    }[kind]
    return f"{blocks[block]}.{table[rest]}"


def test_every_conv_unit_matches_torchvision_inception_v3():
    import torchvision
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    tv_modules = dict(tv.named_modules())
    model = I.InceptionADM()
    assert len(I.CONV_UNITS) == 94
    seen = set()
    for unit in I.CONV_UNITS:
        tv_conv = tv_modules[_torchvision_name(unit.name)].conv
        assert tuple(model.units[unit.name].weight.shape) == tuple(tv_conv.weight.shape), unit.name
        assert (unit.stride, unit.stride) == tuple(tv_conv.stride), unit.name
        valid = tuple(tv_conv.padding) == (0, 0)
        assert unit.padding == ("VALID" if valid and unit.kernel != (1, 1) else unit.padding), unit.name
        if unit.kernel != (1, 1):
            assert (unit.padding == "VALID") == valid, unit.name
        seen.add(_torchvision_name(unit.name))
    assert len(seen) == 94
    assert model.pool_dim == 2048 and tuple(model.logits_weight.shape) == (2048, 1008)


def test_outputs_shapes_head_and_sfid_flatten_order():
    model = random_inception(divisor=16)
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    out, nodes = model.forward_with_nodes(images, ["mixed_6/conv", "mixed_10/join"])
    out.update(nodes)
    assert out["pool"].shape == (2, model.pool_dim)
    assert out["spatial"].shape == (2, 289, 7) and out["logits"].shape == (2, 1008)
    assert out["mixed_6/conv"].shape == (2, 17, 17, 12) and out["mixed_10/join"].shape[1:3] == (8, 8)
    # sFID features: the first 7 channels of mixed_6/conv in H, W, C order -> 2023 numbers
    flat = out["spatial"].reshape(2, -1)
    assert flat.shape == (2, 2023)
    expected = out["mixed_6/conv"][..., :7].reshape(2, -1)
    assert torch.equal(flat, expected)
    assert flat[0, 7] == out["mixed_6/conv"][0, 0, 1, 0]  # next W position, channel 0
    # pool_3 = 8x8 mean of mixed_10/join; logits = pool @ W, no bias
    torch.testing.assert_close(out["pool"], out["mixed_10/join"].mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["logits"], out["pool"].double().matmul(model.logits_weight.double()).float(),
                               rtol=1e-5, atol=1e-5)
    # folding the batch norms into the convolutions changes round-off only
    unfolded = model.set_fold_batchnorm(False)(images)
    model.set_fold_batchnorm(True)
    for key in ("pool", "spatial", "logits"):
        torch.testing.assert_close(unfolded[key], out[key], rtol=1e-4, atol=1e-5)
    # features of an image do not depend on its batch mates
    single = model(images[1:])
    torch.testing.assert_close(single["pool"][0], out["pool"][1], rtol=1e-5, atol=1e-6)


def test_preprocessing_is_resize_then_minus_128_over_128():
    model = random_inception(divisor=16)
    img = np.random.default_rng(1).integers(0, 256, (1, 20, 30, 3), dtype=np.uint8)
    x = model.preprocess(img)
    ref = (tf1_resize_reference(img.astype(np.float64), 299, 299) - 128.0) / 128.0
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), ref, atol=2e-6)


def _save_converted_like(model, path, source_sha="ab" * 32):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": I.FORMAT, "source_sha256": source_sha})


def test_converted_file_roundtrip_and_sha256(tmp_path, monkeypatch):
    from evaluations.weights import sha256_file
    model = random_inception(divisor=16, seed=3)
    path = tmp_path / "inception_adm.safetensors"
    _save_converted_like(model, path)
    digest = sha256_file(path)
    loaded, info = I.load_inception_adm(path, expected_sha256=digest)
    assert info == {"path": str(path), "sha256": digest, "source_sha256": "ab" * 32}
    images = np.random.default_rng(2).integers(0, 256, (1, 33, 33, 3), dtype=np.uint8)
    a, b = model(images), loaded(images)
    for key in ("pool", "spatial", "logits"):
        assert torch.equal(a[key], b[key])
    # accepted when one of several pinned digests matches
    I.load_inception_adm(path, expected_sha256=["00" * 32, digest])
    with pytest.raises(WeightsFileError, match=r"inception_adm.safetensors: sha256 .* does not match"):
        I.load_inception_adm(path, expected_sha256="00" * 32)
    # the extractor finds the file through $SPEEDRUN_INCEPTION_WEIGHTS when no path is given
    monkeypatch.setenv("SPEEDRUN_INCEPTION_WEIGHTS", str(path))
    ext = get_feature_extractor("inception_adm", device="cpu")
    assert ext.identity["weights_sha256"] == digest


def test_missing_or_wrong_weights_files_say_what_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv("SPEEDRUN_INCEPTION_WEIGHTS", raising=False)
    missing = tmp_path / "classify_image_graph_def.pb"
    with pytest.raises(WeightsFileError) as err:
        I.load_inception_adm(missing)
    message = str(err.value)
    assert str(missing) in message and "not found" in message
    assert "openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb" in message
    with pytest.raises(WeightsFileError, match="no Inception weights given.*openaipublic"):
        get_feature_extractor("inception_adm")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsFileError, match="junk.safetensors: not a readable safetensors"):
        I.load_inception_adm(junk)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(WeightsFileError, match="other.safetensors: not a converted Inception file"):
        I.load_inception_adm(other)
    incomplete = tmp_path / "incomplete.safetensors"
    save_file({"x": torch.zeros(1)}, str(incomplete), metadata={"format": I.FORMAT})
    with pytest.raises(WeightsFileError, match="incomplete.safetensors: .*lack"):
        I.load_inception_adm(incomplete)


def test_feature_extractor_interface():
    model = random_inception(divisor=16)
    ext = get_feature_extractor("inception_adm", model=model, device="cpu")
    images = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    feats = ext.extract(images, batch_size=2)  # batches of 2 and 1
    assert feats["pool"].dtype == np.float64 and feats["pool"].shape == (3, model.pool_dim)
    assert feats["spatial"].shape == (3, 289, 7) and feats["logits"].shape == (3, 1008)
    direct = model(images)
    np.testing.assert_allclose(feats["pool"], direct["pool"].double().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected uint8"):
        ext.extract(images.astype(np.float32))
    with pytest.raises(ValueError, match="expected 3 channel"):
        ext.extract(images[..., :1])
    assert ext.identity["network"] == "inception_adm" and ext.identity["backend"] == "torch"
    assert json.dumps(ext.identity)  # serialisable (cache key, provenance)
