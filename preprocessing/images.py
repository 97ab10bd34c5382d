"""Reading source images: listing an image folder or archive, decoding, and the ADM centre crop.

Shared by ``convert`` (ImageNet-style train folders -> shards) and ``reference``
(held-out folders -> ADM reference batches).  Nothing here imports torch, so
worker processes start quickly.

Sources
-------
* a folder;
* an uncompressed ``.tar`` (members are read in place by offset, so workers
  can seek to any image), including the official ImageNet train tar whose
  members are one ``<synset>.tar`` per class;
* a ``.zip`` (stored or deflated).

Layout ``"classes"``: the first path component below the source root is the
class (an ImageNet synset folder); files may sit deeper inside it.  In an
archive, one wrapping top-level folder (``train/n01440764/x.JPEG``) is
stripped automatically when every member lies under the same first
component and some member lies at least three levels deep;
``archive_root`` overrides this (``""``: never strip).  Layout
``"flat"``: every file is an image of no class (e.g. the ImageNet val folder).

Order: entries are sorted by ``(class name, path)`` using Python string
order on POSIX-style relative paths, so the listing -- and hence the output
-- does not depend on the file system's directory order.

Decoding rules (see :func:`decode_image`)
-----------------------------------------
* ``RGB`` is kept; ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` are converted with
  Pillow's ``convert("RGB")`` (no ICC colour management);
* greyscale ``L`` and bilevel ``1`` are replicated to three channels;
  16-bit greyscale (``I;16*``, ``I``) is mapped to 8 bits by
  ``round(clip(v, 0, 65535) / 257)`` before replication (Pillow's own
  ``convert`` would clip at 255 instead);
* images with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a
  ``transparency`` entry, premultiplied ``RGBa``/``La``) are alpha-composited
  onto a white background by default (``alpha="white"``); ``alpha="drop"``
  discards the alpha channel like ADM's ``convert("RGB")`` does;
* animated images use their first frame;
* the EXIF orientation tag is ignored (as in ADM and EDM2's dataset tool);
* the file extension is not trusted: Pillow detects the format from the
  content; a mismatch is recorded as a note and the image is converted.

Skipped (never silently): undecodable or truncated files, images whose short
side is below ``min_size``, images whose bicubic stage would exceed
:data:`MAX_RESIZED_PIXELS` (absurd aspect ratios), decompression bombs,
unsupported modes (32-bit float ``F``), unreadable files, hidden files and
folders, files outside a class folder, non-regular archive members and
earlier duplicates of an archive member name.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

PathLike = Union[str, os.PathLike]

# The bicubic stage resizes the (box-halved) image so its short side equals the
# target; with an extreme aspect ratio the long side explodes.  Refuse beyond this.
MAX_RESIZED_PIXELS = 64 * 1024 * 1024
DEFAULT_MIN_SIZE = 8
ALPHA_MODES = ("white", "drop")

_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "MPO": {".jpg", ".jpeg", ".mpo"},
    "PNG": {".png"},
    "GIF": {".gif"},
    "BMP": {".bmp", ".dib"},
    "WEBP": {".webp"},
    "TIFF": {".tif", ".tiff"},
    "PPM": {".ppm", ".pgm", ".pbm", ".pnm"},
}
_ALPHA_SOURCE_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_PLAIN_CONVERT_MODES = {"CMYK", "YCbCr", "LAB", "HSV", "RGBX"}

__all__ = [
    "MAX_RESIZED_PIXELS", "DEFAULT_MIN_SIZE", "ALPHA_MODES", "SourceError", "Entry", "Listing",
    "list_source", "SourceReader", "adm_center_crop", "adm_resize_plan", "to_rgb", "decode_image",
    "load_and_crop",
]


class SourceError(ValueError):
    """The source folder or archive cannot be used (missing, unsupported, not laid out by class)."""


# --------------------------------------------------------------------------- the ADM centre crop


def adm_resize_plan(width: int, height: int, size: int) -> Tuple[int, List[Tuple[int, int]], Tuple[int, int]]:
    """Sizes the ADM crop goes through: ``(halvings, box sizes, bicubic size)``."""
    w, h = int(width), int(height)
    boxes = []
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        boxes.append((w, h))
    scale = size / min(w, h)
    return len(boxes), boxes, (round(w * scale), round(h * scale))


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's centre crop of an RGB PIL image -> uint8 ``[size, size, 3]``.

    While the short side is at least ``2 * size`` the image is halved
    (``(w // 2, h // 2)``) with a BOX filter; then it is resized with BICUBIC
    so that the short side is ``size`` (sizes ``round(w * s), round(h * s)``,
    ``s = size / min(w, h)``, Python's round); then the centre
    ``size x size`` window at offsets ``((h - size) // 2, (w - size) // 2)``
    is cut out.
    """
    if image.mode != "RGB":
        raise ValueError(f"adm_center_crop expects an RGB image, got mode {image.mode}")
    size = int(size)
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - size) // 2
    left = (array.shape[1] - size) // 2
    return np.ascontiguousarray(array[top : top + size, left : left + size])


# --------------------------------------------------------------------------- mode conversion


def to_rgb(image: Image.Image, alpha: str = "white") -> Tuple[Image.Image, Optional[str]]:
    """``image`` as mode RGB, and a note describing any conversion (``None`` for RGB input).

    Raises ``ValueError`` for modes that have no sensible RGB reading.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    mode = source_mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.float64)
        grey = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        key = image.info.get("transparency")
        image = Image.fromarray(grey, mode="L")
        if not isinstance(key, int):
            return image.convert("RGB"), f"{mode} greyscale -> 8-bit -> RGB"
        image.info["transparency"] = int(np.rint(np.clip(key, 0, 65535) / 257.0))  # the key, mapped alike
        mode = "L"
    if mode == "F":
        raise ValueError("unsupported mode F (32-bit float)")
    # an alpha channel, or a PNG tRNS colour key (palette, greyscale or RGB)
    has_alpha = mode in _ALPHA_SOURCE_MODES or "transparency" in image.info
    if mode == "RGB" and not has_alpha:
        return image, None
    if mode in ("L", "1") and not has_alpha:
        return image.convert("L").convert("RGB"), f"greyscale {mode} -> RGB"
    mode = source_mode
    if has_alpha:
        rgba = image.convert("RGBA")
        if alpha == "drop":
            return rgba.convert("RGB"), f"{mode} with alpha -> RGB (alpha dropped)"
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return (
            Image.alpha_composite(background, rgba).convert("RGB"),
            f"{mode} with alpha -> RGB (composited on white)",
        )
    if mode == "P":
        return image.convert("RGB"), "palette P -> RGB"
    if mode in _PLAIN_CONVERT_MODES:
        return image.convert("RGB"), f"{mode} -> RGB"
    try:
        return image.convert("RGB"), f"{mode} -> RGB"
    except Exception as exc:  # noqa: BLE001 - Pillow raises several types
        raise ValueError(f"unsupported mode {mode} ({exc})") from None


def decode_image(
    data: bytes,
    name: str,
    size: int,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    alpha: str = "white",
) -> Tuple[Optional[np.ndarray], Optional[str], List[str]]:
    """Decode, convert to RGB and ADM-crop one file's bytes.

    Returns ``(image, None, notes)`` on success (uint8 ``[size, size, 3]``) or
    ``(None, reason, notes)`` when the file is skipped.  ``name`` is used only
    for the extension check.
    """
    notes: List[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/ICC chatter; errors still raise
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format or "unknown"
                width, height = image.size
                if min(width, height) < min_size:
                    return None, f"too small: {width}x{height} (short side < {min_size})", notes
                _, _, (bw, bh) = adm_resize_plan(width, height, size)
                if bw * bh > MAX_RESIZED_PIXELS:
                    return None, (
                        f"extreme aspect ratio: {width}x{height} would be resized to {bw}x{bh}"
                    ), notes
                frames = getattr(image, "n_frames", 1)
                image.seek(0)
                image.load()
                suffix = PurePosixPath(name).suffix
                if suffix.lower() not in _EXTENSIONS.get(fmt, {suffix.lower()}):
                    notes.append(f"extension {suffix or '(none)'} but content is {fmt}")
                if frames > 1:
                    notes.append(f"animated {fmt}: first of {frames} frames used")
                try:
                    rgb, note = to_rgb(image, alpha)
                except ValueError as exc:
                    return None, str(exc), notes
                if note:
                    notes.append(note)
                return adm_center_crop(rgb, size), None, notes
    except Image.DecompressionBombError as exc:
        return None, f"decompression bomb: {exc}", notes
    except Image.UnidentifiedImageError:
        return None, "not an image (no decoder recognises the content)", notes
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        if "truncated" in text.lower():
            return None, f"truncated: {text}", notes
        return None, f"corrupt: {type(exc).__name__}: {text}", notes
    except Exception as exc:  # noqa: BLE001 - a bad file must never kill the run
        return None, f"corrupt: {type(exc).__name__}: {exc}", notes


# --------------------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True)
class Entry:
    """One candidate file: its class index (-1 for the flat layout), path and how to read it."""

    label: int
    path: str  # POSIX path relative to the source root (class folder first)
    key: Any  # folder: the path; zip: member name; tar: (offset, size)
    size: int


@dataclasses.dataclass
class Listing:
    kind: str  # "folder" | "tar" | "nested-tar" | "zip"
    source: Path
    class_names: List[str]
    entries: List[Entry]
    skipped: List[Tuple[str, str]]  # (path, reason), found while listing
    fingerprint: List[Any]  # extra data identifying the input for resume (sizes, mtimes)

    def counts(self) -> Dict[str, int]:
        return {"entries": len(self.entries), "skipped_while_listing": len(self.skipped)}


def _is_hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") for p in parts)


# A listing's marker for a folder (key None): a class folder is a class even when it holds no
# image, so an empty synset folder does not shift every later class id (it shows up in the
# report's empty_classes instead).
FOLDER = None


def _classify(
    raw: List[Tuple[str, Any, int]], layout: str
) -> Tuple[List[str], List[Entry], List[Tuple[str, str]]]:
    """Turn ``(posix path, key, size)`` triples into sorted entries, class names and skips."""
    skipped: List[Tuple[str, str]] = []
    keep: List[Tuple[str, str, Any, int]] = []
    classes = set()
    for path, key, size in raw:
        parts = PurePosixPath(path).parts
        if key is FOLDER:
            if layout == "classes" and parts and not _is_hidden(parts[:1]):
                classes.add(parts[0])
            continue
        if _is_hidden(parts):
            skipped.append((path, "hidden file or folder"))
            continue
        if layout == "classes":
            if len(parts) < 2:
                skipped.append((path, "not inside a class folder"))
                continue
            classes.add(parts[0])
            keep.append((parts[0], path, key, size))
        else:
            keep.append(("", path, key, size))
    class_names = sorted(classes)
    index = {c: i for i, c in enumerate(class_names)}
    keep.sort(key=lambda item: (item[0], item[1]))
    entries = [
        Entry(index[c] if layout == "classes" else -1, path, key, size) for c, path, key, size in keep
    ]
    skipped.sort()
    return class_names, entries, skipped


def _strip_prefix(raw: List[Tuple[str, Any, int]], prefix: Optional[str]) -> Tuple[List[Tuple[str, Any, int]], List[Tuple[str, str]]]:
    if prefix is None:
        firsts = {PurePosixPath(p).parts[0] for p, _, _ in raw}
        if len(firsts) == 1 and any(len(PurePosixPath(p).parts) >= 3 for p, _, _ in raw):
            prefix = firsts.pop()
        else:
            return raw, []
    prefix = prefix.strip("/")
    if not prefix:
        return raw, []
    out, skipped = [], []
    for path, key, size in raw:
        if path.startswith(prefix + "/"):
            out.append((path[len(prefix) + 1 :], key, size))
        elif key is not FOLDER:  # the root folder itself (and folders beside it) are no files
            skipped.append((path, f"outside the archive root {prefix!r}"))
    return out, skipped


def _list_folder(root: Path) -> Tuple[List[Tuple[str, Any, int]], List[Tuple[str, str]], List[Any]]:
    raw, skipped, fingerprint = [], [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        if Path(dirpath) == root:
            for name in dirnames:  # the class folders, empty ones included (and in the resume key)
                raw.append((name, FOLDER, 0))
                fingerprint.append((name + "/", -1, 0))
        for filename in sorted(filenames):
            full = Path(dirpath) / filename
            rel = full.relative_to(root).as_posix()
            try:
                st = full.stat()
            except OSError as exc:
                skipped.append((rel, f"unreadable: {exc.strerror or exc}"))
                continue
            if not full.is_file():
                skipped.append((rel, "not a regular file"))
                continue
            raw.append((rel, rel, st.st_size))
            fingerprint.append((rel, st.st_size, st.st_mtime_ns))
    return raw, skipped, fingerprint


def _tar_members(tar: tarfile.TarFile, base_offset: int, label: str) -> Tuple[List[Tuple[str, Any, int]], List[Tuple[str, str]]]:
    by_name: Dict[str, Tuple[int, int]] = {}
    skipped: List[Tuple[str, str]] = []
    for member in tar:
        name = member.name
        while name.startswith("./"):
            name = name[2:]
        name = name.strip("/")
        if not name:
            continue
        if member.isdir():
            by_name.setdefault(name + "/", (-1, 0))
            continue
        shown = f"{label}{name}"
        if not member.isfile():
            skipped.append((shown, "not a regular file (archive link or device)"))
            continue
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            skipped.append((shown, "unsafe archive member name"))
            continue
        if name in by_name:
            skipped.append((shown, "duplicate archive member (the later copy is used)"))
        by_name[name] = (base_offset + member.offset_data, member.size)
    return [(n.rstrip("/"), FOLDER, 0) if n.endswith("/") else (n, (off, size), size)
            for n, (off, size) in by_name.items()], skipped


def _list_tar(path: Path, archive_root: Optional[str]) -> Tuple[str, List[Tuple[str, Any, int]], List[Tuple[str, str]]]:
    try:
        tar = tarfile.open(path, mode="r:")  # uncompressed only: members are read by offset
    except tarfile.ReadError as exc:
        raise SourceError(
            f"{path}: not an uncompressed tar archive ({exc}); compressed tars cannot be read "
            "in place by offset -- decompress it first (e.g. gunzip) or extract it to a folder"
        ) from None
    with tar:
        raw, skipped = _tar_members(tar, 0, "")
        files = [r for r in raw if r[1] is not FOLDER]
        nested = (
            archive_root is None
            and files
            and all(len(PurePosixPath(p).parts) == 1 for p, _, _ in files)
            and any(p.endswith(".tar") for p, _, _ in files)
        )
        if not nested:
            raw, more = _strip_prefix(raw, archive_root)
            return "tar", raw, skipped + more
        # The official ImageNet train tar: one <synset>.tar per class.
        inner_raw: List[Tuple[str, Any, int]] = []
        for name, (offset, size), _ in sorted(files):
            if not name.endswith(".tar"):
                skipped.append((name, "not a class archive (expected <class>.tar members)"))
                continue
            cls = name[: -len(".tar")]
            inner_raw.append((cls, FOLDER, 0))  # a class even if its archive is empty
            fobj = tar.fileobj
            fobj.seek(offset)
            try:
                with tarfile.open(fileobj=_Window(fobj, offset, size), mode="r:") as inner:
                    members, more = _tar_members(inner, offset, f"{name}/")
            except tarfile.TarError as exc:
                skipped.append((name, f"corrupt class archive: {exc}"))
                continue
            skipped.extend(more)
            inner_raw.extend((f"{cls}/{n}", key, s) for n, key, s in members)
        return "nested-tar", inner_raw, skipped


class _Window(io.RawIOBase):
    """A read-only view of ``[offset, offset + size)`` of a seekable file."""

    def __init__(self, fobj, offset: int, size: int):
        self._f, self._start, self._size, self._pos = fobj, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _list_zip(path: Path, archive_root: Optional[str]) -> Tuple[List[Tuple[str, Any, int]], List[Tuple[str, str]]]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{path}: not a readable zip archive ({exc})") from None
    by_name: Dict[str, int] = {}
    skipped: List[Tuple[str, str]] = []
    with zf:
        for info in zf.infolist():
            name = info.filename.strip("/")
            if not name:
                continue
            if info.is_dir():
                by_name.setdefault(name + "/", -1)
                continue
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                skipped.append((name, "unsafe archive member name"))
                continue
            if name in by_name:
                skipped.append((name, "duplicate archive member (the later copy is used)"))
            by_name[name] = info.file_size
    raw = [(n.rstrip("/"), FOLDER, 0) if n.endswith("/") else (n, n, s) for n, s in by_name.items()]
    raw, more = _strip_prefix(raw, archive_root)
    return raw, skipped + more


def list_source(source: PathLike, layout: str = "classes", archive_root: Optional[str] = None) -> Listing:
    """List a folder / ``.tar`` / ``.zip`` of images (see the module docstring)."""
    if layout not in ("classes", "flat"):
        raise ValueError(f"layout must be 'classes' or 'flat', got {layout!r}")
    source = Path(source)
    if not source.exists():
        raise SourceError(f"{source}: source does not exist")
    if source.is_dir():
        raw, skipped, fingerprint = _list_folder(source)
        kind = "folder"
    elif tarfile.is_tarfile(source) and not zipfile.is_zipfile(source):
        kind, raw, skipped = _list_tar(source, archive_root)
        st = source.stat()
        fingerprint = [st.st_size, st.st_mtime_ns]
    elif zipfile.is_zipfile(source):
        raw, skipped = _list_zip(source, archive_root)
        kind = "zip"
        st = source.stat()
        fingerprint = [st.st_size, st.st_mtime_ns]
    else:
        raise SourceError(f"{source}: not a folder, an uncompressed .tar or a .zip archive")
    class_names, entries, more = _classify(raw, layout)
    skipped = sorted(skipped + more)
    if not entries:
        raise SourceError(
            f"{source}: no candidate image files found"
            + (" inside class folders (expected <root>/<class>/<image>)" if layout == "classes" else "")
            + (f"; {len(skipped)} files skipped while listing, e.g. {skipped[0][0]!r}: {skipped[0][1]}" if skipped else "")
        )
    return Listing(kind, source, class_names, entries, skipped, fingerprint)


class SourceReader:
    """Reads entry bytes; one per process (opens the archive lazily)."""

    def __init__(self, kind: str, source: PathLike):
        self.kind, self.source = kind, Path(source)
        self._handle = None

    def read(self, entry: Entry) -> bytes:
        if self.kind == "folder":
            with open(self.source / entry.key, "rb") as f:
                return f.read()
        if self.kind == "zip":
            if self._handle is None:
                self._handle = zipfile.ZipFile(self.source)
            return self._handle.read(entry.key)
        if self._handle is None:
            self._handle = open(self.source, "rb")
        offset, size = entry.key
        self._handle.seek(offset)
        data = self._handle.read(size)
        if len(data) != size:
            raise OSError(f"archive ended early ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def load_and_crop(
    reader: SourceReader, entry: Entry, size: int, *, min_size: int = DEFAULT_MIN_SIZE, alpha: str = "white"
) -> Tuple[Optional[np.ndarray], Optional[str], List[str]]:
    """Read + :func:`decode_image` one entry; read errors become a skip reason."""
    try:
        data = reader.read(entry)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        return None, f"unreadable: {exc}", []
    return decode_image(data, entry.path, size, min_size=min_size, alpha=alpha)
