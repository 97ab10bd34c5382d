"""Every rung of the ablation ladder stays runnable: a short smoke run of each, in CI."""
from __future__ import annotations

import json

import pytest

from ablations import ladder


def test_rungs_are_cumulative_and_printable(capsys):
    spec = ladder.load_ladder()
    flags = ladder.rung_flags(spec)
    ids = [r["id"] for r in spec["rungs"]]
    assert ids[0] == "plain" and flags["plain"] == []
    for before, after in zip(ids, ids[1:]):
        assert flags[after][:len(flags[before])] == flags[before]  # cumulative
    assert flags["balanced"] == flags["timeshift"] and ladder.trained_rung(spec["rungs"][-1]) == "timeshift"
    for option in ("--repa_coef", "--reg_coef", "--sprint", "--norm", "--rope", "--qk_norm",
                   "--value_residual", "--cfm_coef", "--time_shift_base"):
        assert option in flags["timeshift"]
    assert ladder.main(["--print"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(ids)


@pytest.mark.slow
def test_every_rung_trains_evaluates_and_renders(tmp_path, tiny_track):
    out = tmp_path / "out"
    args = ["--track", str(tiny_track), "--out", str(out), "--runs_dir", str(tmp_path / "runs"), "--seeds", "0",
            "--iterations", "2", "--eval_seeds", "0"]
    assert ladder.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["smoke"] is True
    assert set(results["rungs"]) == {r["id"] for r in ladder.load_ladder()["rungs"]}
    for rung in results["rungs"].values():
        assert set(rung["0"]["0"]) >= set(ladder.METRICS)
    text = (out / "RESULTS.md").read_text()
    assert "SMOKE RUN" in text and "+ balanced labels" in text and "3.49" in text
    assert (out / "ladder.png").stat().st_size > 1000
    # the balanced rung reuses the time-shift model: no extra training run
    assert not list((tmp_path / "runs").glob("*balanced*"))
    # a finished ladder is not re-run, and smoke results are never mixed with real ones
    assert ladder.main(args) == 0
    with pytest.raises(SystemExit, match="smoke"):
        ladder.main(args[:-4] + ["--eval_seeds", "0"])


def test_a_model_trained_with_other_settings_never_stands_in_for_a_rung(tmp_path, tiny_track):
    import train

    flags = ladder.rung_flags(ladder.load_ladder())
    track = train.load_track(str(tiny_track))
    base = ["--track", str(tiny_track), "--seed", "0", "--runs_dir", str(tmp_path), "--run_name", "r",
            "--write_record", "false", "--resume", "auto", "--iterations", "2"]
    cfg = train.parse_config(base + flags["plain"])
    path = tmp_path / "r" / "model.safetensors"
    path.parent.mkdir()
    train.export_model(path, train.build_model(cfg, track), cfg, track)
    ladder.check_trained_config(path, base + flags["plain"])  # the same command: accepted
    # where the rung asks for more (ladder.json edited) or other values, the stale model is refused
    with pytest.raises(SystemExit, match=r"repa_coef: trained 0.0, rung 0.5"):
        ladder.check_trained_config(path, base + flags["repa"])
    with pytest.raises(SystemExit, match=r"iterations: trained 2, rung 3"):
        ladder.check_trained_config(path, base[:-1] + ["3"] + flags["plain"])
    # where and how a run ran is not a difference
    ladder.check_trained_config(path, base + flags["plain"] + ["--log_every", "7", "--kernels", "torch"])
