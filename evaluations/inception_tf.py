"""The reference path: the ADM Inception ``.pb`` run by TensorFlow itself (the optional extra).

This does what the ADM evaluator's ``_create_feature_graph`` / ``_create_softmax_graph`` do:
import the GraphDef with a float32 ``[None, None, None, 3]`` placeholder mapped onto
``ExpandDims:0``, read ``pool_3:0`` and ``mixed_6/conv:0`` (first 7 channels), and compute the
logits as ``pool_3 @ W`` with W the second input of ``softmax/logits/MatMul`` (no bias).  It runs
in a ``tf.compat.v1.Session`` of its own graph, so it coexists with PyTorch in one process.
Select it with ``backend="tf"`` (feature extractor ``inception_adm``) or ``--backend tf``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

import numpy as np

from evaluations.inception import (LOGITS_MATMUL_NODE, SPATIAL_CHANNELS, _import_tf,
                                   read_graph_def)

PathLike = Union[str, Path]


class InceptionTFGraph:
    """``run(images) -> {"pool": [N, D], "spatial": [N, 289, 7], "logits": [N, 1008]}`` (float32 numpy)."""

    def __init__(self, pb_or_graph_def: Union[PathLike, object], expected_sha256=None,
                 intra_op_threads: int = 0):
        tf = _import_tf()
        if isinstance(pb_or_graph_def, (str, Path)):
            graph_def = read_graph_def(pb_or_graph_def, expected_sha256)
        else:
            graph_def = pb_or_graph_def
        v1 = tf.compat.v1
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.images = v1.placeholder(tf.float32, shape=[None, None, None, 3], name="images")
            pool3, spatial, matmul = v1.import_graph_def(
                graph_def, input_map={"ExpandDims:0": self.images},
                return_elements=["pool_3:0", "mixed_6/conv:0", LOGITS_MATMUL_NODE], name="inception")
            weight = matmul.inputs[1]
            self.pool = tf.reshape(pool3, [-1, int(weight.shape[0])])
            self.spatial = spatial[..., :SPATIAL_CHANNELS]
            self.logits = tf.matmul(self.pool, weight)
        config = v1.ConfigProto(allow_soft_placement=True,  # DecodeJpeg has no GPU kernel
                                intra_op_parallelism_threads=intra_op_threads)
        config.gpu_options.allow_growth = True  # leave the GPU memory to PyTorch
        self.session = v1.Session(graph=self.graph, config=config)

    def run(self, images: np.ndarray, tensors=None) -> Dict[str, np.ndarray]:
        """Features of NHWC images in 0..255 (uint8 or float), fed as float32 like ADM."""
        feed = {self.images: np.asarray(images, dtype=np.float32)}
        fetch = {"pool": self.pool, "spatial": self.spatial, "logits": self.logits}
        if tensors:
            fetch.update({name: self.graph.get_tensor_by_name(f"inception/{name}") for name in tensors})
        out = self.session.run(fetch, feed_dict=feed)
        n = len(images)
        out["spatial"] = out["spatial"].reshape(n, -1, SPATIAL_CHANNELS)
        return out

    def close(self) -> None:
        self.session.close()
