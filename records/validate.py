"""Validates records before a human reads them: python -m records.validate [record folders...]

With no arguments every record under records/ is checked (CI does this). For each record:
schema (finite numbers, no control characters in text); every artefact's sha256, each a plain
file of the record folder; safetensors only; the date is the folder's and not in the future; the
track exists and the folder sits under it; the dataset block is the track's and the data's
manifest the one the track pins; the budget (iterations x global batch) is the track's; the model
file's parameter count and embedded config are the record's; the code hash is the sha256 of the
code embedded in the run log, whose config line and last lines (iterations, training time) agree
with the record; the evaluation protocol is the track's; every seed of the protocol has a run with
every metric the track lists, the stored evaluation output holds the same runs and the metrics are
their mean; and, when the track's feature network is available locally, the first seed's samples
are re-scored. No two records share a model or a sample file.
Then the significance rule: a one-sided Welch t-test on the primary metric's runs against the best
earlier record of the track (with --claim-record: the best other record, whatever its date);
--claim-record fails unless p is below the track's threshold.
Exit 0 when every record is valid (and, with --claim-record, a new record), 1 otherwise.

What this proves: a record is internally consistent, its artefacts are the ones it lists, and its
samples score as claimed. What it cannot prove: that the model came from the run its log
describes (someone who edits the log, the model metadata and record.json together can claim any
budget, time or data). `bash eval.sh <record>` regenerates the samples from the checkpoint; on
cheap tracks `--retrain` re-runs the training itself.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import numpy as np

from records.record import RecordError, artefact_path, find_records

ROOT = Path(__file__).resolve().parent.parent
LOCAL_FEATURE_NETWORKS = {"digits_net"}  # re-scoring needs no downloaded weights
DEFAULT_SIGNIFICANCE = {"min_runs": 3, "p_value": 0.01}


def _track(record: dict, tracks_dir: Path) -> dict:
    path = tracks_dir / f"{record['track']}.json"
    if not path.is_file():
        raise RecordError(f"track {record['track']!r} has no definition ({path})")
    return json.loads(path.read_text())


def _model_file(path: Path) -> tuple[int, dict]:
    """(parameter count, embedded config) of an exported model file."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as fh:
            count = sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())
            metadata = fh.metadata() or {}
        return count, json.loads(metadata["config"])
    except Exception as e:  # a corrupt header, no config metadata
        raise RecordError(f"{path}: not a readable exported model ({type(e).__name__}: {e})") from e


def _check_log(where: Path, log_text: str, record: dict) -> None:
    """The run log's config line and its last lines agree with record.json."""
    from train import RESUME_MAY_CHANGE, code_from_log
    log_text = log_text[len(code_from_log(log_text)):]  # what the run wrote, not its source
    match = re.search(r"^config: (\{.*\})$", log_text, re.M)
    if not match:
        raise RecordError(f"{where}: the run log has no config line")
    logged = json.loads(match.group(1))
    differ = sorted(k for k in set(logged) | set(record["config"]) if k not in RESUME_MAY_CHANGE
                    and logged.get(k) != record["config"].get(k))
    if differ:
        raise RecordError(f"{where}: field 'config' differs from the run log's in {differ}")
    done = re.findall(r"^training done: (\d+) iterations, train_time:([0-9.]+)s$", log_text, re.M)
    if not done:
        raise RecordError(f"{where}: the run log does not end its training ('training done' line missing)")
    iterations, seconds = int(done[-1][0]), float(done[-1][1])
    if iterations != record["iterations"]:
        raise RecordError(f"{where}: field 'iterations' is {record['iterations']}, the run log trained "
                          f"{iterations}")
    if abs(seconds - record["wall_clock"]["train_seconds"]) > 0.051:  # the log prints 0.1 s
        raise RecordError(f"{where}: field 'wall_clock.train_seconds' is {record['wall_clock']['train_seconds']}, "
                          f"the run log says {seconds}")


def _check_runs(where: Path, record: dict, track: dict) -> None:
    """One run per evaluation seed of the protocol, each with every metric the track lists."""
    protocol = track["evaluation"]
    seeds = protocol.get("eval_seeds", [protocol["seed"]])
    got = [r["seed"] for r in record["metric_runs"]]
    if got != seeds:
        raise RecordError(f"{where}: field 'metric_runs' has the seeds {got}, the protocol's are {seeds}")
    wanted = set(protocol.get("metrics", []))
    for i, run in enumerate(record["metric_runs"]):
        if not wanted <= set(run["metrics"]):
            raise RecordError(f"{where}: field 'metric_runs.{i}.metrics' lacks {sorted(wanted - set(run['metrics']))}")
    if not wanted <= set(record["metrics"]):
        raise RecordError(f"{where}: field 'metrics' lacks {sorted(wanted - set(record['metrics']))}")


def validate_record(record_dir: Path, tracks_dir: Path, rescore: bool = True) -> dict:
    """Every check that needs no training or sampling. Raises RecordError naming the field.
    Returns the record with "_unchecked": what could not be checked here (remote artefacts)."""
    from records.reproduce import check_record

    record_dir = Path(record_dir)
    where = record_dir / "record.json"
    record = check_record(record_dir)  # schema, checksums, safetensors only, code hash vs log
    unchecked = []
    try:
        date = datetime.date.fromisoformat(record["date"])
    except ValueError as e:
        raise RecordError(f"{where}: field 'date': {e}") from None
    if not record_dir.name.startswith(record["date"] + "_"):
        raise RecordError(f"{where}: field 'date' is {record['date']}, the folder is {record_dir.name!r}")
    if date > datetime.datetime.now(datetime.timezone.utc).date() + datetime.timedelta(days=1):
        raise RecordError(f"{where}: field 'date' is {record['date']}, in the future")
    track = _track(record, tracks_dir)
    if record_dir.parent.name != record["track"]:
        raise RecordError(f"{where}: track {record['track']!r} but the folder is under {record_dir.parent.name!r}")
    rules = {k: v for k, v in track["dataset"].items() if k != "dir"}  # where the data lives is no rule
    if {k: v for k, v in record["dataset"].items() if k != "dir"} != rules:
        keys = sorted(k for k in set(rules) | set(record["dataset"]) - {"dir"}
                      if record["dataset"].get(k) != rules.get(k))
        raise RecordError(f"{where}: field 'dataset' differs from the track's in {keys}")
    pinned = track["dataset"].get("manifest_sha256")
    if pinned and record["data_manifest_sha256"] != pinned:
        raise RecordError(f"{where}: field 'data_manifest_sha256' is {record['data_manifest_sha256']}, the "
                          f"track's data has {pinned}: trained on other data")
    budget = track["budget"]
    for key in ("iterations", "global_batch"):
        if record[key] != budget[key] or record["config"][key] != budget[key]:
            raise RecordError(f"{where}: field {key!r} is {record[key]} (config {record['config'][key]}), "
                              f"the track's budget is {budget[key]}")
    if record["images_seen"] != budget["iterations"] * budget["global_batch"]:
        raise RecordError(f"{where}: field 'images_seen' is {record['images_seen']}, the budget is "
                          f"{budget['iterations'] * budget['global_batch']}")
    if track.get("parameter_cap") and record["parameters"] > track["parameter_cap"]:
        raise RecordError(f"{where}: field 'parameters' ({record['parameters']}) is over the track's cap "
                          f"{track['parameter_cap']}")
    model_file = artefact_path(record_dir, record, "model")
    if model_file is None:
        unchecked.append("the model file (remote, not downloaded): parameters and config")
    else:
        counted, embedded = _model_file(model_file)
        if counted != record["parameters"]:
            raise RecordError(f"{where}: field 'parameters' is {record['parameters']}, the model file has {counted}")
        if embedded != record["config"]:
            keys = sorted(k for k in set(embedded) | set(record["config"])
                          if embedded.get(k) != record["config"].get(k))
            raise RecordError(f"{where}: field 'config' differs from the model file's in {keys}")
    _check_log(where, _local(record_dir, record, "log").read_text(), record)
    clock = record["wall_clock"]
    if abs(clock["train_seconds"] + clock["sample_seconds"] + clock["eval_seconds"] - clock["total_seconds"]) > 0.02:
        raise RecordError(f"{where}: field 'wall_clock.total_seconds' is not the sum of its parts")
    if record["evaluation"] != track["evaluation"]:
        keys = sorted(k for k in set(record["evaluation"]) | set(track["evaluation"])
                      if record["evaluation"].get(k) != track["evaluation"].get(k))
        raise RecordError(f"{where}: field 'evaluation' differs from the track's protocol in {keys}")
    rule = track.get("significance", DEFAULT_SIGNIFICANCE)
    if len(record["metric_runs"]) < rule["min_runs"]:
        raise RecordError(f"{where}: field 'metric_runs' has {len(record['metric_runs'])} runs, the track "
                          f"requires at least {rule['min_runs']}")
    _check_runs(where, record, track)
    try:
        stored = json.loads(_local(record_dir, record, "evaluation").read_text())
    except ValueError as e:
        raise RecordError(f"{where}: artefact evaluation is not valid JSON: {e}") from None
    if stored.get("runs") != record["metric_runs"]:
        raise RecordError(f"{where}: field 'metric_runs' differs from the stored evaluation output")
    for name, value in record["metrics"].items():
        mean = float(np.mean([r["metrics"][name] for r in record["metric_runs"]]))
        if not np.isclose(value, mean, rtol=1e-9, atol=1e-12):
            raise RecordError(f"{where}: field 'metrics.{name}' is {value}, the mean of its runs is {mean}")
    samples = artefact_path(record_dir, record, "samples")
    if rescore and samples is None:
        unchecked.append("the samples (remote, not downloaded): re-scoring")
    elif rescore and track["evaluation"]["feature_network"] in LOCAL_FEATURE_NETWORKS:
        from evaluations.evaluate import evaluate_samples
        try:
            again = evaluate_samples(samples, track)
        except ValueError as e:  # SampleFileError and protocol errors
            raise RecordError(f"{where}: artefact samples cannot be scored: {e}") from None
        first = record["metric_runs"][0]["metrics"]
        for name, value in first.items():
            if not np.isclose(again[name], value, rtol=1e-9, atol=1e-12):
                raise RecordError(f"{where}: field 'metric_runs.0.metrics.{name}' is {value}, re-scoring "
                                  f"samples.npz gives {again[name]}")
    return record | {"_unchecked": unchecked}


def _local(record_dir: Path, record: dict, key: str) -> Path:
    file = artefact_path(record_dir, record, key)
    if file is None:
        raise RecordError(f"{record_dir / 'record.json'}: artefact {key} must be a file of the record folder, "
                          "not a URL")
    return file


def significance(candidate: dict, previous: dict, track: dict) -> float:
    """One-sided Welch t-test p-value that the candidate's primary metric beats the previous
    record's (lower is better for FID-like metrics), over their per-seed runs."""
    from scipy import stats
    metric = track["primary_metric"]
    a = [r["metrics"][metric] for r in candidate["metric_runs"]]
    b = [r["metrics"][metric] for r in previous["metric_runs"]]
    lower = metric in track.get("lower_is_better", [])
    result = stats.ttest_ind(a, b, equal_var=False, alternative="less" if lower else "greater")
    return float(result.pvalue)


def best_of(others: list[dict], track: dict) -> dict | None:
    metric = track["primary_metric"]
    sign = 1 if metric in track.get("lower_is_better", []) else -1
    return min(others, key=lambda o: sign * o["metrics"][metric]) if others else None


def best_before(record: dict, others: list[dict], track: dict) -> dict | None:
    return best_of([o for o in others if (o["date"], o["_folder"]) < (record["date"], record["_folder"])], track)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("records", nargs="*", help="record folders (default: every record under --root)")
    parser.add_argument("--root", default=str(ROOT / "records"))
    parser.add_argument("--no-rescore", action="store_true", help="skip re-scoring samples.npz")
    parser.add_argument("--claim-record", action="store_true",
                        help="fail unless each given record significantly beats the best earlier record")
    args = parser.parse_args(argv)
    root = Path(args.root)
    folders = [Path(r) for r in args.records] or find_records(root)
    ok = True
    valid = {}  # every valid record of the tree: the peers a record is compared with
    for folder in find_records(root):
        try:
            valid[folder.resolve()] = validate_record(folder, root / "tracks", rescore=False) | {"_folder": folder.name}
        except Exception:
            pass  # reported below when it is one of the checked folders
    for folder in folders:
        try:
            record = validate_record(folder, root / "tracks", rescore=not args.no_rescore) | {"_folder": folder.name}
            for key in ("model", "samples"):
                twins = [r["_folder"] for p, r in valid.items() if p != folder.resolve()
                         and r["artefacts"][key]["sha256"] == record["artefacts"][key]["sha256"]]
                if twins:
                    raise RecordError(f"artefact {key} is the same file as record {twins[0]}'s")
        except Exception as e:  # one broken record must not hide the verdict on the others
            print(f"INVALID {folder}: {e if isinstance(e, RecordError) else f'{type(e).__name__}: {e}'}")
            ok = False
            continue
        track = json.loads((root / "tracks" / f"{record['track']}.json").read_text())
        rule = track.get("significance", DEFAULT_SIGNIFICANCE)
        peers = [r for p, r in valid.items() if r["track"] == record["track"] and p != folder.resolve()]
        # a claim must beat every other record; otherwise the verdict is against earlier ones
        previous = best_of(peers, track) if args.claim_record else best_before(record, peers, track)
        metric = track["primary_metric"]
        if record["_unchecked"]:
            print(f"note    {folder}: not checked here: {'; '.join(record['_unchecked'])}")
        if previous is None:
            verdict = "first record of its track"
        else:
            p = significance(record, previous, track)
            better = p < rule["p_value"]
            verdict = (f"{metric} {record['metrics'][metric]:.4f} vs previous best {previous['metrics'][metric]:.4f} "
                       f"({previous['_folder']}): one-sided Welch p = {p:.3g} "
                       f"{'<' if better else '>='} {rule['p_value']}: {'NEW RECORD' if better else 'not a new record'}")
            if args.claim_record and not better:
                ok = False
        print(f"valid   {folder}: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
