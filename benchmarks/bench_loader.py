"""Loader throughput: memory-mapped shards (preprocessing.loader.ShardLoader) vs one .npy + one PNG per sample.

    python benchmarks/bench_loader.py                      # 20k synthetic samples, 256 px, INVAE-shaped latents
    python benchmarks/bench_loader.py --n 2000 --steps 10  # quick smoke run

Data: a synthetic set of N samples written to a temporary folder (removed afterwards unless
--keep): uint8 256x256x3 images ("blocky" content: 16-px colour blocks plus mild noise, which
compresses in PNG roughly like a photo), float32 32x16x16 latents, int64 labels.  The same
samples are written twice: as shards, and as one ``<i>.npy`` (latent) + one ``<i>.png`` (image,
zlib level 1) per sample, the layout of per-sample preprocessed datasets.

Both readers visit samples in the trainer's order (the ShardLoader permutation for seed 0) and
produce the same batches: float32 latents [B, 32, 16, 16], int64 labels, uint8 images
[B, 256, 256, 3].  The baseline reads and decodes sample by sample in the calling process, like
a map-style Dataset with no worker processes; labels come from an in-memory array.

Both run on a warm page cache (the files were just written; this script does not drop caches,
which would need root and would disturb other work on a shared machine), so the numbers compare
CPU cost per sample, not disk speed.  Samples/s is samples delivered to the caller.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from preprocessing.loader import ShardLoader  # noqa: E402
from preprocessing.shards import ShardDataset  # noqa: E402
from preprocessing.synthetic import write_synthetic_dataset  # noqa: E402


def _write_per_sample(job):
    root, out, lo, hi = job
    ds = ShardDataset(root, "train", verify=False)
    images, latents = ds.get_images(slice(lo, hi)), ds.get_latents(slice(lo, hi))
    for k, i in enumerate(range(lo, hi)):
        np.save(Path(out) / f"{i:06d}.npy", latents[k])
        Image.fromarray(images[k]).save(Path(out) / f"{i:06d}.png", compress_level=1)
    return hi - lo


def baseline_batches(folder: Path, labels: np.ndarray, loader: ShardLoader, steps: int):
    """Per-sample reads in the loader's order; yields (latents, labels, images) like a Batch."""
    for step in range(steps):
        idx = loader.rank_indices(step)
        lat = np.stack([np.load(folder / f"{i:06d}.npy") for i in idx])
        img = np.stack([np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in idx])
        yield torch.from_numpy(lat), torch.from_numpy(labels[idx]), torch.from_numpy(img)


def timed(iterable, steps: int, batch: int, warmup: int = 1) -> float:
    it = iter(iterable)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    count = 0
    for _ in range(steps):
        out = next(it)
        count += batch
    del out
    return count / (time.perf_counter() - t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="samples in the synthetic set (default 20000)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256, help="global batch (one rank)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps for the shard loader")
    parser.add_argument("--baseline-steps", type=int, default=6, help="timed steps for the baseline")
    parser.add_argument("--dir", default=None, help="where to write the data (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the data afterwards")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_loader_"))
    shards, per_sample = root / "shards", root / "per_sample"
    try:
        t0 = time.perf_counter()
        if not (shards / "manifest.json").exists():
            write_synthetic_dataset(shards, args.n, resolution=args.resolution, latent_shape=(32, 16, 16),
                                    num_classes=1000, shard_size=4096, seed=0, images="blocky")
        if not per_sample.exists():
            tmp = root / "per_sample.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            jobs = [(str(shards), str(tmp), lo, min(args.n, lo + 500)) for lo in range(0, args.n, 500)]
            with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                list(pool.map(_write_per_sample, jobs))
            os.replace(tmp, per_sample)
        setup_s = time.perf_counter() - t0
        png_bytes = sum(p.stat().st_size for p in per_sample.glob("*.png"))

        ds = ShardDataset(shards, "train", verify=False)
        results = {}
        for name, with_images in (("shards_latents_images", True), ("shards_latents_only", False)):
            loader = ShardLoader(shards, "train", args.batch, seed=0, with_images=with_images, dataset=ds)
            results[name] = timed(loader, args.steps, args.batch)
            loader.close()
        ref = ShardLoader(shards, "train", args.batch, seed=0, dataset=ds, prefetch=0)
        results["baseline_npy_png"] = timed(
            baseline_batches(per_sample, ds.labels, ref, args.baseline_steps + 1), args.baseline_steps, args.batch)
        # same batches?  (checks the comparison is apples to apples)
        lat, lab, img = next(baseline_batches(per_sample, ds.labels, ref, 1))
        ref.with_images = True
        check = ref.load(0)
        assert torch.equal(lat, check.latents) and torch.equal(lab, check.labels) and torch.equal(img, check.images)

        ratio = results["shards_latents_images"] / results["baseline_npy_png"]
        summary = {
            "samples": args.n, "resolution": args.resolution, "batch": args.batch,
            "samples_per_s": {k: round(v, 1) for k, v in results.items()},
            "speedup_shards_vs_baseline": round(ratio, 1),
            "mean_png_kb": round(png_bytes / args.n / 1024, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
            "setup_s": round(setup_s, 1),
        }
        print("| reader | samples/s |\n|---|---|")
        for k, v in results.items():
            print(f"| {k} | {v:,.0f} |")
        print(f"\nspeedup (shards with images vs .npy+PNG per sample): {ratio:.1f}x")
        print(json.dumps(summary))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
