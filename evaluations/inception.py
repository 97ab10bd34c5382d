"""A PyTorch port of the ADM evaluator's Inception graph (``classify_image_graph_def.pb``).

The ADM evaluator (guided-diffusion ``evaluations/evaluator.py``) feeds float32 NHWC images in
0..255 to the TensorFlow Inception graph of 2015-12-05 at its ``ExpandDims:0`` tensor and reads

* ``pool_3:0``        [N, 1, 1, 2048]  -> "pool"    (FID, precision/recall),
* ``mixed_6/conv:0``  [N, 17, 17, 192] -> first 7 channels -> "spatial" [N, 289, 7] (sFID; flattened
  in H, W, C order that is 2023 numbers per image),
* ``pool_3 @ W``      with W the weight of ``softmax/logits/MatMul`` (2048 x 1008, no bias)
  -> "logits" [N, 1008] (Inception Score).

This module reproduces that graph op by op:

1. ``ResizeBilinear`` to 299x299 with TF1 semantics (align_corners=False, half_pixel_centers=False,
   no antialias): ``src = dst * in / out`` in float32, see :func:`tf1_resize_bilinear`;
2. ``Sub`` 128, ``Mul`` 1/128;
3. 94 ``Conv2D -> BatchNormWithGlobalNormalization -> Relu`` units, TF ``SAME``/``VALID`` padding,
   max pools and TF average pools (padding excluded from the count), ``Concat`` joins, the last
   block's pool branch is a *max* pool (a quirk of the 2015 graph);
4. ``pool_3``: 8x8 average pool.

The architecture is the table :data:`ARCHITECTURE` (node names of the TF graph).  Weights come
from the ``.pb`` through :func:`convert_graph_def` (needs TensorFlow, the optional extra), which
also checks every node the port relies on (op type, kernel size, strides, padding, data flow);
or from a converted safetensors file (:func:`save_converted` / ``python -m evaluations.inception
convert``).  Channel widths are read from the weights, so a width-reduced graph with the same
structure (the tests' synthetic graph) converts and runs too.

CLI::

    python -m evaluations.inception convert classify_image_graph_def.pb inception_adm.safetensors
    python -m evaluations.inception check classify_image_graph_def.pb   # TF vs port on random images
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluations.weights import SOURCES, WeightsFileError, check_file
from preprocessing.encoders import exact_float32

PathLike = Union[str, Path]

FORMAT = "inception_adm-v1"
INPUT_SIZE = 299
SUB_VALUE = 128.0
MUL_VALUE = 0.0078125  # 1/128, as the graph's Mul/y
SPATIAL_NODE = "mixed_6/conv"
SPATIAL_CHANNELS = 7
POOL_NODE = "pool_3"
LOGITS_WEIGHT_NODE = "softmax/weights"
LOGITS_MATMUL_NODE = "softmax/logits/MatMul"
INCEPTION_SOURCE = SOURCES["inception_pb"]

__all__ = [
    "ARCHITECTURE", "InceptionADM", "InceptionGraphError", "tf1_resize_bilinear", "convert_graph_def",
    "read_graph_def", "save_converted", "load_inception_adm", "main",
]


class InceptionGraphError(ValueError):
    """The graph does not have the structure the port reproduces."""


# ---------------------------------------------------------------------------
# Architecture: the TF graph's nodes, in execution order
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv:
    name: str                 # the unit's Relu node; its ops are name/Conv2D, name/batchnorm
    input: str
    kernel: Tuple[int, int]   # (kh, kw)
    stride: int
    padding: str              # "SAME" | "VALID"
    out: int                  # output channels of the real graph


@dataclass(frozen=True)
class Pool:
    name: str
    input: str
    kind: str                 # "MaxPool" | "AvgPool"
    kernel: int
    stride: int
    padding: str


@dataclass(frozen=True)
class Join:
    name: str                 # name/join in the graph (a Concat on the channel axis)
    inputs: Tuple[str, ...]   # in channel order, nested concats flattened


def _build_architecture() -> Tuple[object, ...]:
    ops: List[object] = []

    def conv(name, inp, k, out, stride=1, padding="SAME"):
        k = (k, k) if isinstance(k, int) else tuple(k)
        ops.append(Conv(name, inp, k, stride, padding, out))
        return name

    def pool(name, inp, kind, k=3, stride=1, padding="SAME"):
        ops.append(Pool(name, inp, kind, k, stride, padding))
        return name

    def join(block, inputs):
        ops.append(Join(f"{block}/join", tuple(inputs)))
        return f"{block}/join"

    x = conv("conv", "Mul", 3, 32, stride=2, padding="VALID")
    x = conv("conv_1", x, 3, 32, padding="VALID")
    x = conv("conv_2", x, 3, 64, padding="SAME")
    x = pool("pool", x, "MaxPool", 3, 2, "VALID")
    x = conv("conv_3", x, 1, 80, padding="VALID")
    x = conv("conv_4", x, 3, 192, padding="VALID")
    x = pool("pool_1", x, "MaxPool", 3, 2, "VALID")
    # 35x35 blocks (torchvision Mixed_5b..5d)
    for block, pool_features in (("mixed", 32), ("mixed_1", 64), ("mixed_2", 64)):
        b0 = conv(f"{block}/conv", x, 1, 64)
        b1 = conv(f"{block}/tower/conv_1", conv(f"{block}/tower/conv", x, 1, 48), 5, 64)
        b2 = conv(f"{block}/tower_1/conv", x, 1, 64)
        b2 = conv(f"{block}/tower_1/conv_1", b2, 3, 96)
        b2 = conv(f"{block}/tower_1/conv_2", b2, 3, 96)
        b3 = conv(f"{block}/tower_2/conv", pool(f"{block}/tower_2/pool", x, "AvgPool"), 1, pool_features)
        x = join(block, (b0, b1, b2, b3))
    # 35 -> 17 (Mixed_6a)
    b0 = conv("mixed_3/conv", x, 3, 384, stride=2, padding="VALID")
    b1 = conv("mixed_3/tower/conv", x, 1, 64)
    b1 = conv("mixed_3/tower/conv_1", b1, 3, 96)
    b1 = conv("mixed_3/tower/conv_2", b1, 3, 96, stride=2, padding="VALID")
    b2 = pool("mixed_3/pool", x, "MaxPool", 3, 2, "VALID")
    x = join("mixed_3", (b0, b1, b2))
    # 17x17 blocks (Mixed_6b..6e); mixed_6/conv is the sFID feature
    for block, c7 in (("mixed_4", 128), ("mixed_5", 160), ("mixed_6", 160), ("mixed_7", 192)):
        b0 = conv(f"{block}/conv", x, 1, 192)
        b1 = conv(f"{block}/tower/conv", x, 1, c7)
        b1 = conv(f"{block}/tower/conv_1", b1, (1, 7), c7)
        b1 = conv(f"{block}/tower/conv_2", b1, (7, 1), 192)
        b2 = conv(f"{block}/tower_1/conv", x, 1, c7)
        b2 = conv(f"{block}/tower_1/conv_1", b2, (7, 1), c7)
        b2 = conv(f"{block}/tower_1/conv_2", b2, (1, 7), c7)
        b2 = conv(f"{block}/tower_1/conv_3", b2, (7, 1), c7)
        b2 = conv(f"{block}/tower_1/conv_4", b2, (1, 7), 192)
        b3 = conv(f"{block}/tower_2/conv", pool(f"{block}/tower_2/pool", x, "AvgPool"), 1, 192)
        x = join(block, (b0, b1, b2, b3))
    # 17 -> 8 (Mixed_7a)
    b0 = conv("mixed_8/tower/conv", x, 1, 192)
    b0 = conv("mixed_8/tower/conv_1", b0, 3, 320, stride=2, padding="VALID")
    b1 = conv("mixed_8/tower_1/conv", x, 1, 192)
    b1 = conv("mixed_8/tower_1/conv_1", b1, (1, 7), 192)
    b1 = conv("mixed_8/tower_1/conv_2", b1, (7, 1), 192)
    b1 = conv("mixed_8/tower_1/conv_3", b1, 3, 192, stride=2, padding="VALID")
    b2 = pool("mixed_8/pool", x, "MaxPool", 3, 2, "VALID")
    x = join("mixed_8", (b0, b1, b2))
    # 8x8 blocks (Mixed_7b, 7c); the second one's pool branch is a max pool in the 2015 graph
    for block, pool_kind in (("mixed_9", "AvgPool"), ("mixed_10", "MaxPool")):
        b0 = conv(f"{block}/conv", x, 1, 320)
        t = conv(f"{block}/tower/conv", x, 1, 384)
        b1a = conv(f"{block}/tower/mixed/conv", t, (1, 3), 384)
        b1b = conv(f"{block}/tower/mixed/conv_1", t, (3, 1), 384)
        t = conv(f"{block}/tower_1/conv", x, 1, 448)
        t = conv(f"{block}/tower_1/conv_1", t, 3, 384)
        b2a = conv(f"{block}/tower_1/mixed/conv", t, (1, 3), 384)
        b2b = conv(f"{block}/tower_1/mixed/conv_1", t, (3, 1), 384)
        b3 = conv(f"{block}/tower_2/conv", pool(f"{block}/tower_2/pool", x, pool_kind), 1, 192)
        x = join(block, (b0, b1a, b1b, b2a, b2b, b3))
    pool(POOL_NODE, x, "AvgPool", 8, 1, "VALID")
    return tuple(ops)


ARCHITECTURE: Tuple[object, ...] = _build_architecture()
CONV_UNITS: Tuple[Conv, ...] = tuple(op for op in ARCHITECTURE if isinstance(op, Conv))
FULL_CHANNELS: Dict[str, int] = {op.name: op.out for op in CONV_UNITS}


# ---------------------------------------------------------------------------
# TF1 resize
# ---------------------------------------------------------------------------


def _tf1_axis(in_size: int, out_size: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower / upper source indices and lerp weights of one axis, as TF1's legacy scaler computes them.

    ``scale = float(in) / out`` and ``src = float(i) * scale`` in float32; ``lower = floor(src)``,
    ``upper = min(ceil(src), in - 1)``, ``lerp = src - floor(src)``.
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    floor = torch.floor(src)
    lower = floor.to(torch.int64).clamp(min=0)
    upper = torch.ceil(src).to(torch.int64).clamp(max=in_size - 1)
    lerp = src - floor
    return lower.to(device), upper.to(device), lerp.to(device)


def tf1_resize_bilinear(images: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)`` (``half_pixel_centers=False``) of NHWC float32 images.

    For every output pixel (y, x) the source coordinate is ``y * in_h / out_h`` (likewise x) --
    not PyTorch's half-pixel ``(y + 0.5) * in / out - 0.5`` -- and there is no antialiasing when
    downsampling.  Interpolation follows TF's order: along x on the two source rows first, then
    along y: ``top + (bottom - top) * y_lerp``.  Computed in float32.
    """
    if images.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {tuple(images.shape)}")
    x = images.to(torch.float32)
    n, in_h, in_w, c = x.shape
    out_h, out_w = int(size[0]), int(size[1])
    y0, y1, yl = _tf1_axis(in_h, out_h, x.device)
    x0, x1, xl = _tf1_axis(in_w, out_w, x.device)
    rows_top = x.index_select(1, y0)
    rows_bottom = x.index_select(1, y1)
    xl = xl.view(1, 1, out_w, 1)
    top_left, top_right = rows_top.index_select(2, x0), rows_top.index_select(2, x1)
    bottom_left, bottom_right = rows_bottom.index_select(2, x0), rows_bottom.index_select(2, x1)
    top = top_left + (top_right - top_left) * xl
    bottom = bottom_left + (bottom_right - bottom_left) * xl
    return top + (bottom - top) * yl.view(1, out_h, 1, 1)


# ---------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------


def _same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TF 'SAME' padding (before, after) of one axis: the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvUnit(nn.Module):
    """``Conv2D`` (no bias) -> ``BatchNormWithGlobalNormalization`` -> ``Relu``.

    The batch norm is TF's: ``(x - mean) * rsqrt(var + eps) [* gamma] + beta``; ``gamma`` holds ones
    when the graph's ``scale_after_normalization`` is false (TF then ignores gamma).  With
    ``fold`` (the default) it is folded into the convolution -- weight ``W * scale``, bias
    ``beta - mean * scale`` -- which is the same affine map with other float32 rounding (~1e-7
    relative per unit) and saves three passes over every activation (on CPUs the unfolded
    elementwise passes cost more than the convolutions).  ``fold=False`` computes TF's order.
    """

    def __init__(self, spec: Conv, in_channels: int, out_channels: int):
        super().__init__()
        self.spec = spec
        self.fold = True
        kh, kw = spec.kernel
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kh, kw))
        for name in ("gamma", "beta", "moving_mean", "moving_variance"):
            self.register_buffer(name, torch.zeros(out_channels))
        self.register_buffer("variance_epsilon", torch.tensor(1e-3))
        self._folded = None

    def _scale(self) -> torch.Tensor:
        return torch.rsqrt(self.moving_variance + self.variance_epsilon) * self.gamma

    def _folded_params(self) -> Tuple[torch.Tensor, torch.Tensor]:
        bufs = (self.weight, self.gamma, self.beta, self.moving_mean, self.moving_variance, self.variance_epsilon)
        key = tuple((b.data_ptr(), b._version, b.device) for b in bufs)
        if self._folded is None or self._folded[0] != key:
            scale = self._scale()
            weight = self.weight * scale.view(-1, 1, 1, 1)
            bias = self.beta - self.moving_mean * scale
            self._folded = (key, weight, bias)
        return self._folded[1], self._folded[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.spec.kernel
        s = self.spec.stride
        weight, bias = self._folded_params() if self.fold else (self.weight, None)
        padding = (0, 0)
        if self.spec.padding == "SAME":
            ph, pw = _same_padding(x.shape[2], kh, s), _same_padding(x.shape[3], kw, s)
            if ph[0] == ph[1] and pw[0] == pw[1]:
                padding = (ph[0], pw[0])
            else:
                x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        y = F.conv2d(x, weight, bias, stride=s, padding=padding)
        if not self.fold:
            y = y.sub_(self.moving_mean.view(1, -1, 1, 1)).mul_(self._scale().view(1, -1, 1, 1))
            y = y.add_(self.beta.view(1, -1, 1, 1))
        return y.relu_()


def _pool(spec: Pool, x: torch.Tensor) -> torch.Tensor:
    k, s = spec.kernel, spec.stride
    if spec.padding == "VALID":
        pad = (0, 0)
    else:
        ph, pw = _same_padding(x.shape[2], k, s), _same_padding(x.shape[3], k, s)
        if ph[0] != ph[1] or pw[0] != pw[1]:  # not in this graph; refuse rather than approximate
            raise NotImplementedError(f"{spec.name}: asymmetric SAME pooling")
        pad = (ph[0], pw[0])
    if spec.kind == "MaxPool":
        return F.max_pool2d(x, k, s, pad)
    # TF's AvgPool averages over the valid (unpadded) pixels only
    return F.avg_pool2d(x, k, s, pad, count_include_pad=False)


class InceptionADM(nn.Module):
    """The ADM Inception graph in PyTorch.

    ``forward(images)`` takes NHWC images in 0..255 (uint8 or float, any size) and returns
    ``{"pool": [N, D], "spatial": [N, 17*17, 7], "logits": [N, 1008]}`` (float32), D = 2048 for
    the real weights.  ``channels`` maps every conv unit to its output width (default: the real
    graph's); :meth:`from_state_dict` reads them from converted weights.  Batch norms are folded
    into the convolutions (faster, round-off-level differences); ``set_fold_batchnorm(False)``
    evaluates TF's order of operations.
    """

    def __init__(self, channels: Optional[Dict[str, int]] = None, num_logits: int = 1008):
        super().__init__()
        channels = dict(FULL_CHANNELS if channels is None else channels)
        widths = {"Mul": 3}
        units = {}
        for op in ARCHITECTURE:
            if isinstance(op, Conv):
                units[op.name] = ConvUnit(op, widths[op.input], int(channels[op.name]))
                widths[op.name] = int(channels[op.name])
            elif isinstance(op, Pool):
                widths[op.name] = widths[op.input]
            else:
                widths[op.name] = sum(widths[i] for i in op.inputs)
        self.units = nn.ModuleDict(units)
        self.pool_dim = widths[POOL_NODE]
        self.register_buffer("logits_weight", torch.zeros(self.pool_dim, num_logits))
        # the last consumer of every value, to free activations as soon as possible
        last_use = {}
        for i, op in enumerate(ARCHITECTURE):
            for name in ((op.input,) if not isinstance(op, Join) else op.inputs):
                last_use[name] = i
        self._last_use = last_use
        self.eval()

    def set_fold_batchnorm(self, fold: bool) -> "InceptionADM":
        for unit in self.units.values():
            unit.fold = bool(fold)
        return self

    @classmethod
    def from_state_dict(cls, state: Dict[str, torch.Tensor]) -> "InceptionADM":
        channels = {}
        for op in CONV_UNITS:
            key = f"units.{op.name}.weight"
            if key not in state:
                raise InceptionGraphError(f"converted weights lack {key!r}")
            channels[op.name] = int(state[key].shape[0])
        if "logits_weight" not in state:
            raise InceptionGraphError("converted weights lack 'logits_weight'")
        model = cls(channels, num_logits=int(state["logits_weight"].shape[1]))
        model.load_state_dict(state, strict=True)
        return model

    def preprocess(self, images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """uint8/float NHWC 0..255 -> the graph's ``Mul:0`` (299x299, (x - 128) / 128) as NCHW float32."""
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        device = self.logits_weight.device
        x = tf1_resize_bilinear(x.to(device=device, dtype=torch.float32), (INPUT_SIZE, INPUT_SIZE))
        x = (x - SUB_VALUE) * MUL_VALUE
        # NCHW view of NHWC memory (channels_last): the layout oneDNN / cuDNN convolutions prefer
        return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    def forward(self, images: Union[np.ndarray, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.forward_with_nodes(images, ())[0]

    @torch.no_grad()
    def forward_with_nodes(self, images: Union[np.ndarray, torch.Tensor], nodes: Sequence[str]
                           ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """``(outputs, activations)``: the outputs of :meth:`forward` and the named graph nodes
        (e.g. ``"mixed_6/conv"``, ``"pool_1"``, ``"mixed_10/join"``) as NHWC tensors, like TF's."""
        keep = set(nodes) | {SPATIAL_NODE}
        unknown = set(nodes) - {op.name for op in ARCHITECTURE} - {"Mul"}
        if unknown:
            raise KeyError(f"unknown graph nodes {sorted(unknown)}")
        with exact_float32():
            values = {"Mul": self.preprocess(images)}
            extra: Dict[str, torch.Tensor] = {"Mul": values["Mul"]}
            for i, op in enumerate(ARCHITECTURE):
                if isinstance(op, Conv):
                    out = self.units[op.name](values[op.input])
                elif isinstance(op, Pool):
                    out = _pool(op, values[op.input])
                else:
                    out = torch.cat([values[name] for name in op.inputs], dim=1)
                values[op.name] = out
                if op.name in keep:
                    extra[op.name] = out
                for name in ((op.input,) if not isinstance(op, Join) else op.inputs):
                    if self._last_use.get(name) == i:
                        values.pop(name, None)
            pool = values[POOL_NODE].flatten(1)
            logits = pool @ self.logits_weight
        spatial = extra[SPATIAL_NODE][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
        outputs = {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1, SPATIAL_CHANNELS),
                   "logits": logits}
        return outputs, {name: extra[name].permute(0, 2, 3, 1) for name in nodes}


# ---------------------------------------------------------------------------
# Conversion from the TF graph
# ---------------------------------------------------------------------------


def import_tensorflow():
    """``tensorflow``, or None when the optional extra is not installed.

    triton is imported first: importing triton (e.g. through torchvision / torch._dynamo) AFTER
    TensorFlow crashes the process with a segmentation fault (tensorflow-cpu 2.21 + triton 3.8),
    while the other order works.
    """
    try:
        import triton  # noqa: F401
    except Exception:  # no triton (or a broken one): nothing to protect
        pass
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return tf


def _import_tf():
    tf = import_tensorflow()
    if tf is None:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            "reading the Inception .pb needs TensorFlow, the optional extra: "
            ".venv/bin/pip install -r requirements-tf.txt (or SPEEDRUN_EXTRAS=tf bash test.sh); "
            "or use a converted .safetensors file")
    return tf


def read_graph_def(path: PathLike, expected_sha256=None):
    """Parse a ``.pb`` GraphDef after checking the file (and its sha256 when pinned). Needs TensorFlow."""
    check_file(path, "Inception graph (.pb)", INCEPTION_SOURCE, expected_sha256)
    tf = _import_tf()
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(Path(path).read_bytes())
    except Exception as e:
        raise WeightsFileError(f"{path}: not a TensorFlow GraphDef (.pb): {e}") from e
    return graph_def


def _strip(name: str) -> str:
    name = name.lstrip("^")
    return name.split(":")[0]


class _Graph:
    """Node lookup with the checks the converter needs; every error names the source."""

    def __init__(self, graph_def, source: str):
        self.nodes = {n.name: n for n in graph_def.node}
        self.source = source

    def fail(self, message: str):
        raise InceptionGraphError(f"{self.source}: {message}")

    def node(self, name: str, ops: Iterable[str]):
        ops = tuple(ops)
        if name not in self.nodes:
            self.fail(f"node {name!r} is missing (expected op {'/'.join(ops)})")
        node = self.nodes[name]
        if node.op not in ops:
            self.fail(f"node {name!r} has op {node.op}, expected {'/'.join(ops)}")
        return node

    def resolve(self, name: str) -> str:
        """Follow Identity nodes to the producing node."""
        name = _strip(name)
        seen = set()
        while name in self.nodes and self.nodes[name].op == "Identity" and name not in seen:
            seen.add(name)
            name = _strip(self.nodes[name].input[0])
        return name

    def inputs(self, node) -> List[str]:
        return [self.resolve(i) for i in node.input if not i.startswith("^")]

    def const(self, name: str) -> np.ndarray:
        from tensorflow.python.framework import tensor_util
        node = self.node(self.resolve(name), ("Const",))
        return np.array(tensor_util.MakeNdarray(node.attr["value"].tensor))

    def expect_input(self, node, index: int, producer: str):
        inputs = self.inputs(node)
        if len(inputs) <= index or inputs[index] != producer:
            got = inputs[index] if len(inputs) > index else None
            self.fail(f"node {node.name!r} input {index} is {got!r}, expected {producer!r}")

    def attr_list(self, node, key: str) -> List[int]:
        return list(node.attr[key].list.i)

    def flat_concat_inputs(self, node) -> List[str]:
        """Inputs of a Concat/ConcatV2 on the channel axis, nested concats expanded."""
        inputs = self.inputs(node)
        if node.op == "Concat":
            axis_name, values = inputs[0], inputs[1:]
        else:
            axis_name, values = inputs[-1], inputs[:-1]
        axis = int(self.const(axis_name))
        if axis not in (3, -1):
            self.fail(f"node {node.name!r} concatenates on axis {axis}, expected the channel axis 3")
        flat = []
        for v in values:
            producer = self.nodes.get(v)
            if producer is not None and producer.op in ("Concat", "ConcatV2"):
                flat.extend(self.flat_concat_inputs(producer))
            else:
                flat.append(v)
        return flat


def convert_graph_def(graph_def, source: str = "graph") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """State dict of :class:`InceptionADM` from the ADM Inception GraphDef (needs TensorFlow).

    Every node the port relies on is checked against :data:`ARCHITECTURE`: the preprocessing
    (``ResizeBilinear`` to 299x299 with align_corners/half_pixel_centers false, ``Sub`` 128,
    ``Mul`` 1/128), each unit's ``Conv2D`` (kernel size, strides, padding, NHWC, its input),
    ``BatchNormWithGlobalNormalization`` and ``Relu``, every pool (op type, window, strides,
    padding), every join's inputs in channel order, ``pool_3`` and ``softmax/logits/MatMul``.
    Raises :class:`InceptionGraphError` naming ``source`` and the node on any difference.
    Returns ``(state_dict, metadata)``.
    """
    _import_tf()
    g = _Graph(graph_def, source)
    # preprocessing
    resize = g.node("ResizeBilinear", ("ResizeBilinear",))
    g.expect_input(resize, 0, "ExpandDims")
    size = g.const(g.inputs(resize)[1]).tolist()
    if size != [INPUT_SIZE, INPUT_SIZE]:
        g.fail(f"ResizeBilinear size is {size}, expected [{INPUT_SIZE}, {INPUT_SIZE}]")
    for flag in ("align_corners", "half_pixel_centers"):
        if flag in resize.attr and resize.attr[flag].b:
            g.fail(f"ResizeBilinear has {flag}=True; the port implements the TF1 default (False)")
    for name, producer, value in (("Sub", "ResizeBilinear", SUB_VALUE), ("Mul", "Sub", MUL_VALUE)):
        node = g.node(name, (name,))
        g.expect_input(node, 0, producer)
        got = g.const(g.inputs(node)[1])
        if got.size != 1 or float(got.reshape(-1)[0]) != value:
            g.fail(f"{name} constant is {got.tolist()}, expected {value}")

    state: Dict[str, torch.Tensor] = {}
    eps_values = set()
    scale_flags = set()
    for op in ARCHITECTURE:
        if isinstance(op, Conv):
            conv = g.node(f"{op.name}/Conv2D", ("Conv2D",))
            g.expect_input(conv, 0, op.input)
            g.expect_input(conv, 1, f"{op.name}/conv2d_params")
            w = g.const(f"{op.name}/conv2d_params").astype(np.float32)
            if w.ndim != 4 or tuple(w.shape[:2]) != op.kernel:
                g.fail(f"{op.name}/conv2d_params has shape {w.shape}, expected kernel {op.kernel} (HWIO)")
            strides = g.attr_list(conv, "strides")
            if strides != [1, op.stride, op.stride, 1]:
                g.fail(f"{op.name}/Conv2D strides {strides}, expected [1, {op.stride}, {op.stride}, 1]")
            padding = conv.attr["padding"].s.decode()
            pointwise = op.kernel == (1, 1) and op.stride == 1
            if padding != op.padding and not (pointwise and padding in ("SAME", "VALID")):
                g.fail(f"{op.name}/Conv2D padding {padding}, expected {op.padding}")
            if "data_format" in conv.attr and conv.attr["data_format"].s.decode() not in ("", "NHWC"):
                g.fail(f"{op.name}/Conv2D data_format {conv.attr['data_format'].s.decode()}, expected NHWC")
            bn = g.node(f"{op.name}/batchnorm", ("BatchNormWithGlobalNormalization",))
            expected_bn_inputs = [f"{op.name}/Conv2D"] + [f"{op.name}/batchnorm/{k}" for k in
                                                          ("moving_mean", "moving_variance", "beta", "gamma")]
            for i, producer in enumerate(expected_bn_inputs):
                g.expect_input(bn, i, producer)
            relu = g.node(op.name, ("Relu",))
            g.expect_input(relu, 0, f"{op.name}/batchnorm")
            eps = float(bn.attr["variance_epsilon"].f)
            scale_after = bool(bn.attr["scale_after_normalization"].b)
            eps_values.add(eps)
            scale_flags.add(scale_after)
            params = {k: g.const(f"{op.name}/batchnorm/{k}").astype(np.float32).reshape(-1)
                      for k in ("moving_mean", "moving_variance", "beta", "gamma")}
            out = w.shape[3]
            for k, v in params.items():
                if v.shape != (out,):
                    g.fail(f"{op.name}/batchnorm/{k} has shape {v.shape}, expected ({out},)")
            if not scale_after:
                params["gamma"] = np.ones(out, np.float32)
            prefix = f"units.{op.name}."
            state[prefix + "weight"] = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
            for k, v in params.items():
                state[prefix + k] = torch.from_numpy(np.ascontiguousarray(v))
            state[prefix + "variance_epsilon"] = torch.tensor(eps, dtype=torch.float32)
        elif isinstance(op, Pool):
            node = g.node(op.name, (op.kind,))
            g.expect_input(node, 0, op.input)
            want = {"ksize": [1, op.kernel, op.kernel, 1], "strides": [1, op.stride, op.stride, 1]}
            for key, value in want.items():
                if g.attr_list(node, key) != value:
                    g.fail(f"{op.name} {key} {g.attr_list(node, key)}, expected {value}")
            if node.attr["padding"].s.decode() != op.padding:
                g.fail(f"{op.name} padding {node.attr['padding'].s.decode()}, expected {op.padding}")
        else:
            node = g.node(op.name, ("Concat", "ConcatV2"))
            flat = g.flat_concat_inputs(node)
            if flat != list(op.inputs):
                g.fail(f"{op.name} joins {flat}, expected {list(op.inputs)} in this order")
    matmul = g.node(LOGITS_MATMUL_NODE, ("MatMul",))
    g.expect_input(matmul, 1, LOGITS_WEIGHT_NODE)
    for flag in ("transpose_a", "transpose_b"):
        if flag in matmul.attr and matmul.attr[flag].b:
            g.fail(f"{LOGITS_MATMUL_NODE} has {flag}=True")
    logits_w = g.const(LOGITS_WEIGHT_NODE).astype(np.float32)
    pool_dim = sum(int(state[f"units.{name}.weight"].shape[0]) for name in ARCHITECTURE[-2].inputs)
    if logits_w.ndim != 2 or logits_w.shape[0] != pool_dim:
        g.fail(f"{LOGITS_WEIGHT_NODE} has shape {logits_w.shape}, expected ({pool_dim}, classes)")
    state["logits_weight"] = torch.from_numpy(np.ascontiguousarray(logits_w))
    metadata = {"format": FORMAT, "variance_epsilon": json.dumps(sorted(eps_values)),
                "scale_after_normalization": json.dumps(sorted(scale_flags)),
                "graph_producer": str(graph_def.versions.producer)}
    return state, metadata


def save_converted(pb_path: PathLike, out_path: PathLike, expected_sha256=None) -> str:
    """Convert a ``.pb`` to a safetensors state dict (metadata records the source sha256); returns its sha256."""
    from safetensors.torch import save_file

    from preprocessing.shards import atomic_write, sha256_file
    source_sha = check_file(pb_path, "Inception graph (.pb)", INCEPTION_SOURCE, expected_sha256)
    state, metadata = convert_graph_def(read_graph_def(pb_path), source=str(pb_path))
    metadata["source_sha256"] = source_sha
    atomic_write(out_path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return sha256_file(out_path)


def load_inception_adm(path: PathLike, expected_sha256=None, device: Union[str, torch.device] = "cpu"
                       ) -> Tuple[InceptionADM, Dict[str, str]]:
    """The port with weights from a ``.pb`` (needs TensorFlow) or a converted ``.safetensors``.

    ``expected_sha256`` (a hex digest or several acceptable ones) is checked against the file
    given.  Returns ``(model, info)``; ``info`` has the file's ``sha256`` and, for converted files,
    the ``source_sha256`` of the ``.pb`` they came from.
    """
    path = Path(path)
    sha = check_file(path, "Inception weights (.pb or converted .safetensors)", INCEPTION_SOURCE,
                     expected_sha256)
    info = {"path": str(path), "sha256": sha}
    if path.suffix == ".pb":
        state, metadata = convert_graph_def(read_graph_def(path), source=str(path))
        info["source_sha256"] = sha
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), "pt") as f:
                metadata = dict(f.metadata() or {})
            state = load_file(str(path))
        except Exception as e:
            raise WeightsFileError(f"{path}: not a readable safetensors file: {e}") from e
        if metadata.get("format") != FORMAT:
            raise WeightsFileError(f"{path}: not a converted Inception file (format "
                                   f"{metadata.get('format')!r}, expected {FORMAT!r})")
        info["source_sha256"] = metadata.get("source_sha256", "")
    try:
        model = InceptionADM.from_state_dict(state)
    except (InceptionGraphError, RuntimeError) as e:
        raise WeightsFileError(f"{path}: {e}") from e
    return model.to(device), info


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="ADM Inception: convert the .pb, or check the port against TF")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="write a safetensors state dict from classify_image_graph_def.pb")
    c.add_argument("pb")
    c.add_argument("out")
    c.add_argument("--sha256", default=None, help="expected sha256 of the .pb")
    k = sub.add_parser("check", help="run TF (the .pb) and the port on random images; print relative errors")
    k.add_argument("pb")
    k.add_argument("--num_images", type=int, default=4)
    k.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "convert":
            digest = save_converted(args.pb, args.out, args.sha256)
            print(f"[inception] wrote {args.out} (sha256 {digest})")
            return 0
        from evaluations.inception_tf import InceptionTFGraph
        images = np.random.default_rng(0).integers(0, 256, (args.num_images, args.resolution,
                                                             args.resolution, 3), dtype=np.uint8)
        ref = InceptionTFGraph(args.pb).run(images)
        model, _ = load_inception_adm(args.pb)
        got = {key: value.numpy() for key, value in model(images).items()}
        worst = 0.0
        for key in ("pool", "spatial", "logits"):
            err = _relative_error(got[key].reshape(len(images), -1), ref[key].reshape(len(images), -1))
            worst = max(worst, err)
            print(f"[inception] {key}: max |port - TF| / max |TF| = {err:.3g}")
        return 0 if worst <= 1e-4 else 1
    except (WeightsFileError, InceptionGraphError, ImportError) as e:
        print(f"[inception] error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
