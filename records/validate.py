"""Validates records before a human reads them: python -m records.validate [record folders...]

With no arguments every record under records/ is checked (CI does this). For each record:
schema; every artefact's sha256; safetensors only; the track exists and the folder sits under it;
the budget (iterations x global batch) is the track's; the parameter count is the model file's and
within the track's cap; the code hash is the sha256 of the code embedded in the run log; the
evaluation protocol is the track's; the metrics are the mean of the per-seed runs, which are the
stored evaluation output; enough evaluation runs for the track's significance rule; and, when the
track's feature network is available locally, the first seed's samples are re-scored.
Then the significance rule: against the best earlier record of the track, a one-sided Welch
t-test on the primary metric's runs; --claim-record fails unless p is below the track's threshold.
Exit 0 when every record is valid (and, with --claim-record, a new record), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from records.record import RecordError, find_records, load_record

ROOT = Path(__file__).resolve().parent.parent
LOCAL_FEATURE_NETWORKS = {"digits_net"}  # re-scoring needs no downloaded weights
DEFAULT_SIGNIFICANCE = {"min_runs": 3, "p_value": 0.01}


def _track(record: dict, tracks_dir: Path) -> dict:
    path = tracks_dir / f"{record['track']}.json"
    if not path.is_file():
        raise RecordError(f"track {record['track']!r} has no definition ({path})")
    return json.loads(path.read_text())


def _model_parameters(path: Path) -> int:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as fh:
        return sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())


def validate_record(record_dir: Path, tracks_dir: Path, rescore: bool = True) -> dict:
    """Every check that needs no training or sampling. Raises RecordError naming the field."""
    from records.reproduce import check_record

    record_dir = Path(record_dir)
    where = record_dir / "record.json"
    record = check_record(record_dir)  # schema, checksums, safetensors only, code hash vs log
    track = _track(record, tracks_dir)
    if record_dir.parent.name != record["track"]:
        raise RecordError(f"{where}: track {record['track']!r} but the folder is under {record_dir.parent.name!r}")
    budget = track["budget"]
    for key in ("iterations", "global_batch"):
        if record[key] != budget[key] or record["config"][key] != budget[key]:
            raise RecordError(f"{where}: field {key!r} is {record[key]} (config {record['config'][key]}), "
                              f"the track's budget is {budget[key]}")
    if record["images_seen"] != budget["iterations"] * budget["global_batch"]:
        raise RecordError(f"{where}: field 'images_seen' is {record['images_seen']}, the budget is "
                          f"{budget['iterations'] * budget['global_batch']}")
    counted = _model_parameters(record_dir / record["artefacts"]["model"]["path"])
    if counted != record["parameters"]:
        raise RecordError(f"{where}: field 'parameters' is {record['parameters']}, the model file has {counted}")
    if track.get("parameter_cap") and counted > track["parameter_cap"]:
        raise RecordError(f"{where}: field 'parameters' ({counted}) is over the track's cap {track['parameter_cap']}")
    if record["evaluation"] != track["evaluation"]:
        keys = sorted(k for k in set(record["evaluation"]) | set(track["evaluation"])
                      if record["evaluation"].get(k) != track["evaluation"].get(k))
        raise RecordError(f"{where}: field 'evaluation' differs from the track's protocol in {keys}")
    rule = track.get("significance", DEFAULT_SIGNIFICANCE)
    if len(record["metric_runs"]) < rule["min_runs"]:
        raise RecordError(f"{where}: field 'metric_runs' has {len(record['metric_runs'])} runs, the track "
                          f"requires at least {rule['min_runs']}")
    stored = json.loads((record_dir / record["artefacts"]["evaluation"]["path"]).read_text())
    if stored.get("runs") != record["metric_runs"]:
        raise RecordError(f"{where}: field 'metric_runs' differs from the stored evaluation output")
    for name, value in record["metrics"].items():
        mean = float(np.mean([r["metrics"][name] for r in record["metric_runs"]]))
        if not np.isclose(value, mean, rtol=1e-9, atol=1e-12):
            raise RecordError(f"{where}: field 'metrics.{name}' is {value}, the mean of its runs is {mean}")
    if rescore and track["evaluation"]["feature_network"] in LOCAL_FEATURE_NETWORKS:
        from evaluations.evaluate import evaluate_samples
        again = evaluate_samples(record_dir / record["artefacts"]["samples"]["path"], track)
        first = record["metric_runs"][0]["metrics"]
        for name, value in first.items():
            if not np.isclose(again[name], value, rtol=1e-9, atol=1e-12):
                raise RecordError(f"{where}: field 'metric_runs.0.metrics.{name}' is {value}, re-scoring "
                                  f"samples.npz gives {again[name]}")
    return record


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


def best_before(record: dict, others: list[dict], track: dict) -> dict | None:
    metric = track["primary_metric"]
    sign = 1 if metric in track.get("lower_is_better", []) else -1
    earlier = [o for o in others if (o["date"], o["_folder"]) < (record["date"], record["_folder"])]
    return min(earlier, key=lambda o: sign * o["metrics"][metric]) if earlier else None


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
    all_records = {}
    for folder in find_records(root):
        try:
            all_records[folder.resolve()] = load_record(folder) | {"_folder": folder.name}
        except RecordError:
            pass  # reported below when it is one of the checked folders
    for folder in folders:
        try:
            record = validate_record(folder, root / "tracks", rescore=not args.no_rescore) | {"_folder": folder.name}
        except RecordError as e:
            print(f"INVALID {folder}: {e}")
            ok = False
            continue
        track = json.loads((root / "tracks" / f"{record['track']}.json").read_text())
        rule = track.get("significance", DEFAULT_SIGNIFICANCE)
        peers = [r for p, r in all_records.items() if r["track"] == record["track"] and p != folder.resolve()]
        previous = best_before(record, peers, track)
        metric = track["primary_metric"]
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
