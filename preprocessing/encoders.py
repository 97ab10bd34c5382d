"""Latent encoders: the map between uint8 images and the latents a model trains on.

Every encoder has the same interface:

* ``name``   -- registry name, recorded in the dataset manifest;
* ``scale``  -- latent scale factor, recorded in the manifest (1.0 for pixels);
* ``latent_shape(image_shape)`` -- ``(c, h, w)`` latent shape for an image of
  shape ``(H, W, C)``;
* ``encode(images)`` -- uint8 NHWC images -> float32 NCHW latents.  A numpy
  input gives a numpy result, a torch input gives a torch tensor;
* ``decode(latents)`` -- float NCHW latents -> uint8 NHWC torch tensor.

``get_encoder(name)`` builds an encoder from the registry.  The digits track
works in pixel space with :class:`IdentityEncoder`; learned autoencoders (the
INVAE for ImageNet) register themselves here as well.
"""

from __future__ import annotations

import abc
import contextlib
import os
from typing import Optional, Tuple, Union

import numpy as np
import torch

from preprocessing.registry import Registry

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "LatentEncoder",
    "IdentityEncoder",
    "register_encoder",
    "get_encoder",
    "available_encoders",
    "latent_decoder",
    "exact_float32",
    "unit_range_to_uint8",
]


@contextlib.contextmanager
def exact_float32(tf32: bool = False, deterministic_convolutions: bool = False):
    """Plain float32 inside: no TF32 matmuls/convolutions on GPU (unless ``tf32=True``, an
    explicit opt-in such as KDD's ``precision: tf32``), no autocast, and with
    ``deterministic_convolutions`` cuDNN's deterministic algorithms without benchmarking; every
    setting restored after. train.py turns TF32 on for training and sampling: the metric networks
    and the autoencoder, whose outputs must not depend on who called them, never inherit it."""
    cudnn = torch.backends.cudnn
    previous = (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = bool(tf32)
    if deterministic_convolutions:
        cudnn.deterministic, cudnn.benchmark = True, False
    try:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark) = previous


def _check_images(images: ArrayLike) -> None:
    if isinstance(images, np.ndarray):
        dtype_ok = images.dtype == np.uint8
    elif isinstance(images, torch.Tensor):
        dtype_ok = images.dtype == torch.uint8
    else:
        raise TypeError(
            f"encode() expects a numpy array or torch tensor, got {type(images).__name__}"
        )
    if not dtype_ok:
        raise ValueError(f"encode() expects uint8 images, got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(
            f"encode() expects NHWC images of rank 4, got shape {tuple(images.shape)}"
        )


class LatentEncoder(abc.ABC):
    """Common interface of all latent encoders (see the module docstring)."""

    name: str = ""
    scale: float = 1.0

    @abc.abstractmethod
    def latent_shape(self, image_shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
        """Latent ``(c, h, w)`` for images of shape ``(H, W, C)``."""

    @abc.abstractmethod
    def encode(self, images: ArrayLike) -> ArrayLike:
        """uint8 NHWC images -> float32 NCHW latents (numpy in, numpy out; torch in, torch out)."""

    @abc.abstractmethod
    def decode(self, latents: ArrayLike) -> torch.Tensor:
        """Float NCHW latents -> uint8 NHWC torch tensor (on the latents' device)."""


def unit_range_to_uint8(x: torch.Tensor, *, truncate: bool) -> torch.Tensor:
    """Decoded NCHW pixels in [-1, 1] -> uint8 NHWC, 255 (x + 1) / 2 clamped to [0, 255], then:

    * ``truncate=True``: cut to the integer below, as SR-DiT's generate.py (SpeedrunDiT @ c24c2ff,
      and the REG branch whose results.txt holds its reported numbers) and guided-diffusion's
      image_sample.py store samples: ``clamp(255 * (x + 1) / 2, 0, 255).to(uint8)``; the numbers
      the ImageNet tracks are compared with were scored on such pixels;
    * ``truncate=False``: rounded to nearest (half to even), the exact inverse of the identity
      encoder. (DiT/REPA store ``clamp(127.5 x + 128).to(uint8)``, i.e. round half up.)
    """
    if truncate:  # SR-DiT's own operations, in its order
        pixels = (255.0 * ((x + 1.0) / 2.0)).clamp(0, 255).floor()
    else:
        pixels = torch.round((x + 1.0) * 127.5).clamp_(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class IdentityEncoder(LatentEncoder):
    """Pixel space: ``latent = image / 127.5 - 1`` laid out NCHW.

    ``decode`` inverts it with ``clamp(round((x + 1) * 127.5), 0, 255)`` where the
    rounding is ``torch.round`` (round half to even), so ``decode(encode(x)) == x``
    exactly for every uint8 image.
    """

    name = "identity"
    scale = 1.0

    def latent_shape(self, image_shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (H, W, C), got {tuple(image_shape)}")
        h, w, c = (int(v) for v in image_shape)
        return (c, h, w)

    def encode(self, images: ArrayLike) -> ArrayLike:
        _check_images(images)
        as_numpy = isinstance(images, np.ndarray)
        x = torch.from_numpy(np.ascontiguousarray(images)) if as_numpy else images
        latents = (x.to(torch.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
        return latents.numpy() if as_numpy else latents

    def decode(self, latents: ArrayLike) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(latents)) if isinstance(latents, np.ndarray) else latents
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"decode() expects a tensor, got {type(latents).__name__}")
        if x.ndim != 4:
            raise ValueError(f"decode() expects NCHW latents of rank 4, got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise ValueError(f"decode() expects floating point latents, got dtype {x.dtype}")
        return unit_range_to_uint8(x.to(torch.float32), truncate=False)

    def __repr__(self) -> str:
        return "IdentityEncoder()"


_REGISTRY: Registry[LatentEncoder] = Registry("latent encoder")
register_encoder = _REGISTRY.register
available_encoders = _REGISTRY.names
get_encoder = _REGISTRY.build  # e.g. get_encoder("identity")


register_encoder("identity")(IdentityEncoder)


def _invae_factory(**kwargs) -> LatentEncoder:
    """The INVAE (preprocessing/invae.py), imported on first use; kwargs: checkpoint, sha256, device, ..."""
    from preprocessing.invae import INVAEEncoder

    return INVAEEncoder(**kwargs)


register_encoder("invae")(_invae_factory)


INVAE_WEIGHTS_VARIABLE = "SPEEDRUN_INVAE_WEIGHTS"


def latent_decoder(name: str, checkpoint_sha256: Optional[str],
                   device: Union[str, torch.device] = "auto") -> LatentEncoder:
    """The decoder for a model's samples: the identity needs nothing; an INVAE model decodes with
    the checkpoint that encoded its training data, whose sha256 the model records
    (SiT.autoencoder_sha256), read from $SPEEDRUN_INVAE_WEIGHTS and checked against it
    (ValueError naming what is missing), on ``device`` (auto: CUDA when available)."""
    if name != "invae":
        return get_encoder(name)
    if not checkpoint_sha256:
        raise ValueError("the model records no INVAE checkpoint sha256 (the manifest of its training data "
                         "named none: latents of a randomly initialised INVAE?), so no file can be checked to "
                         "decode its samples")
    path = os.environ.get(INVAE_WEIGHTS_VARIABLE)
    if not path:
        raise ValueError(f"decoding INVAE latents needs the INVAE that encoded the training data: set "
                         f"${INVAE_WEIGHTS_VARIABLE} to its .safetensors file (sha256 {checkpoint_sha256}; "
                         "preprocessing/README.md says where it comes from)")
    return get_encoder("invae", checkpoint=path, sha256=checkpoint_sha256, device=device)
