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
import os
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from preprocessing.registry import Registry

__all__ = [
    "FeatureExtractor",
    "DigitsFeatureExtractor",
    "InceptionADMFeatureExtractor",
    "DINOv2FeatureExtractor",
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
    required_features: Tuple[str, ...] = ("pool", "logits")
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
        missing = set(self.required_features) - set(out)
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


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class InceptionADMFeatureExtractor(FeatureExtractor):
    """The ADM evaluator's Inception (``classify_image_graph_def.pb``) on uint8 NHWC RGB images of any size.

    pool [N, 2048] (``pool_3``), logits [N, 1008] (``pool_3 @ softmax/logits/MatMul`` weight, no
    bias), spatial [N, 289, 7] (``mixed_6/conv`` first 7 channels, H, W, C order: 2023 numbers per
    image when flattened).

    ``weights`` defaults to ``$SPEEDRUN_INCEPTION_WEIGHTS``.
    ``backend="torch"`` (default): the PyTorch port (:mod:`evaluations.inception`) with weights from
    the ``.pb`` (needs TensorFlow to read it) or a converted ``.safetensors``.  ``backend="tf"``: the
    ``.pb`` run by TensorFlow (:mod:`evaluations.inception_tf`), the reference path.  ``sha256``
    (one digest or several acceptable ones) is checked against the weights file.  For tests,
    ``model`` (an :class:`~evaluations.inception.InceptionADM`) or ``graph_def`` (tf backend)
    replaces the file.
    """

    name = "inception_adm"
    input_resolution = None
    input_channels = 3
    feature_names = ("pool", "logits", "spatial")
    default_batch_size = 64  # ADM's Inception batch

    def __init__(self, weights=None, sha256=None, backend: str = "torch",
                 device: Union[str, torch.device, None] = None, model=None, graph_def=None):
        from evaluations.inception import INCEPTION_SOURCE, load_inception_adm
        from evaluations.weights import WeightsFileError

        if backend not in ("torch", "tf"):
            raise ValueError(f"{self.name}: backend must be 'torch' or 'tf', got {backend!r}")
        self.backend = backend
        self.device = _default_device(device)
        info = {"path": None, "sha256": None}
        weights = weights or os.environ.get("SPEEDRUN_INCEPTION_WEIGHTS") or None
        if weights is None and model is None and graph_def is None:
            raise WeightsFileError(f"{self.name}: no Inception weights given (weights=... or "
                                   f"$SPEEDRUN_INCEPTION_WEIGHTS). They come from {INCEPTION_SOURCE}")
        if backend == "torch":
            if model is None:
                model, info = load_inception_adm(weights, sha256, device=self.device)
            self.model = model.to(self.device).eval()
        else:
            from evaluations.inception_tf import InceptionTFGraph
            if graph_def is None:
                from evaluations.weights import sha256_file
                self.graph = InceptionTFGraph(weights, sha256)
                info = {"path": str(weights), "sha256": sha256_file(weights)}
            else:
                self.graph = InceptionTFGraph(graph_def)
        self.weights_info = info
        self.identity = {"network": self.name, "backend": backend, "weights_sha256": info.get("sha256"),
                         "source_sha256": info.get("source_sha256", info.get("sha256"))}

    def _extract_batch(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        if self.backend == "tf":
            return self.graph.run(images)
        out = self.model(images)
        return {k: out[k].detach().to("cpu", torch.float64).numpy() for k in self.feature_names}


class DINOv2FeatureExtractor(FeatureExtractor):
    """DINOv2 ViT-L/14 CLS features (after the final norm) of uint8 NHWC RGB images: pool [N, 1024].

    Images are resized to 224x224 with PIL bicubic and ImageNet-normalised, as dgm-eval does
    (:mod:`evaluations.dinov2`).  ``weights`` is a local ``.pth`` / ``.safetensors`` (default
    ``$SPEEDRUN_DINOV2_WEIGHTS``) checked against ``sha256``; tests may pass a ``model`` (e.g.
    randomly initialised) instead.
    """

    name = "dinov2_vitl14"
    input_resolution = None
    input_channels = 3
    feature_names = ("pool",)
    required_features = ("pool",)
    default_batch_size = 32

    def __init__(self, weights=None, sha256=None, device: Union[str, torch.device, None] = None, model=None,
                 precision: str = "fp32"):
        from evaluations import dinov2
        from evaluations.weights import WeightsFileError

        if precision not in dinov2.PRECISIONS:
            raise ValueError(f"{self.name}: precision must be one of {dinov2.PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.device = _default_device(device)
        info = {"path": None, "sha256": None}
        weights = weights or os.environ.get("SPEEDRUN_DINOV2_WEIGHTS") or None
        if model is None:
            if weights is None:
                raise WeightsFileError(f"{self.name}: no DINOv2 weights given (weights=... or "
                                       f"$SPEEDRUN_DINOV2_WEIGHTS). They come from {dinov2.DINOV2_SOURCE}")
            model, info = dinov2.load_dinov2(weights, sha256, device=self.device)
        self.model = model.to(self.device).eval()
        self.weights_info = info
        self.identity = {"network": self.name, "weights_sha256": info.get("sha256"),
                         "preprocess": "PIL bicubic 224, ImageNet mean/std",
                         "pos_embed": "hub bicubic, scale (16+0.1)/37, no antialias", "precision": precision}
        self._features = dinov2.dinov2_features

    def _extract_batch(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        feats = self._features(self.model, images, self.device, self.precision)
        return {"pool": feats.to("cpu", torch.float64).numpy()}


register_feature_extractor("inception_adm")(InceptionADMFeatureExtractor)
register_feature_extractor("dinov2_vitl14")(DINOv2FeatureExtractor)
