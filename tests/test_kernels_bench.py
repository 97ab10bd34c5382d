"""The kernel benchmark script runs end to end (tiny shapes; on CPU through the interpreter) and
its tables report every implementation with a small error against float64."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_kernels")


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| implementation"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_benchmark_tables(bench, capsys):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench.main(["--device", device, "--dtype", "fp32", "--batch", "1", "--heads", "2",
                "--seq", "17", "--head_dim", "32", "--width", "64", "--reps", "1",
                "--warmup", "0"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    expected = ["triton", "triton + qknorm + rope", "SDPA math",
                "PyTorch chain: rmsnorm, rope, SDPA",
                "from qkv: triton attention_packed + qknorm + rope",
                "from qkv: PyTorch permute, chain, head merge", "triton modulated_rmsnorm",
                "PyTorch rms_norm + modulate", "triton gated_residual_modulated_rmsnorm",
                "PyTorch x + gate*u, rms_norm, modulate"]
    for name in expected:
        assert name in rows, f"missing row {name!r} in:\n{out}"
        err = float(rows[name][-1])
        assert 0 <= err < 1e-5, (name, err)
        assert re.fullmatch(r"[0-9.]+", rows[name][0]), rows[name]  # a timing, not n/a
    for backend in ("flash", "cuDNN", "efficient"):  # listed even where unsupported (n/a)
        assert f"SDPA {backend}" in rows


@pytest.mark.slow
def test_training_step_benchmark_runs_train_py_step(tmp_path, capsys, monkeypatch):
    """benchmarks/bench_gpu_step.py times train.py's own step (train.Stepper over a ShardLoader of
    a synthetic dataset); a CPU smoke run with a small SiT: two variants with the same data and
    draws give the same losses, and the table and JSON report them."""
    import json
    mod = load_benchmark("bench_gpu_step")
    out = tmp_path / "step.json"
    public = tmp_path / "public_step.py"  # stands in for benchmarks/public_srdit_step.py's output line
    public.write_text("print('SRDIT_PUBLIC ms_per_step=300.0 ms_median=250.0 steps=2')\n")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # main() sets it for --device cpu; restored after
    counted = []

    def count_flops_failing_once(step):  # the first variant cannot count them: its row stays timed
        counted.append(step.variant)
        if len(counted) == 1:
            raise RuntimeError("flop counter refused")
        return real_count_flops(step)
    real_count_flops = mod.count_flops
    monkeypatch.setattr(mod, "count_flops", count_flops_failing_once)
    assert mod.main(["--device", "cpu", "--model", "SiT-S/1", "--batch", "2", "--steps", "2",
                     "--warmup", "1", "--variants", "torch,torch+nondeterministic",
                     "--json", str(out), "--public", str(public)]) == 0
    text = capsys.readouterr().out
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert [r["variant"] for r in rows] == ["train.py torch", "train.py torch+nondeterministic",
                                            "public SR-DiT code"]
    assert all("error" not in r for r in rows), rows
    assert counted == ["torch", "torch+nondeterministic"]  # counted again on the next variant, then not
    assert rows[1]["loss_rel_diff"] < 1e-6 and rows[0]["ms"] > 0
    assert "| train.py torch | " in text
    assert results["flops_per_step"] > 0
    # timed before our variants (a time limit cuts those), its MFU from the FLOPs counted on them
    assert text.index('"variant": "public SR-DiT code') < text.index('"variant": "train.py torch"')
    assert rows[2]["ms"] == 250.0 and rows[2]["images_per_s"] == 2 / 0.25
    # (on a CPU there is no matmul peak: NaN, as in our rows)
    np.testing.assert_equal(rows[2]["mfu"], results["flops_per_step"] / 0.25 / (results["matmul_peak_tflops"] * 1e12))
    assert mod.cudagraph_skips() >= 0  # the counter a +cudagraphs row reports exists in this torch


def test_training_step_variants_are_checked_before_anything_is_built():
    mod = load_benchmark("bench_gpu_step")
    with pytest.raises(ValueError, match=r"\+cudagraphs needs \+compile"):
        mod.SRDiTStep("torch+cudagraphs", 2, torch.device("cpu"), None)
    with pytest.raises(ValueError, match="unknown variant parts"):
        mod.SRDiTStep("torch+graphs", 2, torch.device("cpu"), None)


def test_host_overhead_benchmark_times_every_call_path(monkeypatch, capsys):
    """benchmarks/bench_host_overhead.py: SDPA, kernels.attention's eager autograd.Function and
    the same launchers through the opaque custom operators, forward and forward+backward (CPU:
    interpreted; the compiled row needs a GPU)."""
    monkeypatch.setenv("KERNELS_AUTOTUNE", "1")  # restored after: the script sets it to 0
    mod = load_benchmark("bench_host_overhead")
    mod.main(["--device", "cpu", "--batch", "1", "--heads", "2", "--seq", "17", "--head_dim", "32",
              "--reps", "2", "--warmup", "1"])
    rows = table_rows(capsys.readouterr().out)
    names = ["SDPA default choice", "kernels.attention (eager: autograd.Function)",
             "same launchers, opaque custom operators"]
    assert [n for n in rows if n != "call"] == names
    for name in names:
        fwd, _, fwd_bwd, _ = rows[name]
        assert float(fwd) > 0 and float(fwd_bwd) > float(fwd) * 0.5, rows[name]

    # a row that fails (a compile error on a GPU) is reported as such; the others are still measured
    def broken(*args):
        raise RuntimeError("no kernel for you")
    monkeypatch.setattr(mod.flash.ATTENTION, "opaque", broken)
    mod.main(["--device", "cpu", "--batch", "1", "--heads", "2", "--seq", "17", "--head_dim", "32",
              "--reps", "2", "--warmup", "1"])
    rows = table_rows(capsys.readouterr().out)
    assert rows["same launchers, opaque custom operators"][0].startswith("failed: RuntimeError: no kernel for you")
    assert float(rows["SDPA default choice"][0]) > 0
