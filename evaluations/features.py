"""Feature extractors used by the evaluator, one interface for every track.

A :class:`FeatureExtractor` turns uint8 NHWC images into named feature arrays:

* ``"pool"``    -- [N, D] embedding for FID, precision/recall, kernel distance;
* ``"logits"``  -- [N, K] class logits for the Inception-Score-style score;
* ``"spatial"`` -- optional [N, P, C] spatial features (e.g. for sFID).

Outputs are float64 numpy arrays.  The digits track uses ``"digits_net"``
(:class:`DigitsFeatureExtractor`); ImageNet's Inception and DINOv2 extractors
register themselves with :func:`register_feature_extractor` as well.
"""

from __future__ import annotations

import abc
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from preprocessing.registry import Registry

__all__ = [
    "FeatureExtractor",
    "DigitsFeatureExtractor",
    "register_feature_extractor",
    "get_feature_extractor",
    "available_feature_extractors",
]


class FeatureExtractor(abc.ABC):
    """Base class: validation and batching; subclasses implement :meth:`_extract_batch`.

    Attributes:
        name: registry name.
        input_resolution: required image height == width, or ``None`` if any
            resolution is accepted (the extractor resizes internally).
        input_channels: required channel count C of the NHWC input.
        feature_names: names returned by :meth:`extract` (always includes
            ``"pool"`` and ``"logits"``).
    """

    name: str = ""
    input_resolution: Optional[int] = None
    input_channels: int = 3
    feature_names: Tuple[str, ...] = ("pool", "logits")
    default_batch_size: int = 256

    def validate(self, images: np.ndarray) -> None:
        """Raise ``ValueError`` unless ``images`` is uint8 NHWC with the expected C (and H, W)."""
        if not isinstance(images, np.ndarray):
            raise ValueError(
                f"{self.name}: expected a numpy uint8 NHWC array, got {type(images).__name__}"
            )
        if images.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: expected uint8 images (0..255), got dtype {images.dtype}; "
                "convert generated samples to uint8 before feature extraction"
            )
        if images.ndim != 4:
            raise ValueError(
                f"{self.name}: expected rank-4 NHWC images [N, H, W, C], got shape {images.shape}"
            )
        n, h, w, c = images.shape
        if c != self.input_channels:
            raise ValueError(
                f"{self.name}: expected {self.input_channels} channel(s) (NHWC, channels last), "
                f"got {c} in shape {images.shape}"
            )
        if self.input_resolution is not None and (h, w) != (self.input_resolution,) * 2:
            raise ValueError(
                f"{self.name}: expected {self.input_resolution}x{self.input_resolution} images, "
                f"got {h}x{w}"
            )
        if n == 0:
            raise ValueError(f"{self.name}: no images given")

    @abc.abstractmethod
    def _extract_batch(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """Features of one validated uint8 NHWC batch."""

    def extract(self, images_uint8_nhwc: np.ndarray, batch_size: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Features of all images, as float64 arrays with N rows each."""
        self.validate(images_uint8_nhwc)
        batch_size = int(batch_size or self.default_batch_size)
        if batch_size <= 0:
            raise ValueError(f"{self.name}: batch_size must be positive, got {batch_size}")
        parts: Dict[str, list] = {}
        for start in range(0, len(images_uint8_nhwc), batch_size):
            batch = np.ascontiguousarray(images_uint8_nhwc[start : start + batch_size])
            for key, value in self._extract_batch(batch).items():
                parts.setdefault(key, []).append(np.asarray(value, dtype=np.float64))
        out = {key: np.concatenate(values, axis=0) for key, values in parts.items()}
        missing = {"pool", "logits"} - set(out)
        if missing:
            raise RuntimeError(f"{self.name}: extractor did not return {sorted(missing)}")
        return out

    def __call__(self, images_uint8_nhwc: np.ndarray, batch_size: Optional[int] = None) -> Dict[str, np.ndarray]:
        return self.extract(images_uint8_nhwc, batch_size)


class DigitsFeatureExtractor(FeatureExtractor):
    """DigitsNet features of 8x8 grayscale digits: pool [N, 64], logits [N, 10], spatial [N, 16, 64]."""

    name = "digits_net"
    input_resolution = 8
    input_channels = 1
    feature_names = ("pool", "logits", "spatial")
    default_batch_size = 500

    def __init__(self, path=None, verify: bool = True, device: Union[str, torch.device] = "cpu"):
        from evaluations import digits_net

        self.path = digits_net.DEFAULT_WEIGHTS_PATH if path is None else path
        self.device = torch.device(device)
        self.model = digits_net.load_digits_net(self.path, verify=verify, device=self.device)
        self._preprocess = digits_net.preprocess

    @torch.no_grad()
    def _extract_batch(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        x = self._preprocess(images).to(self.device)
        out = self.model(x)
        return {k: out[k].detach().to("cpu", torch.float64).numpy() for k in self.feature_names}


_REGISTRY: Registry[FeatureExtractor] = Registry("feature extractor")
register_feature_extractor = _REGISTRY.register
available_feature_extractors = _REGISTRY.names
get_feature_extractor = _REGISTRY.build  # e.g. get_feature_extractor("digits_net")


register_feature_extractor("digits_net")(DigitsFeatureExtractor)
