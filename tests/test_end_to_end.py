"""The whole product on the real digits track: `bash train.sh`, the committed records, `bash eval.sh`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from records import leaderboard
from records.record import find_records

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    # use this interpreter: no bootstrap inside the tests
    return dict(os.environ, SPEEDRUN_PYTHON=sys.executable)


def test_committed_records_are_valid_and_the_leaderboard_is_current(capsys):
    from records import validate
    records = find_records(ROOT / "records")
    assert any(r.parent.name == "digits" for r in records), "the digits baseline record is missing"
    # the whole validator over every committed record (re-scoring included), as a reviewer runs it
    assert validate.main([]) == 0, capsys.readouterr().out
    assert leaderboard.render_markdown(ROOT / "records") == (ROOT / "LEADERBOARD.md").read_text()


def test_committed_digits_record_validates_on_another_cpus_kernels():
    """oneDNN's AVX2 kernels sum in another order than the AVX-512 ones that scored the record: the
    float32 feature network's metrics move in their 7th digit, within the re-scoring tolerance."""
    record = [r for r in find_records(ROOT / "records") if r.parent.name == "digits"][0]
    proc = subprocess.run([sys.executable, "-m", "records.validate", str(record.relative_to(ROOT))], cwd=ROOT,
                          env=dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("valid"), proc.stdout + proc.stderr


@pytest.mark.slow
def test_eval_sh_reproduces_the_committed_digits_record():
    record = [r for r in find_records(ROOT / "records") if r.parent.name == "digits"][0]
    proc = subprocess.run(["bash", "eval.sh", str(record.relative_to(ROOT))], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[eval] REPRODUCED" in proc.stdout


@pytest.mark.slow
def test_train_sh_trains_samples_scores_records_and_ranks(tmp_path):
    """The README's first command with outputs redirected to tmp: the full digits budget."""
    from evaluations.evaluate import evaluate_samples
    from generate import generate_to_npz
    from train import SiT, load_track

    out = ["--runs_dir", str(tmp_path / "runs"), "--records_dir", str(tmp_path / "records"),
           "--leaderboard", str(tmp_path / "LEADERBOARD.md"), "--data_dir", str(tmp_path / "data")]
    proc = subprocess.run(["bash", "train.sh", *out], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step:1500/1500" in proc.stdout and "record written" in proc.stdout
    [record_dir] = find_records(tmp_path / "records")
    record = json.loads((record_dir / "record.json").read_text())
    assert record["iterations"] * record["global_batch"] == 1500 * 128
    assert record_dir.name in (tmp_path / "LEADERBOARD.md").read_text()
    # learning, not just running: FID at most a fifth of an untrained model's, same protocol
    track = load_track("digits")
    track["dataset"]["dir"] = str(tmp_path / "data")
    torch.manual_seed(0)
    untrained = SiT("SiT-Digits/2", 8, 1, 10).eval()
    generate_to_npz(untrained, track, track["evaluation"], tmp_path / "untrained.npz")
    untrained_fid = evaluate_samples(tmp_path / "untrained.npz", track)["fid"]
    assert record["metrics"]["fid"] <= untrained_fid / 5, (record["metrics"], untrained_fid)
    assert record["metrics"]["precision"] > 0.5 and record["metrics"]["recall"] > 0.5
