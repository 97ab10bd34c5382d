"""Reproduces a record: python -m records.reproduce records/<track>/<folder>  (what eval.sh runs).

1. runs the validator's checks (records.validate, re-scoring included): schema, every artefact's
   sha256, the code hash against the train.py embedded in the run log, budget, dataset, protocol;
2. loads the checkpoint (safetensors only: anything that would unpickle code is refused), or with
   --retrain re-trains from the record's config (tracks marked retrain_allowed, e.g. digits) with
   this checkout's train.py, which must be the one that made the record;
3. regenerates the samples for every evaluation seed of the track's protocol (on the GPU when
   there is one; with --processes N over N processes, as eval.sh does for N visible GPUs) and
   rescores them;
4. prints recorded vs reproduced for every seed and the mean, and a one-line verdict; exit 0 =
   every number reproduced within the track's stated tolerance, 1 = differs, 2 = the record or
   its artefacts are invalid, 3 = the reproduction could not run (bad arguments, an --out inside
   the records tree or on a file, a crash): no verdict.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from records.record import RecordError, artefact_file_name, artefact_path, load_record, seed_samples_key

ROOT = Path(__file__).resolve().parent.parent

SAFETENSORS_SUFFIX = ".safetensors"


def within(recorded: float, reproduced: float, tol: dict) -> bool:
    if not (math.isfinite(recorded) and math.isfinite(reproduced)):
        return False  # an infinite recorded value would make any relative tolerance infinite
    return abs(recorded - reproduced) <= max(tol.get("abs", 0.0), tol.get("rel", 0.0) * abs(recorded))


def check_record(record_dir: Path) -> dict:
    """Integrity checks that need no sampling. Raises RecordError naming the problem."""
    from train import code_from_log

    record = load_record(record_dir, check_artefacts=True)
    model = record["artefacts"]["model"]
    model_file = model.get("path") or model["url"]
    if not model_file.endswith(SAFETENSORS_SUFFIX):
        raise RecordError(f"{record_dir}: checkpoint {model_file} is not a .safetensors file; pickled "
                          f"formats (.pt/.pth/.ckpt/.bin) can run code when loaded and are refused")
    log = artefact_path(Path(record_dir), record, "log")
    if log is None:
        raise RecordError(f"{record_dir}: the run log must be a file of the record folder, not a URL")
    log_text = log.read_text()
    try:
        embedded = hashlib.sha256(code_from_log(log_text).encode()).hexdigest()
    except ValueError as e:
        raise RecordError(f"{record_dir}: run log: {e}") from e
    if embedded != record["code_hash"]:
        raise RecordError(f"{record_dir}: code_hash {record['code_hash']} is not the sha256 of the train.py "
                          f"embedded in its run log ({embedded})")
    return record


def retrain_args(record: dict, work: Path, track_arg: str) -> list[str]:
    """train.py flags that re-run a record's config into `work` (no record, no leaderboard). Paths
    of the submitter's machine are not taken: the data is the track's, the outputs go to `work`
    (a record naming a folder of the reviewer's would otherwise have it rebuilt)."""
    skip = {"runs_dir", "records_dir", "leaderboard", "run_name", "resume", "write_record", "track", "wandb",
            "data_dir", "encoder_weights"}
    args = ["--track", track_arg, "--runs_dir", str(work), "--run_name", "retrain", "--write_record", "false"]
    for key, value in sorted(record["config"].items()):
        if key not in skip:  # --key=value: a value starting with "-" is not read as a flag
            args.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
    return args


def sample_in_processes(model_path: Path, track_file: Path, work: Path, processes: int) -> None:
    """Every evaluation seed's samples into `work` by `generate.py --eval_dir` launched over
    `processes` processes (one per GPU; gloo processes on a machine without one), sharded as
    train.py's end of run shards them: the same samples as one process draws."""
    import socket

    import train
    with socket.socket() as sock:  # a free port for this launch's process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if not train._on_gpu():
        env["ACCELERATE_USE_CPU"] = "1"  # real gloo processes (accelerate's --cpu would start one)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "generate.py"), str(model_path), "--track", str(track_file), "--eval_dir", str(work)]
    if subprocess.run(cmd, env=env).returncode != 0:
        raise RuntimeError(f"sampling over {processes} processes failed (its output is above)")


def reproduce(record_dir: Path, out_dir: Path | None = None, root: Path | None = None,
              retrain: bool = False, other_code: bool = False, processes: int = 1
              ) -> tuple[bool, list[tuple], list[tuple], str]:
    """Regenerates and rescores (or, with retrain, re-trains from the record's config first) with
    the track's protocol, and compares every seed's metrics and their mean with the record's,
    within the track's tolerance. `root`: the records tree (its tracks/ defines the track).
    The samples are drawn on the GPU when there is one, over `processes` processes when more
    than one (sample_in_processes); the metrics are computed in this process.
    Returns (every number within tolerance, the metric rows, each seed's sample comparison, where
    the record was made and where it was reproduced)."""
    import generate
    import train
    from evaluations.evaluate import scoring_machine
    from records.validate import absolute_folder, validate_tree

    record_dir = Path(record_dir)
    root = Path(root or ROOT / "records")
    tracks_dir = root / "tracks"
    if out_dir is not None:
        check_out_dir(Path(out_dir), root, record_dir)
    valid, invalid = validate_tree(root, rescore=True, only=[record_dir])  # the same verdict as records.validate's
    key = absolute_folder(record_dir)
    if key in invalid:
        raise RecordError(invalid[key])
    record = valid[key]
    track_file = tracks_dir / f"{record['track']}.json"
    spec = train.load_track(str(track_file))
    if retrain and not spec.get("retrain_allowed", False):
        raise RecordError(f"track {spec['name']!r} is not cheap enough for --retrain; reproduce from the checkpoint")
    current = train.code_hash(Path(train.__file__).read_text())
    if retrain and current != record["code_hash"] and not other_code:
        raise RecordError(f"{record_dir}: the record was trained by the train.py with sha256 {record['code_hash']} "
                          f"(embedded in its train.log); this checkout's has {current}. Check out the commit "
                          "whose train.py matches, or pass --other-code to re-train with this one")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(out_dir) if out_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if retrain:
            if train.main(retrain_args(record, work, str(track_file))) != 0:
                raise RecordError(f"{record_dir}: re-training from the record's config failed")
            model_path = work / "retrain" / "model.safetensors"
        else:
            model_path = artefact_path(record_dir, record, "model")
            if model_path is None:
                url = record["artefacts"]["model"]["url"]
                raise RecordError(f"{record_dir}: the checkpoint is remote: download {url} to "
                                  f"{record_dir / 'model.safetensors'} (its sha256 is checked)")
        try:
            model, _ = train.load_model(model_path)
        except (FileNotFoundError, ValueError) as e:
            raise RecordError(str(e)) from e
        if processes > 1:
            del model  # it loads: each process of the launch loads its own
            sample_in_processes(model_path, track_file, work, processes)
        else:
            generate.to_sampling_device(model)
            train.sample_evaluation_seeds(model, spec, work)
        evaluation = train.score_evaluation_seeds(spec, work)
        samples = _compare_samples(record_dir, record, work)
    env = record["environment"]
    here = scoring_machine("cuda" if train._on_gpu() else "cpu")
    machines = (f"recorded on {env.get('gpu') or env.get('cpu')} (torch {env.get('torch')}), "
                f"reproduced on {here['device'].split(': ', 1)[1]} (torch {here['torch']})")
    rows, ok = [], True
    reruns = {r["seed"]: r["metrics"] for r in evaluation["runs"]}
    for name, tol in spec.get("reproduction_tolerance", {}).items():
        pairs = [(f"seed {r['seed']}", r["metrics"].get(name), reruns.get(r["seed"], {}).get(name))
                 for r in record["metric_runs"]] + [("mean", record["metrics"].get(name),
                                                     evaluation["mean"].get(name))]
        for label, recorded, got in pairs:
            if recorded is None or got is None:  # a metric the tolerance names must be there
                ok = False
                rows.append((f"{name} ({label})", recorded, got, tol, False))
                continue
            good = within(recorded, got, tol)
            ok &= good
            rows.append((f"{name} ({label})", recorded, got, tol, good))
    return ok and bool(rows), rows, samples, machines


class OutputError(ValueError):
    """--out cannot take the regenerated files (exit 3: the reproduction did not run)."""


def check_out_dir(out: Path, root: Path, record_dir: Path) -> None:
    """The regenerated samples must never land in a record (they would replace the files they are
    compared with) nor on an existing file."""
    resolved = out.resolve()
    for protected in (root.resolve(), record_dir.resolve()):
        if resolved == protected or protected in resolved.parents:
            raise OutputError(f"--out {out} is inside the records tree {protected}: the regenerated files would "
                              "replace a record's; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; name a folder for the regenerated samples")


def _compare_samples(record_dir: Path, record: dict, work: Path) -> list[tuple]:
    """Each seed's regenerated images against the record's stored ones: identical, or how many
    differ and by how much (a report for the reviewer: other CPUs and GPUs round differently)."""
    rows = []
    for i, run in enumerate(record["metric_runs"]):
        key = "samples" if i == 0 else seed_samples_key(run["seed"])
        stored = artefact_path(record_dir, record, key) if key in record["artefacts"] else None
        fresh = work / artefact_file_name(key)
        if stored is None or not fresh.is_file():
            continue
        rows.append((key, compare_batches(stored, fresh)))
    return rows


COMPARE_CHUNK = 256  # images per read: 200 MB of a 512 px batch, not the 39 GB batch at once


def compare_batches(stored: Path, fresh: Path, chunk: int = COMPARE_CHUNK) -> str:
    """'identical', or how many images of two sample batches (arr_0) differ and the largest pixel
    difference; read `chunk` images of each at a time."""
    import numpy as np

    from evaluations.npz import NpzArrayReader
    with NpzArrayReader(stored) as a, NpzArrayReader(fresh) as b:
        if a.shape != b.shape:
            return f"shape {a.shape} vs {b.shape}"
        differ, largest = 0, 0
        for start in range(0, len(a), chunk):
            x, y = a.read(start, start + chunk), b.read(start, start + chunk)
            rows = np.any(x != y, axis=tuple(range(1, x.ndim)))
            if rows.any():  # the difference of the differing images only
                differ += int(rows.sum())
                largest = max(largest, int(np.abs(x[rows].astype(np.int16) - y[rows]).max()))
    return "identical" if not differ else (f"{differ} of {len(a)} images differ (largest pixel difference "
                                           f"{largest})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("record", help="a record folder (records/<track>/<date>_<slug>)")
    parser.add_argument("--out", default=None, help="keep the regenerated samples and grid here")
    parser.add_argument("--root", default=str(ROOT / "records"),
                        help="the records tree whose tracks/ defines the record's track")
    parser.add_argument("--retrain", action="store_true",
                        help="re-train from the record's config first (cheap tracks only, e.g. digits)")
    parser.add_argument("--other-code", action="store_true",
                        help="with --retrain: allow a train.py other than the record's (the verdict says so)")
    parser.add_argument("--processes", type=int, default=1,
                        help="sample over this many processes, one per GPU (eval.sh: one per visible GPU)")
    # exit codes: 0 reproduced, 1 not reproduced, 2 invalid record, 3 could not run (bad arguments too)
    parser.error = lambda message: parser.exit(3, f"{parser.prog}: error: {message}\n")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, not {args.processes}")
    try:
        ok, rows, samples, machines = reproduce(Path(args.record), Path(args.out) if args.out else None,
                                                Path(args.root), args.retrain, args.other_code, args.processes)
    except RecordError as e:
        print(f"[eval] INVALID RECORD: {e}", file=sys.stderr)
        return 2
    except OutputError as e:
        print(f"[eval] error: {e}", file=sys.stderr)
        return 3
    except Exception:  # a crash is not a verdict on the record
        traceback.print_exc()
        print("[eval] error: the reproduction could not run (traceback above); no verdict", file=sys.stderr)
        return 3
    print(f"{'metric':<18} {'recorded':>12} {'reproduced':>12} {'tolerance':>22}  ok")
    fmt = lambda v: "missing" if v is None else f"{v:.4f}"  # noqa: E731
    for name, recorded, got, tol, good in rows:
        tol_text = f"abs {tol.get('abs', 0)} / rel {tol.get('rel', 0)}"
        mark = "exact" if good and recorded == got else ("yes" if good else "NO")
        print(f"{name:<18} {fmt(recorded):>12} {fmt(got):>12} {tol_text:>22}  {mark}")
    for key, text in samples:
        print(f"{key:<18} regenerated vs the record's: {text}")
    print(f"{'machines':<18} {machines}")
    verdict = "REPRODUCED" if ok else "NOT REPRODUCED"
    code = " (re-trained with a different train.py)" if args.retrain and args.other_code else ""
    print(f"[eval] {verdict}{code}: {args.record} ({sum(r[4] for r in rows)}/{len(rows)} numbers within "
          f"tolerance)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
