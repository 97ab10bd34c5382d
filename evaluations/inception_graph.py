"""A synthetic stand-in for ``classify_image_graph_def.pb``: same node names and op types, random weights.

The real graph (Inception, 2015-12-05) cannot be fetched in tests, so the parity tests and the
throughput benchmark build this one and run it through TensorFlow and through the PyTorch port.
It is written node by node, the way the real GraphDef is laid out (facts from public dumps of that
graph: node names, ``conv2d_params`` / ``batchnorm/{beta,gamma,moving_mean,moving_variance}``
constants, ``<block>/join`` with a ``concat_dim`` constant, a graph producer version below 9 since
it uses the ``BatchNormWithGlobalNormalization`` op), independently of the port's
:data:`evaluations.inception.ARCHITECTURE` table:

    DecodeJpeg/contents (Placeholder, string) -> DecodeJpeg -> Cast -> ExpandDims
    -> ResizeBilinear(size 299x299, align_corners=False) -> Sub(128) -> Mul(1/128)
    -> conv ... mixed_10/join -> pool_3 (AvgPool 8x8) -> pool_3/_reshape [1, 2048]
    -> softmax/logits/MatMul(softmax/weights) -> softmax/logits (BiasAdd softmax/biases) -> softmax

where each conv unit ``X`` is ``X/Conv2D(X/conv2d_params)`` -> ``X/batchnorm``
(BatchNormWithGlobalNormalization, eps 0.001) -> ``X`` (Relu).  In the 8x8 blocks the 1x3/3x1 pairs
are listed directly in the block's join (channel order as torchvision's Mixed_7b/7c); the
original may hold them in nested concats, which the converter accepts as well.

``width_divisor`` shrinks every channel count (kernel sizes, strides, paddings, spatial sizes and
names stay), so tests run the whole structure in a fraction of the 5.7 GMAC per image.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

GRAPH_PRODUCER = 8  # < 9: BatchNormWithGlobalNormalization is refused in GraphDefs from version 9 on


def build_synthetic_inception_graph(seed: int = 0, width_divisor: int = 1, num_classes: int = 1008,
                                    scale_after_normalization: bool = False, variance_epsilon: float = 0.001,
                                    producer: int = GRAPH_PRODUCER):
    """A GraphDef with the real graph's structure and random weights (needs TensorFlow)."""
    from evaluations.inception import _import_tf
    tf = _import_tf()
    from tensorflow.core.framework import attr_value_pb2, graph_pb2, types_pb2

    rng = np.random.default_rng(seed)
    gd = graph_pb2.GraphDef()
    gd.versions.producer = producer
    F32 = types_pb2.DT_FLOAT

    def width(c: int) -> int:
        return max(int(math.ceil(c / width_divisor)), 1) if width_divisor > 1 else c

    def add(name, op, inputs=(), **attrs):
        node = gd.node.add()
        node.name, node.op = name, op
        node.input.extend(inputs)
        for key, value in attrs.items():
            a = attr_value_pb2.AttrValue()
            if isinstance(value, bool):
                a.b = value
            elif isinstance(value, float):
                a.f = value
            elif isinstance(value, int) and key in ("T", "dtype", "SrcT", "DstT", "Tdim", "Tshape"):
                a.type = value
            elif isinstance(value, int):
                a.i = value
            elif isinstance(value, bytes):
                a.s = value
            elif isinstance(value, (list, tuple)):
                a.list.i.extend(value)
            elif isinstance(value, tf.TensorShape):
                a.shape.CopyFrom(value.as_proto())
            else:
                a.tensor.CopyFrom(value)
            node.attr[key].CopyFrom(a)
        return name

    def const(name, array):
        array = np.asarray(array)
        return add(name, "Const", dtype=tf.as_dtype(array.dtype).as_datatype_enum,
                   value=tf.make_tensor_proto(array))

    channels = {}

    def conv(name, inp, kh, kw, out, stride=1, padding=b"SAME"):
        cin = channels[inp]
        out = width(out)
        std = math.sqrt(2.0 / (kh * kw * cin))
        w = const(f"{name}/conv2d_params", (rng.standard_normal((kh, kw, cin, out)) * std).astype(np.float32))
        c = add(f"{name}/Conv2D", "Conv2D", [inp, w], T=F32, strides=[1, stride, stride, 1], padding=padding,
                use_cudnn_on_gpu=True)
        params = {
            "moving_mean": rng.normal(0.0, 0.2, out),
            "moving_variance": rng.uniform(0.5, 1.5, out),
            "beta": rng.normal(0.0, 0.2, out),
            "gamma": rng.uniform(0.5, 1.5, out),
        }
        names = [const(f"{name}/batchnorm/{k}", v.astype(np.float32)) for k, v in params.items()]
        bn = add(f"{name}/batchnorm", "BatchNormWithGlobalNormalization", [c, *names], T=F32,
                 variance_epsilon=variance_epsilon, scale_after_normalization=scale_after_normalization)
        add(name, "Relu", [bn], T=F32)
        channels[name] = out
        return name

    def pool(name, inp, op, k=3, stride=1, padding=b"SAME"):
        add(name, op, [inp], T=F32, ksize=[1, k, k, 1], strides=[1, stride, stride, 1], padding=padding)
        channels[name] = channels[inp]
        return name

    def join(block, inputs):
        dim = const(f"{block}/join/concat_dim", np.int32(3))
        add(f"{block}/join", "Concat", [dim, *inputs], N=len(inputs), T=F32)
        channels[f"{block}/join"] = sum(channels[i] for i in inputs)
        return f"{block}/join"

    # input and preprocessing, as in the 2015 graph
    add("DecodeJpeg/contents", "Placeholder", dtype=types_pb2.DT_STRING, shape=tf.TensorShape([]))
    add("DecodeJpeg", "DecodeJpeg", ["DecodeJpeg/contents"], channels=3)
    add("Cast", "Cast", ["DecodeJpeg"], SrcT=types_pb2.DT_UINT8, DstT=F32)
    const("ExpandDims/dim", np.int32(0))
    add("ExpandDims", "ExpandDims", ["Cast", "ExpandDims/dim"], T=F32, Tdim=types_pb2.DT_INT32)
    const("ResizeBilinear/size", np.array([299, 299], np.int32))
    add("ResizeBilinear", "ResizeBilinear", ["ExpandDims", "ResizeBilinear/size"], T=F32, align_corners=False)
    const("Sub/y", np.float32(128.0))
    add("Sub", "Sub", ["ResizeBilinear", "Sub/y"], T=F32)
    const("Mul/y", np.float32(0.0078125))
    add("Mul", "Mul", ["Sub", "Mul/y"], T=F32)
    channels["Mul"] = 3

    # stem
    x = conv("conv", "Mul", 3, 3, 32, stride=2, padding=b"VALID")
    x = conv("conv_1", x, 3, 3, 32, padding=b"VALID")
    x = conv("conv_2", x, 3, 3, 64)
    x = pool("pool", x, "MaxPool", 3, 2, b"VALID")
    x = conv("conv_3", x, 1, 1, 80, padding=b"VALID")
    x = conv("conv_4", x, 3, 3, 192, padding=b"VALID")
    x = pool("pool_1", x, "MaxPool", 3, 2, b"VALID")

    # mixed, mixed_1, mixed_2: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1
    for block, pool_out in (("mixed", 32), ("mixed_1", 64), ("mixed_2", 64)):
        a = conv(f"{block}/conv", x, 1, 1, 64)
        t = conv(f"{block}/tower/conv", x, 1, 1, 48)
        b = conv(f"{block}/tower/conv_1", t, 5, 5, 64)
        t = conv(f"{block}/tower_1/conv", x, 1, 1, 64)
        t = conv(f"{block}/tower_1/conv_1", t, 3, 3, 96)
        c = conv(f"{block}/tower_1/conv_2", t, 3, 3, 96)
        p = pool(f"{block}/tower_2/pool", x, "AvgPool")
        d = conv(f"{block}/tower_2/conv", p, 1, 1, pool_out)
        x = join(block, [a, b, c, d])

    # mixed_3: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2
    a = conv("mixed_3/conv", x, 3, 3, 384, stride=2, padding=b"VALID")
    t = conv("mixed_3/tower/conv", x, 1, 1, 64)
    t = conv("mixed_3/tower/conv_1", t, 3, 3, 96)
    b = conv("mixed_3/tower/conv_2", t, 3, 3, 96, stride=2, padding=b"VALID")
    p = pool("mixed_3/pool", x, "MaxPool", 3, 2, b"VALID")
    x = join("mixed_3", [a, b, p])

    # mixed_4 .. mixed_7: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1
    for block, c7 in (("mixed_4", 128), ("mixed_5", 160), ("mixed_6", 160), ("mixed_7", 192)):
        a = conv(f"{block}/conv", x, 1, 1, 192)
        t = conv(f"{block}/tower/conv", x, 1, 1, c7)
        t = conv(f"{block}/tower/conv_1", t, 1, 7, c7)
        b = conv(f"{block}/tower/conv_2", t, 7, 1, 192)
        t = conv(f"{block}/tower_1/conv", x, 1, 1, c7)
        t = conv(f"{block}/tower_1/conv_1", t, 7, 1, c7)
        t = conv(f"{block}/tower_1/conv_2", t, 1, 7, c7)
        t = conv(f"{block}/tower_1/conv_3", t, 7, 1, c7)
        c = conv(f"{block}/tower_1/conv_4", t, 1, 7, 192)
        p = pool(f"{block}/tower_2/pool", x, "AvgPool")
        d = conv(f"{block}/tower_2/conv", p, 1, 1, 192)
        x = join(block, [a, b, c, d])

    # mixed_8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2
    t = conv("mixed_8/tower/conv", x, 1, 1, 192)
    a = conv("mixed_8/tower/conv_1", t, 3, 3, 320, stride=2, padding=b"VALID")
    t = conv("mixed_8/tower_1/conv", x, 1, 1, 192)
    t = conv("mixed_8/tower_1/conv_1", t, 1, 7, 192)
    t = conv("mixed_8/tower_1/conv_2", t, 7, 1, 192)
    b = conv("mixed_8/tower_1/conv_3", t, 3, 3, 192, stride=2, padding=b"VALID")
    p = pool("mixed_8/pool", x, "MaxPool", 3, 2, b"VALID")
    x = join("mixed_8", [a, b, p])

    # mixed_9, mixed_10: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 (avg, then max)
    for block, pool_op in (("mixed_9", "AvgPool"), ("mixed_10", "MaxPool")):
        a = conv(f"{block}/conv", x, 1, 1, 320)
        t = conv(f"{block}/tower/conv", x, 1, 1, 384)
        b1 = conv(f"{block}/tower/mixed/conv", t, 1, 3, 384)
        b2 = conv(f"{block}/tower/mixed/conv_1", t, 3, 1, 384)
        t = conv(f"{block}/tower_1/conv", x, 1, 1, 448)
        t = conv(f"{block}/tower_1/conv_1", t, 3, 3, 384)
        c1 = conv(f"{block}/tower_1/mixed/conv", t, 1, 3, 384)
        c2 = conv(f"{block}/tower_1/mixed/conv_1", t, 3, 1, 384)
        p = pool(f"{block}/tower_2/pool", x, pool_op)
        d = conv(f"{block}/tower_2/conv", p, 1, 1, 192)
        x = join(block, [a, b1, b2, c1, c2, d])

    pool("pool_3", x, "AvgPool", 8, 1, b"VALID")
    dim = channels["pool_3"]
    const("pool_3/_reshape/shape", np.array([1, dim], np.int32))
    add("pool_3/_reshape", "Reshape", ["pool_3", "pool_3/_reshape/shape"], T=F32, Tshape=types_pb2.DT_INT32)
    w = const("softmax/weights", (rng.standard_normal((dim, num_classes)) / math.sqrt(dim)).astype(np.float32))
    b = const("softmax/biases", rng.normal(0, 0.1, num_classes).astype(np.float32))
    add("softmax/logits/MatMul", "MatMul", ["pool_3/_reshape", w], T=F32)
    add("softmax/logits", "BiasAdd", ["softmax/logits/MatMul", b], T=F32)
    add("softmax", "Softmax", ["softmax/logits"], T=F32)
    return gd


def write_synthetic_inception_graph(path, **kwargs) -> Optional[str]:
    """Build the synthetic graph and write it as a binary ``.pb``."""
    gd = build_synthetic_inception_graph(**kwargs)
    with open(path, "wb") as f:
        f.write(gd.SerializeToString())
    return str(path)
