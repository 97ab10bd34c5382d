"""Validates records before a human reads them: python -m records.validate [record folders...]

With no arguments every record under records/ is checked (CI does this). For each record:
schema (finite numbers, no control characters in text); every artefact's sha256, each a plain
file of the record folder; safetensors only; the date is the folder's and not in the future; the
track exists and the folder sits under it; the dataset block is the track's and the data's
manifest the one the track pins; the budget (iterations x global batch) is the track's; the model
file's parameter count and embedded config are the record's; the code hash is the sha256 of the
code embedded in the run log, whose config line and last lines (iterations, training time) agree
with the record, and whose step lines go forward in time within each leg of the run and end at the
'training done' line's step and time; the evaluation protocol is the track's; every seed of the
protocol has a run with every metric the track lists, the stored evaluation output holds the same
runs and the metrics are their mean; and, when the track's feature network is available locally,
every seed's samples are re-scored (within RESCORE_TOLERANCE: another CPU's float32 kernels round
differently). Every sample batch's labels (arr_1) are the protocol's, and where the model decodes
without external weights (digits: no autoencoder) a few samples of every seed are regenerated from
the model and compared with the stored ones (the spot check: the samples are the model's); other
tracks say that eval.sh is that check. No two seeds of a record share their samples, and no two
records share a model (the same tensor values, whatever their dtype) or a sample batch (more than
SHARED_IMAGES of its images, in any order).
Then the significance rule: a one-sided Welch t-test on the primary metric's runs against the best
earlier record of the track (with --claim-record: the best other record, whatever its date);
--claim-record fails unless p is below the track's threshold.
Exit 0 when every record is valid (and, with --claim-record, a new record), 1 otherwise.

What this proves: a record is internally consistent, its artefacts are the ones it lists, its
samples score as claimed and, where they are regenerated here, are its model's. What it cannot
prove: that the model came from the run its log describes (someone who edits the log, the model
metadata and record.json together can claim any budget, time or data). `bash eval.sh <record>`
regenerates every sample from the checkpoint; on cheap tracks `--retrain` re-runs the training.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from records.record import RecordError, artefact_path, device_hours_of, find_records, parse_json, seed_samples_key

ROOT = Path(__file__).resolve().parent.parent
LOCAL_FEATURE_NETWORKS = {"digits_net"}  # re-scoring needs no downloaded weights
LOCAL_DECODERS = {"identity"}  # latent decoders without weights: samples are regenerated here
DEFAULT_SIGNIFICANCE = {"min_runs": 3, "p_value": 0.01}
# Re-scoring on another CPU is not bitwise: the digits feature network runs in float32 and oneDNN's
# kernels for another instruction set sum in another order. The committed digits record, scored on
# an AVX-512 CPU and re-scored with ONEDNN_MAX_CPU_ISA=AVX2 or SSE41, moved by up to 7.5e-7 relative
# (KD; FID 1.4e-7, IS 3e-9) and 3.5e-6 absolute (KD): "rel" and "abs" leave margins of 10x and 3x, and
# an edit of 0.1% is still refused. Precision and recall count points within a k-NN radius, and a
# distance that ties a radius may fall on either side: each may move by one point of the set it
# counts ("points": 1.5 allows one, not two).
RESCORE_TOLERANCE = {"rel": 1e-5, "abs": 1e-5, "points": 1.5}
COUNTED_METRICS = {"precision": "samples", "recall": "reference"}  # the set whose fraction each is
# Batches drawn from other noise (other evaluation seeds) share no image by chance: the committed
# digits record's three batches of 1000 share none. From the same noise (one seed in two records of
# a track), two close models can draw some identical images: two 6-iteration models of the tests'
# 20-sample track drew 2 alike. Batches that share more than these fractions of their images are one
# batch reused (for two seeds, or by two records), whatever was changed, reordered or re-compressed.
SHARED_IMAGES = {"other noise": 0.01, "same noise": 0.5}
# The spot check: sample i of a seed depends on (seed, i) only (generate.sample_generator), so a few
# can be regenerated alone from the model and compared with the stored ones. Per seed, "fixed"
# indices come from the sample file's sha256 and "fresh" ones from the OS's randomness (why both:
# spot_check_indices). The digits model regenerates 5 samples in ~0.15 s.
SPOT_CHECK = {"fixed": 3, "fresh": 2}
# Another machine's float32 kernels round differently, and the sampler carries a difference on to
# the pixels. The committed digits record's 3000 samples, regenerated with torch's, MKL's and oneDNN's
# AVX2/SSE kernels (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), moved by at
# most 1 level in 1 pixel value of 64000; with every matmul's inputs rounded to TF32 (what a GPU
# computes) by at most 1 level in 0.7% of them. The training image or other-seed sample closest to
# any of its samples differs by more than 2 levels in at least 40% of the pixel values. An image
# passes when at most "fraction" of its pixel values differ by more than "levels".
SPOT_CHECK_TOLERANCE = {"levels": 2, "fraction": 0.05}


FOLDER_NAME = re.compile(r"\d{4}-\d{2}-\d{2}_[A-Za-z0-9._-]+")  # write_record's names
STEP_LINE = re.compile(r"^step:(\d+)/(\d+) .* train_time:([0-9.]+)s ", re.M)  # train.py's step log lines
RESUMED_LINE = re.compile(r"^resumed from .*$", re.M)  # where a resumed run's next leg starts
TRACK_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _track(record: dict, tracks_dir: Path) -> dict:
    path = tracks_dir / f"{record['track']}.json"
    if not path.is_file():
        raise RecordError(f"track {record['track']!r} has no definition ({path})")
    return json.loads(path.read_text())


def _sample_keys(record: dict) -> list[str]:
    """The samples artefact of each evaluation seed, in the order of metric_runs."""
    return ["samples"] + [seed_samples_key(r["seed"]) for r in record["metric_runs"][1:]]


def _model_file(where: Path, path: Path, record: dict, track: dict) -> str:
    """Checks an exported model file against the record (parameters, config, the architecture the
    network is rebuilt from, the track) and returns the sha256 of its tensors' names, shapes and
    values (not of the file, nor of the dtypes: a re-saved copy of the same weights, or one stored
    as float64, loads as the same model)."""
    import dataclasses

    import train
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="np") as fh:
            metadata = fh.metadata() or {}
            digest, count = hashlib.sha256(), 0
            for name in sorted(fh.keys()):
                tensor = fh.get_tensor(name)
                count += tensor.size
                canonical = np.float64 if np.issubdtype(tensor.dtype, np.floating) else np.int64
                digest.update(f"{name}|{tensor.shape}|".encode())
                digest.update(np.ascontiguousarray(tensor, dtype=canonical).tobytes())
        embedded = json.loads(metadata["config"])
        options = json.loads(metadata["options"])
    except Exception as e:  # a corrupt header, missing metadata
        raise RecordError(f"{path}: not a readable exported model ({type(e).__name__}: {e})") from e
    if count != record["parameters"]:
        raise RecordError(f"{where}: field 'parameters' is {record['parameters']}, the model file has {count}")
    if embedded != record["config"]:
        keys = sorted(k for k in set(embedded) | set(record["config"]) if embedded.get(k) != record["config"].get(k))
        raise RecordError(f"{where}: field 'config' differs from the model file's in {keys}")
    fields = {f.name for f in dataclasses.fields(train.Config)}
    cfg = train.Config(**{k: v for k, v in embedded.items() if k in fields})
    teacher = (int(options.get("repa_dim", 0)), int(options.get("reg_dim", 0)))  # widths of the teacher
    implied = dataclasses.asdict(train.model_options(cfg, teacher))
    shape = train.track_model_shape(track)
    built = {"model": metadata.get("model"), "options": options, "track": metadata.get("track")} | {
        k: metadata.get(k) for k in shape}
    wanted = {"model": cfg.model, "options": implied, "track": record["track"]} | {
        k: str(v) for k, v in shape.items()}
    if built != wanted:  # what generate and eval.sh rebuild the network from
        keys = sorted(k for k in wanted if built[k] != wanted[k])
        raise RecordError(f"{path}: the architecture in its metadata ({keys}) is not the one its config implies")
    return digest.hexdigest()


def _image_digests(path: Path) -> frozenset[bytes]:
    """A digest of each image of a sample batch (arr_0), whatever the zip around them and their
    order; read in chunks, so a 50K batch is never in memory at once."""
    from evaluations.npz import NpzArrayReader
    digests = set()
    with NpzArrayReader(path) as reader:
        for start in range(0, len(reader), 4096):
            for image in reader.read(start, start + 4096):
                digests.add(hashlib.blake2b(f"{image.dtype.str}|{image.shape}|".encode() + image.tobytes(),
                                            digest_size=16).digest())
    return frozenset(digests)


def _shared_batches(batches: dict[tuple[Path, str], frozenset]) -> list[tuple]:
    """(a, b, images shared) for every two batches ({(record folder, artefact key): image digests})
    that share more than SHARED_IMAGES of the smaller one's images (the same key: the same noise)."""
    from collections import Counter
    holders: dict[bytes, list] = {}
    for label, images in batches.items():
        for image in images:
            holders.setdefault(image, []).append(label)
    shared = Counter(pair for labels in holders.values() for pair in itertools.combinations(labels, 2))
    found = []
    for (a, b), n in shared.items():
        limit = SHARED_IMAGES["same noise" if a[1] == b[1] else "other noise"]
        if n > limit * min(len(batches[a]), len(batches[b])):
            found.append((a, b, n))
    return found


def _logged(written: str, key: str) -> list[str]:
    """The values of every `key: value` line in what a run wrote to its log."""
    return re.findall(rf"^{re.escape(key)}: (.*)$", written, re.M)


def _check_log(where: Path, log_text: str, record: dict) -> None:
    """The run log agrees with record.json: config, environment, data, iterations, times."""
    from train import RESUME_MAY_CHANGE, code_from_log
    log_text = log_text[len(code_from_log(log_text)):]  # what the run wrote, not its source
    configs = _logged(log_text, "config")
    if not configs:
        raise RecordError(f"{where}: the run log has no config line")
    logged = json.loads(configs[0])
    differ = sorted(k for k in set(logged) | set(record["config"]) if k not in RESUME_MAY_CHANGE
                    and logged.get(k) != record["config"].get(k))
    if differ:
        raise RecordError(f"{where}: field 'config' differs from the run log's in {differ}")
    environments = _logged(log_text, "environment")  # one per start: the last leg's counts
    if not environments or json.loads(environments[-1]) != record["environment"]:
        raise RecordError(f"{where}: field 'environment' is not the one the run log recorded")
    manifests = set(_logged(log_text, "data_manifest_sha256"))
    if manifests != {record["data_manifest_sha256"]}:
        raise RecordError(f"{where}: field 'data_manifest_sha256' is not the data the run log recorded "
                          f"({sorted(manifests)})")
    done = re.findall(r"^(\d+) iterations, train_time:([0-9.]+)s$", "\n".join(_logged(log_text, "training done")),
                      re.M)
    if not done:
        raise RecordError(f"{where}: the run log does not end its training ('training done' line missing)")
    iterations, seconds = int(done[-1][0]), float(done[-1][1])
    if iterations != record["iterations"]:
        raise RecordError(f"{where}: field 'iterations' is {record['iterations']}, the run log trained "
                          f"{iterations}")
    _check_steps(where, log_text, iterations, seconds)
    clock = record["wall_clock"]
    scored = re.findall(r"^sample_seconds:([0-9.]+) eval_seconds:([0-9.]+)$",
                        "\n".join(_logged(log_text, "evaluation done")), re.M)
    if not scored:
        raise RecordError(f"{where}: the run log has no 'evaluation done' line")
    for name, logged_value in (("train_seconds", seconds), ("sample_seconds", float(scored[-1][0])),
                               ("eval_seconds", float(scored[-1][1]))):
        if abs(logged_value - clock[name]) > 0.051:  # the log prints 0.1 s
            raise RecordError(f"{where}: field 'wall_clock.{name}' is {clock[name]}, the run log says {logged_value}")
    # train time x processes: between the fewest and the most processes of the run's legs (both
    # stored to 0.01 s: the product may be off by 0.01 s per process)
    worlds = [json.loads(e)["world_size"] for e in environments]
    low = (clock["train_seconds"] - 0.01) * min(worlds)
    high = (clock["train_seconds"] + 0.01) * max(worlds)
    if not low <= clock["device_train_seconds"] <= high:
        raise RecordError(f"{where}: field 'wall_clock.device_train_seconds' is {clock['device_train_seconds']}, "
                          f"not train_seconds x the run's processes ({sorted(set(worlds))} in its legs)")


def _check_steps(where: Path, log_text: str, iterations: int, seconds: float) -> None:
    """The step lines go forward in steps and training time within each leg of the run (a resumed
    leg goes on from its checkpoint's step and time, which may be earlier than the last line the
    interrupted leg wrote), and the last one is the 'training done' line's step and time (both
    print the same training seconds to 0.1 s)."""
    legs = [[(int(step), int(total), float(clock)) for step, total, clock in STEP_LINE.findall(leg)]
            for leg in RESUMED_LINE.split(log_text)]
    for leg in legs:
        for (step, _, clock), (later, _, later_clock) in zip(leg, leg[1:]):
            if later <= step or later_clock < clock:
                raise RecordError(f"{where}: the run log's step lines go back: step:{later} train_time:{later_clock}s "
                                  f"after step:{step} train_time:{clock}s")
    steps = [line for leg in legs for line in leg]
    if not steps or steps[-1] != (iterations, iterations, seconds):
        last = "none" if not steps else "step:{}/{} train_time:{}s".format(*steps[-1])
        raise RecordError(f"{where}: the run log's 'training done' line ({iterations} iterations, "
                          f"train_time:{seconds}s) is not its last step line ({last})")


def _check_derived(where: Path, record: dict) -> None:
    """The numbers write_record derives from others (a table cell must not be a free claim).
    Stored times are rounded to 0.01 s, derived values to their last digit: the check allows both."""
    clock, env = record["wall_clock"], record["environment"]
    train_s, total = clock["train_seconds"], clock["total_seconds"]
    if abs(train_s + clock["sample_seconds"] + clock["eval_seconds"] - total) > 0.02:
        raise RecordError(f"{where}: field 'wall_clock.total_seconds' is not the sum of its parts")
    rates = {"throughput.iterations_per_second": (record["throughput"]["iterations_per_second"],
                                                  record["iterations"], 1e-3),
             "throughput.images_per_second": (record["throughput"]["images_per_second"], record["images_seen"], 0.1)}
    for name, (stated, count, digit) in rates.items():
        low, high = count / (train_s + 0.005), count / max(train_s - 0.005, 1e-9)
        if not low - digit <= stated <= high + digit:
            raise RecordError(f"{where}: field '{name}' is {stated}, its parts give {count / max(train_s, 1e-9):.4g}")
    scoring = clock["sample_seconds"] + clock["eval_seconds"]
    hours = device_hours_of(clock["device_train_seconds"], scoring, env["world_size"]) if "gpu" in env else 0.0
    if abs(record["gpu_hours"] - hours) > 1e-4 + 1e-3 * hours:
        raise RecordError(f"{where}: field 'gpu_hours' is {record['gpu_hours']}, its parts give {hours:.4g}")


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
    if set(record["metrics"]) != set(record["metric_runs"][0]["metrics"]):
        raise RecordError(f"{where}: field 'metrics' names other metrics than its runs")


def _check_evaluation_output(where: Path, stored, record: dict, track: dict) -> None:
    """metrics.json is the evaluation that produced the record: protocol, runs, mean, std, and
    provenance (what scored them: the reference batch's and every network's sha256, equal to the
    track's pins where it has them)."""
    if not isinstance(stored, dict) or set(stored) != {"protocol", "runs", "mean", "std", "provenance"}:
        raise RecordError(f"{where}: artefact evaluation is not an evaluation output (protocol, runs, mean, std, "
                          "provenance)")
    _check_provenance(where, stored["provenance"], track)
    if stored["protocol"] != track["evaluation"]:
        raise RecordError(f"{where}: artefact evaluation was made with another protocol than the track's")
    if stored["runs"] != record["metric_runs"]:
        raise RecordError(f"{where}: field 'metric_runs' differs from the stored evaluation output")
    for name, value in record["metrics"].items():
        runs = np.array([r["metrics"][name] for r in record["metric_runs"]], dtype=np.float64)
        std = float(runs.std(ddof=1)) if len(runs) > 1 else 0.0
        for label, got, want in ((f"metrics.{name}", value, runs.mean()),
                                 (f"mean.{name} of the evaluation output", stored["mean"].get(name), runs.mean()),
                                 (f"std.{name} of the evaluation output", stored["std"].get(name), std)):
            if got is None or not np.isclose(got, want, rtol=1e-9, atol=1e-12):
                raise RecordError(f"{where}: field '{label}' is {got}, the runs give {want}")


def _check_provenance(where: Path, provenance, track: dict) -> None:
    digest = re.compile(r"[0-9a-f]{64}")
    networks = provenance.get("networks") if isinstance(provenance, dict) else None
    if (not isinstance(networks, dict) or not networks or not digest.fullmatch(str(provenance.get("reference_sha256")))
            or not all(isinstance(n, dict) and digest.fullmatch(str(n.get("weights_sha256"))) for n in networks.values())):
        raise RecordError(f"{where}: artefact evaluation's provenance does not give the sha256 of the reference "
                          "batch and of every network's weights")
    pins = {"reference_sha256": (track["evaluation"].get("reference_sha256"), provenance["reference_sha256"])}
    if track["evaluation"].get("feature_network") == "digits_net":
        from evaluations.digits_net import DIGITS_NET_SHA256
        pins["digits_net weights"] = (DIGITS_NET_SHA256, networks.get("digits_net", {}).get("weights_sha256"))
    for name, (pinned, used) in pins.items():
        if pinned and used != pinned:
            raise RecordError(f"{where}: artefact evaluation was scored with {name} {used}, the track pins {pinned}")


def spot_check_indices(sha256: str, num_samples: int) -> list[int]:
    """The samples of one batch that the spot check regenerates: SPOT_CHECK["fixed"] picked by the
    batch file's sha256 and SPOT_CHECK["fresh"] drawn anew at every validation. Fixed ones alone
    could be dodged: whoever replaced some images could re-save the file until its digest picks none
    of them. Fresh ones alone would make a failure impossible to re-run. With both, every validation
    (CI, each reviewer) checks the same reproducible ones and others that nobody could predict."""
    fixed = [int.from_bytes(hashlib.sha256(f"spot/{sha256}/{j}".encode()).digest()[:8], "little") % num_samples
             for j in range(SPOT_CHECK["fixed"])]
    fresh = [secrets.randbelow(num_samples) for _ in range(SPOT_CHECK["fresh"])]  # os.urandom
    return sorted(set(fixed) | set(fresh))


def validate_record(record_dir: Path, tracks_dir: Path, rescore: bool = True,
                    spot_indices: Callable[[str, int], list[int]] = spot_check_indices) -> dict:
    """Every check that needs no training, and with `rescore` those that run the networks:
    re-scoring, and the spot check, which regenerates the samples spot_indices(sha256 of the batch
    file, number of samples) names. Raises RecordError naming the field.
    Returns the record with "_unchecked" (what could not be checked here) and "_content" (the
    digest of its model's tensors, "model", and each sample batch's image digests, "samples":
    what twins share)."""
    record_dir = Path(record_dir)
    where = record_dir / "record.json"
    try:
        return _validate(record_dir, where, Path(tracks_dir), rescore, spot_indices)
    except RecordError:
        raise
    except Exception as e:  # whatever a malformed record breaks, it is an invalid record
        raise RecordError(f"{where}: {type(e).__name__}: {e}") from e


def _validate(record_dir: Path, where: Path, tracks_dir: Path, rescore: bool,
              spot_indices: Callable[[str, int], list[int]]) -> dict:
    from records.reproduce import check_record

    if not where.is_file():
        raise RecordError(f"{where}: record file not found (not a record folder?)")
    if record_dir.is_symlink() or record_dir.parent.is_symlink():
        raise RecordError(f"{record_dir}: a record folder is a folder of its own, not a link")
    if not FOLDER_NAME.fullmatch(record_dir.name) or not TRACK_NAME.fullmatch(record_dir.parent.name):
        raise RecordError(f"{record_dir}: record folders are named records/<track>/<date>_<slug> with "
                          "letters, digits, '.', '_' and '-' only")
    record = check_record(record_dir)  # schema, checksums, safetensors only, code hash vs log
    unchecked, content = [], {}
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
    _check_runs(where, record, track)
    for key in ["model"] + _sample_keys(record):  # large artefacts: remote only where the track allows
        if key not in record["artefacts"]:
            raise RecordError(f"{where}: field 'artefacts' lacks {key!r}")
        if artefact_path(record_dir, record, key) is None:
            if not track.get("remote_artefacts", False):
                raise RecordError(f"{where}: artefact {key} is remote; track {record['track']!r} keeps its "
                                  "artefacts in the record folder")
            unchecked.append(f"{key} (remote, not downloaded)")
    model_file = artefact_path(record_dir, record, "model")
    if model_file is not None:
        content["model"] = _model_file(where, model_file, record, track)
    _check_log(where, _local(record_dir, record, "log").read_text(), record)
    _check_derived(where, record)
    if record["evaluation"] != track["evaluation"]:
        keys = sorted(k for k in set(record["evaluation"]) | set(track["evaluation"])
                      if record["evaluation"].get(k) != track["evaluation"].get(k))
        raise RecordError(f"{where}: field 'evaluation' differs from the track's protocol in {keys}")
    rule = track.get("significance", DEFAULT_SIGNIFICANCE)
    if len(record["metric_runs"]) < rule["min_runs"]:
        raise RecordError(f"{where}: field 'metric_runs' has {len(record['metric_runs'])} runs, the track "
                          f"requires at least {rule['min_runs']}")
    try:
        stored = parse_json(_local(record_dir, record, "evaluation").read_text())
    except ValueError as e:
        raise RecordError(f"{where}: artefact evaluation is not valid JSON: {e}") from None
    _check_evaluation_output(where, stored, record, track)
    keys = _sample_keys(record)
    sample_files = {key: path for key in keys if (path := artefact_path(record_dir, record, key)) is not None}
    content["samples"] = {key: _image_digests(path) for key, path in sample_files.items()}
    for (_, a), (_, b), shared in _shared_batches({(record_dir, k): v for k, v in content["samples"].items()}):
        raise RecordError(f"{where}: artefacts {a} and {b} share {shared} images: one sample batch serves two "
                          "evaluation seeds (another seed draws other noise, so other images)")
    local_scoring = track["evaluation"]["feature_network"] in LOCAL_FEATURE_NETWORKS
    for i, key in enumerate(keys):
        samples = sample_files.get(key)
        if samples is None:
            continue
        _check_labels(where, key, samples, track, record["metric_runs"][i]["seed"])
        if rescore and local_scoring:  # every seed's samples score as recorded, by the recorded networks
            from evaluations.evaluate import score_samples
            try:
                again, provenance = score_samples(samples, track)
            except ValueError as e:  # SampleFileError and protocol errors
                raise RecordError(f"{where}: artefact {key} cannot be scored: {e}") from None
            if provenance != stored["provenance"]:
                raise RecordError(f"{where}: artefact evaluation's provenance is {stored['provenance']}, re-scoring "
                                  f"{samples.name} used {provenance}")
            for name, value in record["metric_runs"][i]["metrics"].items():
                if not _rescored_within(name, value, again[name], track):
                    raise RecordError(f"{where}: field 'metric_runs.{i}.metrics.{name}' is {value}, re-scoring "
                                      f"{samples.name} gives {again[name]}")
    samples = artefact_path(record_dir, record, "samples")
    if samples is not None:  # the grid shows the first seed's samples, as the run drew it
        import generate
        from PIL import Image

        from evaluations.npz import NpzArrayReader
        with NpzArrayReader(samples) as batch:  # only the images the grid shows
            first = batch.read(0, generate.GRID_SAMPLES)
        with Image.open(_local(record_dir, record, "grid")) as grid:
            if not np.array_equal(np.asarray(grid), generate.protocol_grid(first, track, track["evaluation"])):
                raise RecordError(f"{where}: artefact grid is not the grid of the record's samples")
    if rescore and not local_scoring:
        unchecked.append("re-scoring (the track's feature networks are not available offline)")
    if rescore and sample_files:
        why = _spot_check(where, record, track, sample_files, model_file, spot_indices)
        if why:
            unchecked.append(why)
    return record | {"_unchecked": unchecked, "_content": content}


def _check_labels(where: Path, key: str, path: Path, track: dict, seed: int) -> None:
    """A sample batch's labels (arr_1) are the ones the protocol samples, in order."""
    import generate

    from evaluations.npz import BatchFileError, NpzArrayReader
    protocol = track["evaluation"]
    try:
        with NpzArrayReader(path, "arr_1") as reader:
            labels = reader.read(0, len(reader))
    except BatchFileError as e:  # no labels, a damaged file: the message names the file
        raise RecordError(f"{where}: artefact {key}: {e}") from None
    wanted = generate.sample_labels(range(int(protocol["num_samples"])), track["dataset"]["num_classes"],
                                    protocol.get("labels", "balanced"), seed).numpy()
    if labels.shape != wanted.shape:
        raise RecordError(f"{where}: artefact {key} ({path.name}) has {labels.shape} labels (arr_1), the protocol "
                          f"samples {wanted.shape}")
    if not np.array_equal(labels, wanted):
        i = int(np.flatnonzero(labels != wanted)[0])
        raise RecordError(f"{where}: artefact {key} ({path.name}) has label {labels[i]} at index {i}, the "
                          f"protocol's {protocol.get('labels', 'balanced')} labels give {wanted[i]}")


def _spot_check(where: Path, record: dict, track: dict, sample_files: dict[str, Path], model_file: Path | None,
                spot_indices: Callable[[str, int], list[int]]) -> str | None:
    """Regenerates the samples spot_indices picks in every seed's batch from the record's model,
    on the CPU, with the code generate.generate_to_npz samples a batch with (the record's protocol:
    sampler, steps, guidance, state dtype), and compares them with the stored ones (RecordError
    naming the file and the index). Returns what stopped it from running here, or None."""
    data = track["dataset"]
    if data["encoder"] not in LOCAL_DECODERS:
        return (f"the samples are not regenerated (decoding {data['encoder']} latents needs the autoencoder's "
                "weights): `bash eval.sh <record>` is that check")
    if model_file is None:
        return "the samples are not regenerated (the model is remote, not downloaded)"
    import torch

    import generate
    import train
    from evaluations.npz import NpzArrayReader
    from preprocessing.encoders import latent_decoder
    try:
        model, _ = train.load_model(model_file)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError: a format this train.py refuses
        raise RecordError(f"{where}: artefact model cannot be loaded to regenerate samples: {e}") from None
    decoder = latent_decoder(data["encoder"], model.autoencoder_sha256, device="cpu")
    threads = torch.get_num_threads()
    for key, run in zip(_sample_keys(record), record["metric_runs"]):
        path = sample_files.get(key)
        if path is None:
            continue
        protocol = dict(track["evaluation"], seed=run["seed"])  # as train.sample_evaluation_seeds
        indices = sorted(set(spot_indices(record["artefacts"][key]["sha256"], int(protocol["num_samples"]))))
        # a few samples gain nothing from threads, and on a busy machine every op waits for a
        # descheduled partner thread: the committed record's check took 26 s with 2 threads, 0.6 s with 1
        torch.set_num_threads(1)
        try:
            latents, _ = generate.sample_latents(model, indices, data["latent_shape"], data["num_classes"],
                                                 protocol, "cpu")
            images = decoder.decode(latents).numpy()
        finally:
            torch.set_num_threads(threads)
        with NpzArrayReader(path) as reader:
            for index, image in zip(indices, images):
                stored = reader.read(index, index + 1)
                differs = (_spot_check_differs(stored[0], image) if stored.shape == (1,) + image.shape
                           else f"shape ({stored.shape[1:] if len(stored) else 'no such image'})")
                if differs:
                    raise RecordError(f"{where}: artefact {key} ({path.name}) is not its model's samples: image "
                                      f"{index} differs from the one {model_file.name} samples (seed {run['seed']}) "
                                      f"in {differs}")
    return None


def _spot_check_differs(stored: np.ndarray, again: np.ndarray) -> str:
    """How a stored image differs from its regeneration beyond SPOT_CHECK_TOLERANCE ('' when not)."""
    diff = np.abs(stored.astype(np.int16) - again.astype(np.int16))
    off = int((diff > SPOT_CHECK_TOLERANCE["levels"]).sum())
    if off <= SPOT_CHECK_TOLERANCE["fraction"] * diff.size:
        return ""
    return (f"{off} of {diff.size} pixel values by more than {SPOT_CHECK_TOLERANCE['levels']} levels (largest "
            f"difference {int(diff.max())}; allowed: {SPOT_CHECK_TOLERANCE['fraction']:.0%} of them)")


def _rescored_within(name: str, recorded: float, again: float, track: dict) -> bool:
    """A re-scored metric agrees with the recorded one within RESCORE_TOLERANCE."""
    from records.reproduce import within
    if name not in COUNTED_METRICS:
        return within(recorded, again, {"rel": RESCORE_TOLERANCE["rel"], "abs": RESCORE_TOLERANCE["abs"]})
    if COUNTED_METRICS[name] == "samples":
        counted = int(track["evaluation"]["num_samples"])
    else:
        from evaluations.evaluate import reference_images
        counted = len(reference_images(track))
    return within(recorded, again, {"abs": RESCORE_TOLERANCE["points"] / counted})


def _local(record_dir: Path, record: dict, key: str) -> Path:
    file = artefact_path(record_dir, record, key)
    if file is None:
        raise RecordError(f"{record_dir / 'record.json'}: artefact {key} must be a file of the record folder, "
                          "not a URL")
    return file


def absolute_folder(path: Path) -> Path:
    """One name per folder (links are not resolved: a linked record folder is refused as such)."""
    return Path(os.path.abspath(path))


def validate_tree(root: Path, rescore: bool = False, tracks_dir: Path | None = None,
                  only: list[Path] | None = None) -> tuple[dict, dict]:
    """Every record of a records tree (or `only` these, judged against the whole tree):
    ({folder: record} valid, {folder: reason} invalid). Records that share a model (the same
    tensor values, whatever their files' bytes or dtypes) or a sample batch (more than
    SHARED_IMAGES of its images, whatever their order) are all invalid: which one is the original
    is for the repository's history to say."""
    root = Path(root)
    tracks_dir = Path(tracks_dir) if tracks_dir else root / "tracks"
    checked = {absolute_folder(f) for f in only} if only is not None else None
    valid, invalid = {}, {}
    for folder in sorted({absolute_folder(f) for f in find_records(root)} | (checked or set())):
        try:
            deep = rescore and (checked is None or folder in checked)
            valid[folder] = validate_record(folder, tracks_dir, rescore=deep) | {"_folder": folder.name}
        except RecordError as e:
            invalid[folder] = str(e)
    shares: dict[Path, dict[Path, list[str]]] = {}  # folder -> the other record -> what they share
    models: dict[str, list[Path]] = {}
    for folder, record in valid.items():
        if "model" in record["_content"]:
            models.setdefault(record["_content"]["model"], []).append(folder)
    for folders in models.values():
        for a, b in itertools.permutations(folders, 2):
            shares.setdefault(a, {}).setdefault(b, []).append(f"the model is {b.name}'s")
    batches = {(folder, key): images for folder, record in valid.items()
               for key, images in record["_content"]["samples"].items()}
    for (a, key_a), (b, key_b), n in _shared_batches(batches):
        if a != b:  # within a record, validate_record has refused them
            shares.setdefault(a, {}).setdefault(b, []).append(f"{n} images of {key_a} are in {b.name}'s {key_b}")
            shares.setdefault(b, {}).setdefault(a, []).append(f"{n} images of {key_b} are in {a.name}'s {key_a}")
    for folder, others in shares.items():
        names = ", ".join(sorted(other.name for other in others))
        invalid[folder] = (f"its model or samples are the same as record {names}'s: "
                           + "; ".join(what for _, whats in sorted(others.items()) for what in whats))
    for folder in invalid:
        valid.pop(folder, None)
    return valid, invalid


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
    parser.add_argument("--no-rescore", action="store_true",
                        help="skip re-scoring the sample batches and regenerating a few of their samples")
    parser.add_argument("--claim-record", action="store_true",
                        help="fail unless each given record significantly beats the best other record")
    args = parser.parse_args(argv)
    root = Path(args.root)
    folders = [Path(r) for r in args.records] or find_records(root)
    if not folders:
        print(f"INVALID {root}: no record folders under it (a mistyped --root?)")
        return 1
    valid, invalid = validate_tree(root, rescore=not args.no_rescore, only=folders)
    ok = True
    for shown in folders:
        folder = absolute_folder(shown)
        if folder not in valid:
            print(f"INVALID {shown}: {invalid[folder]}")
            ok = False
            continue
        record = valid[folder]
        track = json.loads((root / "tracks" / f"{record['track']}.json").read_text())
        rule = track.get("significance", DEFAULT_SIGNIFICANCE)
        peers = [r for p, r in valid.items() if r["track"] == record["track"] and p != folder]
        # a claim must beat every other record; otherwise the verdict is against earlier ones
        previous = best_of(peers, track) if args.claim_record else best_before(record, peers, track)
        metric = track["primary_metric"]
        if record["_unchecked"]:
            print(f"note    {shown}: not checked here: {'; '.join(record['_unchecked'])}")
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
        print(f"valid   {shown}: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
