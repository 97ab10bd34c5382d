"""Reproduces a record: python -m records.reproduce records/<track>/<folder>  (what eval.sh runs).

1. validates record.json and the sha256 of every artefact it lists;
2. checks that the code hash is the sha256 of the train.py embedded at the top of its run log;
3. loads the checkpoint (safetensors only: anything that would unpickle code is refused), or with
   --retrain re-trains from the record's config (tracks marked retrain_allowed, e.g. digits);
4. regenerates the samples for every evaluation seed of the record's protocol and rescores them;
5. prints recorded vs reproduced and a one-line verdict; exit 0 = reproduced within the
   track's stated tolerance, 1 = differs, 2 = the record or its artefacts are invalid.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

from records.record import RecordError, load_record

SAFETENSORS_SUFFIX = ".safetensors"


def within(recorded: float, reproduced: float, tol: dict) -> bool:
    return abs(recorded - reproduced) <= max(tol.get("abs", 0.0), tol.get("rel", 0.0) * abs(recorded))


def check_record(record_dir: Path) -> dict:
    """Integrity checks that need no sampling. Raises RecordError naming the problem."""
    from train import code_from_log

    record = load_record(record_dir, check_artefacts=True)
    model_file = record["artefacts"]["model"]["path"]
    if not model_file.endswith(SAFETENSORS_SUFFIX):
        raise RecordError(f"{record_dir}: checkpoint {model_file} is not a .safetensors file; pickled "
                          f"formats (.pt/.pth/.ckpt/.bin) can run code when loaded and are refused")
    log_text = (Path(record_dir) / record["artefacts"]["log"]["path"]).read_text()
    try:
        embedded = hashlib.sha256(code_from_log(log_text).encode()).hexdigest()
    except ValueError as e:
        raise RecordError(f"{record_dir}: run log: {e}") from e
    if embedded != record["code_hash"]:
        raise RecordError(f"{record_dir}: code_hash {record['code_hash']} is not the sha256 of the train.py "
                          f"embedded in its run log ({embedded})")
    return record


def retrain_args(record: dict, work: Path, track_arg: str) -> list[str]:
    """train.py flags that re-run a record's config into `work` (no record, no leaderboard)."""
    skip = {"runs_dir", "records_dir", "leaderboard", "run_name", "resume", "write_record", "track", "wandb"}
    args = ["--track", track_arg, "--runs_dir", str(work), "--run_name", "retrain", "--write_record", "false"]
    for key, value in sorted(record["config"].items()):
        if key not in skip:
            args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def reproduce(record_dir: Path, out_dir: Path | None = None, track: str | None = None,
              retrain: bool = False) -> tuple[bool, list[tuple]]:
    """Regenerates and rescores (or, with retrain, re-trains from the record's config first) and
    compares the mean metrics with the record's, within the track's tolerance."""
    import train

    record_dir = Path(record_dir)
    record = check_record(record_dir)
    track_arg = track or record["track"]
    spec = train.load_track(track_arg)
    if spec["name"] != record["track"]:
        raise RecordError(f"{record_dir}: the record is for track {record['track']!r}, not {spec['name']!r}")
    if retrain and not spec.get("retrain_allowed", False):
        raise RecordError(f"track {spec['name']!r} is not cheap enough for --retrain; reproduce from the checkpoint")
    spec = spec | {"evaluation": record["evaluation"]}  # the record's own protocol
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(out_dir) if out_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if retrain:
            if train.main(retrain_args(record, work, track_arg)) != 0:
                raise RecordError(f"{record_dir}: re-training from the record's config failed")
            model_path = work / "retrain" / "model.safetensors"
        else:
            model_path = record_dir / record["artefacts"]["model"]["path"]
        try:
            model, _ = train.load_model(model_path)
        except (FileNotFoundError, ValueError) as e:
            raise RecordError(str(e)) from e
        evaluation, _, _ = train.score_model(model, spec, work)
    rows, ok = [], True
    for name, tol in spec.get("reproduction_tolerance", {}).items():
        if name not in record["metrics"]:
            continue
        got = evaluation["mean"][name]
        good = within(record["metrics"][name], got, tol)
        ok &= good
        rows.append((name, record["metrics"][name], got, tol, good))
    return ok, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("record", help="a record folder (records/<track>/<date>_<slug>)")
    parser.add_argument("--out", default=None, help="keep the regenerated samples and grid here")
    parser.add_argument("--track", default=None, help="track name or JSON path (default: the record's track)")
    parser.add_argument("--retrain", action="store_true",
                        help="re-train from the record's config first (cheap tracks only, e.g. digits)")
    args = parser.parse_args(argv)
    try:
        ok, rows = reproduce(Path(args.record), Path(args.out) if args.out else None, args.track, args.retrain)
    except RecordError as e:
        print(f"[eval] INVALID RECORD: {e}", file=sys.stderr)
        return 2
    print(f"{'metric':<10} {'recorded':>12} {'reproduced':>12} {'tolerance':>22}  ok")
    for name, recorded, got, tol, good in rows:
        tol_text = f"abs {tol.get('abs', 0)} / rel {tol.get('rel', 0)}"
        print(f"{name:<10} {recorded:>12.4f} {got:>12.4f} {tol_text:>22}  {'yes' if good else 'NO'}")
    verdict = "REPRODUCED" if ok else "NOT REPRODUCED"
    print(f"[eval] {verdict}: {args.record} ({sum(r[4] for r in rows)}/{len(rows)} metrics within tolerance)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
