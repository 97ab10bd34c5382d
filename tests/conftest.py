"""Shared fixtures: a digits dataset built once per session and a tiny track that runs the
whole loop (train -> checkpoint -> samples -> metrics -> record) in seconds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_thread():
    """One torch / BLAS thread for a module of small problems (use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`): on a shared 2-core machine every parallel
    region can wait for a descheduled partner thread (measured there: a relu on 200k floats 0.05 ms
    with 1 torch thread, 11 ms with 2; a 2023-d eigvalsh 0.55 s with 1 OpenBLAS thread, 22 s with
    2). Restored afterwards."""
    import torch
    from threadpoolctl import threadpool_limits
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)


@pytest.fixture
def fixed_kernel_tiles(monkeypatch):
    """The attention kernels' first tile config instead of autotuning (KERNELS_AUTOTUNE=0): on a
    GPU, autotuning every (dtype, head_dim, flags) variant a test file touches would compile
    ~16 configs each; the interpreter always uses the first. The autotuned path runs in
    kernels.selfcheck and the benchmarks."""
    monkeypatch.setenv("KERNELS_AUTOTUNE", "0")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from preprocessing.digits import build_digits
    root = tmp_path_factory.mktemp("data") / "digits"
    build_digits(root)
    return root


def make_track(path: Path, digits_dir: Path, **budget) -> Path:
    """A copy of the digits track with a tiny budget and protocol, written to `path`."""
    spec = json.loads((ROOT / "records" / "tracks" / "digits.json").read_text())
    spec["name"] = "tiny"
    spec["dataset"]["dir"] = str(digits_dir)
    spec["budget"] = {"iterations": 6, "global_batch": 16} | budget
    spec["train_defaults"] |= {"log_every": 2, "ckpt_every": 3, "keep_checkpoints": 5}
    spec["evaluation"] |= {"num_samples": 20, "num_steps": 2, "inception_score_splits": 2,
                           "kernel_distance": {"num_subsets": 5, "subset_size": 10, "seed": 0}}
    path.write_text(json.dumps(spec, indent=2))
    return path


@pytest.fixture
def tiny_track(tmp_path, digits_dir) -> Path:
    return make_track(tmp_path / "tiny.json", digits_dir)


@pytest.fixture
def run_args(tmp_path, tiny_track) -> list[str]:
    """train.py flags that keep every output inside tmp_path."""
    return ["--track", str(tiny_track), "--runs_dir", str(tmp_path / "runs"),
            "--records_dir", str(tmp_path / "records"), "--leaderboard", str(tmp_path / "LEADERBOARD.md")]


def random_inception(divisor: int = 8, seed: int = 0, num_logits: int = 1008, logits_scale: float | None = None):
    """A width-reduced ADM Inception port with random weights (BN statistics that keep activations
    O(1)); the logits weight has std logits_scale (default 1/sqrt(pool width))."""
    import math

    import torch

    from evaluations import inception as I
    gen = torch.Generator().manual_seed(seed)
    channels = {name: max(math.ceil(c / divisor), 1) for name, c in I.FULL_CHANNELS.items()}
    model = I.InceptionADM(channels, num_logits=num_logits)
    for unit in model.units.values():
        w = unit.weight
        w.copy_(torch.randn(w.shape, generator=gen) * math.sqrt(2.0 / w[0].numel()))
        unit.moving_mean.copy_(torch.randn(w.shape[0], generator=gen) * 0.2)
        unit.moving_variance.copy_(torch.rand(w.shape[0], generator=gen) + 0.5)
        unit.beta.copy_(torch.randn(w.shape[0], generator=gen) * 0.2)
        unit.gamma.fill_(1.0)
    scale = 1 / math.sqrt(model.pool_dim) if logits_scale is None else logits_scale
    model.logits_weight.copy_(torch.randn(model.logits_weight.shape, generator=gen) * scale)
    return model
