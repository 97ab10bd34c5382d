"""DINOv2 ViT-L/14 features for KDD (kernel distance on DINOv2 features), through timm.

What dgm-eval computes its ``kd`` on, reproduced here:

* the network: torch hub ``facebookresearch/dinov2`` ``dinov2_vitl14`` (ViT-L/14, 24 blocks,
  width 1024, LayerScale, no registers); here timm's ``vit_large_patch14_dinov2`` with the same
  weights (same layers, same forward);
* the input: each image resized to 224x224 with PIL bicubic (dgm-eval applies torchvision
  ``Resize((224, 224), BICUBIC)`` to PIL images, i.e. PIL's resize), then ``/ 255`` and ImageNet
  normalisation ``(x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)``;
* the feature: the CLS token after the final LayerNorm (1024-d; what the hub model returns);
* the position embedding: the checkpoint's 37x37 grid (trained at 518 px) interpolated to 16x16
  the way the hub model does it at every forward pass -- ``F.interpolate`` bicubic, no antialias,
  ``scale_factor = (16 + 0.1) / 37`` -- computed once at load time.  (timm's own loader would
  resample with antialias and a size-based mapping, which gives slightly different features.)

Weights: a local file given by path with its sha256 checked -- Meta's ``dinov2_vitl14_pretrain.pth``
or timm's ``model.safetensors`` of ``vit_large_patch14_dinov2.lvd142m`` (see
:data:`evaluations.weights.SOURCES`).  Nothing is downloaded.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import re
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from preprocessing.encoders import exact_float32
from evaluations.weights import SOURCES, WeightsFileError, check_file

PathLike = Union[str, Path]

ARCH = "vit_large_patch14_dinov2"
IMAGE_SIZE = 224
PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_INTERPOLATE_OFFSET = 0.1
FEATURE_DIM = 1024
DINOV2_SOURCE = SOURCES["dinov2_vitl14"]

__all__ = ["build_dinov2", "preprocess", "hub_interpolate_pos_embed", "convert_dinov2_state_dict",
           "load_dinov2", "IMAGE_SIZE", "FEATURE_DIM"]


def build_dinov2(depth: int = 24, img_size: int = IMAGE_SIZE):
    """timm's DINOv2 ViT-L/14 at ``img_size`` with no head (``model(x)`` = CLS after the final norm).

    ``depth`` < 24 gives the same blocks, fewer of them (for tests only).
    """
    import timm
    return timm.create_model(ARCH, pretrained=False, img_size=img_size, num_classes=0, depth=depth).eval()


@functools.lru_cache(maxsize=1)
def _resize_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1),
                                                 thread_name_prefix="dinov2-resize")


def preprocess(images: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 NHWC RGB -> float32 NCHW: PIL bicubic resize to size x size, / 255, ImageNet mean/std."""
    from PIL import Image

    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError("expected uint8 NHWC RGB images [N, H, W, 3], got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)

    def resize(i: int) -> None:
        img = images[i]
        out[i] = img if img.shape[:2] == (size, size) else np.asarray(
            Image.fromarray(img).resize((size, size), Image.BICUBIC))
    # PIL releases the GIL while resizing: threads keep the CPU side off a GPU's critical path
    # (each image is resized on its own, so the result does not depend on the thread count)
    list(_resize_pool().map(resize, range(len(images))))
    x = torch.from_numpy(out).permute(0, 3, 1, 2).to(torch.float32).div(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def hub_interpolate_pos_embed(pos_embed: torch.Tensor, grid: int,
                              offset: float = HUB_INTERPOLATE_OFFSET) -> torch.Tensor:
    """[1, 1 + M*M, D] -> [1, 1 + grid*grid, D], as the hub DINOv2's ``interpolate_pos_encoding``.

    The class position is kept; the M x M patch grid goes through ``F.interpolate`` bicubic
    (align_corners False, no antialias) with ``scale_factor = (grid + offset) / M`` in float32.
    """
    pos = pos_embed.float()
    n = pos.shape[1] - 1
    m = int(round(math.sqrt(n)))
    if m * m != n:
        raise ValueError(f"position embedding has {n} patch positions, not a square grid")
    if m == grid:
        return pos.clone()
    dim = pos.shape[2]
    scale = float(grid + offset) / m
    patch = F.interpolate(pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                          antialias=False, scale_factor=(scale, scale))
    if patch.shape[-2:] != (grid, grid):
        raise ValueError(f"interpolated grid is {tuple(patch.shape[-2:])}, expected {grid}x{grid}")
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def convert_dinov2_state_dict(state: Dict[str, torch.Tensor], img_size: int = IMAGE_SIZE) -> Dict[str, torch.Tensor]:
    """Meta / timm DINOv2 ViT-L/14 checkpoint -> timm model at ``img_size`` (hub position embedding)."""
    out = {}
    for key, value in state.items():
        if key == "mask_token":  # used only for masked training
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # chunked-blocks checkpoints
        out[key] = value
    if "pos_embed" not in out:
        raise KeyError("no 'pos_embed' in the checkpoint")
    out["pos_embed"] = hub_interpolate_pos_embed(out["pos_embed"], img_size // PATCH)
    return out


def _read_state(path: Path) -> Dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsFileError(f"{path}: not a readable DINOv2 checkpoint (.pth or .safetensors): {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsFileError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_dinov2(path: PathLike, expected_sha256=None, device: Union[str, torch.device] = "cpu",
                depth: int = 24):
    """timm DINOv2 ViT-L/14 at 224 px with the weights in ``path`` (sha256 checked when pinned).

    Returns ``(model, info)`` with ``info = {"path", "sha256"}``.
    """
    path = Path(path)
    sha = check_file(path, "DINOv2 ViT-L/14 weights", DINOV2_SOURCE, expected_sha256)
    state = _read_state(path)
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.(?:\d+\.)?(\d+)\.norm1\.weight$", k)] if m}
    if len(blocks) != depth:
        raise WeightsFileError(f"{path}: does not fit DINOv2 ViT-L/14 ({ARCH}): the checkpoint has "
                               f"{len(blocks)} blocks, the network {depth}")
    model = build_dinov2(depth=depth)
    try:
        model.load_state_dict(convert_dinov2_state_dict(state), strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise WeightsFileError(f"{path}: does not fit DINOv2 ViT-L/14 ({ARCH}): {e}") from e
    return model.to(device), {"path": str(path), "sha256": sha}


PRECISIONS = ("fp32", "tf32")


@torch.no_grad()
def dinov2_features(model, images: np.ndarray, device: Optional[torch.device] = None,
                    precision: str = "fp32") -> torch.Tensor:
    """CLS token after the final norm, [N, 1024] float32, of uint8 NHWC images. precision
    'fp32' (default, plain float32 as dgm-eval runs it) or 'tf32' (TF32 matmuls on GPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"DINOv2 precision must be one of {PRECISIONS}, got {precision!r}")
    device = device or next(model.parameters()).device
    x = preprocess(images).to(device, non_blocking=True)
    with exact_float32(tf32=precision == "tf32"):
        return model(x).float()
