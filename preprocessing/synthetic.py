"""Synthetic inputs for tests and benchmarks (generated locally; nothing is downloaded).

* :func:`make_image_zoo` -- a small ImageNet-style folder with ordinary JPEG/PNG
  files and every kind of awkward input ``convert`` must handle, plus the
  outcome each file should have;
* :func:`write_synthetic_dataset` -- a shard dataset of any size with random
  images, latents and labels, written straight to memory-mapped files.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np
from PIL import Image

from preprocessing.shards import sha256_file

PathLike = Union[str, os.PathLike]

__all__ = ["smooth_image", "make_image_zoo", "write_synthetic_dataset"]


def smooth_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like uint8 RGB array: a random low-frequency pattern plus mild noise."""
    coarse = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-6, 7, size=base.shape, dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _save(path: Path, image: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kw)


def make_image_zoo(root: PathLike, seed: int = 0, per_class: int = 4) -> Dict[str, str]:
    """Write a small class-folder tree under ``root``; returns ``{relative path: expected}``.

    ``expected`` is ``"ok"`` (converted as is), ``"note"`` (converted, with a
    note in the report) or ``"skip:<reason start>"``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    expect: Dict[str, str] = {}
    classes = ["n02000001", "n01000002", "n03000003"]  # deliberately not created in sorted order
    for c, cls in enumerate(classes):
        for i in range(per_class):
            w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            array = smooth_image(rng, w, h)
            if i % 2 == 0:
                rel = f"{cls}/{cls}_{i}.JPEG"
                _save(root / rel, Image.fromarray(array), "JPEG", quality=90)
            else:
                rel = f"{cls}/{cls}_{i}.png"
                _save(root / rel, Image.fromarray(array), "PNG")
            expect[rel] = "ok"
    a, b, c = classes[0], classes[1], classes[2]
    rgb = smooth_image(rng, 64, 48)
    # odd colour modes -> converted with a note
    _save(root / f"{a}/cmyk.JPEG", Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90)
    expect[f"{a}/cmyk.JPEG"] = "note"
    _save(root / f"{a}/grey.png", Image.fromarray(rgb).convert("L"), "PNG")
    expect[f"{a}/grey.png"] = "note"
    grey16 = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
    _save(root / f"{b}/grey16.png", Image.fromarray(grey16), "PNG")
    expect[f"{b}/grey16.png"] = "note"
    rgba = np.concatenate([rgb, rng.integers(0, 256, size=(48, 64, 1), dtype=np.uint8)], axis=2)
    _save(root / f"{b}/alpha.png", Image.fromarray(rgba, "RGBA"), "PNG")
    expect[f"{b}/alpha.png"] = "note"
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    _save(root / f"{c}/palette.png", pal, "PNG")
    expect[f"{c}/palette.png"] = "note"
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    _save(root / f"{c}/palette_alpha.png", pal_t, "PNG", transparency=0)
    expect[f"{c}/palette_alpha.png"] = "note"
    # wrong extension: PNG content in a .JPEG file -> converted with a note
    _save(root / f"{c}/really_png.JPEG", Image.fromarray(rgb), "PNG")
    expect[f"{c}/really_png.JPEG"] = "note"
    # bad input -> skipped with a reason
    buf = io.BytesIO()
    Image.fromarray(smooth_image(rng, 80, 80)).save(buf, format="JPEG", quality=90)
    (root / f"{a}/truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect[f"{a}/truncated.JPEG"] = "skip:truncated"
    buf = io.BytesIO()
    Image.fromarray(smooth_image(rng, 80, 80)).save(buf, format="PNG")
    (root / f"{b}/truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect[f"{b}/truncated.png"] = "skip:"
    (root / f"{b}/garbage.JPEG").write_bytes(rng.integers(0, 256, size=3000, dtype=np.uint8).tobytes())
    expect[f"{b}/garbage.JPEG"] = "skip:not an image"
    (root / f"{c}/notes.txt").write_text("not an image\n")
    expect[f"{c}/notes.txt"] = "skip:not an image"
    _save(root / f"{c}/tiny.png", Image.fromarray(smooth_image(rng, 4, 4)), "PNG")
    expect[f"{c}/tiny.png"] = "skip:too small"
    (root / f"{a}/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    expect[f"{a}/.DS_Store"] = "skip:hidden"
    (root / "stray.JPEG").write_bytes(buf.getvalue())
    expect["stray.JPEG"] = "skip:not inside a class folder"
    return expect


def write_synthetic_dataset(root: PathLike, n: int, *, resolution: int = 256, latent_shape: Tuple[int, int, int] = (32, 16, 16),
                            num_classes: int = 1000, shard_size: int = 4096, seed: int = 0, split: str = "train",
                            images: str = "noise") -> Path:
    """A ``speedrun-shards-v1`` dataset of ``n`` random samples (images, latents, labels); returns the manifest.

    ``images="noise"``: uniform random pixels; ``"blocky"``: random 16x16-pixel
    colour blocks plus mild noise (compresses in PNG about as well as a photo).
    """
    if images not in ("noise", "blocky"):
        raise ValueError(f"images must be 'noise' or 'blocky', got {images!r}")
    from preprocessing.shards import FORMAT, dump_manifest

    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for index in range(math.ceil(n / shard_size)):
        count = min(shard_size, n - index * shard_size)
        record = {"count": count}
        for kind, dtype, shape in (("images", np.uint8, (count, resolution, resolution, 3)),
                                   ("latents", np.float32, (count,) + tuple(latent_shape)),
                                   ("labels", np.int64, (count,))):
            rel = f"{split}/{kind}-{index:05d}.npy"
            out = np.lib.format.open_memmap(root / rel, mode="w+", dtype=dtype, shape=shape)
            for lo in range(0, count, 512):
                hi = min(count, lo + 512)
                if kind == "images" and images == "blocky":
                    cells = -(-resolution // 16)
                    coarse = rng.integers(0, 256, size=(hi - lo, cells, cells, 3)).astype(np.int16)
                    up = coarse.repeat(16, axis=1).repeat(16, axis=2)[:, :resolution, :resolution]
                    noise = rng.integers(-6, 7, size=up.shape, dtype=np.int16)
                    out[lo:hi] = np.clip(up + noise, 0, 255).astype(np.uint8)
                elif kind == "images":
                    out[lo:hi] = rng.integers(0, 256, size=(hi - lo,) + shape[1:], dtype=np.uint8)
                elif kind == "latents":
                    out[lo:hi] = rng.standard_normal(size=(hi - lo,) + shape[1:], dtype=np.float32)
                else:
                    out[lo:hi] = rng.integers(0, num_classes, size=hi - lo)
            out.flush()
            del out
            record[kind] = {"path": rel, "bytes": (root / rel).stat().st_size, "dtype": np.dtype(dtype).name,
                            "shape": list(shape), "sha256": sha256_file(root / rel)}
        shards.append(record)
    manifest = {
        "format": FORMAT, "name": "synthetic", "resolution": resolution, "image_channels": 3,
        "image_shape": [resolution, resolution, 3], "latent_shape": list(latent_shape),
        "latent_encoder": "synthetic", "latent_scale": 1.0,
        "class_names": [f"c{i:04d}" for i in range(num_classes)], "num_classes": num_classes,
        "shard_size": shard_size, "metadata": {"builder": "preprocessing.synthetic", "seed": seed},
        "extras": {}, "splits": {split: {"count": n, "shards": shards}},
    }
    (root / "manifest.json").write_bytes(dump_manifest(manifest))
    return root / "manifest.json"
