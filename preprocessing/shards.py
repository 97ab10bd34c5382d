"""Dataset shard format ``speedrun-shards-v1``.

Layout of a dataset directory::

    <root>/manifest.json
    <root>/<split>/images-00000.npy    uint8   [n, H, W, C]   (NHWC)
    <root>/<split>/latents-00000.npy   float32 [n, c, h, w]   (encoder output)
    <root>/<split>/labels-00000.npy    int64   [n]
    <root>/<split>/images-00001.npy    ...
    <root>/<extra files>               optional (e.g. reference.npz)

``manifest.json`` (JSON, sorted keys, indent 2, trailing newline)::

    {
      "format": "speedrun-shards-v1",
      "name": <dataset name>,
      "resolution": H,                      # images are square, H == W
      "image_channels": C,
      "image_shape": [H, W, C],
      "latent_shape": [c, h, w],
      "latent_encoder": <encoder name>,     # preprocessing.encoders registry
      "latent_scale": <float>,
      "class_names": [...],
      "num_classes": len(class_names),
      "shard_size": <images per shard, last shard may be smaller>,
      "metadata": {...},                    # free-form, dataset specific
      "extras": {<file name>: {"bytes": n, "sha256": hex}},
      "splits": {
        <split>: {
          "count": <images in split>,
          "shards": [
            {"count": n,
             "images":  {"path": "<split>/images-00000.npy",  "bytes": .., "dtype": "uint8",
                         "shape": [n, H, W, C], "sha256": hex},
             "latents": {... "dtype": "float32", "shape": [n, c, h, w] ...},
             "labels":  {... "dtype": "int64",   "shape": [n] ...}},
            ...
          ]
        }
      }
    }

Images-only datasets (written by ``python -m preprocessing convert`` before
``encode`` has run) have ``"latent_encoder": null``, ``"latent_shape": null``,
``"latent_scale": null`` and no ``"latents"`` entry in their shards;
``encode`` adds the latents files beside the images and fills these fields in.
Everything else about the format is the same.

The writer is deterministic (no timestamps; a re-run writes byte-identical
files) and atomic: everything is written into a temporary sibling directory
which then replaces the destination with ``os.replace``.  The reader
(:class:`ShardDataset`) memory-maps the shards, so it scales to datasets that
do not fit in memory; indices are global across the shards of a split.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from preprocessing.encoders import LatentEncoder, get_encoder

FORMAT = "speedrun-shards-v1"
MANIFEST_NAME = "manifest.json"
DEFAULT_SHARD_SIZE = 16384
DEFAULT_ENCODE_BATCH_SIZE = 256
KINDS = ("images", "latents", "labels")
KIND_DTYPES = {"images": np.dtype(np.uint8), "latents": np.dtype(np.float32), "labels": np.dtype(np.int64)}

_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_EXTRA_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HASH_CHUNK = 1 << 20

PathLike = Union[str, os.PathLike]

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "DEFAULT_SHARD_SIZE",
    "ShardFormatError",
    "write_dataset",
    "read_manifest",
    "verify_dataset",
    "sha256_file",
    "atomic_write",
    "shard_kinds",
    "shard_file",
    "dump_manifest",
    "save_npy",
    "write_manifest",
    "ShardDataset",
]


class ShardFormatError(ValueError):
    """A dataset directory is missing a file, is corrupt, or does not match its manifest."""


# --------------------------------------------------------------------------- helpers


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def check_output_file(path: PathLike) -> Path:
    """Refuses, before any work is done, an output file that atomic_write could not write: a
    folder of that name, or a location this process may not write (ValueError naming the path)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; name a file")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # atomic_write creates the missing folders
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output {path} cannot be written ({existing} is not a writable folder)")
    return path


def atomic_write(path: PathLike, write_fn) -> None:
    """write_fn(tmp) writes the whole file to a temporary name beside ``path``; it is fsynced and
    renamed over ``path``, so readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_fn(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _shard_file(split: str, kind: str, index: int) -> str:
    return f"{split}/{kind}-{index:05d}.npy"


def shard_file(split: str, kind: str, index: int) -> str:
    """Relative path of shard ``index`` of ``kind`` (images/latents/labels) in ``split``."""
    return _shard_file(split, kind, index)


def shard_kinds(manifest: Mapping[str, Any]) -> Tuple[str, ...]:
    """The kinds every shard of ``manifest`` has: all three, or no latents for an images-only dataset."""
    if manifest.get("latent_encoder") is None:
        return ("images", "labels")
    return KINDS


def _dump_manifest(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode("utf-8")


def dump_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a manifest (sorted keys, indent 2, trailing newline)."""
    return _dump_manifest(manifest)


def write_manifest(root: PathLike, manifest: Mapping[str, Any]) -> Path:
    """Atomically (temporary file, fsync, rename) write ``<root>/manifest.json``."""
    root = Path(root)
    path = root / MANIFEST_NAME
    payload = _dump_manifest(manifest)
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))
    _fsync_dir(root)
    return path


def _save_npy(path: Path, array: np.ndarray) -> Dict[str, Any]:
    array = np.ascontiguousarray(array)
    with open(path, "wb") as f:
        np.lib.format.write_array(f, array, allow_pickle=False)
    return {
        "bytes": path.stat().st_size,
        "dtype": array.dtype.name,
        "shape": [int(s) for s in array.shape],
        "sha256": sha256_file(path),
    }


def save_npy(path: PathLike, array: np.ndarray) -> Dict[str, Any]:
    """Write ``array`` as ``.npy`` (no pickle); returns its manifest entry (bytes, dtype, shape, sha256)."""
    return _save_npy(Path(path), array)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
    the C library or the filesystem does not offer it."""
    import ctypes
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_into_place(staging: Path, out_dir: Path, tag: str) -> None:
    """Replaces out_dir by the finished staging directory in one atomic exchange where the system
    offers it (a reader sees the old dataset or the new one, never none); elsewhere in two renames,
    between which out_dir is missing and the old dataset waits as .<name>.old-<tag>."""
    if out_dir.exists() and _exchange(staging, out_dir):
        _fsync_dir(out_dir.parent)
        shutil.rmtree(staging, ignore_errors=True)  # holds the old dataset now
        return
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{tag}"
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """A rename survives a power cut only once its folder's entry is on disk too (POSIX);
    where a folder cannot be opened or synced (some filesystems, Windows) the rename stands as is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _encode_shard(encoder: LatentEncoder, images: np.ndarray, batch_size: int) -> np.ndarray:
    parts = []
    for start in range(0, len(images), batch_size):
        latents = encoder.encode(np.ascontiguousarray(images[start : start + batch_size]))
        if not isinstance(latents, np.ndarray):  # torch tensor (possibly on an accelerator)
            latents = latents.detach().cpu().numpy()
        parts.append(np.asarray(latents, dtype=np.float32))
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------- writer


def write_dataset(
    out_dir: PathLike,
    name: str,
    splits: Mapping[str, Tuple[np.ndarray, np.ndarray]],
    encoder: Union[LatentEncoder, str, None],
    class_names: Sequence[str],
    shard_size: int = DEFAULT_SHARD_SIZE,
    *,
    metadata: Optional[Mapping[str, Any]] = None,
    extras: Optional[Mapping[str, bytes]] = None,
    encode_batch_size: int = DEFAULT_ENCODE_BATCH_SIZE,
) -> Path:
    """Write a ``speedrun-shards-v1`` dataset to ``out_dir``; returns the manifest path.

    ``splits`` maps a split name to ``(images, labels)``: images uint8 NHWC
    ``[n, H, W, C]`` (any sliceable array, e.g. a memmap: it is read one shard
    at a time), labels integers in ``[0, len(class_names))``.  Latents are
    ``encoder.encode(images)``; ``encoder=None`` writes an images-only dataset
    (no latents; see the module docstring).  ``metadata`` (JSON-serialisable) is stored in
    the manifest; ``extras`` maps file names to bytes written next to the
    manifest and checksummed in it.

    The whole dataset is written to a temporary sibling directory and then
    moved into place with ``os.replace``; an existing ``out_dir`` is replaced
    only if it is empty or holds a ``manifest.json`` (i.e. was a dataset).
    """
    if isinstance(encoder, str):
        encoder = get_encoder(encoder)
    if not splits:
        raise ValueError("write_dataset: no splits given")
    if int(shard_size) <= 0:
        raise ValueError(f"write_dataset: shard_size must be positive, got {shard_size}")
    shard_size = int(shard_size)
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise ValueError("write_dataset: class_names is empty")
    for extra in extras or {}:
        if not _EXTRA_RE.match(extra) or extra == MANIFEST_NAME:
            raise ValueError(f"write_dataset: invalid extra file name {extra!r}")

    image_shape: Optional[Tuple[int, int, int]] = None
    for split, (images, labels) in splits.items():
        if not _SPLIT_RE.match(split) or split in (extras or {}):
            raise ValueError(f"write_dataset: invalid split name {split!r}")
        if np.dtype(images.dtype) != np.uint8 or len(images.shape) != 4:
            raise ValueError(
                f"write_dataset: split {split!r}: images must be uint8 NHWC, "
                f"got dtype {images.dtype} shape {tuple(images.shape)}"
            )
        shape = tuple(int(s) for s in images.shape[1:])
        if shape[0] != shape[1]:
            raise ValueError(f"write_dataset: split {split!r}: images must be square, got {shape}")
        if image_shape is None:
            image_shape = shape  # type: ignore[assignment]
        elif shape != image_shape:
            raise ValueError(
                f"write_dataset: split {split!r} has image shape {shape}, expected {image_shape}"
            )
        labels_arr = np.asarray(labels)
        if labels_arr.ndim != 1 or len(labels_arr) != images.shape[0]:
            raise ValueError(
                f"write_dataset: split {split!r}: labels shape {labels_arr.shape} does not match "
                f"{images.shape[0]} images"
            )
        if len(labels_arr) == 0:
            raise ValueError(f"write_dataset: split {split!r} is empty")
        if not np.issubdtype(labels_arr.dtype, np.integer):
            raise ValueError(f"write_dataset: split {split!r}: labels must be integers")
        if labels_arr.min() < 0 or labels_arr.max() >= len(class_names):
            raise ValueError(
                f"write_dataset: split {split!r}: labels outside [0, {len(class_names)})"
            )
    assert image_shape is not None
    latent_shape = (
        tuple(int(s) for s in encoder.latent_shape(image_shape)) if encoder is not None else None
    )

    out_dir = Path(out_dir)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"write_dataset: {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists():
            raise FileExistsError(
                f"write_dataset: refusing to replace {out_dir}: it is not empty and holds no "
                f"{MANIFEST_NAME}"
            )

    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = parent / f".{out_dir.name}.tmp-{tag}"
    staging.mkdir()
    try:
        split_records: Dict[str, Any] = {}
        for split, (images, labels) in splits.items():
            labels_arr = np.asarray(labels).astype(np.int64, copy=False)
            n = int(images.shape[0])
            (staging / split).mkdir()
            shards: List[Dict[str, Any]] = []
            for index in range(math.ceil(n / shard_size)):
                lo, hi = index * shard_size, min(n, (index + 1) * shard_size)
                shard_images = np.ascontiguousarray(images[lo:hi], dtype=np.uint8)
                arrays = [("images", shard_images)]
                if encoder is not None:
                    shard_latents = _encode_shard(encoder, shard_images, encode_batch_size)
                    expected = (hi - lo,) + latent_shape
                    if shard_latents.shape != expected:
                        raise ValueError(
                            f"write_dataset: encoder {encoder.name!r} produced latents of shape "
                            f"{shard_latents.shape}, expected {expected}"
                        )
                    arrays.append(("latents", shard_latents))
                arrays.append(("labels", labels_arr[lo:hi]))
                record: Dict[str, Any] = {"count": hi - lo}
                for kind, array in arrays:
                    rel = _shard_file(split, kind, index)
                    record[kind] = {"path": rel, **_save_npy(staging / rel, array)}
                shards.append(record)
            split_records[split] = {"count": n, "shards": shards}

        extra_records: Dict[str, Any] = {}
        for extra, payload in (extras or {}).items():
            (staging / extra).write_bytes(payload)
            extra_records[extra] = {
                "bytes": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            }

        manifest = {
            "format": FORMAT,
            "name": str(name),
            "resolution": int(image_shape[0]),
            "image_channels": int(image_shape[2]),
            "image_shape": [int(s) for s in image_shape],
            "latent_shape": list(latent_shape) if latent_shape is not None else None,
            "latent_encoder": encoder.name if encoder is not None else None,
            "latent_scale": float(encoder.scale) if encoder is not None else None,
            "class_names": class_names,
            "num_classes": len(class_names),
            "shard_size": shard_size,
            "metadata": dict(metadata or {}),
            "extras": extra_records,
            "splits": split_records,
        }
        (staging / MANIFEST_NAME).write_bytes(_dump_manifest(manifest))
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())

        swap_into_place(staging, out_dir, tag)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir / MANIFEST_NAME


# --------------------------------------------------------------------------- reader


def read_manifest(root: PathLike) -> Dict[str, Any]:
    """Load and structurally validate ``<root>/manifest.json``."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ShardFormatError(f"{path}: missing file (not a speedrun-shards dataset directory? build one with "
                               "python -m preprocessing convert, then encode: preprocessing/README.md)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"{path}: corrupt manifest: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ShardFormatError(f"{path}: corrupt manifest: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise ShardFormatError(
            f"{path}: corrupt manifest: format is {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    required = (
        "name", "resolution", "image_channels", "image_shape", "latent_shape",
        "latent_encoder", "latent_scale", "class_names", "splits",
    )
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ShardFormatError(f"{path}: corrupt manifest: missing keys {missing}")
    kinds = shard_kinds(manifest)
    try:
        image_shape = [int(s) for s in manifest["image_shape"]]
        if len(image_shape) != 3:
            raise ValueError("image_shape must have 3 entries")
        if "latents" in kinds:
            latent_shape = [int(s) for s in manifest["latent_shape"]]
            if len(latent_shape) != 3:
                raise ValueError("latent_shape must have 3 entries")
            float(manifest["latent_scale"])
        if image_shape[0] != int(manifest["resolution"]) or image_shape[2] != int(
            manifest["image_channels"]
        ):
            raise ValueError("image_shape disagrees with resolution/image_channels")
        if not isinstance(manifest["class_names"], list) or not manifest["class_names"]:
            raise ValueError("class_names must be a non-empty list")
        splits = manifest["splits"]
        if not isinstance(splits, dict) or not splits:
            raise ValueError("splits must be a non-empty object")
        for split, record in splits.items():
            if not _SPLIT_RE.match(split):
                raise ValueError(f"invalid split name {split!r}")
            shards = record["shards"]
            if sum(int(s["count"]) for s in shards) != int(record["count"]):
                raise ValueError(f"split {split!r}: shard counts do not add up to its count")
            for index, shard in enumerate(shards):
                for kind in kinds:
                    entry = shard[kind]
                    if entry["path"] != _shard_file(split, kind, index):
                        raise ValueError(f"split {split!r}: unexpected shard path {entry['path']!r}")
                    str(entry["sha256"])
        for extra, entry in (manifest.get("extras") or {}).items():
            if not _EXTRA_RE.match(extra):
                raise ValueError(f"invalid extra file name {extra!r}")
            str(entry["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardFormatError(f"{path}: corrupt manifest: {exc!r}") from None
    return manifest


def _verify_file(root: Path, rel: str, entry: Mapping[str, Any]) -> None:
    path = root / rel
    if not path.is_file():
        raise ShardFormatError(f"{path}: missing file (listed in {root / MANIFEST_NAME})")
    size = path.stat().st_size
    if "bytes" in entry and size != int(entry["bytes"]):
        raise ShardFormatError(
            f"{path}: size mismatch: {size} bytes on disk, manifest says {int(entry['bytes'])}"
        )
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ShardFormatError(
            f"{path}: checksum mismatch: sha256 {actual}, manifest says {entry['sha256']}"
        )


def verify_dataset(root: PathLike, splits: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Verify sha256 of every shard (of ``splits``, default all) and of the extras.

    Returns the manifest; raises :class:`ShardFormatError` naming the first bad file.
    """
    root = Path(root)
    manifest = read_manifest(root)
    names = list(manifest["splits"]) if splits is None else list(splits)
    for split in names:
        if split not in manifest["splits"]:
            raise ShardFormatError(
                f"{root / MANIFEST_NAME}: no split {split!r} (have {sorted(manifest['splits'])})"
            )
        for shard in manifest["splits"][split]["shards"]:
            for kind in shard_kinds(manifest):
                _verify_file(root, shard[kind]["path"], shard[kind])
    for extra, entry in (manifest.get("extras") or {}).items():
        _verify_file(root, extra, entry)
    return manifest


class ShardDataset:
    """Read-only, memory-mapped view of one split of a ``speedrun-shards-v1`` dataset.

    ``verify=True`` checks the sha256 of every file of the split (and of the
    dataset's extras) before use.  Shape and dtype of every shard are checked
    against the manifest in any case.
    """

    def __init__(self, root: PathLike, split: str, verify: bool = True):
        self.root = Path(root)
        self.split = split
        if verify:
            self.manifest = verify_dataset(self.root, [split])
        else:
            self.manifest = read_manifest(self.root)
        m = self.manifest
        if split not in m["splits"]:
            raise ShardFormatError(
                f"{self.root / MANIFEST_NAME}: no split {split!r} (have {sorted(m['splits'])})"
            )
        self.name: str = m["name"]
        self.class_names: List[str] = list(m["class_names"])
        self.num_classes: int = len(self.class_names)
        self.image_shape: Tuple[int, int, int] = tuple(int(s) for s in m["image_shape"])  # type: ignore[assignment]
        self.resolution: int = int(m["resolution"])
        # An images-only dataset (not encoded yet) has no latents: these three are None.
        self.has_latents: bool = "latents" in shard_kinds(m)
        self.latent_shape: Optional[Tuple[int, int, int]] = (
            tuple(int(s) for s in m["latent_shape"]) if self.has_latents else None  # type: ignore[assignment]
        )
        self.latent_encoder: Optional[str] = m["latent_encoder"]
        self.latent_scale: Optional[float] = float(m["latent_scale"]) if self.has_latents else None

        self._images: List[np.ndarray] = []
        self._latents: List[np.ndarray] = []
        label_parts: List[np.ndarray] = []
        counts: List[int] = []
        for shard in m["splits"][split]["shards"]:
            n = int(shard["count"])
            counts.append(n)
            self._images.append(self._open(shard["images"]["path"], "images", (n,) + self.image_shape))
            if self.has_latents:
                self._latents.append(
                    self._open(shard["latents"]["path"], "latents", (n,) + self.latent_shape)
                )
            label_parts.append(np.array(self._open(shard["labels"]["path"], "labels", (n,))))
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._len = int(self._offsets[-1])
        self.labels: np.ndarray = (
            np.concatenate(label_parts) if label_parts else np.zeros((0,), dtype=np.int64)
        )
        self.labels.setflags(write=False)
        if self._len and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ShardFormatError(
                f"{self.root / split}: labels outside [0, {self.num_classes}) in split {split!r}"
            )

    def _open(self, rel: str, kind: str, shape: Tuple[int, ...]) -> np.ndarray:
        path = self.root / rel
        if not path.is_file():
            raise ShardFormatError(f"{path}: missing file (listed in {self.root / MANIFEST_NAME})")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
            raise ShardFormatError(f"{path}: corrupt .npy file ({exc})") from None
        if array.dtype != KIND_DTYPES[kind]:
            raise ShardFormatError(
                f"{path}: wrong dtype {array.dtype}, expected {KIND_DTYPES[kind].name}"
            )
        if tuple(array.shape) != tuple(shape):
            raise ShardFormatError(f"{path}: wrong shape {tuple(array.shape)}, expected {tuple(shape)}")
        return array

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return (
            f"ShardDataset(root={str(self.root)!r}, split={self.split!r}, n={self._len}, "
            f"image_shape={self.image_shape}, latent_shape={self.latent_shape})"
        )

    @property
    def num_shards(self) -> int:
        return len(self._images)

    def _normalize(self, indices: Any) -> np.ndarray:
        if isinstance(indices, slice):
            return np.arange(self._len, dtype=np.int64)[indices]
        idx = np.asarray(indices)
        if idx.ndim == 0:
            idx = idx.reshape(1)
        if idx.ndim != 1:
            raise IndexError(f"indices must be 1-D, got shape {idx.shape}")
        if idx.size == 0:
            return idx.astype(np.int64)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + self._len, idx)
        if idx.min() < 0 or idx.max() >= self._len:
            raise IndexError(f"index out of range for split {self.split!r} of length {self._len}")
        return idx

    def _gather(self, parts: List[np.ndarray], indices: Any, item_shape: Tuple[int, ...], dtype) -> np.ndarray:
        idx = self._normalize(indices)
        out = np.empty((len(idx),) + item_shape, dtype=dtype)
        if len(idx) == 0:
            return out
        shard_of = np.searchsorted(self._offsets, idx, side="right") - 1
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            local = idx[where] - self._offsets[s]
            out[where] = parts[s][local]
        return out

    def get_images(self, indices: Any) -> np.ndarray:
        """uint8 NHWC images at global ``indices`` (ints, array or slice), in that order."""
        return self._gather(self._images, indices, self.image_shape, np.uint8)

    def get_latents(self, indices: Any) -> np.ndarray:
        """float32 NCHW latents at global ``indices`` (ints, array or slice), in that order."""
        if not self.has_latents:
            raise ShardFormatError(
                f"{self.root / MANIFEST_NAME}: dataset has no latents yet (images only); "
                f"run: python -m preprocessing encode {self.root} --encoder <name>"
            )
        return self._gather(self._latents, indices, self.latent_shape, np.float32)

    def image_shards(self) -> List[np.ndarray]:
        """The memory-mapped image arrays, one per shard (read-only)."""
        return list(self._images)

    def latent_shards(self) -> List[np.ndarray]:
        """The memory-mapped latent arrays, one per shard (read-only; empty if images only)."""
        return list(self._latents)

    @property
    def shard_offsets(self) -> np.ndarray:
        """Global index of the first sample of each shard, plus the total at the end."""
        return self._offsets.copy()

    def get_labels(self, indices: Any) -> np.ndarray:
        return self.labels[self._normalize(indices)]
