"""Records, the leaderboard renderer and eval.sh's reproduction, on a tiny real run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import train
from records import leaderboard, reproduce
from records.record import RecordError, find_records, load_record


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory, digits_dir):
    from conftest import make_track
    base = tmp_path_factory.mktemp("records_run")
    (base / "records" / "tracks").mkdir(parents=True)
    track = make_track(base / "records" / "tracks" / "tiny.json", digits_dir)
    args = ["--track", str(track), "--runs_dir", str(base / "runs"), "--records_dir", str(base / "records"),
            "--leaderboard", str(base / "LEADERBOARD.md"), "--run_name", "2026-01-01_first",
            "--contributors", "alice, bob"]
    summary = train.train(train.parse_config(args))
    return base, track, Path(summary["record_dir"])


def _copy(tiny_record, tmp_path) -> Path:
    _, _, record_dir = tiny_record
    dst = tmp_path / "records" / "tiny" / record_dir.name
    shutil.copytree(record_dir, dst)
    return dst


def _edit(record_dir: Path, fn) -> None:
    path = record_dir / "record.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_a_track_run_writes_a_complete_record(tiny_record):
    base, _, record_dir = tiny_record
    assert record_dir.parent == base / "records" / "tiny" and record_dir.name.endswith("_first")
    record = load_record(record_dir, check_artefacts=True)
    assert record["iterations"] == 6 and record["global_batch"] == 16 and record["images_seen"] == 96
    assert record["contributors"] == ["alice", "bob"]
    assert record["code_hash"] == train.code_hash((Path(train.__file__)).read_text())
    assert record["config"]["model"] == "SiT-Digits/2" and record["environment"]["world_size"] == 1
    assert set(record["metrics"]) >= {"fid", "is", "precision", "recall", "kd"}
    assert record["evaluation"]["num_samples"] == 20
    for art in record["artefacts"].values():
        assert (record_dir / art["path"]).is_file()
    assert f"[{record_dir.name}](records/tiny/{record_dir.name})" in (base / "LEADERBOARD.md").read_text()


def test_non_track_runs_write_no_record(tmp_path, run_args):
    summary = train.train(train.parse_config(run_args + ["--run_name", "short", "--iterations", "2"]))
    assert "record_dir" not in summary and not (tmp_path / "records").exists()


def test_load_record_names_the_file_and_field(tiny_record, tmp_path):
    record_dir = _copy(tiny_record, tmp_path)
    _edit(record_dir, lambda d: d.pop("global_batch"))
    with pytest.raises(RecordError, match=r"record.json: missing field 'global_batch'"):
        load_record(record_dir)
    _edit(record_dir, lambda d: d.update(global_batch="16"))
    with pytest.raises(RecordError, match="field 'global_batch': '16' is not of type 'integer'"):
        load_record(record_dir)
    _edit(record_dir, lambda d: (d.update(global_batch=16), d["wall_clock"].pop("total_seconds")))
    with pytest.raises(RecordError, match="missing field 'wall_clock.total_seconds'"):
        load_record(record_dir)
    (record_dir / "record.json").write_text("{not json")
    with pytest.raises(RecordError, match="not valid JSON"):
        load_record(record_dir)


def test_tampered_or_missing_artefacts_are_detected(tiny_record, tmp_path):
    record_dir = _copy(tiny_record, tmp_path)
    load_record(record_dir, check_artefacts=True)
    with open(record_dir / "model.safetensors", "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(RecordError, match=r"artefact model .* has sha256"):
        load_record(record_dir, check_artefacts=True)
    (record_dir / "samples.npz").unlink()
    (record_dir / "model.safetensors").write_bytes((tiny_record[2] / "model.safetensors").read_bytes())
    with pytest.raises(RecordError, match="artefact samples .* is missing"):
        load_record(record_dir, check_artefacts=True)


def test_leaderboard_is_rendered_from_records_deterministically(tiny_record, tmp_path):
    first = _copy(tiny_record, tmp_path)
    second = first.with_name("2026-01-02_better")
    shutil.copytree(first, second)
    _edit(second, lambda d: d["metrics"].update(fid=d["metrics"]["fid"] / 2))
    _edit(second, lambda d: d.update(description="better | run"))
    text = leaderboard.render_markdown(tmp_path / "records")
    assert text == leaderboard.render_markdown(tmp_path / "records")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "tiny/" in line]
    assert rows[0].startswith("| 1 |") and "2026-01-02_better" in rows[0] and "better / run" in rows[0]
    assert rows[1].startswith("| 2 |") and first.name in rows[1]
    assert "alice, bob" in rows[1]
    out = tmp_path / "LEADERBOARD.md"
    assert leaderboard.main(["--records", str(tmp_path / "records"), "--out", str(out)]) == 0
    assert leaderboard.main(["--records", str(tmp_path / "records"), "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "hand edit\n")
    assert leaderboard.main(["--records", str(tmp_path / "records"), "--out", str(out), "--check"]) == 1
    assert [p.name for p in find_records(tmp_path / "records")] == sorted([first.name, second.name])


def test_reproduction_verdicts(tiny_record, tmp_path, capsys):
    _, track, _ = tiny_record
    record_dir = _copy(tiny_record, tmp_path)
    assert reproduce.main([str(record_dir), "--track", str(track)]) == 0
    assert "REPRODUCED" in capsys.readouterr().out
    # an edited metric no longer reproduces
    _edit(record_dir, lambda d: d["metrics"].update(fid=d["metrics"]["fid"] * 1.5 + 1))
    assert reproduce.main([str(record_dir), "--track", str(track)]) == 1
    assert "NOT REPRODUCED" in capsys.readouterr().out


def test_reproduction_refuses_invalid_records(tiny_record, tmp_path, capsys):
    _, track, original = tiny_record
    record_dir = _copy(tiny_record, tmp_path)
    # code hash that does not match the code in the log
    _edit(record_dir, lambda d: d.update(code_hash="0" * 64))
    assert reproduce.main([str(record_dir), "--track", str(track)]) == 2
    assert "is not the sha256 of the train.py embedded in its run log" in capsys.readouterr().err
    # a pickled checkpoint is refused even with a matching checksum
    shutil.copy(original / "record.json", record_dir / "record.json")
    (record_dir / "model.safetensors").rename(record_dir / "model.pt")
    _edit(record_dir, lambda d: d["artefacts"]["model"].update(path="model.pt"))
    assert reproduce.main([str(record_dir), "--track", str(track)]) == 2
    assert "model.pt is not a .safetensors file" in capsys.readouterr().err
    # a record of another track
    shutil.copy(original / "record.json", record_dir / "record.json")
    (record_dir / "model.pt").rename(record_dir / "model.safetensors")
    assert reproduce.main([str(record_dir), "--track", "digits"]) == 2
    assert "is for track 'tiny'" in capsys.readouterr().err


def test_reproduction_of_a_record_missing_a_field_exits_2(tiny_record, tmp_path, capsys):
    _, track, _ = tiny_record
    record_dir = _copy(tiny_record, tmp_path)
    _edit(record_dir, lambda d: d.pop("metrics"))
    assert reproduce.main([str(record_dir), "--track", str(track)]) == 2
    assert "record.json: missing field 'metrics'" in capsys.readouterr().err


# ---- the validator -----------------------------------------------------------------------------
def _validate(record_dir, capsys, *extra) -> tuple[int, str]:
    from records import validate
    code = validate.main([str(record_dir), "--root", str(record_dir.parent.parent), *extra])
    return code, capsys.readouterr().out


def _into_tree(tiny_record, tmp_path) -> Path:
    base, track, _ = tiny_record
    record_dir = _copy(tiny_record, tmp_path)
    (tmp_path / "records" / "tracks").mkdir(exist_ok=True)
    shutil.copy(track, tmp_path / "records" / "tracks" / "tiny.json")
    return record_dir


def test_validator_accepts_a_genuine_record(tiny_record, tmp_path, capsys):
    record_dir = _into_tree(tiny_record, tmp_path)
    code, out = _validate(record_dir, capsys)
    assert code == 0 and "valid" in out and "first record of its track" in out


@pytest.mark.parametrize("mutation, message", [
    (lambda d: d.update(iterations=12), "field 'iterations' is 12"),
    (lambda d: d["config"].update(global_batch=32), "field 'global_batch' is 16 \\(config 32\\)"),
    (lambda d: d["metrics"].update(fid=d["metrics"]["fid"] - 1), "field 'metrics.fid'"),
    (lambda d: d["metric_runs"][0]["metrics"].update(fid=1.0), "'metric_runs' differs from the stored"),
    (lambda d: d.update(code_hash="a" * 64), "is not the sha256 of the train.py"),
    (lambda d: d.update(parameters=d["parameters"] - 1), "the model file has"),
    (lambda d: d["evaluation"].update(num_steps=1), "differs from the track's protocol in \\['num_steps'\\]"),
    (lambda d: d.update(metric_runs=d["metric_runs"][:2]), "requires at least 3"),
    (lambda d: d["artefacts"]["samples"].update(sha256="0" * 64), "artefact samples .* has sha256"),
])
def test_validator_rejects_tampered_records_naming_the_field(tiny_record, tmp_path, capsys, mutation, message):
    import re
    record_dir = _into_tree(tiny_record, tmp_path)
    _edit(record_dir, mutation)
    code, out = _validate(record_dir, capsys)
    assert code == 1 and "INVALID" in out and re.search(message, out), out


def test_validator_rejects_missing_and_pickled_artefacts_and_forged_samples(tiny_record, tmp_path, capsys):
    import numpy as np
    from preprocessing.shards import sha256_file
    record_dir = _into_tree(tiny_record, tmp_path)
    (record_dir / "grid.png").unlink()
    code, out = _validate(record_dir, capsys)
    assert code == 1 and "artefact grid" in out and "is missing" in out
    shutil.copy(tiny_record[2] / "grid.png", record_dir / "grid.png")
    (record_dir / "model.safetensors").rename(record_dir / "model.ckpt")
    _edit(record_dir, lambda d: d["artefacts"]["model"].update(path="model.ckpt"))
    code, out = _validate(record_dir, capsys)
    assert code == 1 and "not a .safetensors file" in out
    # samples replaced by others (checksum updated too): re-scoring exposes them
    (record_dir / "model.ckpt").rename(record_dir / "model.safetensors")
    _edit(record_dir, lambda d: d["artefacts"]["model"].update(path="model.safetensors"))
    with np.load(record_dir / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    np.savez(record_dir / "samples.npz", arr_0=255 - images, arr_1=labels)
    _edit(record_dir, lambda d: d["artefacts"]["samples"].update(sha256=sha256_file(record_dir / "samples.npz")))
    code, out = _validate(record_dir, capsys)
    assert code == 1 and "re-scoring samples.npz gives" in out


def test_significance_rule(tiny_record, tmp_path, capsys):
    from records import validate
    first = _into_tree(tiny_record, tmp_path)
    better = first.with_name("2099-01-01_better")
    shutil.copytree(first, better)
    shift = lambda runs, delta: [dict(r, metrics=dict(r["metrics"], fid=r["metrics"]["fid"] + delta + 0.01 * i))  # noqa: E731
                                 for i, r in enumerate(runs)]

    def improve(record_dir, delta):
        data = json.loads((record_dir / "record.json").read_text())
        runs = shift(data["metric_runs"], delta)
        stored = json.loads((record_dir / "metrics.json").read_text())
        stored["runs"] = runs
        (record_dir / "metrics.json").write_text(json.dumps(stored))
        from preprocessing.shards import sha256_file
        data["metric_runs"] = runs
        data["metrics"]["fid"] = sum(r["metrics"]["fid"] for r in runs) / len(runs)
        data["date"] = "2099-01-01"
        data["artefacts"]["evaluation"]["sha256"] = sha256_file(record_dir / "metrics.json")
        (record_dir / "record.json").write_text(json.dumps(data))
    improve(better, -50.0)
    code, out = _validate(better, capsys, "--claim-record", "--no-rescore")
    assert code == 0 and "NEW RECORD" in out
    improve(better, 50.0 + 0.001)  # back to (about) the same numbers: no significant gain
    code, out = _validate(better, capsys, "--claim-record", "--no-rescore")
    assert code == 1 and "not a new record" in out
    a = {"metric_runs": [{"metrics": {"fid": v}} for v in (1.0, 1.1, 0.9)]}
    b = {"metric_runs": [{"metrics": {"fid": v}} for v in (2.0, 2.1, 1.9)]}
    track = {"primary_metric": "fid", "lower_is_better": ["fid"]}
    from scipy import stats
    expected = stats.ttest_ind([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], equal_var=False).pvalue / 2
    assert abs(validate.significance(a, b, track) - expected) < 1e-12
    assert validate.significance(b, a, track) > 0.99


def test_leaderboard_spread_published_list_and_plot_are_deterministic(tiny_record, tmp_path):
    record_dir = _into_tree(tiny_record, tmp_path)
    spec = json.loads((tmp_path / "records" / "tracks" / "tiny.json").read_text())
    spec["published"] = [{"source": "a paper", "description": "their model", "metrics": {"fid": 3.49}}]
    (tmp_path / "records" / "tracks" / "tiny.json").write_text(json.dumps(spec))
    out = tmp_path / "LEADERBOARD.md"
    leaderboard.render_leaderboard(tmp_path / "records", out)
    first_text, first_png = out.read_text(), (tmp_path / "records" / "tiny" / "leaderboard.png").read_bytes()
    leaderboard.render_leaderboard(tmp_path / "records", out)
    assert out.read_text() == first_text
    assert (tmp_path / "records" / "tiny" / "leaderboard.png").read_bytes() == first_png
    assert " ± " in first_text and "Published, not reproduced here" in first_text and "a paper" in first_text
    assert "records/tiny/leaderboard.png" in first_text and record_dir.name in first_text


def test_retrain_reproduces_a_cheap_track(tiny_record, tmp_path, capsys):
    base, track, _ = tiny_record
    record_dir = _copy(tiny_record, tmp_path)
    spec = json.loads(Path(track).read_text())
    assert reproduce.main([str(record_dir), "--track", str(track), "--retrain"]) == (0 if spec.get("retrain_allowed") else 2)
    assert "REPRODUCED" in capsys.readouterr().out
    assert reproduce.main([str(record_dir), "--track", "imagenet256_100k", "--retrain"]) == 2
