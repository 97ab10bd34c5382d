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
# artefacts copied from the run folder into the record folder
ARTEFACT_FILES = {"model": "model.safetensors", "log": "train.log", "samples": "samples.npz",
                  "grid": "grid.png", "evaluation": "metrics.json"}


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
    for key, name in ARTEFACT_FILES.items():
        shutil.copyfile(run_dir / name, record_dir / name)
        artefacts[key] = {"path": name, "sha256": sha256_file(record_dir / name)}
    train_s = summary["train_seconds"]
    total = train_s + summary["sample_seconds"] + summary["eval_seconds"]
    env = summary["environment"]
    device_hours = total / 3600 * env["world_size"] if "gpu" in env else 0.0
    record = {
        "format": RECORD_FORMAT, "track": track["name"], "date": date,
        "dataset": track["dataset"], "data_manifest_sha256": summary["data_manifest_sha256"],
        "description": cfg.description,
        "contributors": [c.strip() for c in cfg.contributors.split(",") if c.strip()],
        "config": dataclasses.asdict(cfg), "code_hash": summary["code_hash"], "environment": env,
        "parameters": summary["parameters"], "iterations": summary["step"],
        "global_batch": cfg.global_batch, "images_seen": summary["step"] * cfg.global_batch,
        "wall_clock": {"train_seconds": round(train_s, 2), "sample_seconds": round(summary["sample_seconds"], 2),
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


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name} (a metric must be a finite number)")


def _check_text(path: Path, where: str, text: str) -> None:
    """Free-text fields end up in LEADERBOARD.md's table: no line breaks or other control characters."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise RecordError(f"{path}: field {where!r} contains control characters (line breaks, tabs...)")


def artefact_path(record_dir: Path, record: dict, key: str) -> Path | None:
    """The local file of an artefact: its `path`, a plain file name inside the record folder (no
    directories, no symlinks); for a remote artefact (`url`), the file downloaded next to
    record.json under its usual name, or None when it has not been downloaded."""
    art = record["artefacts"][key]
    record_dir = Path(record_dir)
    name = art.get("path") or ARTEFACT_FILES.get(key, key)
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
        record = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError; so is a NaN or an Infinity
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
