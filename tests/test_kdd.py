"""KDD's feature network: DINOv2 ViT-L/14 through timm, as dgm-eval feeds it.

No weights can be fetched here, so the network is randomly initialised with the real width (ViT-L,
1024) and 2 blocks instead of 24 (timm builds the same blocks, fewer of them) to keep the tests
fast.  Checked against independent references: torchvision's transforms (dgm-eval's exact
preprocessing), a numpy bicubic interpolation of the position grid written from the formula, and
a by-hand forward pass for "CLS token after the final norm".
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluations import dinov2 as D
from evaluations.features import get_feature_extractor
from evaluations.weights import WeightsFileError, sha256_file

DEPTH = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = D.build_dinov2(depth=DEPTH)
    with torch.no_grad():  # non-trivial LayerScale / norm parameters, so every part shows in the output
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        m.pos_embed.normal_(0, 0.5)
        m.cls_token.normal_(0, 0.5)
    return m


def test_preprocessing_is_dgm_evals_torchvision_transform():
    import torchvision.transforms as T
    from PIL import Image
    images = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    images[2] = images[2] // 2  # another intensity range
    got = D.preprocess(images)
    transform = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ref = torch.stack([transform(Image.fromarray(img)) for img in images])
    assert got.shape == (3, 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # bicubic, not bilinear: the two differ on random images
    bilinear = T.Compose([T.Resize((224, 224), T.InterpolationMode.BILINEAR), T.ToTensor()])(Image.fromarray(images[0]))
    assert not torch.allclose(ref[0] * 0.229 + 0.485, bilinear[0], atol=1e-3)
    # 224 px input is not resampled
    small = images[:1, :224, :224]
    expected = (torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255
                - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(D.preprocess(small), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected uint8 NHWC RGB"):
        D.preprocess(images.astype(np.float32))


def _cubic(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def _bicubic_reference(grid: np.ndarray, out: int, scale: float) -> np.ndarray:
    """Keys cubic convolution (a = -0.75), src = (dst + 0.5) / scale - 0.5, borders replicated."""
    m = grid.shape[0]
    res = np.zeros((out, out, grid.shape[2]))
    for oy in range(out):
        sy = (oy + 0.5) / scale - 0.5
        fy = math.floor(sy)
        for ox in range(out):
            sx = (ox + 0.5) / scale - 0.5
            fx = math.floor(sx)
            acc = 0.0
            for i in range(-1, 3):
                wy = _cubic(sy - (fy + i))
                yy = min(max(fy + i, 0), m - 1)
                for j in range(-1, 3):
                    acc = acc + wy * _cubic(sx - (fx + j)) * grid[yy, min(max(fx + j, 0), m - 1)]
            res[oy, ox] = acc
    return res


def test_position_embedding_interpolated_like_the_hub_model():
    """37x37 (518 px) -> 16x16 (224 px) with scale_factor (16 + 0.1) / 37, bicubic, no antialias."""
    rng = np.random.default_rng(1)
    pos = rng.standard_normal((1, 1 + 37 * 37, 3)).astype(np.float32)
    got = D.hub_interpolate_pos_embed(torch.from_numpy(pos), 16).numpy()
    assert got.shape == (1, 257, 3)
    np.testing.assert_array_equal(got[0, 0], pos[0, 0])  # the class position is kept
    ref = _bicubic_reference(pos[0, 1:].reshape(37, 37, 3).astype(np.float64), 16, 16.1 / 37)
    np.testing.assert_allclose(got[0, 1:].reshape(16, 16, 3), ref, atol=1e-5)
    # the 0.1 offset matters: a plain size-based mapping (scale 16/37) gives other values
    plain = _bicubic_reference(pos[0, 1:].reshape(37, 37, 3).astype(np.float64), 16, 16 / 37)
    assert np.max(np.abs(plain - ref)) > 1e-3


def test_feature_is_the_cls_token_after_the_final_norm(model):
    images = np.random.default_rng(2).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    ext = get_feature_extractor("dinov2_vitl14", model=model, device="cpu")
    feats = ext.extract(images)
    assert set(feats) == {"pool"} and feats["pool"].shape == (2, 1024)
    # by hand: patchify, prepend CLS, add positions, the blocks, final LayerNorm, token 0
    x = D.preprocess(images)
    with torch.no_grad():
        w = model.patch_embed.proj
        tokens = torch.nn.functional.conv2d(x, w.weight, w.bias, stride=14).flatten(2).transpose(1, 2)
        assert tokens.shape == (2, 256, 1024)
        h = torch.cat([model.cls_token.expand(2, -1, -1), tokens], dim=1) + model.pos_embed
        for blk in model.blocks:
            h = h + blk.ls1(blk.attn(blk.norm1(h)))
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        normed = torch.nn.functional.layer_norm(h, (1024,), model.norm.weight, model.norm.bias, eps=1e-6)
    np.testing.assert_allclose(feats["pool"], normed[:, 0].double().numpy(), rtol=1e-4, atol=1e-4)
    # neither the pre-norm CLS token nor the mean patch token
    assert np.max(np.abs(feats["pool"] - h[:, 0].double().numpy())) > 1e-2
    assert np.max(np.abs(feats["pool"] - normed[:, 1:].mean(1).double().numpy())) > 1e-2
    # features of one image do not depend on its batch mates
    np.testing.assert_allclose(ext.extract(images[1:])["pool"][0], feats["pool"][1], rtol=1e-4, atol=1e-5)


def _meta_checkpoint(model) -> dict:
    """A checkpoint laid out like Meta's dinov2_vitl14_pretrain.pth: 37x37 positions, a mask token."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pos_embed"] = torch.randn(1, 1 + 37 * 37, 1024, generator=torch.Generator().manual_seed(3))
    state["mask_token"] = torch.zeros(1, 1024)
    return state


def test_load_weights_file_with_checksum(tmp_path, model):
    state = _meta_checkpoint(model)
    pth = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(state, pth)
    digest = sha256_file(pth)
    loaded, info = D.load_dinov2(pth, expected_sha256=digest, depth=DEPTH)
    assert info == {"path": str(pth), "sha256": digest}
    loaded_state = loaded.state_dict()
    torch.testing.assert_close(loaded_state["pos_embed"], D.hub_interpolate_pos_embed(state["pos_embed"], 16))
    for key, value in model.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(loaded_state[key], value), key
    # timm's safetensors layout (no mask token) loads the same way
    from safetensors.torch import save_file
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if k != "mask_token"}, str(st))
    loaded_st, _ = D.load_dinov2(st, depth=DEPTH)
    assert torch.equal(loaded_st.state_dict()["pos_embed"], loaded_state["pos_embed"])
    with pytest.raises(WeightsFileError, match="model.safetensors: does not fit"):  # the extractor wants 24 blocks
        get_feature_extractor("dinov2_vitl14", weights=str(st), device="cpu")


def test_bad_weights_files_say_what_and_where(tmp_path, model, monkeypatch):
    monkeypatch.delenv("SPEEDRUN_DINOV2_WEIGHTS", raising=False)
    missing = tmp_path / "dinov2_vitl14_pretrain.pth"
    with pytest.raises(WeightsFileError, match=r"dinov2_vitl14_pretrain.pth: DINOv2 ViT-L/14 weights not found.*"
                                               r"dl.fbaipublicfiles.com/dinov2"):
        D.load_dinov2(missing)
    with pytest.raises(WeightsFileError, match="no DINOv2 weights given"):
        get_feature_extractor("dinov2_vitl14")
    torch.save(_meta_checkpoint(model), missing)
    with pytest.raises(WeightsFileError, match="sha256 .* does not match"):
        D.load_dinov2(missing, expected_sha256="0" * 64, depth=DEPTH)
    with pytest.raises(WeightsFileError, match="does not fit DINOv2 ViT-L/14"):
        D.load_dinov2(missing, depth=DEPTH + 1)  # a block is missing from the file
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(WeightsFileError, match="junk.pth: not a readable DINOv2 checkpoint"):
        D.load_dinov2(junk)


def test_precision_option_is_recorded_and_checked(model):
    """fp32 (dgm-eval's arithmetic) is the default; tf32 is an opt-in that the extractor's
    identity and the KDD definition name. TF32 only exists on GPUs: on CPU both agree."""
    from evaluations.imagenet import kd_definition
    images = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    exact = get_feature_extractor("dinov2_vitl14", model=model, device="cpu")
    fast = get_feature_extractor("dinov2_vitl14", model=model, device="cpu", precision="tf32")
    assert exact.identity["precision"] == "fp32" and fast.identity["precision"] == "tf32"
    before = torch.backends.cuda.matmul.allow_tf32
    np.testing.assert_array_equal(exact.extract(images)["pool"], fast.extract(images)["pool"])
    assert torch.backends.cuda.matmul.allow_tf32 is before  # the setting is restored afterwards
    with pytest.raises(ValueError, match="precision"):
        get_feature_extractor("dinov2_vitl14", model=model, device="cpu", precision="bf16")
    assert "plain float32" in kd_definition({"kernel_distance": {}})
    assert "TF32" in kd_definition({"kernel_distance": {"precision": "tf32"}})
