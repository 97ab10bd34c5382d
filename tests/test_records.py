"""Records, the leaderboard renderer and eval.sh's reproduction, on a tiny real run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import train
from records import leaderboard, reproduce
from records.record import RecordError, find_records, load_record


def _track_run(base: Path, track: Path, *flags: str) -> Path:
    args = ["--track", str(track), "--runs_dir", str(base / "runs"), "--records_dir", str(base / "records"),
            "--leaderboard", str(base / "LEADERBOARD.md"), *flags]
    return Path(train.train(train.parse_config(args))["record_dir"])


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory, digits_dir):
    from conftest import make_track
    base = tmp_path_factory.mktemp("records_run")
    (base / "records" / "tracks").mkdir(parents=True)
    track = make_track(base / "records" / "tracks" / "tiny.json", digits_dir)
    record_dir = _track_run(base, track, "--run_name", "2026-01-01_first", "--contributors", "alice, bob")
    return base, track, record_dir


@pytest.fixture(scope="module")
def second_record(tiny_record):
    """Another genuine record of the same track (another seed), written after the first."""
    base, track, _ = tiny_record
    return _track_run(base, track, "--run_name", "second", "--seed", "1", "--description", "better | run",
                      "--contributors", "eve [x](http://example.com) <b>")


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


def _set_runs(record_dir: Path, fn) -> None:
    """Edits the per-seed metric runs (fn(runs) changes them in place) and re-syncs everything derived
    from them, as a forger would: record.json's means, metrics.json and its sha256."""
    import numpy as np
    from preprocessing.shards import sha256_file
    data = json.loads((record_dir / "record.json").read_text())
    stored = json.loads((record_dir / "metrics.json").read_text())
    fn(data["metric_runs"])
    for name in data["metrics"]:
        values = np.array([r["metrics"][name] for r in data["metric_runs"]])
        data["metrics"][name] = stored["mean"][name] = float(values.mean())
        stored["std"][name] = float(values.std(ddof=1))
    stored["runs"] = data["metric_runs"]
    (record_dir / "metrics.json").write_text(json.dumps(stored))
    data["artefacts"]["evaluation"]["sha256"] = sha256_file(record_dir / "metrics.json")
    (record_dir / "record.json").write_text(json.dumps(data))


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


def test_a_run_on_other_data_writes_no_record(tiny_record, tmp_path, digits_dir, capsys):
    _, track, _ = tiny_record
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["metadata"]["note"] = "my own copy"
    (data / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    summary = train.train(train.parse_config([
        "--track", str(track), "--runs_dir", str(tmp_path / "runs"), "--records_dir", str(tmp_path / "records"),
        "--leaderboard", str(tmp_path / "LEADERBOARD.md"), "--data_dir", str(data), "--run_name", "other"]))
    assert "record_dir" not in summary and not (tmp_path / "records").exists()
    assert "is not the track's" in capsys.readouterr().out


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


def test_leaderboard_is_rendered_from_records_deterministically(tiny_record, second_record, tmp_path):
    first = _into_tree(tiny_record, tmp_path)
    second = tmp_path / "records" / "tiny" / second_record.name
    shutil.copytree(second_record, second)
    text = leaderboard.render_markdown(tmp_path / "records")
    assert text == leaderboard.render_markdown(tmp_path / "records")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "tiny/" in line]
    fid = {p.name: load_record(p)["metrics"]["fid"] for p in (first, second)}
    order = sorted(fid, key=lambda name: (fid[name], name))
    assert rows[0].startswith("| 1 |") and order[0] in rows[0] and rows[1].startswith("| 2 |") and order[1] in rows[1]
    row = {name: r for name, r in zip(order, rows)}
    assert "alice, bob" in row[first.name]
    # record text is inert: an escaped pipe stays in its cell, no link or HTML from a contributor
    assert "better \\| run" in row[second.name] and "eve \\[x\\](http&#58;//example.com) &lt;b&gt;" in row[second.name]
    import re
    cells = lambda r: len(re.findall(r"(?<!\\)\|", r))  # noqa: E731  (unescaped pipes)
    assert cells(row[second.name]) == cells(row[first.name]) == cells(text.splitlines()[[
        i for i, line in enumerate(text.splitlines()) if line.startswith("| # |")][0]])
    # a record that fails the validator is not ranked, and is named as such
    shutil.copytree(second, second.with_name(second.name + "-copy"))
    _edit(second.with_name(second.name + "-copy"), lambda d: d["metrics"].update(fid=0.001))
    text = leaderboard.render_markdown(tmp_path / "records")
    assert len([line for line in text.splitlines() if line.startswith("| ") and "tiny/" in line]) == 2
    assert f"`tiny/{second.name}-copy`" in text.split("## Not ranked")[1]
    shutil.rmtree(second.with_name(second.name + "-copy"))
    out = tmp_path / "LEADERBOARD.md"
    assert leaderboard.main(["--records", str(tmp_path / "records"), "--out", str(out)]) == 0
    assert leaderboard.main(["--records", str(tmp_path / "records"), "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "hand edit\n")
    assert leaderboard.main(["--records", str(tmp_path / "records"), "--out", str(out), "--check"]) == 1
    assert [p.name for p in find_records(tmp_path / "records")] == sorted([first.name, second.name])


def _reproduce(record_dir: Path, *extra: str) -> int:
    return reproduce.main([str(record_dir), "--root", str(record_dir.parent.parent), *extra])


def test_reproduction_verdicts(tiny_record, tmp_path, capsys, monkeypatch):
    record_dir = _into_tree(tiny_record, tmp_path)
    assert _reproduce(record_dir) == 0
    out = capsys.readouterr().out
    assert "REPRODUCED" in out and "fid (seed 1)" in out and "fid (mean)" in out and "exact" in out
    assert "samples_seed2      regenerated vs the record's: identical" in out
    from train import _cpu_model
    env = load_record(record_dir)["environment"]
    assert f"recorded on {_cpu_model()} (torch {env['torch']}), reproduced on {_cpu_model()} (torch " in out
    # one seed's number changed (the stored output and the mean with it): that seed does not reproduce
    import train as _train  # noqa: F401  (scoring runs through train.score_evaluation_seeds)
    real_score = _train.score_evaluation_seeds

    def shifted(spec, work):
        evaluation = real_score(spec, work)
        evaluation["runs"][1]["metrics"]["fid"] *= 2.0  # far outside any tolerance
        return evaluation
    monkeypatch.setattr(_train, "score_evaluation_seeds", shifted)
    assert _reproduce(record_dir) == 1
    out = capsys.readouterr().out
    assert "NOT REPRODUCED" in out and [l for l in out.splitlines() if l.startswith("fid (seed 1)")][0].endswith("NO")
    # a recorded infinity can never be "within" a relative tolerance
    assert not reproduce.within(float("-inf"), 1e9, {"rel": 0.05, "abs": 0.1})


@pytest.mark.slow
def test_reproduction_over_two_processes_regenerates_the_same_samples(tiny_record, tmp_path, capsys):
    """eval.sh with NPROC=2: generate.py --eval_dir over two gloo processes (GPUs on a GPU machine),
    the metrics in the verdict's process; sharding changes no sample, so every number is exact."""
    record_dir = _into_tree(tiny_record, tmp_path)
    out = tmp_path / "regenerated"
    assert _reproduce(record_dir, "--processes", "2", "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "REPRODUCED" in text and "NO" not in text.split()
    assert [l for l in text.splitlines() if l.startswith("fid (mean)")][0].endswith("exact")
    for key in ("samples", "samples_seed1", "samples_seed2"):
        assert f"{key:<18} regenerated vs the record's: identical" in text
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "samples.npz", "samples_seed1.npz",
                                                     "samples_seed2.npz"]  # no part files left
    with pytest.raises(SystemExit) as stop:  # argparse's exit, with the harness's "could not run" code
        _reproduce(record_dir, "--processes", "0")
    assert stop.value.code == 3 and "--processes must be at least 1" in capsys.readouterr().err


def test_reproduction_refuses_invalid_records(tiny_record, tmp_path, capsys):
    _, track, original = tiny_record
    record_dir = _into_tree(tiny_record, tmp_path)
    # code hash that does not match the code in the log
    _edit(record_dir, lambda d: d.update(code_hash="0" * 64))
    assert _reproduce(record_dir) == 2
    assert "is not the sha256 of the train.py embedded in its run log" in capsys.readouterr().err
    # a pickled checkpoint is refused even with a matching checksum
    shutil.copy(original / "record.json", record_dir / "record.json")
    (record_dir / "model.safetensors").rename(record_dir / "model.pt")
    _edit(record_dir, lambda d: d["artefacts"]["model"].update(path="model.pt"))
    assert _reproduce(record_dir) == 2
    assert "model.pt is not a .safetensors file" in capsys.readouterr().err
    # the track comes from the tree's tracks/, by name: a record cannot bring its own tolerances
    shutil.copy(original / "record.json", record_dir / "record.json")
    (record_dir / "model.pt").rename(record_dir / "model.safetensors")
    assert reproduce.main([str(record_dir)]) == 2  # the repository's tree has no track 'tiny'
    assert "track 'tiny' has no definition" in capsys.readouterr().err
    # an off-budget record is refused before anything runs (eval.sh validates first)
    _edit(record_dir, lambda d: d.update(iterations=3))
    assert _reproduce(record_dir) == 2
    assert "field 'iterations' is 3" in capsys.readouterr().err


def test_reproduction_of_a_record_missing_a_field_exits_2(tiny_record, tmp_path, capsys):
    record_dir = _into_tree(tiny_record, tmp_path)
    _edit(record_dir, lambda d: d.pop("metrics"))
    assert _reproduce(record_dir) == 2
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
    (lambda d: d.update(metric_runs=d["metric_runs"][:2]), r"has the seeds \[0, 1\], the protocol's are"),
    (lambda d: d["artefacts"]["samples"].update(sha256="0" * 64), "artefact samples .* has sha256"),
    (lambda d: d["metrics"].update(fid=float("-inf")), "non-finite number -Infinity"),
    (lambda d: d.update(metric_runs=[d["metric_runs"][0]] * 3), r"has the seeds \[0, 0, 0\]"),
    (lambda d: d.update(metrics={}), "field 'metrics' names other metrics than its runs"),
    (lambda d: d.update(date="2020-01-01"), "field 'date' is 2020-01-01, the folder is"),
    (lambda d: d["dataset"].update(train_split="heldout"), r"'dataset' differs from the track's in \['train_split'\]"),
    (lambda d: d.update(data_manifest_sha256="0" * 64), "trained on other data"),
    (lambda d: d["config"].update(lr=1.0), r"'config' differs from the model file's in \['lr'\]"),
    (lambda d: d["wall_clock"].update(train_seconds=d["wall_clock"]["train_seconds"] + 5), "the run log says"),
    (lambda d: d.update(description="fine\n| 1 | 0.01 |"), "field 'description' contains control or invisible"),
    (lambda d: d.update(contributors=["al\u200bice", "x \u202e1.0 DIF"]), "'contributors.0' contains control or invisible"),
    (lambda d: d.update(gpu_hours=10 ** 400), "implausibly large"),
    (lambda d: d["environment"].update(gpu="NVIDIA H100"), "field 'environment' is not the one the run log recorded"),
    (lambda d: d["throughput"].update(images_per_second=1e6), "field 'throughput.images_per_second' is 1000000.0"),
    # 5 s more sampling, the total kept the sum of its parts (a tiny run can sample in under the
    # log's 0.1 s resolution, so zeroing it would not be a change)
    (lambda d: d["wall_clock"].update(sample_seconds=d["wall_clock"]["sample_seconds"] + 5,
                                      total_seconds=d["wall_clock"]["total_seconds"] + 5),
     r"'wall_clock.sample_seconds' is [0-9.]+, the run log says"),
    (lambda d: d["artefacts"]["grid"].update(path="../grid.png"), "must be a file name inside the record folder"),
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


def test_metrics_edited_consistently_are_refused_by_re_scoring_and_not_ranked(tiny_record, tmp_path, capsys):
    record_dir = _into_tree(tiny_record, tmp_path)
    # 0.1% more FID in every place that states it: only re-scoring the samples can tell
    _set_runs(record_dir, lambda runs: [r["metrics"].update(fid=r["metrics"]["fid"] * (1 + 1e-3)) for r in runs])
    code, out = _validate(record_dir, capsys, "--no-rescore")
    assert code == 0, out
    code, out = _validate(record_dir, capsys)
    assert code == 1 and "field 'metric_runs.0.metrics.fid' is" in out and "re-scoring samples.npz gives" in out
    text = leaderboard.render_markdown(tmp_path / "records")
    assert "## Not ranked" in text and f"`tiny/{record_dir.name}`" in text.split("## Not ranked")[1]
    assert not [line for line in text.splitlines() if line.startswith("| ") and "tiny/" in line]


def test_validator_reports_broken_records_and_copies_and_goes_on(tiny_record, second_record, tmp_path, capsys):
    from preprocessing.shards import sha256_file
    first = _into_tree(tiny_record, tmp_path)
    twin = first.with_name(first.name + "-mine")  # someone else's files, relabelled
    shutil.copytree(first, twin)
    _edit(twin, lambda d: d.update(contributors=["mallory"]))
    # the same tensors and images in other bytes: the model's metadata re-spaced, samples compressed
    import numpy as np
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(twin / "model.safetensors"), framework="np") as fh:
        meta = fh.metadata()
    save_file(load_file(str(twin / "model.safetensors")), str(twin / "model.safetensors"),
              metadata=meta | {"config": json.dumps(json.loads(meta["config"]), indent=1)})
    with np.load(twin / "samples.npz") as f:
        arrays = dict(f)
    np.savez_compressed(twin / "samples.npz", **arrays)
    _edit(twin, lambda d: [d["artefacts"][k].update(sha256=sha256_file(twin / n))
                           for k, n in (("model", "model.safetensors"), ("samples", "samples.npz"))])
    code, out = _validate(twin, capsys)
    assert code == 1 and "its model or samples are the same as record" in out
    code, out = _validate(first, capsys)  # which of the two is the original is for git history to say
    assert code == 1 and f"the same as record {twin.name}'s" in out
    assert f"`tiny/{first.name}`" in leaderboard.render_markdown(tmp_path / "records").split("## Not ranked")[1]
    shutil.rmtree(twin)
    broken = tmp_path / "records" / "tiny" / second_record.name
    shutil.copytree(second_record, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    _edit(broken, lambda d: d["artefacts"]["model"].update(sha256=sha256_file(broken / "model.safetensors")))
    from records import validate
    code = validate.main([str(broken), str(first), "--root", str(tmp_path / "records"), "--no-rescore"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1 and lines[0].startswith(f"INVALID {broken}") and "not a readable exported model" in lines[0]
    assert lines[-1].startswith(f"valid   {first}"), lines  # the next record is still judged
    (broken / "model.safetensors").unlink()
    (broken / "model.safetensors").symlink_to(first / "model.safetensors")
    code, out = _validate(broken, capsys, "--no-rescore")
    assert code == 1 and "is a symlink" in out


def test_validator_finds_a_copy_stored_in_another_dtype_and_order(tiny_record, tmp_path, capsys):
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from preprocessing.shards import sha256_file
    from records import validate
    first = _into_tree(tiny_record, tmp_path)
    twin = first.with_name(first.name + "-mine")
    shutil.copytree(first, twin)
    # a float32 tensor stored as float64 (it loads as the same values) and two images swapped
    with safe_open(str(twin / "model.safetensors"), framework="np") as fh:
        meta = fh.metadata()
    tensors = load_file(str(twin / "model.safetensors"))
    name = next(k for k, v in sorted(tensors.items()) if v.dtype == np.float32)
    save_file(tensors | {name: tensors[name].astype(np.float64)}, str(twin / "model.safetensors"), metadata=meta)
    with np.load(twin / "samples_seed1.npz") as f:
        arrays = dict(f)
    assert not np.array_equal(arrays["arr_0"][0], arrays["arr_0"][1])
    arrays["arr_0"][[0, 1]] = arrays["arr_0"][[1, 0]]
    np.savez(twin / "samples_seed1.npz", **arrays)
    _edit(twin, lambda d: [d["artefacts"][k].update(sha256=sha256_file(twin / n))
                           for k, n in (("model", "model.safetensors"), ("samples_seed1", "samples_seed1.npz"))])
    code, out = _validate(twin, capsys, "--no-rescore")  # a swap changes IS and KD: not re-scored here
    assert code == 1 and f"the same as record {first.name}'s: the model is {first.name}'s" in out, out
    assert f"20 images of samples_seed1 are in {first.name}'s samples_seed1" in out
    code, out = _validate(first, capsys, "--no-rescore")
    assert code == 1 and f"the same as record {twin.name}'s" in out
    # each alone is enough: the same tensor values, the same images
    [a, b] = [validate.validate_record(r, tmp_path / "records" / "tracks", rescore=False)["_content"]
              for r in (first, twin)]
    assert a["model"] == b["model"] and a["samples"]["samples_seed1"] == b["samples"]["samples_seed1"]


def test_shared_images_are_judged_by_whether_the_batches_drew_the_same_noise():
    from records.validate import _shared_batches
    a = frozenset(range(100))
    close = frozenset(range(90, 190))  # 10 of 100 alike: two close models from the same noise can draw that
    assert _shared_batches({("A", "samples"): a, ("B", "samples"): close}) == []
    assert _shared_batches({("A", "samples"): a, ("A", "samples_seed1"): close}) == [
        (("A", "samples"), ("A", "samples_seed1"), 10)]  # other noise: a reused batch
    assert _shared_batches({("A", "samples"): a, ("B", "samples"): frozenset(range(40, 140))}) == [
        (("A", "samples"), ("B", "samples"), 60)]


def test_validator_refuses_one_sample_batch_for_every_seed(tiny_record, tmp_path, capsys):
    from preprocessing.shards import sha256_file
    record_dir = _into_tree(tiny_record, tmp_path)
    for key in ("samples_seed1", "samples_seed2"):
        shutil.copy(record_dir / "samples.npz", record_dir / f"{key}.npz")
        _edit(record_dir, lambda d: d["artefacts"][key].update(sha256=sha256_file(record_dir / f"{key}.npz")))
    # every seed's numbers are the first one's, as re-scoring the reused batch gives them
    _set_runs(record_dir, lambda runs: [r.update(metrics=dict(runs[0]["metrics"])) for r in runs])
    code, out = _validate(record_dir, capsys)
    assert code == 1 and "artefacts samples and samples_seed1 share 20 images" in out, out


def test_validator_checks_the_training_time_against_the_log_s_step_lines(tiny_record, tmp_path, capsys):
    import re

    from preprocessing.shards import sha256_file
    record_dir = _into_tree(tiny_record, tmp_path)
    log = (record_dir / "train.log").read_text()
    [done] = re.findall(r"^training done: 6 iterations, train_time:([0-9.]+)s$", log, re.M)
    assert re.search(rf"^step:6/6 .* train_time:{done}s ", log, re.M)  # the last step line's time

    def claim(text: str, seconds: float) -> None:  # the log and every number derived from its time
        (record_dir / "train.log").write_text(text)
        _edit(record_dir, lambda d: (
            d["wall_clock"].update(train_seconds=seconds, total_seconds=round(
                seconds + d["wall_clock"]["sample_seconds"] + d["wall_clock"]["eval_seconds"], 2)),
            d["throughput"].update(iterations_per_second=round(6 / seconds, 3),
                                   images_per_second=round(6 * 16 / seconds, 1)),
            d["artefacts"]["log"].update(sha256=sha256_file(record_dir / "train.log"))))
    faster = float(done) / 2
    claim(log.replace(f"train_time:{done}s\n", f"train_time:{faster}s\n"), faster)
    code, out = _validate(record_dir, capsys, "--no-rescore")
    assert code == 1 and (f"the run log's 'training done' line (6 iterations, train_time:{faster}s) is not its "
                          f"last step line (step:6/6 train_time:{float(done)}s)") in out, out
    # a step line edited: the training time goes back after it
    earlier = re.findall(r"^step:4/6 .* train_time:([0-9.]+)s ", log, re.M)[0]
    claim(re.sub(rf"(step:4/6 .* train_time:){earlier}s ", rf"\g<1>{float(earlier) + 100}s ", log), float(done))
    code, out = _validate(record_dir, capsys, "--no-rescore")
    assert code == 1 and f"step lines go back: step:6 train_time:{float(done)}s after step:4" in out, out


def test_step_lines_may_start_again_from_a_checkpoint_in_a_resumed_leg():
    from records.validate import _check_steps
    legs = ["step:2/6 loss:1 train_time:1.0s elapsed:1.0s", "step:4/6 loss:1 train_time:2.0s elapsed:2.0s",
            "resumed from step_00000002.safetensors at step 2",  # a crash after step 4: its checkpoint was step 2's
            "step:4/6 loss:1 train_time:1.9s elapsed:0.9s", "step:6/6 loss:1 train_time:2.9s elapsed:1.9s"]
    _check_steps(Path("record.json"), "\n".join(legs) + "\n", 6, 2.9)
    with pytest.raises(RecordError, match=r"go back: step:4 train_time:1.9s after step:4 train_time:2.0s"):
        _check_steps(Path("record.json"), "\n".join(legs[:2] + legs[3:]) + "\n", 6, 2.9)


def test_validator_checks_the_files_behind_the_record(tiny_record, tmp_path, capsys):
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from preprocessing.shards import sha256_file
    first = _into_tree(tiny_record, tmp_path)
    original = first.with_name(first.name + "-orig")
    shutil.copytree(first, original)  # a pristine copy to restore from (outside the checks below)
    (original / "record.json").rename(original / "record.keep")

    def restore():
        shutil.rmtree(first)
        shutil.copytree(original, first)
        (first / "record.keep").rename(first / "record.json")

    def rehash(*names):
        _edit(first, lambda d: [d["artefacts"][k].update(sha256=sha256_file(first / d["artefacts"][k]["path"]))
                                for k in names])
    # the architecture the network is rebuilt from must be the one its config implies
    with safe_open(str(first / "model.safetensors"), framework="np") as fh:
        meta = fh.metadata()
    options = json.loads(meta["options"]) | {"rope": True, "norm": "rmsnorm"}
    save_file(load_file(str(first / "model.safetensors")), str(first / "model.safetensors"),
              metadata=meta | {"options": json.dumps(options)})
    rehash("model")
    code, out = _validate(first, capsys, "--no-rescore")
    assert code == 1 and "the architecture in its metadata (['options'])" in out
    restore()
    # every evaluation seed's samples are re-scored, not only the first
    with np.load(first / "samples_seed1.npz") as f:
        arrays = dict(f)
    arrays["arr_0"] = 255 - arrays["arr_0"]
    np.savez(first / "samples_seed1.npz", **arrays)
    rehash("samples_seed1")
    code, out = _validate(first, capsys)
    assert code == 1 and "re-scoring samples_seed1.npz gives" in out
    restore()
    # metrics.json is the evaluation output: its mean is checked too
    stored = json.loads((first / "metrics.json").read_text())
    stored["mean"]["fid"] = 0.01
    (first / "metrics.json").write_text(json.dumps(stored))
    rehash("evaluation")
    code, out = _validate(first, capsys, "--no-rescore")
    assert code == 1 and "'mean.fid of the evaluation output' is 0.01" in out
    restore()
    # the grid is the grid of the samples
    from PIL import Image
    Image.new("L", (1, 1), 255).save(first / "grid.png")
    rehash("grid")
    code, out = _validate(first, capsys, "--no-rescore")
    assert code == 1 and "artefact grid is not the grid of the record's samples" in out
    restore()
    # a record that keeps its model elsewhere: refused on a track that keeps artefacts in the folder
    (first / "model.safetensors").unlink()
    _edit(first, lambda d: d["artefacts"].update(model={"url": "https://example.org/m.safetensors",
                                                         "sha256": "0" * 64}))
    code, out = _validate(first, capsys, "--no-rescore")
    assert code == 1 and "artefact model is remote; track 'tiny' keeps its artefacts in the record folder" in out
    spec = json.loads((tmp_path / "records" / "tracks" / "tiny.json").read_text())
    (tmp_path / "records" / "tracks" / "tiny.json").write_text(json.dumps(spec | {"remote_artefacts": True}))
    code, out = _validate(first, capsys, "--no-rescore")
    assert code == 0 and "not checked here: model (remote, not downloaded)" in out
    (tmp_path / "records" / "tracks" / "tiny.json").write_text(json.dumps(spec))
    restore()
    # duplicate keys: a reader would see the first value, the tools the last
    text = (first / "record.json").read_text()
    (first / "record.json").write_text(text.replace("{", '{"description": "decoy", ', 1))
    code, out = _validate(first, capsys, "--no-rescore")
    assert code == 1 and "duplicate keys ['description']" in out
    restore()
    shutil.rmtree(original)
    # a folder name that is not <date>_<slug>, and a folder that is a link to another record
    odd = first.with_name(first.name + " x")
    shutil.copytree(first, odd)
    code, out = _validate(odd, capsys, "--no-rescore")
    assert code == 1 and "record folders are named" in out
    shutil.rmtree(odd)
    (first.parent / f"{first.name}-mirror").symlink_to(first)
    code, out = _validate(first.parent / f"{first.name}-mirror", capsys, "--no-rescore")
    assert code == 1 and "not a link" in out
    # a description that starts with "-" is re-trained as a value, not read as a flag
    assert "--description=-2%-FID" in reproduce.retrain_args({"config": {"description": "-2%-FID"}}, tmp_path, "t")


def test_significance_rule(tiny_record, second_record, tmp_path, capsys):
    from records import validate
    first = _into_tree(tiny_record, tmp_path)
    better = tmp_path / "records" / "tiny" / second_record.name
    shutil.copytree(second_record, better)
    first_runs = json.loads((first / "record.json").read_text())["metric_runs"]

    def set_fid(record_dir, delta):  # the first record's FIDs + delta (+ a little spread)
        _set_runs(record_dir, lambda runs: [r["metrics"].update(fid=f["metrics"]["fid"] + delta + 0.01 * i)
                                            for i, (r, f) in enumerate(zip(runs, first_runs))])
    set_fid(better, -50.0)
    code, out = _validate(better, capsys, "--claim-record", "--no-rescore")
    assert code == 0 and "NEW RECORD" in out
    set_fid(better, 0.001)  # the same numbers, about: no significant gain
    code, out = _validate(better, capsys, "--claim-record", "--no-rescore")
    assert code == 1 and "not a new record" in out
    # a claim is judged against every other record, whatever dates they carry
    set_fid(better, -50.0)
    code, out = _validate(first, capsys, "--claim-record", "--no-rescore")
    assert code == 1 and f"previous best" in out and better.name in out
    a = {"metric_runs": [{"metrics": {"fid": v}} for v in (1.0, 1.1, 0.9)]}
    b = {"metric_runs": [{"metrics": {"fid": v}} for v in (2.0, 2.1, 1.9)]}
    track = {"primary_metric": "fid", "lower_is_better": ["fid"]}
    from scipy import stats
    expected = stats.ttest_ind([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], equal_var=False).pvalue / 2
    assert abs(validate.significance(a, b, track) - expected) < 1e-12
    assert validate.significance(b, a, track) > 0.99


def test_leaderboard_spread_published_list_and_plot_are_deterministic(tiny_record, tmp_path, monkeypatch):
    from records import validate
    record_dir = _into_tree(tiny_record, tmp_path)
    spec = json.loads((tmp_path / "records" / "tracks" / "tiny.json").read_text())
    spec["published"] = [{"source": "a paper", "description": "their model", "metrics": {"fid": 3.49}}]
    (tmp_path / "records" / "tracks" / "tiny.json").write_text(json.dumps(spec))
    out = tmp_path / "LEADERBOARD.md"
    calls, real_validate_tree = [], validate.validate_tree
    monkeypatch.setattr(validate, "validate_tree", lambda *a, **k: calls.append(a) or real_validate_tree(*a, **k))
    leaderboard.render_leaderboard(tmp_path / "records", out)
    assert len(calls) == 1  # the table and the plot are rendered from one validation
    assert out.read_text() == leaderboard.render_markdown(tmp_path / "records")
    first_text, first_png = out.read_text(), (tmp_path / "records" / "tiny" / "leaderboard.png").read_bytes()
    leaderboard.render_leaderboard(tmp_path / "records", out)
    assert out.read_text() == first_text
    assert (tmp_path / "records" / "tiny" / "leaderboard.png").read_bytes() == first_png
    assert " ± " in first_text and "Published, not reproduced here" in first_text and "a paper" in first_text
    assert "records/tiny/leaderboard.png" in first_text and record_dir.name in first_text


def test_retrain_reproduces_a_cheap_track(tiny_record, tmp_path, capsys, monkeypatch):
    record_dir = _into_tree(tiny_record, tmp_path)
    # a record naming a data folder of the reviewer's: re-training uses the track's data instead
    victim = tmp_path / "my_data"
    victim.mkdir()
    (victim / "precious").write_text("x")
    seen = []
    real_main = train.main
    monkeypatch.setattr(train, "main", lambda argv: seen.append(argv) or real_main(argv))
    assert "--data_dir" not in reproduce.retrain_args({"config": {"data_dir": str(victim), "lr": 1.0}},
                                                       tmp_path, "t.json")
    assert _reproduce(record_dir, "--retrain") == 0
    assert "REPRODUCED" in capsys.readouterr().out and "--data_dir" not in seen[0]
    assert (victim / "precious").read_text() == "x"
    # a record made by another train.py is not re-trained with this one unless asked
    log = (record_dir / "train.log").read_text()
    other = log.replace("\n", "\n# another version\n", 1)
    (record_dir / "train.log").write_text(other)
    from preprocessing.shards import sha256_file
    _edit(record_dir, lambda d: (d.update(code_hash=train.code_hash(train.code_from_log(other))),
                                 d["artefacts"]["log"].update(sha256=sha256_file(record_dir / "train.log"))))
    assert _reproduce(record_dir, "--retrain") == 2
    assert "Check out the commit whose train.py matches" in capsys.readouterr().err
    # tracks not marked retrain_allowed refuse
    spec = json.loads((tmp_path / "records" / "tracks" / "tiny.json").read_text())
    (tmp_path / "records" / "tracks" / "tiny.json").write_text(json.dumps(spec | {"retrain_allowed": False}))
    assert _reproduce(record_dir, "--retrain", "--other-code") == 2
    assert "not cheap enough for --retrain" in capsys.readouterr().err


def test_reproduction_never_writes_into_a_record_and_a_crash_is_no_verdict(tiny_record, tmp_path, capsys,
                                                                           monkeypatch):
    """--out inside the records tree would overwrite the record's samples with the regenerated
    ones and compare them with themselves; bad arguments and crashes exit 3 (no verdict), not
    1 ("not reproduced") or 2 ("invalid record")."""
    record_dir = _into_tree(tiny_record, tmp_path)
    before = {p.name: p.read_bytes() for p in record_dir.iterdir()}
    for out in (record_dir, record_dir.parent / "elsewhere"):
        assert _reproduce(record_dir, "--out", str(out)) == 3
        assert "is inside the records tree" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in record_dir.iterdir()} == before
    (tmp_path / "a_file").write_text("x")
    assert _reproduce(record_dir, "--out", str(tmp_path / "a_file")) == 3
    assert "is a file; name a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        _reproduce(record_dir, "--no-such-flag")
    assert stop.value.code == 3
    import train as _train

    def broken(*args, **kwargs):
        raise MemoryError("out of memory while sampling")
    monkeypatch.setattr(_train, "sample_evaluation_seeds", broken)
    assert _reproduce(record_dir) == 3
    err = capsys.readouterr().err
    assert "MemoryError: out of memory while sampling" in err and "no verdict" in err
    # a launch over several processes that fails is no verdict either
    monkeypatch.setattr(reproduce.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    assert _reproduce(record_dir, "--processes", "2") == 3
    err = capsys.readouterr().err
    assert "sampling over 2 processes failed" in err and "no verdict" in err


def test_eval_sh_reads_paths_from_where_it_is_typed(tmp_path):
    """bash ../eval.sh <relative record> from another folder names that folder's record (it was
    resolved against the repository root)."""
    import subprocess
    import sys
    root = Path(reproduce.__file__).resolve().parent.parent
    (tmp_path / "records" / "digits").mkdir(parents=True)
    proc = subprocess.run(["bash", str(root / "eval.sh"), "records/digits/2026-01-01_missing"], cwd=tmp_path,
                          env=dict(os.environ, SPEEDRUN_PYTHON=sys.executable), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{tmp_path}/records/digits/2026-01-01_missing/record.json: record file not found" in proc.stderr


def test_validate_with_a_mistyped_root_fails(tmp_path, capsys):
    from records import validate
    assert validate.main(["--root", str(tmp_path / "nosuch")]) == 1
    assert "no record folders under it" in capsys.readouterr().out


def _set_provenance(record_dir: Path, fn) -> None:
    """Edits metrics.json's provenance (fn(provenance) in place) and re-syncs its sha256."""
    from preprocessing.shards import sha256_file
    stored = json.loads((record_dir / "metrics.json").read_text())
    fn(stored["provenance"])
    (record_dir / "metrics.json").write_text(json.dumps(stored))
    _edit(record_dir, lambda d: d["artefacts"]["evaluation"].update(sha256=sha256_file(record_dir / "metrics.json")))


def test_a_record_says_what_scored_it_and_it_must_be_what_scores_it_again(tiny_record, tmp_path, capsys):
    """metrics.json names the reference batch's and the feature network's sha256 (for ImageNet
    tracks: the Inception/DINOv2 files a reviewer compares with the published ones); the digits
    network is pinned, and re-scoring must have used the same files."""
    from evaluations.digits_net import DIGITS_NET_SHA256
    record_dir = _into_tree(tiny_record, tmp_path)
    provenance = json.loads((record_dir / "metrics.json").read_text())["provenance"]
    assert provenance["networks"] == {"digits_net": {"weights_sha256": DIGITS_NET_SHA256}}
    assert len(provenance["reference_sha256"]) == 64
    original = (record_dir / "metrics.json").read_bytes(), (record_dir / "record.json").read_bytes()
    for fn, message in ((lambda p: p["networks"]["digits_net"].update(weights_sha256="a" * 64),
                         f"scored with digits_net weights {'a' * 64}, the track pins {DIGITS_NET_SHA256}"),
                        (lambda p: p.update(reference_sha256="b" * 64), "re-scoring samples.npz used"),
                        (lambda p: p.pop("networks"), "does not give the sha256 of the reference")):
        (record_dir / "metrics.json").write_bytes(original[0])
        (record_dir / "record.json").write_bytes(original[1])
        _set_provenance(record_dir, fn)
        code, out = _validate(record_dir, capsys)
        assert code == 1 and message in out, out


def test_device_train_seconds_must_fit_the_logged_process_counts(tiny_record, tmp_path, capsys):
    record_dir = _into_tree(tiny_record, tmp_path)
    clock = json.loads((record_dir / "record.json").read_text())["wall_clock"]
    assert clock["device_train_seconds"] == pytest.approx(clock["train_seconds"], abs=0.011)  # one process
    _edit(record_dir, lambda d: d["wall_clock"].update(device_train_seconds=2 * clock["train_seconds"] + 1))
    code, out = _validate(record_dir, capsys)
    assert code == 1 and "not train_seconds x the run's processes ([1] in its legs)" in out


# ---- the spot check: the samples are the model's -----------------------------------------------
def _forge_samples(record_dir: Path, forge) -> None:
    """Replaces every seed's images (arr_0) by forge(k, images, labels), k the seed's position, and
    re-syncs all that follows from them, as a forger would: the grid, the metrics re-scored
    (record.json, metrics.json) and every sha256."""
    import numpy as np
    from PIL import Image

    import generate
    from evaluations.evaluate import score_samples
    from preprocessing.shards import sha256_file
    from records import validate
    from records.record import artefact_file_name
    track = json.loads((record_dir.parent.parent / "tracks" / "tiny.json").read_text())
    keys = validate._sample_keys(json.loads((record_dir / "record.json").read_text()))
    for k, key in enumerate(keys):
        with np.load(record_dir / artefact_file_name(key)) as f:
            images, labels = f["arr_0"], f["arr_1"]
        np.savez(record_dir / artefact_file_name(key), arr_0=forge(k, images.copy(), labels), arr_1=labels)
    with np.load(record_dir / "samples.npz") as f:
        Image.fromarray(generate.protocol_grid(f["arr_0"], track, track["evaluation"])).save(record_dir / "grid.png")
    _edit(record_dir, lambda d: [d["artefacts"][key].update(sha256=sha256_file(record_dir / artefact_file_name(key)))
                                 for key in keys + ["grid"]])
    scores = {key: score_samples(record_dir / artefact_file_name(key), track)[0] for key in keys}
    _set_runs(record_dir, lambda runs: [run.update(metrics=scores[key]) for run, key in zip(runs, keys)])


def test_spot_check_indices_are_fixed_by_the_file_and_fresh_at_each_validation():
    from records.validate import SPOT_CHECK, spot_check_indices
    n = 10 ** 12  # no two draws alike by chance
    picks = [set(spot_check_indices("ab" * 32, n)) for _ in range(3)]
    fixed = set.intersection(*picks)
    assert len(fixed) == SPOT_CHECK["fixed"] and all(len(p) == sum(SPOT_CHECK.values()) for p in picks)
    assert len(set.union(*picks)) == SPOT_CHECK["fixed"] + 3 * SPOT_CHECK["fresh"]  # fresh ones every time
    assert not fixed & set.intersection(*[set(spot_check_indices("cd" * 32, n)) for _ in range(2)])
    assert spot_check_indices("ab" * 32, 1) == [0]


def test_samples_that_are_not_the_model_s_are_refused_whatever_else_agrees(tiny_record, digits_dir, tmp_path,
                                                                           capsys):
    """The auditor's forgery: every batch replaced by training images of the same labels (one
    pixel changed per seed, so the seeds share no image), re-scored, grid and checksums re-made:
    only regenerating samples from the model can tell."""
    import numpy as np
    record_dir = _into_tree(tiny_record, tmp_path)
    train_images = np.concatenate([np.load(p) for p in sorted((digits_dir / "train").glob("images-*.npy"))])
    train_labels = np.concatenate([np.load(p) for p in sorted((digits_dir / "train").glob("labels-*.npy"))])

    def training_images(k, images, labels):
        picked = np.stack([train_images[train_labels == c][i // 10] for i, c in enumerate(labels)])
        picked[:, 0, 0, 0] ^= k
        return picked
    _forge_samples(record_dir, training_images)
    code, out = _validate(record_dir, capsys, "--no-rescore")
    assert code == 0, out  # consistent everywhere else
    code, out = _validate(record_dir, capsys)
    assert code == 1 and "artefact samples (samples.npz) is not its model's samples: image " in out, out
    assert "differs from the one model.safetensors samples (seed 0) in " in out
    text = leaderboard.render_markdown(tmp_path / "records")
    assert f"`tiny/{record_dir.name}`" in text.split("## Not ranked")[1]


def test_one_forged_image_is_caught_when_its_index_is_checked(tiny_record, tmp_path):
    from records import validate
    record_dir = _into_tree(tiny_record, tmp_path)
    tracks = tmp_path / "records" / "tracks"
    validate.validate_record(record_dir, tracks, spot_indices=lambda sha, n: list(range(n)))  # every image

    def invert_image_7(k, images, labels):
        if k == 1:
            images[7] = 255 - images[7]
        return images
    _forge_samples(record_dir, invert_image_7)
    with pytest.raises(RecordError, match=r"artefact samples_seed1 \(samples_seed1.npz\) is not its model's "
                                          r"samples: image 7 differs .* \(seed 1\) in \d+ of 64 pixel values"):
        validate.validate_record(record_dir, tracks, spot_indices=lambda sha, n: [7])
    validate.validate_record(record_dir, tracks, spot_indices=lambda sha, n: [6, 8])  # the others are the model's


def test_labels_must_be_the_protocol_s(tiny_record, tmp_path, capsys):
    import numpy as np
    from preprocessing.shards import sha256_file
    record_dir = _into_tree(tiny_record, tmp_path)
    with np.load(record_dir / "samples_seed2.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    np.savez(record_dir / "samples_seed2.npz", arr_0=images, arr_1=np.roll(labels, 1))
    _edit(record_dir,
          lambda d: d["artefacts"]["samples_seed2"].update(sha256=sha256_file(record_dir / "samples_seed2.npz")))
    code, out = _validate(record_dir, capsys, "--no-rescore")  # no network needed: checked always
    assert code == 1 and ("artefact samples_seed2 (samples_seed2.npz) has label 9 at index 0, the protocol's "
                          "balanced labels give 0") in out, out


def test_tracks_whose_samples_are_not_regenerated_say_so(tiny_record, tmp_path, capsys, monkeypatch):
    from records import validate
    record_dir = _into_tree(tiny_record, tmp_path)
    monkeypatch.setattr(validate, "LOCAL_DECODERS", set())  # as an INVAE track is judged
    code, out = _validate(record_dir, capsys)
    assert code == 0 and "not checked here: the samples are not regenerated (decoding identity latents" in out
    assert "`bash eval.sh <record>` is that check" in out


def test_the_committed_digits_record_s_samples_are_its_model_s():
    from records import validate
    from records.record import artefact_path
    root = Path(reproduce.__file__).resolve().parent
    record_dir = [r for r in find_records(root) if r.parent.name == "digits"][0]
    record = load_record(record_dir)
    track = json.loads((root / "tracks" / "digits.json").read_text())
    files = {key: artefact_path(record_dir, record, key) for key in validate._sample_keys(record)}
    assert validate._spot_check(record_dir / "record.json", record, track, files, record_dir / "model.safetensors",
                                lambda sha, n: validate.spot_check_indices(sha, n) + [0, n - 1]) is None


def test_regenerated_batches_are_compared_chunk_by_chunk(tmp_path):
    import numpy as np
    a = np.random.default_rng(0).integers(0, 50, (10, 4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[1, 0, 0, 0] += 1  # three images in three chunks of 3, the largest difference in a middle one
    b[5, 2, 1, 2] += 200
    b[9] += 7
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez_compressed(tmp_path / "b.npz", arr_0=b)  # a compressed member is streamed
    expected = "3 of 10 images differ (largest pixel difference 200)"
    whole = (int(np.any(a != b, axis=(1, 2, 3)).sum()), int(np.abs(a.astype(np.int16) - b).max()))
    assert whole == (3, 200)  # what comparing the whole batches gave
    for chunk in (1, 3, 4, 100):
        assert reproduce.compare_batches(tmp_path / "a.npz", tmp_path / "b.npz", chunk=chunk) == expected
    assert reproduce.compare_batches(tmp_path / "a.npz", tmp_path / "a.npz", chunk=3) == "identical"
    np.savez(tmp_path / "c.npz", arr_0=a[:9])
    assert reproduce.compare_batches(tmp_path / "a.npz", tmp_path / "c.npz") == "shape (10, 4, 4, 3) vs (9, 4, 4, 3)"


def test_bare_urls_and_addresses_in_record_text_are_not_links():
    cell = leaderboard._cell("see https://evil.example/x, HTTP://E.example, www.evil.example and bob@evil.example")
    assert cell == ("see https&#58;//evil.example/x, HTTP&#58;//E.example, www&#46;evil.example and "
                    "bob@&#8203;evil.example")
    import html
    assert html.unescape(cell).replace("\u200b", "") == (  # it reads as the text the record gave
        "see https://evil.example/x, HTTP://E.example, www.evil.example and bob@evil.example")
