"""INVAE encode throughput (preprocessing/invae.py) on this machine, as `python -m preprocessing
encode` runs it: float32, TF32 off, cuDNN deterministic, a posterior sample of uint8 256 px images
(the default; its noise costs ~0.15 ms per 256 px image on one CPU core, ~3% of the H100 rate in
RESULTS_GPU.md, which was measured with the posterior mean).

    python benchmarks/bench_encode.py [--images 1024] [--batch 64] [--resolution 256]

Random weights: the cost is the architecture's. Prints images/s and the time ImageNet's 1,281,167
training images would take on one such device.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from preprocessing.invae import INVAE, INVAEEncoder  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    encoder = INVAEEncoder(model=INVAE(), device=args.device, batch_size=args.batch)
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.resolution, args.resolution, 3),
                                               dtype=np.uint8)
    encoder.encode(images[:args.batch])  # warm-up (cuDNN plans, allocator)
    start = time.perf_counter()
    latents = encoder.encode(images)  # numpy out: includes the copy back, as the shard writer needs
    seconds = time.perf_counter() - start
    rate = args.images / seconds
    name = torch.cuda.get_device_name() if encoder.device.type == "cuda" else "CPU"
    print(f"INVAE encode on {name}: {args.images} images {args.resolution} px -> latents {latents.shape[1:]}, "
          f"batch {args.batch}: {rate:.1f} images/s; ImageNet train ({IMAGENET_TRAIN}) ~{IMAGENET_TRAIN / rate / 3600:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
