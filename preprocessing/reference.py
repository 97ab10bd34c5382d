"""``reference``: an ADM-format reference batch (``.npz``) for tracks that have no published one.

    python -m preprocessing reference --folder HELDOUT_DIR --resolution 256 --out ref.npz [--features NAME]
    python -m preprocessing reference --shards data/digits --split heldout --out reference.npz

The file holds ``arr_0`` (uint8 NHWC images, as ADM's evaluator expects),
``labels`` (int64, when the source has classes) and, with ``--features NAME``
(a feature extractor registered in ``evaluations.features``), the
statistics ADM reference batches carry: ``mu``/``sigma`` of the ``pool``
features and, when the extractor has ``spatial`` features, ``mu_s``/``sigma_s``
of them flattened per image (mean and ``ddof=1`` covariance, float64).

Sources: a held-out folder of images, read with exactly the same decoding,
colour-mode and ADM-centre-crop rules as ``convert`` (``--flat`` for a folder
without class sub-folders, e.g. ImageNet val), or a split of a shard dataset.
Skipped files are listed with their reasons in ``<out>.report.json``.
``--num-images K --seed S`` keeps a seeded random subset of K images (in
source order).

The ``.npz`` is written deterministically (stored members, fixed timestamps,
no pickle) and atomically.  The digits track's ``reference.npz`` is written by
:func:`npz_bytes` here, and ``--shards <digits dir> --split heldout``
reproduces it byte for byte.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from preprocessing.shards import atomic_write

PathLike = Union[str, os.PathLike]
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)

__all__ = ["npz_bytes", "write_npz", "feature_statistics_arrays", "images_from_folder", "build_reference"]


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An ``.npz`` (as ``np.savez``: stored, no pickle) with fixed timestamps: byte-reproducible."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(_member(key), member.getvalue())
    return buf.getvalue()


def write_npz(path: PathLike, arrays: Dict[str, np.ndarray]) -> Path:
    """Write :func:`npz_bytes` of ``arrays`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    payload = npz_bytes(**arrays)
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))
    return path


ADM_STATISTICS_NETWORK = "inception_adm"


def feature_statistics_arrays(images: np.ndarray, extractor_name: str, batch_size: Optional[int] = None) -> Dict[str, np.ndarray]:
    """ADM statistics of ``images`` under a registered feature extractor: mu, sigma (+ mu_s, sigma_s)."""
    from evaluations.features import get_feature_extractor

    extractor = get_feature_extractor(extractor_name)
    feats = extractor.extract(images, batch_size)
    if len(images) < 2:
        raise ValueError("statistics need at least two images")
    out = {}
    for key, prefix in (("pool", ""), ("spatial", "_s")):
        if key not in feats:
            continue
        x = np.asarray(feats[key], dtype=np.float64).reshape(len(images), -1)
        out[f"mu{prefix}"] = x.mean(axis=0)
        out[f"sigma{prefix}"] = np.cov(x, rowvar=False)
    return out


def _decode_chunk(job):
    """Worker: decode ``(listing index, entry)`` pairs; returns one outcome per pair, in order."""
    from preprocessing.images import SourceReader, load_and_crop

    kind, source, pairs, size, min_size, alpha = job
    reader = SourceReader(kind, source)
    outcomes = []  # (index, image or None, skip reason or None, notes)
    try:
        for index, entry in pairs:
            array, reason, notes = load_and_crop(reader, entry, size, min_size=min_size, alpha=alpha)
            outcomes.append((index, array, reason, "; ".join(notes)))
    finally:
        reader.close()
    return outcomes


def images_from_folder(source: PathLike, resolution: int, *, flat: bool = False, num_images: Optional[int] = None,
                       seed: int = 0, workers: Optional[int] = None, min_size: Optional[int] = None,
                       alpha: str = "white", archive_root: Optional[str] = None, progress: bool = True):
    """Decode + ADM-crop a held-out folder/archive.

    Returns ``(images, labels or None, class_names, report)``.  With
    ``num_images``, candidates are tried in a seeded random order until that
    many converted (skipped files are replaced by the next candidates), and
    the chosen images are returned in source order.  Neither the result nor
    the report depends on ``workers``.
    """
    from tqdm import tqdm

    from preprocessing.images import DEFAULT_MIN_SIZE, list_source

    listing = list_source(source, layout="flat" if flat else "classes", archive_root=archive_root)
    entries = listing.entries
    if num_images is not None and int(num_images) < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if num_images is not None and num_images < len(entries):
        order = np.random.Generator(np.random.PCG64(seed)).permutation(len(entries))
        want = int(num_images)
    else:
        order = np.arange(len(entries))
        want = len(entries)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    min_size = DEFAULT_MIN_SIZE if min_size is None else int(min_size)
    chunk = 128
    images, kept = [], []  # kept: (listing index, label)
    skipped = [tuple(s) for s in listing.skipped]
    notes = []
    bar = tqdm(total=want, unit="img", desc="reference", disable=not progress, file=sys.stderr)
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        pos = 0
        while len(kept) < want and pos < len(order):
            jobs = []
            for _ in range(max(1, workers)):
                if pos >= len(order):
                    break
                pairs = [(int(i), entries[int(i)]) for i in order[pos : pos + chunk]]
                jobs.append((listing.kind, str(listing.source), pairs, int(resolution), min_size, alpha))
                pos += chunk
            results = pool.map(_decode_chunk, jobs) if pool else map(_decode_chunk, jobs)
            for outcomes in results:
                for index, array, reason, note in outcomes:
                    if len(kept) >= want:
                        break  # candidates past the last one needed are not used (nor reported)
                    path = entries[index].path
                    if note:
                        notes.append((path, note))
                    if array is None:
                        skipped.append((path, reason))
                    else:
                        images.append(array)
                        kept.append((index, entries[index].label))
                        bar.update(1)
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    if not kept:
        raise ValueError(f"{source}: no image could be converted ({len(skipped)} files skipped)")
    if num_images is not None and len(kept) < int(num_images):  # a short reference is not comparable
        raise ValueError(f"{source}: asked for {num_images} images, only {len(kept)} of {len(entries)} "
                         f"candidates converted ({len(skipped)} files skipped)")
    source_order = np.argsort([i for i, _ in kept], kind="stable")
    images = np.stack([images[i] for i in source_order])
    labels = np.asarray([lab for _, lab in kept], dtype=np.int64)[source_order]
    report = {
        "source_kind": listing.kind,
        "candidates": len(listing.entries) + len(listing.skipped),
        "images": int(len(kept)),
        "skipped": [{"path": p, "reason": r} for p, r in sorted(skipped)],
        "notes": [{"path": p, "note": n} for p, n in sorted(notes)],
    }
    return images, (None if flat else labels), listing.class_names, report


def images_from_shards(root: PathLike, split: str, *, num_images: Optional[int] = None, seed: int = 0,
                       verify: bool = True):
    """Images and labels of a shard split (optionally a seeded subset, in split order)."""
    from preprocessing.shards import ShardDataset

    ds = ShardDataset(root, split, verify=verify)
    if num_images is not None and num_images > len(ds):
        raise ValueError(f"{root}: asked for {num_images} images, split {split!r} has {len(ds)}")
    if num_images is not None and num_images < len(ds):
        idx = np.sort(np.random.Generator(np.random.PCG64(seed)).permutation(len(ds))[: int(num_images)])
    else:
        idx = np.arange(len(ds))
    return ds.get_images(idx), ds.get_labels(idx).astype(np.int64), ds.class_names


def build_reference(out: PathLike, *, folder: Optional[PathLike] = None, shards: Optional[PathLike] = None,
                    split: str = "heldout", resolution: Optional[int] = None, flat: bool = False,
                    num_images: Optional[int] = None, seed: int = 0, features: Optional[str] = None,
                    workers: Optional[int] = None, min_size: Optional[int] = None, alpha: str = "white",
                    archive_root: Optional[str] = None, progress: bool = True, log=print) -> Path:
    """Build the reference ``.npz`` from a folder or a shard split; returns its path."""
    if (folder is None) == (shards is None):
        raise ValueError("give exactly one source: a held-out folder or a shard dataset")
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"{out}: the reference batch must be an .npz file")
    if features and features != ADM_STATISTICS_NETWORK:  # mu/sigma, mu_s/sigma_s mean Inception's
        raise ValueError(f"--features {features}: ADM reference statistics are Inception "
                         f"({ADM_STATISTICS_NETWORK}) statistics; other networks' are not stored")
    report = None
    if folder is not None:
        if not resolution:
            raise ValueError("--resolution is required with a folder source")
        images, labels, _, report = images_from_folder(
            folder, int(resolution), flat=flat, num_images=num_images, seed=seed, workers=workers,
            min_size=min_size, alpha=alpha, archive_root=archive_root, progress=progress)
    else:
        images, labels, _ = images_from_shards(shards, split, num_images=num_images, seed=seed)
        if resolution and images.shape[1] != int(resolution):
            raise ValueError(f"{shards}: split {split!r} has {images.shape[1]} px images, not {resolution}")
    arrays: Dict[str, np.ndarray] = {"arr_0": images}
    if labels is not None:
        arrays["labels"] = labels
    if features:
        arrays.update(feature_statistics_arrays(images, features))
    if report is not None:
        report_path = out.with_name(out.name + ".report.json")
        text = json.dumps(report, sort_keys=True, indent=2) + "\n"
        atomic_write(report_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        log(f"reference: {report['images']} images, {len(report['skipped'])} files skipped "
            f"(listed with reasons in {report_path})")
    write_npz(out, arrays)
    log(f"reference: wrote {out} ({', '.join(f'{k} {tuple(v.shape)}' for k, v in arrays.items())})")
    return out


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="held-out images: a folder (or .tar/.zip) with class sub-folders, or flat with --flat")
    src.add_argument("--shards", help="a shard dataset folder (use with --split)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--split", default="heldout", help="split of --shards (default heldout)")
    parser.add_argument("--resolution", type=int, default=None, help="ADM crop size for --folder (e.g. 256)")
    parser.add_argument("--flat", action="store_true", help="the folder has no class sub-folders (no labels)")
    parser.add_argument("--num-images", type=int, default=None, help="keep a seeded random subset of this many")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset (default 0)")
    parser.add_argument("--features", default=None, choices=[ADM_STATISTICS_NETWORK],
                        help="store ADM's mu/sigma (pool_3) and mu_s/sigma_s (mixed_6/conv) statistics of "
                             "the arr_0 images (ADM's own files hold them over the whole training set)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    parser.add_argument("--min-size", type=int, default=None, help="skip images with a smaller short side")
    parser.add_argument("--alpha", choices=("white", "drop"), default="white")
    parser.add_argument("--archive-root", default=None)
    parser.add_argument("--no-progress", action="store_true")


def main_args(args) -> int:
    build_reference(args.out, folder=args.folder, shards=args.shards, split=args.split, resolution=args.resolution,
                    flat=args.flat, num_images=args.num_images, seed=args.seed, features=args.features,
                    workers=args.workers, min_size=args.min_size, alpha=args.alpha,
                    archive_root=args.archive_root, progress=not args.no_progress)
    return 0
