"""``encode``: add latents beside the images of a shard dataset.

    python -m preprocessing encode DATASET --encoder invae --vae PATH.safetensors --vae-sha256 HEX [--posterior mean]
    python -m preprocessing encode DATASET --encoder identity

For every shard ``<split>/images-XXXXX.npy`` it writes
``<split>/latents-XXXXX.npy`` (float32 ``[n, c, h, w]``, the encoder's
output, already multiplied by its scale), in batches, on the GPU when there is
one (``--device``).  Then it records in ``manifest.json``: the encoder name,
scale and latent shape, the sha256 of every latents file, and deterministic
per-channel latent statistics of each split (``metadata.latent_stats``:
count, mean and population std of every channel over all samples and
positions, accumulated in float64 shard by shard and merged in shard order
with Chan's formula, so the numbers depend only on the latents).

Resumable: each finished shard is recorded (with its sha256 and statistics)
in ``.encode-state.json`` inside the dataset; a re-run with the same encoder
skips those.  New latents are written under ``<split>/.encode/`` and moved
beside the images only when every shard is done, followed by the manifest
(atomic rename).  Until then the dataset stays exactly as it was; replacing
existing latents needs ``--force``.  A kill during those final moves of a
``--force`` run leaves old and new latents files under the old manifest: their
sha256 checks fail (the trainer verifies on open) until the same ``encode
--force`` is run again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from preprocessing.encoders import LatentEncoder, get_encoder
from preprocessing.shards import (
    MANIFEST_NAME,
    ShardFormatError,
    atomic_write,
    read_manifest,
    sha256_file,
    shard_file,
    verify_dataset,
    write_manifest,
)

PathLike = Union[str, os.PathLike]
STATE_NAME = ".encode-state.json"
STAGING_DIR = ".encode"
DEFAULT_BATCH_SIZE = 64

__all__ = ["encode_dataset", "channel_stats", "merge_stats", "EncodeError"]


class EncodeError(RuntimeError):
    """Encoding cannot proceed (existing latents without --force, a state from another encoder, ...)."""


# --------------------------------------------------------------------------- statistics


def channel_stats(latents: np.ndarray) -> Dict[str, Any]:
    """``{"count", "mean", "m2"}`` per channel of ``[n, c, h, w]`` latents, in float64."""
    x = np.asarray(latents, dtype=np.float64).transpose(1, 0, 2, 3).reshape(latents.shape[1], -1)
    mean = x.mean(axis=1)
    m2 = ((x - mean[:, None]) ** 2).sum(axis=1)
    return {"count": int(x.shape[1]), "mean": mean.tolist(), "m2": m2.tolist()}


def merge_stats(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Chan's parallel merge of :func:`channel_stats` results, in the given order."""
    count, mean, m2 = 0, None, None
    for part in parts:
        n_b = int(part["count"])
        if n_b == 0:
            continue
        mean_b, m2_b = np.asarray(part["mean"], np.float64), np.asarray(part["m2"], np.float64)
        if mean is None:
            count, mean, m2 = n_b, mean_b.copy(), m2_b.copy()
            continue
        n = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + delta**2 * (count * n_b / n)
        count = n
    if mean is None:
        raise ValueError("no latents to summarise")
    return {"count": count, "mean": mean.tolist(), "std": np.sqrt(m2 / count).tolist()}


# --------------------------------------------------------------------------- encoding


def _encoder_identity(encoder: LatentEncoder) -> Dict[str, Any]:
    info = encoder.describe() if hasattr(encoder, "describe") else {"name": encoder.name}
    return json.loads(json.dumps(info, sort_keys=True))


def _write_state(root: Path, state: Dict[str, Any]) -> None:
    text = json.dumps(state, sort_keys=True, indent=1)
    atomic_write(root / STATE_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _encode_shard(encoder: LatentEncoder, images: np.ndarray, out_path: Path, latent_shape, batch_size: int,
                  bar) -> None:
    n = images.shape[0]
    tmp = out_path.with_name(out_path.name + f".{os.getpid()}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n,) + tuple(latent_shape))
        for start in range(0, n, batch_size):
            batch = np.array(images[start : start + batch_size])  # a writable copy read from disk
            latents = encoder.encode(batch)
            if not isinstance(latents, np.ndarray):
                latents = latents.detach().cpu().numpy()
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != (len(batch),) + tuple(latent_shape):
                raise EncodeError(
                    f"encoder {encoder.name!r} returned shape {latents.shape}, expected "
                    f"{(len(batch),) + tuple(latent_shape)}"
                )
            if not np.isfinite(latents).all():
                raise EncodeError(f"encoder {encoder.name!r} produced non-finite latents in {out_path.name}")
            out[start : start + len(batch)] = latents
            bar.update(len(batch))
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()


def encode_dataset(
    root: PathLike,
    encoder: Union[LatentEncoder, str],
    *,
    splits: Optional[Sequence[str]] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    force: bool = False,
    verify: bool = True,
    progress: bool = True,
    log=print,
) -> Path:
    """Encode every shard of ``splits`` (default: all) of the dataset at ``root``; returns the manifest path."""
    from tqdm import tqdm

    root = Path(root)
    if isinstance(encoder, str):
        encoder = get_encoder(encoder)
    manifest = verify_dataset(root) if verify else read_manifest(root)
    names = list(manifest["splits"]) if splits is None else list(splits)
    for split in names:
        if split not in manifest["splits"]:
            raise EncodeError(f"{root / MANIFEST_NAME}: no split {split!r} (have {sorted(manifest['splits'])})")
    if manifest.get("latent_encoder") is not None and not force:
        raise EncodeError(
            f"{root / MANIFEST_NAME}: the dataset already has latents from encoder "
            f"{manifest['latent_encoder']!r}; pass --force to replace them"
        )
    image_shape = tuple(int(s) for s in manifest["image_shape"])
    latent_shape = tuple(int(s) for s in encoder.latent_shape(image_shape))
    identity = _encoder_identity(encoder)
    if set(names) != set(manifest["splits"]) and (
        (manifest.get("metadata") or {}).get("latent_encoder_info") != identity
    ):
        raise EncodeError(
            f"{root / MANIFEST_NAME}: encoding only splits {names} would mix encoders; the other splits must "
            "already hold latents of this same encoder (encode all splits instead)"
        )

    state_path = root / STATE_NAME
    state: Dict[str, Any] = {"encoder": identity, "latent_shape": list(latent_shape), "done": {}}
    if state_path.exists():
        try:
            old = json.loads(state_path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old and old.get("encoder") == identity and old.get("latent_shape") == list(latent_shape):
            state = old
        elif old:
            log(f"encode: discarding the progress of an earlier run with another encoder ({state_path})")
            for split in names:
                shutil.rmtree(root / split / STAGING_DIR, ignore_errors=True)
    total = sum(manifest["splits"][s]["count"] for s in names)
    bar = tqdm(total=total, unit="img", desc=f"encode {encoder.name}", disable=not progress,
               dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
    try:
        for split in names:
            staging = root / split / STAGING_DIR
            staging.mkdir(exist_ok=True)
            done = state["done"].setdefault(split, {})
            for index, shard in enumerate(manifest["splits"][split]["shards"]):
                name = Path(shard_file(split, "latents", index)).name
                out_path = staging / name
                record = done.get(str(index))
                if record and out_path.is_file() and out_path.stat().st_size == record["bytes"]:
                    bar.update(int(shard["count"]))
                    continue
                images = np.load(root / shard["images"]["path"], mmap_mode="r", allow_pickle=False)
                if images.shape != (int(shard["count"]),) + image_shape:
                    raise ShardFormatError(f"{root / shard['images']['path']}: wrong shape {images.shape}")
                _encode_shard(encoder, images, out_path, latent_shape, int(batch_size), bar)
                latents = np.load(out_path, mmap_mode="r")
                done[str(index)] = {
                    "bytes": out_path.stat().st_size,
                    "sha256": sha256_file(out_path),
                    "stats": channel_stats(latents),
                }
                del latents
                _write_state(root, state)
    finally:
        bar.close()

    # Everything is encoded: move the files beside the images, then switch the manifest.
    stats = {}
    for split in names:
        records = state["done"][split]
        shards = manifest["splits"][split]["shards"]
        stats[split] = merge_stats([records[str(i)]["stats"] for i in range(len(shards))])
        for index, shard in enumerate(shards):
            rel = shard_file(split, "latents", index)
            record = records[str(index)]
            os.replace(root / split / STAGING_DIR / Path(rel).name, root / rel)
            shard["latents"] = {"path": rel, "bytes": record["bytes"], "dtype": "float32",
                                "shape": [int(shard["count"])] + list(latent_shape), "sha256": record["sha256"]}
        shutil.rmtree(root / split / STAGING_DIR, ignore_errors=True)
    manifest["latent_encoder"] = encoder.name
    manifest["latent_scale"] = float(encoder.scale)
    manifest["latent_shape"] = list(latent_shape)
    meta = dict(manifest.get("metadata") or {})
    meta["latent_encoder_info"] = identity
    meta["latent_stats"] = {**(meta.get("latent_stats") or {}), **stats}
    manifest["metadata"] = meta
    path = write_manifest(root, manifest)
    state_path.unlink(missing_ok=True)
    log(f"encode: {total} images -> {encoder.name} latents {list(latent_shape)} in {root}")
    return path


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("dataset", help="shard dataset folder (from `convert`)")
    parser.add_argument("--encoder", default="invae", help="latent encoder: invae (default) or identity")
    parser.add_argument("--vae", default=None, help="INVAE checkpoint (.safetensors)")
    parser.add_argument("--vae-sha256", default=None, help="expected sha256 of the INVAE checkpoint (required)")
    parser.add_argument("--posterior", choices=["sample", "mean"], default="sample",
                        help="invae: store a posterior sample per image (SR-DiT's preprocessing; the default) "
                             "or the posterior mean")
    parser.add_argument("--posterior-seed", type=int, default=0,
                        help="invae: seed of the posterior samples' noise (with each image's bytes)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--split", action="append", default=None, help="only this split (repeatable)")
    parser.add_argument("--force", action="store_true", help="replace existing latents")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the image shards")
    parser.add_argument("--no-progress", action="store_true")


def main_args(args) -> int:
    if args.encoder == "invae":
        if not args.vae or not args.vae_sha256:
            raise EncodeError("--encoder invae needs --vae CHECKPOINT.safetensors and --vae-sha256 HEX")
        encoder = get_encoder("invae", checkpoint=args.vae, sha256=args.vae_sha256, device=args.device,
                              batch_size=args.batch_size, posterior=args.posterior, seed=args.posterior_seed)
    else:
        encoder = get_encoder(args.encoder)
    encode_dataset(args.dataset, encoder, splits=args.split, batch_size=args.batch_size, force=args.force,
                   verify=not args.no_verify, progress=not args.no_progress)
    return 0
