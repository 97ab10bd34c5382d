"""The digits track dataset: scikit-learn's bundled handwritten digits as shards.

Source: ``sklearn.datasets.load_digits()`` -- 1797 grayscale 8x8 images with
values 0..16 and 10 classes (it ships with scikit-learn; nothing is downloaded).

* Pixels: ``uint8 = round(v * 255 / 16)`` (round half to even; the only tie,
  v = 8 -> 127.5, becomes 128), stored NHWC ``[N, 8, 8, 1]`` at the native
  8x8 resolution.  Latents are pixel space (``identity`` encoder).
* Split (fixed): a stratified held-out set of exactly ``HELDOUT_PER_CLASS`` = 50
  images per class (500 total).  With
  ``rng = numpy.random.Generator(numpy.random.PCG64(SPLIT_SEED))``, for each
  class c = 0..9 in order, the (sorted) original indices of class c are
  permuted with ``rng.permutation`` and the first 50 are held out.  The other
  1297 images are the train split.  Both splits are kept sorted by original
  index.
* ``reference.npz`` in the dataset directory is an ADM-style reference batch:
  ``arr_0`` = held-out images (uint8 NHWC) and ``labels``.  It is written
  deterministically (fixed zip timestamps) by the shared reference tool
  (``preprocessing.reference.npz_bytes``; ``python -m preprocessing reference
  --shards data/digits --split heldout --out x.npz`` rebuilds it byte for byte)
  and checksummed in the manifest.

CLI: ``python -m preprocessing.digits [--out data/digits] [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Tuple, Union

import numpy as np

from preprocessing.encoders import IdentityEncoder
from preprocessing.shards import MANIFEST_NAME, ShardFormatError, verify_dataset, write_dataset

DATASET_NAME = "digits"
DEFAULT_OUT = "data/digits"
SPLIT_SEED = 20261125
NUM_CLASSES = 10
HELDOUT_PER_CLASS = 50
TOTAL_COUNT = 1797
HELDOUT_COUNT = NUM_CLASSES * HELDOUT_PER_CLASS  # 500
TRAIN_COUNT = TOTAL_COUNT - HELDOUT_COUNT  # 1297
RESOLUTION = 8
CHANNELS = 1
SOURCE_MAX_VALUE = 16
# 1024 images per shard: the train split spans two shards, so the multi-shard
# code path is exercised by the default track as well.
SHARD_SIZE = 1024
TRAIN_SPLIT = "train"
HELDOUT_SPLIT = "heldout"
REFERENCE_NAME = "reference.npz"
CLASS_NAMES = tuple(str(c) for c in range(NUM_CLASSES))

PathLike = Union[str, Path]

__all__ = [
    "DATASET_NAME", "DEFAULT_OUT", "SPLIT_SEED", "NUM_CLASSES", "HELDOUT_PER_CLASS",
    "TOTAL_COUNT", "HELDOUT_COUNT", "TRAIN_COUNT", "SHARD_SIZE", "TRAIN_SPLIT",
    "HELDOUT_SPLIT", "REFERENCE_NAME", "CLASS_NAMES",
    "load_digits_uint8", "split_indices", "build_digits", "ensure_digits", "main",
]


def load_digits_uint8() -> Tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as ``(images uint8 [N, 8, 8, 1], labels int64 [N])``, original order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    values = np.asarray(bunch.images, dtype=np.float64)  # [N, 8, 8], 0..16
    if values.shape != (TOTAL_COUNT, RESOLUTION, RESOLUTION):
        raise RuntimeError(f"unexpected sklearn digits shape {values.shape}")
    if values.min() < 0 or values.max() > SOURCE_MAX_VALUE or np.any(values != np.round(values)):
        raise RuntimeError("unexpected sklearn digits values (expected integers 0..16)")
    # v * 255 / 16 is exact in float64; np.rint rounds half to even.
    images = np.rint(values * 255.0 / SOURCE_MAX_VALUE).astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    return np.ascontiguousarray(images), labels


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """The fixed stratified split: ``(train_indices, heldout_indices)``, both sorted."""
    labels = np.asarray(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    heldout = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)  # sorted
        if len(members) < HELDOUT_PER_CLASS:
            raise RuntimeError(f"class {c} has only {len(members)} images")
        heldout.append(rng.permutation(members)[:HELDOUT_PER_CLASS])
    heldout_idx = np.sort(np.concatenate(heldout)).astype(np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[heldout_idx] = False
    train_idx = np.flatnonzero(mask).astype(np.int64)
    return train_idx, heldout_idx


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    """The reference batch bytes, written by the shared reference tool (preprocessing/reference.py)."""
    from preprocessing.reference import npz_bytes

    return npz_bytes(**arrays)


def build_digits(out_dir: PathLike = DEFAULT_OUT, shard_size: int = SHARD_SIZE) -> Path:
    """(Re)build the digits dataset into ``out_dir``; returns the manifest path."""
    images, labels = load_digits_uint8()
    train_idx, heldout_idx = split_indices(labels)
    assert len(train_idx) == TRAIN_COUNT and len(heldout_idx) == HELDOUT_COUNT
    reference = _npz_bytes(arr_0=images[heldout_idx], labels=labels[heldout_idx])
    metadata = {
        "source": "sklearn.datasets.load_digits",
        "pixel_transform": "uint8 = round_half_even(v * 255 / 16), v in 0..16",
        "split_seed": SPLIT_SEED,
        "split_rule": (
            "rng = numpy.random.Generator(numpy.random.PCG64(split_seed)); for class c in 0..9: "
            "heldout += rng.permutation(sorted indices of class c)[:heldout_per_class]; "
            "train = the rest; both sorted by original index"
        ),
        "heldout_per_class": HELDOUT_PER_CLASS,
        "train_indices_sha256": _sha256(train_idx.astype("<i8").tobytes()),
        "heldout_indices_sha256": _sha256(heldout_idx.astype("<i8").tobytes()),
        "reference_batch": REFERENCE_NAME,
    }
    return write_dataset(
        out_dir,
        DATASET_NAME,
        {
            TRAIN_SPLIT: (images[train_idx], labels[train_idx]),
            HELDOUT_SPLIT: (images[heldout_idx], labels[heldout_idx]),
        },
        IdentityEncoder(),
        CLASS_NAMES,
        shard_size=shard_size,
        metadata=metadata,
        extras={REFERENCE_NAME: reference},
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digits(out_dir: PathLike = DEFAULT_OUT) -> Path:
    """Verify an existing digits dataset (checksums and identity); returns the manifest path.

    Raises :class:`ShardFormatError` if it is missing, corrupt or not the digits dataset.
    """
    out_dir = Path(out_dir)
    manifest = verify_dataset(out_dir)
    counts = {s: r["count"] for s, r in manifest["splits"].items()}
    meta = manifest.get("metadata") or {}
    if (
        manifest["name"] != DATASET_NAME
        or counts != {TRAIN_SPLIT: TRAIN_COUNT, HELDOUT_SPLIT: HELDOUT_COUNT}
        or manifest["latent_encoder"] != "identity"
        or manifest["image_shape"] != [RESOLUTION, RESOLUTION, CHANNELS]
        or meta.get("split_seed") != SPLIT_SEED
        or meta.get("heldout_per_class") != HELDOUT_PER_CLASS
        or REFERENCE_NAME not in (manifest.get("extras") or {})
    ):
        raise ShardFormatError(
            f"{out_dir / MANIFEST_NAME}: not the expected digits dataset "
            f"(name/split counts/encoder/split seed differ)"
        )
    return out_dir / MANIFEST_NAME


def ensure_digits(out_dir: PathLike = DEFAULT_OUT, verbose: bool = False) -> Path:
    """Return the manifest path of a valid digits dataset at ``out_dir``, building it if needed."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).exists():
        try:
            path = check_digits(out_dir)
        except ShardFormatError as exc:
            if verbose:
                print(f"digits: existing dataset invalid ({exc}); rebuilding", flush=True)
        else:
            if verbose:
                print(f"digits: {out_dir} is valid (checksums verified); skipping", flush=True)
            return path
    path = build_digits(out_dir)
    if verbose:
        print(f"digits: wrote {path}", flush=True)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.digits",
        description="Build the digits track dataset (sklearn handwritten digits, 8x8) as shards.",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"dataset directory (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid dataset exists")
    args = parser.parse_args(argv)
    if args.force:
        path = build_digits(args.out)
        print(f"digits: rebuilt {path}", flush=True)
    else:
        ensure_digits(args.out, verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
