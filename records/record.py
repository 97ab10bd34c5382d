"""Record folders: records/<track>/<date>_<slug>/ holding record.json and the run's artefacts.

A record is data only. It carries everything needed to re-run and re-score the run: the full
config, the code hash (sha256 of train.py, whose source opens train.log), the environment, the
budget actually used, wall-clock, the metrics with their evaluation protocol, and the sha256 of
every artefact. `load_record` validates a record and names the file and field when it is wrong.
"""
from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

RECORD_FORMAT = "speedrun-record-v1"
RECORD_FILE = "record.json"
SCHEMA_FILE = Path(__file__).resolve().parent / "schema.json"
# artefacts copied from the run folder into the record folder; besides these, every evaluation seed
# after the first has its samples as "samples_seed<k>" (samples_seed<k>.npz)
ARTEFACT_FILES = {"model": "model.safetensors", "log": "train.log", "samples": "samples.npz",
                  "grid": "grid.png", "evaluation": "metrics.json"}
MAX_NUMBER = 1e15  # no field of a record is larger; a bigger number is a forgery or a bug


def seed_samples_key(seed: int) -> str:
    return f"samples_seed{seed}"


def artefact_file_name(key: str) -> str:
    return ARTEFACT_FILES.get(key, f"{key}.npz")


class RecordError(ValueError):
    pass


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def write_record(cfg, track: dict, run_dir: Path, summary: dict) -> Path:
    """Copies the run's artefacts into a new record folder and writes record.json atomically."""
    import dataclasses

    from preprocessing.shards import sha256_file
    from preprocessing.shards import atomic_write

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    slug = _slug(re.sub(r"^\d{4}-\d{2}-\d{2}_", "", cfg.run_name))
    base = Path(cfg.records_dir) / track["name"]
    record_dir = base / f"{date}_{slug}"
    n = 2
    while record_dir.exists():  # never overwrite a record
        record_dir = base / f"{date}_{slug}-{n}"
        n += 1
    record_dir.mkdir(parents=True)
    artefacts = {}
    keys = list(ARTEFACT_FILES) + [seed_samples_key(r["seed"]) for r in summary["evaluation"]["runs"][1:]]
    for key in keys:
        name = artefact_file_name(key)
        shutil.copyfile(run_dir / name, record_dir / name)
        artefacts[key] = {"path": name, "sha256": sha256_file(record_dir / name)}
    train_s = summary["train_seconds"]
    total = train_s + summary["sample_seconds"] + summary["eval_seconds"]
    env = summary["environment"]
    device_train = summary["device_train_seconds"]
    device_hours = device_hours_of(device_train, total - train_s, env["world_size"]) if "gpu" in env else 0.0
    record = {
        "format": RECORD_FORMAT, "track": track["name"], "date": date,
        "dataset": track["dataset"], "data_manifest_sha256": summary["data_manifest_sha256"],
        "description": cfg.description,
        "contributors": [c.strip() for c in str(cfg.contributors).split(",") if c.strip()],
        "config": dataclasses.asdict(cfg), "code_hash": summary["code_hash"], "environment": env,
        "parameters": summary["parameters"], "iterations": summary["step"],
        "global_batch": cfg.global_batch, "images_seen": summary["step"] * cfg.global_batch,
        "wall_clock": {"train_seconds": round(train_s, 2), "device_train_seconds": round(device_train, 2),
                       "sample_seconds": round(summary["sample_seconds"], 2),
                       "eval_seconds": round(summary["eval_seconds"], 2), "total_seconds": round(total, 2)},
        "gpu_hours": round(device_hours, 4),
        "throughput": {"iterations_per_second": round(summary["step"] / train_s, 3),
                       "images_per_second": round(summary["step"] * cfg.global_batch / train_s, 1)},
        "metrics": summary["metrics"], "metric_runs": summary["evaluation"]["runs"],
        "evaluation": track["evaluation"], "artefacts": artefacts,
    }
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write(record_dir / RECORD_FILE, lambda tmp: Path(tmp).write_text(text))
    return record_dir


def device_hours_of(device_train_seconds: float, scoring_seconds: float, world_size: int) -> float:
    """Process-hours of a run: its training time x processes summed over its legs (a resume may
    change the count), then sampling and scoring on the last leg's processes."""
    return (device_train_seconds + scoring_seconds * world_size) / 3600


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name} (a metric must be a finite number)")


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:  # a reader would see the first value, the tools the last
        raise ValueError(f"duplicate keys {repeated}")
    return dict(pairs)


def parse_json(text: str):
    """JSON as records are read: no NaN or Infinity, no duplicate keys."""
    return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicate_keys)


def _check_text(path: Path, where: str, text: str) -> None:
    """Free-text fields end up in LEADERBOARD.md's table: no line breaks, control characters, or
    invisible formatting (bidi overrides, zero-width characters)."""
    import unicodedata
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text):
        raise RecordError(f"{path}: field {where!r} contains control or invisible formatting characters "
                          "(line breaks, tabs, bidi overrides, zero-width characters...)")


def _check_numbers(path: Path, value, where: str = "") -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)) and abs(value) > MAX_NUMBER:
        raise RecordError(f"{path}: field {where!r} is {str(value)[:24]}, implausibly large")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(path, v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_numbers(path, v, f"{where}.{i}")


def artefact_path(record_dir: Path, record: dict, key: str) -> Path | None:
    """The local file of an artefact: its `path`, a plain file name inside the record folder (no
    directories, no symlinks); for a remote artefact (`url`), the file downloaded next to
    record.json under its usual name, or None when it has not been downloaded."""
    art = record["artefacts"][key]
    record_dir = Path(record_dir)
    name = art.get("path") or artefact_file_name(key)
    if Path(name).name != name or name in (".", "..") or "\\" in name:
        raise RecordError(f"{record_dir / RECORD_FILE}: artefact {key} path {name!r} must be a file name "
                          "inside the record folder")
    file = record_dir / name
    if file.is_symlink():
        raise RecordError(f"{record_dir / RECORD_FILE}: artefact {key} ({file}) is a symlink; a record "
                          "folder holds its own files")
    if "path" not in art and not file.is_file():
        return None
    return file


def load_record(record_dir: Path, check_artefacts: bool = False) -> dict:
    """Reads and validates record.json; optionally verifies every local artefact's sha256."""
    record_dir = Path(record_dir)
    path = record_dir / RECORD_FILE if record_dir.is_dir() else record_dir
    if not path.is_file():
        raise RecordError(f"{path}: record file not found")
    try:
        record = parse_json(path.read_text())
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, duplicate keys, undecodable bytes
        raise RecordError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise RecordError(f"{path}: expected a JSON object")
    import jsonschema
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    errors = sorted(validator.iter_errors(record), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        where = ".".join(str(p) for p in error.absolute_path)
        if error.validator == "required":
            missing = [f for f in error.validator_value if f not in error.instance]
            where = ".".join([*(str(p) for p in error.absolute_path), missing[0]])
            raise RecordError(f"{path}: missing field {where!r}")
        raise RecordError(f"{path}: field {where or '(top level)'!r}: {error.message}")
    for where, text in ([("description", record["description"]), ("date", record["date"]),
                         ("track", record["track"])]
                        + [(f"contributors.{i}", c) for i, c in enumerate(record["contributors"])]
                        + [(f"environment.{k}", v) for k, v in record["environment"].items()
                           if isinstance(v, str)]):
        _check_text(path, where, text)
    _check_numbers(path, record)
    if check_artefacts:
        from preprocessing.shards import sha256_file
        for key, art in record["artefacts"].items():
            file = artefact_path(path.parent, record, key)
            if file is None:
                continue  # a remote artefact not downloaded here: checked by whoever downloads it
            if not file.is_file():
                raise RecordError(f"{path}: artefact {key} ({file}) is missing")
            actual = sha256_file(file)
            if actual != art["sha256"]:
                raise RecordError(f"{path}: artefact {key} ({file}) has sha256 {actual}, "
                                  f"the record says {art['sha256']}")
    return record


def find_records(records_dir: Path) -> list[Path]:
    """Every record folder under records/<track>/, in a stable order."""
    return sorted(p.parent for p in Path(records_dir).glob(f"*/*/{RECORD_FILE}"))
