"""``convert``: an ImageNet-style train folder (or a tar/zip of one) -> uint8 image shards.

    python -m preprocessing convert SOURCE OUT --resolution 256 [--workers N] [--shard-size 4096]

Output: a ``speedrun-shards-v1`` dataset without latents yet (see
:mod:`preprocessing.shards`): ``<split>/images-XXXXX.npy`` (uint8
``[n, R, R, 3]``), ``<split>/labels-XXXXX.npy`` (int64 class ids: the index of
the class folder in the sorted list of class folder names), ``manifest.json``
(counts, class names, sha256 of every shard) and ``convert_report.json`` (every
skipped file with its reason and every converted-with-changes file with a
note; it is checksummed in the manifest).  ``python -m preprocessing encode``
adds the latents afterwards.

Work is split into fixed slices of the sorted listing (``shard_size``
entries each) that worker processes convert independently.  A finished slice
is committed to ``<OUT>.partial/`` (data files first, then a small JSON
marker, each written to a temporary name and renamed), so a run that is
killed resumes with the slices that are already done.  Slices lose their
skipped files, so shards can hold fewer than ``shard_size`` images; slices
in which every file was skipped produce no shard.  When every slice is done
the shards are linked into a staging folder with consecutive numbers, the
manifest is written, and the staging folder replaces ``OUT`` in one atomic exchange.

Byte-identical output: the listing order is sorted, each shard depends only
on its own files, JSON is written with sorted keys, and nothing records time,
host or absolute paths.  (Decoders differ between Pillow/libjpeg versions,
so "identical" assumes the same Pillow build; its version is recorded.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from preprocessing.images import (
    ALPHA_MODES,
    DEFAULT_MIN_SIZE,
    Listing,
    SourceReader,
    list_source,
    load_and_crop,
)
from preprocessing.shards import atomic_write, sha256_file

PathLike = Union[str, os.PathLike]

DEFAULT_SHARD_SIZE = 4096
REPORT_NAME = "convert_report.json"
PLAN_NAME = "plan.json"
PLAN_FORMAT = "speedrun-convert-plan-v1"
# Testing aid: seconds to sleep after each image, so a test can kill a run mid-way.
_DELAY_ENV = "PREPROCESSING_CONVERT_DELAY"

__all__ = ["DEFAULT_SHARD_SIZE", "REPORT_NAME", "ConvertError", "convert", "main_args"]


class ConvertError(RuntimeError):
    """The conversion cannot proceed (bad arguments, a partial run made with other settings, ...)."""


# --------------------------------------------------------------------------- small file helpers


def _atomic_bytes(path: Path, payload: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode("utf-8")


def _file_entry(path: Path, rel: str, dtype: str, shape: Sequence[int]) -> Dict[str, Any]:
    return {
        "path": rel,
        "bytes": path.stat().st_size,
        "dtype": dtype,
        "shape": [int(s) for s in shape],
        "sha256": sha256_file(path),
    }


def _shrink_npy(path: Path, count: int, item_shape: Tuple[int, ...], dtype: np.dtype) -> None:
    """Rewrite the header of a ``.npy`` of capacity >= count to say ``count`` rows, and truncate it."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        old_offset = f.tell()
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": (count,) + tuple(item_shape)}
        buf = _header_bytes(header, version)
        nbytes = count * int(np.prod(item_shape, dtype=np.int64)) * dtype.itemsize
        if len(buf) == old_offset:
            f.seek(0)
            f.write(buf)
            f.truncate(old_offset + nbytes)
            return
    # Header length changed (rare): copy the rows into a fresh file.
    src = np.load(path, mmap_mode="r")
    tmp = path.with_name(path.name + ".shrink")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(count,) + tuple(item_shape))
    out[:] = src[:count]
    out.flush()
    del out, src
    os.replace(tmp, path)


def _header_bytes(header: Dict[str, Any], version: Tuple[int, int]) -> bytes:
    import io

    buf = io.BytesIO()
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buf, header)
    else:
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


# --------------------------------------------------------------------------- worker side

_PROGRESS_QUEUE = None


def _init_worker(queue) -> None:  # pragma: no cover - runs in worker processes
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = queue


def _slice_paths(work: Path, split: str, index: int) -> Dict[str, Path]:
    return {
        "images": work / split / f"slice-{index:05d}.images.npy",
        "labels": work / split / f"slice-{index:05d}.labels.npy",
        "marker": work / split / f"slice-{index:05d}.json",
    }


def _convert_slice(job: Dict[str, Any]) -> Dict[str, Any]:
    """Convert one slice of the listing and commit it to the work folder; returns its record."""
    work, split, index = Path(job["work"]), job["split"], job["index"]
    size, entries = job["resolution"], job["entries"]
    paths = _slice_paths(work, split, index)
    reader = SourceReader(job["kind"], job["source"])
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    tmp_images = paths["images"].with_name(paths["images"].name + f".{os.getpid()}.tmp")
    item = (size, size, 3)
    images = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(len(entries),) + item)
    labels: List[int] = []
    skipped: List[List[str]] = []
    converted: List[List[str]] = []
    pending = 0
    try:
        for entry in entries:
            array, reason, notes = load_and_crop(
                reader, entry, size, min_size=job["min_size"], alpha=job["alpha"]
            )
            if array is None:
                skipped.append([entry.path, str(reason)])
            else:
                images[len(labels)] = array
                labels.append(entry.label)
            if notes:
                converted.append([entry.path, "; ".join(notes)])
            pending += 1
            if delay:
                time.sleep(delay)
            if _PROGRESS_QUEUE is not None and pending >= 16:
                _PROGRESS_QUEUE.put(pending)
                pending = 0
        images.flush()
        del images
        count = len(labels)
        _shrink_npy(tmp_images, count, item, np.dtype(np.uint8))
        with open(tmp_images, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_images, paths["images"])
        label_array = np.asarray(labels, dtype=np.int64)
        buf = _npy_bytes(label_array)
        _atomic_bytes(paths["labels"], buf)
        record = {
            "index": index,
            "entries": len(entries),
            "count": count,
            "images": {"bytes": paths["images"].stat().st_size, "sha256": sha256_file(paths["images"])},
            "labels": {"bytes": len(buf), "sha256": hashlib.sha256(buf).hexdigest()},
            "skipped": skipped,
            "converted": converted,
        }
        _atomic_bytes(paths["marker"], _json_bytes(record))  # the commit point
    finally:
        reader.close()
        if tmp_images.exists():
            tmp_images.unlink()
        if _PROGRESS_QUEUE is not None and pending:
            _PROGRESS_QUEUE.put(pending)
    return record


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _load_done(work: Path, split: str, index: int, n_entries: int) -> Optional[Dict[str, Any]]:
    """The committed record of slice ``index`` if its files are intact (sizes match), else None."""
    paths = _slice_paths(work, split, index)
    try:
        record = json.loads(paths["marker"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        ok = (
            record["index"] == index
            and record["entries"] == n_entries
            and paths["images"].stat().st_size == record["images"]["bytes"]
            and paths["labels"].stat().st_size == record["labels"]["bytes"]
        )
    except (OSError, KeyError, TypeError):
        return None
    return record if ok else None


# --------------------------------------------------------------------------- the driver


def _plan(listing: Listing, split: str, resolution: int, shard_size: int, min_size: int, alpha: str) -> Dict[str, Any]:
    import PIL

    fingerprint = hashlib.sha256(
        json.dumps(
            [[e.path, e.size, e.label] for e in listing.entries] + [listing.fingerprint, listing.kind],
            separators=(",", ":"),
        ).encode("utf-8")
    ).hexdigest()
    return {
        "format": PLAN_FORMAT,
        "split": split,
        "resolution": resolution,
        "shard_size": shard_size,
        "min_size": min_size,
        "alpha": alpha,
        "class_names": listing.class_names,
        "entries": len(listing.entries),
        "input_fingerprint": fingerprint,
        "pillow": PIL.__version__,
    }


def _listing_sha256(listing: Listing) -> str:
    """Content-independent identity of the input listing (relative paths and sizes only)."""
    digest = hashlib.sha256()
    for e in listing.entries:
        digest.update(f"{e.path}\t{e.size}\n".encode("utf-8"))
    return digest.hexdigest()


def convert(
    source: PathLike,
    out_dir: PathLike,
    *,
    resolution: int = 256,
    split: str = "train",
    name: str = "imagenet",
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: Optional[int] = None,
    min_size: int = DEFAULT_MIN_SIZE,
    alpha: str = "white",
    archive_root: Optional[str] = None,
    force: bool = False,
    restart: bool = False,
    progress: bool = True,
    log=print,
) -> Path:
    """Convert ``source`` into an images-only shard dataset at ``out_dir``; returns the manifest path.

    ``workers``: processes (default: all CPUs; 0 converts in this process).
    ``force``: replace an existing dataset at ``out_dir``.  ``restart``:
    discard a partial run instead of resuming it (a partial run made with
    other settings or another input is refused unless ``restart``).
    """
    from preprocessing.shards import _SPLIT_RE, MANIFEST_NAME, FORMAT, _fsync_dir  # noqa: PLC0415

    if int(resolution) <= 0:
        raise ConvertError(f"resolution must be positive, got {resolution}")
    if int(shard_size) <= 0:
        raise ConvertError(f"shard_size must be positive, got {shard_size}")
    if alpha not in ALPHA_MODES:
        raise ConvertError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    if not _SPLIT_RE.match(split):
        raise ConvertError(f"invalid split name {split!r}")
    resolution, shard_size, min_size = int(resolution), int(shard_size), int(min_size)
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConvertError(f"{out_dir}: exists and is not a directory")
        if (out_dir / MANIFEST_NAME).exists():
            if not force:
                raise ConvertError(
                    f"{out_dir}: a dataset already exists there; pass --force to replace it"
                )
        elif any(out_dir.iterdir()):
            raise ConvertError(f"{out_dir}: refusing to replace a non-empty folder that holds no {MANIFEST_NAME}")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)

    listing = list_source(source, layout="classes", archive_root=archive_root)
    if len(listing.class_names) < 2:  # caught before hours of conversion, not by train.py afterwards
        raise ConvertError(
            f"{source}: {len(listing.class_names)} class folder(s) found {listing.class_names}: a "
            "class-conditional dataset has one folder per class; when they sit deeper in the archive "
            "(Kaggle's ILSVRC/Data/CLS-LOC/train/<synset>/...), pass --archive-root with that path"
        )
    log(
        f"convert: {listing.kind} {Path(source).name}: {len(listing.class_names)} classes, "
        f"{len(listing.entries)} candidate files, {len(listing.skipped)} skipped while listing"
    )
    plan = _plan(listing, split, resolution, shard_size, min_size, alpha)

    work = out_dir.parent / f"{out_dir.name}.partial"
    if work.exists():
        try:
            old = json.loads((work / PLAN_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if restart or old is None:
            shutil.rmtree(work)
        elif old != plan:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise ConvertError(
                f"{work}: a partial conversion made with different settings or input exists "
                f"(differs in {diff}); pass --restart to discard it"
            )
    (work / split).mkdir(parents=True, exist_ok=True)
    if not (work / PLAN_NAME).exists():
        _atomic_bytes(work / PLAN_NAME, _json_bytes(plan))

    n = len(listing.entries)
    n_slices = math.ceil(n / shard_size)
    records: Dict[int, Dict[str, Any]] = {}
    for index in range(n_slices):
        chunk = listing.entries[index * shard_size : (index + 1) * shard_size]
        done = _load_done(work, split, index, len(chunk))
        if done is not None:
            records[index] = done
    if records:
        log(f"convert: resuming: {len(records)} of {n_slices} slices already done")
    todo = [i for i in range(n_slices) if i not in records]
    jobs = [
        {
            "work": str(work), "split": split, "index": i, "resolution": resolution,
            "entries": listing.entries[i * shard_size : (i + 1) * shard_size],
            "kind": listing.kind, "source": str(listing.source), "min_size": min_size, "alpha": alpha,
        }
        for i in todo
    ]
    already = sum(records[i]["entries"] for i in records)
    _run_jobs(jobs, workers, records, total=n, initial=already, progress=progress)

    # ---- finalize: link slices into a staging folder with consecutive shard numbers
    parent = out_dir.parent
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = parent / f".{out_dir.name}.tmp-{tag}"
    (staging / split).mkdir(parents=True)
    try:
        shards: List[Dict[str, Any]] = []
        skipped = [[p, r] for p, r in listing.skipped]
        converted: List[List[str]] = []
        for index in range(n_slices):
            record = records[index]
            skipped.extend(record["skipped"])
            converted.extend(record["converted"])
            if record["count"] == 0:
                continue
            number = len(shards)
            paths = _slice_paths(work, split, index)
            entry: Dict[str, Any] = {"count": record["count"]}
            for kind, dtype, shape in (
                ("images", "uint8", [record["count"], resolution, resolution, 3]),
                ("labels", "int64", [record["count"]]),
            ):
                rel = f"{split}/{kind}-{number:05d}.npy"
                _link_or_copy(paths[kind], staging / rel)
                entry[kind] = {"path": rel, "bytes": record[kind]["bytes"], "dtype": dtype,
                               "shape": shape, "sha256": record[kind]["sha256"]}
            shards.append(entry)
        count = sum(s["count"] for s in shards)
        if count == 0:
            raise ConvertError(
                f"{source}: every file was skipped ({len(skipped)}); first: {skipped[0][0]!r}: {skipped[0][1]}"
            )
        skipped.sort()
        converted.sort()
        per_class = np.zeros(len(listing.class_names), dtype=np.int64)
        for index in range(n_slices):
            if records[index]["count"]:
                per_class += np.bincount(
                    np.load(_slice_paths(work, split, index)["labels"]), minlength=len(listing.class_names)
                )
        empty = [listing.class_names[i] for i in np.flatnonzero(per_class == 0)]
        report = {
            "split": split,
            "candidates": len(listing.entries) + len(listing.skipped),
            "converted": count,
            "skipped_count": len(skipped),
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
            "notes": [{"path": p, "note": r} for p, r in converted],
            "empty_classes": empty,
        }
        report_bytes = _json_bytes(report)
        (staging / REPORT_NAME).write_bytes(report_bytes)
        import PIL

        manifest = {
            "format": FORMAT,
            "name": str(name),
            "resolution": resolution,
            "image_channels": 3,
            "image_shape": [resolution, resolution, 3],
            "latent_shape": None,
            "latent_encoder": None,
            "latent_scale": None,
            "class_names": listing.class_names,
            "num_classes": len(listing.class_names),
            "shard_size": shard_size,
            "metadata": {
                "builder": "preprocessing.convert",
                "crop": "adm_center_crop (box halving while short side >= 2R, bicubic, centre crop)",
                "alpha": alpha,
                "min_size": min_size,
                "source_kind": listing.kind,
                "source_listing_sha256": _listing_sha256(listing),
                "pillow": PIL.__version__,
                "images_per_class": {split: [int(c) for c in per_class]},
                "skipped": len(skipped),
                "report": REPORT_NAME,
            },
            "extras": {REPORT_NAME: {"bytes": len(report_bytes),
                                     "sha256": hashlib.sha256(report_bytes).hexdigest()}},
            "splits": {split: {"count": count, "shards": shards}},
        }
        from preprocessing.shards import dump_manifest, swap_into_place  # noqa: PLC0415

        (staging / MANIFEST_NAME).write_bytes(dump_manifest(manifest))
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(staging / split)
        _fsync_dir(staging)
        swap_into_place(staging, out_dir, tag)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    log(
        f"convert: wrote {count} images in {len(shards)} shards to {out_dir}; "
        f"{len(skipped)} files skipped, {len(converted)} converted with notes "
        f"(see {out_dir / REPORT_NAME})"
    )
    return out_dir / MANIFEST_NAME


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _run_jobs(jobs, workers: int, records, *, total: int, initial: int, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="img", desc="convert", disable=not progress,
               dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    try:
        if workers <= 1 or len(jobs) <= 1:
            global _PROGRESS_QUEUE
            _PROGRESS_QUEUE = _BarQueue(bar)
            try:
                for job in jobs:
                    record = _convert_slice(job)
                    records[record["index"]] = record
            finally:
                _PROGRESS_QUEUE = None
            return
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)) or 1, mp_context=ctx,
                                 initializer=_init_worker, initargs=(queue,)) as pool:
            pending = {pool.submit(_convert_slice, job) for job in jobs}
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(queue, bar)
                for future in done:
                    record = future.result()  # re-raises a worker's unexpected error
                    records[record["index"]] = record
            _drain(queue, bar)
    finally:
        bar.close()


class _BarQueue:
    """In-process stand-in for the progress queue."""

    def __init__(self, bar):
        self.bar = bar

    def put(self, n: int) -> None:
        self.bar.update(n)


def _drain(queue, bar) -> None:
    import queue as queue_mod

    while True:
        try:
            bar.update(queue.get_nowait())
        except queue_mod.Empty:
            return


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("source", help="ImageNet-style train folder (one sub-folder per class), or a .tar/.zip of one")
    parser.add_argument("out", help="output dataset folder")
    parser.add_argument("--resolution", type=int, default=256, help="output size R (ADM centre crop), e.g. 256 or 512")
    parser.add_argument("--split", default="train", help="split name (default train)")
    parser.add_argument("--name", default="imagenet", help="dataset name recorded in the manifest")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"files per slice/shard (default {DEFAULT_SHARD_SIZE}); also the resume granularity")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPUs; 0 = in process)")
    parser.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE,
                        help=f"skip images whose short side is below this (default {DEFAULT_MIN_SIZE})")
    parser.add_argument("--alpha", choices=ALPHA_MODES, default="white",
                        help="transparent images: composite on white (default) or drop alpha")
    parser.add_argument("--archive-root", default=None,
                        help="folder inside a tar/zip that holds the class folders (default: auto)")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset at OUT")
    parser.add_argument("--restart", action="store_true", help="discard a partial run instead of resuming it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_args(args) -> int:
    convert(
        args.source, args.out, resolution=args.resolution, split=args.split, name=args.name,
        shard_size=args.shard_size, workers=args.workers, min_size=args.min_size, alpha=args.alpha,
        archive_root=args.archive_root, force=args.force, restart=args.restart,
        progress=not args.no_progress,
    )
    return 0
