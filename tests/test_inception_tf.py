"""Parity of the PyTorch Inception port with TensorFlow running the graph (the ADM reference path).

The real classify_image_graph_def.pb cannot be fetched here, so these tests build a synthetic
GraphDef with the real graph's node names and op types (evaluations/inception_graph.py; random
weights), convert it and compare the port with TensorFlow's own execution of that graph:
activations within 1e-4 relative (max |port - TF| / max |TF|), the resize against
tf.raw_ops.ResizeBilinear on random images, the converter's refusal of graphs that differ.

These tests need TensorFlow (the optional extra: pip install -r requirements-tf.txt, or
SPEEDRUN_EXTRAS=tf bash test.sh); without it they are skipped, and pytest prints the reason.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluations import inception as I  # noqa: E402

tf = I.import_tensorflow()  # imports triton first: triton imported after TensorFlow segfaults
if tf is None:
    pytest.skip("TensorFlow (the optional extra, requirements-tf.txt) is not installed: the Inception "
                "TF-parity tests cannot run; install it with SPEEDRUN_EXTRAS=tf bash test.sh",
                allow_module_level=True)

from evaluations.features import get_feature_extractor  # noqa: E402
from evaluations.inception_graph import build_synthetic_inception_graph  # noqa: E402
from evaluations.inception_tf import InceptionTFGraph  # noqa: E402

TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(got, ref) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def small_graph():
    return build_synthetic_inception_graph(seed=0, width_divisor=8)


@pytest.fixture(scope="module")
def small_pair(small_graph):
    state, meta = I.convert_graph_def(small_graph, "synthetic")
    return I.InceptionADM.from_state_dict(state), InceptionTFGraph(small_graph), meta


# ---------------------------------------------------------------------------
# resize
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 256, 256, 3), (1, 512, 512, 3), (2, 64, 80, 3), (1, 299, 299, 3),
                                   (1, 7, 300, 3)])
def test_resize_matches_tensorflow(shape):
    images = np.random.default_rng(sum(shape)).integers(0, 256, shape).astype(np.float32)
    ref = tf.raw_ops.ResizeBilinear(images=images, size=[299, 299], align_corners=False,
                                    half_pixel_centers=False).numpy()
    got = I.tf1_resize_bilinear(torch.from_numpy(images), (299, 299)).numpy()
    assert np.max(np.abs(got - ref)) <= 1e-3  # values in 0..255: < 4e-6 relative
    if shape[1:3] == (299, 299):
        assert np.array_equal(got, images)


# ---------------------------------------------------------------------------
# network parity
# ---------------------------------------------------------------------------

NODES = ["conv", "pool", "pool_1", "mixed/join", "mixed_3/join", "mixed_6/conv", "mixed_8/join", "mixed_10/join"]


def test_port_matches_tensorflow_on_synthetic_graph(small_pair):
    model, graph, meta = small_pair
    assert meta["variance_epsilon"] == "[0.0010000000474974513]" and meta["graph_producer"] == "8"
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    ref = graph.run(images, tensors=[f"{n}:0" for n in NODES])
    got, nodes = model.forward_with_nodes(images, NODES)
    for node in NODES:
        assert rel_err(nodes[node].numpy(), ref[f"{node}:0"]) < TOL, node
    for key in ("pool", "spatial", "logits"):
        assert rel_err(got[key].numpy(), ref[key]) < TOL, key
    # sFID features are TF's mixed_6/conv:0[..., :7] flattened in H, W, C order (what ADM reshapes)
    adm_spatial = ref["mixed_6/conv:0"][..., :7].reshape(2, -1)
    assert adm_spatial.shape == (2, 2023)
    assert rel_err(got["spatial"].reshape(2, -1).numpy(), adm_spatial) < TOL
    # activations are not degenerate: the comparison means something
    assert (ref["pool"] > 0).mean() > 0.5 and np.std(ref["logits"]) > 0.1
    # TF's own order of the batch-norm operations (no folding) matches as well
    unfolded, nodes = model.set_fold_batchnorm(False).forward_with_nodes(images, NODES)
    model.set_fold_batchnorm(True)
    for key in ("pool", "spatial", "logits"):
        assert rel_err(unfolded[key].numpy(), ref[key]) < TOL, key
    assert rel_err(nodes["mixed_10/join"].numpy(), ref["mixed_10/join:0"]) < TOL


def test_logits_are_the_graphs_matmul_without_bias(small_pair, small_graph):
    """With one image the graph's own pool_3/_reshape [1, D] works: compare with softmax/logits/MatMul:0."""
    model, graph, _ = small_pair
    image = np.random.default_rng(2).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    ref = graph.run(image, tensors=["softmax/logits/MatMul:0", "softmax/logits:0"])
    assert rel_err(model(image)["logits"].numpy(), ref["softmax/logits/MatMul:0"]) < TOL
    assert rel_err(ref["logits"], ref["softmax/logits/MatMul:0"]) < 1e-6
    assert rel_err(ref["softmax/logits:0"], ref["softmax/logits/MatMul:0"]) > 1e-3  # the bias is left out


def test_full_width_graph_parity_and_dimensions():
    """The real widths: pool 2048, spatial 17x17x7 = 2023, 1008 logits (one 256 px image)."""
    graph_def = build_synthetic_inception_graph(seed=5, width_divisor=1, scale_after_normalization=True)
    state, meta = I.convert_graph_def(graph_def, "synthetic-full")
    assert meta["scale_after_normalization"] == "[true]"
    model = I.InceptionADM.from_state_dict(state)
    assert set(I.FULL_CHANNELS.items()) <= {(u, int(model.units[u].weight.shape[0])) for u in model.units}
    image = np.random.default_rng(3).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    ref = InceptionTFGraph(graph_def).run(image)
    got = model(image)
    assert got["pool"].shape == (1, 2048) and got["spatial"].reshape(1, -1).shape == (1, 2023)
    assert got["logits"].shape == (1, 1008)
    for key in ("pool", "spatial", "logits"):
        assert rel_err(got[key].numpy(), ref[key]) < TOL, key


# ---------------------------------------------------------------------------
# files, CLI, backends
# ---------------------------------------------------------------------------


def test_pb_file_conversion_cli_and_tf_backend(tmp_path, small_graph, small_pair):
    from evaluations.weights import sha256_file
    pb = tmp_path / "classify_image_graph_def.pb"
    pb.write_bytes(small_graph.SerializeToString())
    pb_sha = sha256_file(pb)
    out = tmp_path / "inception_adm.safetensors"
    assert I.main(["convert", str(pb), str(out), "--sha256", pb_sha]) == 0
    model, info = I.load_inception_adm(out)
    assert info["source_sha256"] == pb_sha
    direct, info_pb = I.load_inception_adm(pb, expected_sha256=pb_sha)
    assert info_pb["sha256"] == pb_sha
    images = np.random.default_rng(4).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    a, b = model(images), direct(images)
    assert all(torch.equal(a[k], b[k]) for k in ("pool", "spatial", "logits"))
    assert I.main(["convert", str(pb), str(tmp_path / "x.safetensors"), "--sha256", "0" * 64]) == 1
    assert I.main(["check", str(pb), "--num_images", "1", "--resolution", "64"]) == 0
    # the two backends of the feature extractor agree
    torch_ext = get_feature_extractor("inception_adm", weights=str(out), device="cpu")
    tf_ext = get_feature_extractor("inception_adm", weights=str(pb), sha256=pb_sha, backend="tf")
    assert tf_ext.identity["weights_sha256"] == pb_sha and torch_ext.identity["source_sha256"] == pb_sha
    ft, fr = torch_ext.extract(images), tf_ext.extract(images)
    for key in ("pool", "spatial", "logits"):
        assert rel_err(ft[key], fr[key]) < TOL, key


def _mutated(graph_def, name, fn):
    gd = type(graph_def)()
    gd.CopyFrom(graph_def)
    node = next(n for n in gd.node if n.name == name)
    fn(node)
    return gd


def _set_op(op):
    def fn(node):
        node.op = op
    return fn


def _set_attr(key, field, value):
    def fn(node):
        setattr(node.attr[key], field, value)
    return fn


def _set_strides(stride):
    def fn(node):
        del node.attr["strides"].list.i[:]
        node.attr["strides"].list.i.extend([1, stride, stride, 1])
    return fn


def _swap_inputs(i, j):
    def fn(node):
        inputs = list(node.input)
        inputs[i], inputs[j] = inputs[j], inputs[i]
        del node.input[:]
        node.input.extend(inputs)
    return fn


def _set_input(i, name):
    def fn(node):
        node.input[i] = name
    return fn


def _set_scalar(value):
    def fn(node):
        tensor = node.attr["value"].tensor
        tensor.ClearField("tensor_content")
        tensor.ClearField("float_val")
        tensor.float_val.append(value)
    return fn


@pytest.mark.parametrize("node,mutation,message", [
    ("mixed_10/tower_2/pool", _set_op("AvgPool"), "has op AvgPool, expected MaxPool"),
    ("mixed_9/tower_2/pool", _set_op("MaxPool"), "has op MaxPool, expected AvgPool"),
    ("conv_2/Conv2D", _set_attr("padding", "s", b"VALID"), "padding VALID, expected SAME"),
    ("mixed_3/conv/Conv2D", _set_strides(1), r"strides \[1, 1, 1, 1\], expected \[1, 2, 2, 1\]"),
    ("ResizeBilinear", _set_attr("align_corners", "b", True), "align_corners=True"),
    ("mixed_6/join", _swap_inputs(1, 2), "mixed_6/join joins"),
    ("mixed_4/tower/conv_1/Conv2D", _set_input(0, "mixed_4/conv"),
     "input 0 is 'mixed_4/conv', expected 'mixed_4/tower/conv'"),
    ("Mul/y", _set_scalar(0.5), "Mul constant"),
])
def test_converter_refuses_a_graph_that_differs(small_graph, node, mutation, message):
    bad = _mutated(small_graph, node, mutation)
    with pytest.raises(I.InceptionGraphError, match=message) as err:
        I.convert_graph_def(bad, "bad.pb")
    assert str(err.value).startswith("bad.pb: ")


def test_converter_reports_a_missing_node(small_graph):
    gd = type(small_graph)()
    gd.CopyFrom(small_graph)
    keep = [n for n in gd.node if n.name != "mixed_6/conv/batchnorm"]
    del gd.node[:]
    gd.node.extend(keep)
    with pytest.raises(I.InceptionGraphError, match="node 'mixed_6/conv/batchnorm' is missing"):
        I.convert_graph_def(gd, "cut.pb")
