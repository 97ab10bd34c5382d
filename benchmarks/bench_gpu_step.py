"""End-to-end SR-DiT training step on one GPU: images/s, MFU, kernels on vs off.

    python benchmarks/bench_gpu_step.py [--batch 32] [--steps 20] [--json out.json]
        [--variants torch,triton,torch+compile,triton+flash,...] [--public benchmarks/public_srdit_step.py]
    python benchmarks/bench_gpu_step.py --device cpu --model SiT-S/1 --batch 2 --steps 1
        # a smoke run of the code path on CPU (the timings mean nothing)

The step is train.py's own (train.Stepper, with the model, optimiser and accelerator train()
builds) on the track imagenet256_400k defaults (SR-DiT SiT-B/1 on 32x16x16 INVAE latents, every
component on): the ShardLoader batch from a synthetic shard dataset of the track's shapes (random
uint8 256 px images and latents, written to a temporary folder; pinned memory, prefetch thread),
the step's noise (drawn a step ahead on a thread), the online DINOv2-B/14 forward (random weights:
the cost is the architecture's), bf16 autocast, backward, clipping, the loss's all-reduce and
.item(), AdamW, EMA. One process holds one rank's share of the track's run: the global batch is
set to --batch, so each step draws noise for 32 samples where a rank of the 8-GPU run draws the
whole 256 (that draw's CPU time is printed on its own; it runs on the prefetch thread).

Columns: median ms/step over the timed steps and images/s per GPU; MFU = model FLOPs per step
(counted once by torch.utils.flop_counter on the torch path: SiT forward+backward, DINOv2 forward)
/ step time / the bf16 matmul peak measured here (8192^3, random data); `loss diff` is the
relative difference of the mean loss over all (warm-up + timed) steps from the torch path's
(same initial weights, same draws and data: the trajectories may part only by rounding).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from preprocessing.loader import ShardLoader  # noqa: E402
from preprocessing.shards import ShardDataset  # noqa: E402
from preprocessing.synthetic import write_synthetic_dataset  # noqa: E402

TRACK = "imagenet256_400k"


def matmul_peak_tflops(device: torch.device, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * nbytes * 5 / (start.elapsed_time(end) / 1e3) / 1e9  # bytes read + written


def synthetic_dataset(root: Path, track: dict, samples: int) -> ShardDataset:
    """A shard dataset shaped like the track's (random uint8 images at its resolution, latents
    of its shape, labels of its classes), read through train.py's loader."""
    data = track["dataset"]
    write_synthetic_dataset(root, samples, resolution=data["resolution"],
                            latent_shape=tuple(data["latent_shape"]), num_classes=data["num_classes"],
                            split=data["train_split"])
    return ShardDataset(root, data["train_split"])


class SRDiTStep:
    """train.py's SR-DiT step (train.Stepper: loader batch, noise, teacher, loss, backward,
    clipping, AdamW, EMA) on one GPU, with the model, optimiser and accelerator train() builds."""

    def __init__(self, variant: str, batch: int, device: torch.device, dataset: ShardDataset,
                 model: str = "", seed: int = 0):
        """variant: 'torch' or 'triton' (--kernels), optionally '+compile' (--compile true),
        '+cudagraphs' (with +compile: --compile_mode reduce-overhead), '+nondeterministic'
        (--deterministic false) and, with triton, '+flash' (the Triton flash-attention kernel
        instead of the QK-norm/RoPE kernel feeding SDPA)."""
        kernels, *extras = variant.split("+")
        unknown = set(extras) - {"compile", "cudagraphs", "nondeterministic", "flash"}
        if unknown:
            raise ValueError(f"unknown variant parts {sorted(unknown)} in {variant!r}")
        compile = "compile" in extras
        if "cudagraphs" in extras and not compile:
            raise ValueError(f"+cudagraphs needs +compile in {variant!r}")
        mode = "reduce-overhead" if "cudagraphs" in extras else "default"
        self.variant, self.device, self.next_step = variant, device, 0
        # one process holds the batch a rank of the track's run holds (its global batch / 8)
        cfg = train.parse_config(
            ["--track", TRACK, "--kernels", kernels, "--compile", str(compile), "--compile_mode", mode,
             "--seed", str(seed),
             "--deterministic", str("nondeterministic" not in extras), "--global_batch", str(batch)]
            + (["--model", model] if model else []))
        track = train.load_track(TRACK)
        accelerator = train.make_accelerator(cfg)
        if accelerator.device.type != device.type:
            raise RuntimeError(f"accelerate chose {accelerator.device}, not {device}")
        train.set_determinism(cfg.deterministic)
        torch.manual_seed(cfg.seed)
        teacher = train.DinoV2Teacher(track["dataset"]["resolution"], random_init=True).to(device)
        net = train.build_model(cfg, track, teacher.dims)
        self.backend = train.set_kernels(net, kernels, device, flash_attention="flash" in extras, compiled=compile)
        self.n_params = train.count_parameters(net)
        ema = copy.deepcopy(net).requires_grad_(False).eval()
        optimizer = train.make_optimizer(cfg, net, device)
        teacher = train.compile_for_training(cfg, teacher)
        net, optimizer = accelerator.prepare(train.compile_for_training(cfg, net), optimizer)
        ema.to(device)
        loader = ShardLoader(None, track["dataset"]["train_split"], cfg.global_batch, cfg.seed,
                             with_images=True, pin_memory=device.type == "cuda", dataset=dataset)
        unwrapped = train.unwrap_model(accelerator, net)
        self.stepper = train.Stepper(cfg, accelerator, net, teacher, optimizer, ema, loader,
                                     train.noise_source(cfg, track, unwrapped),
                                     track["dataset"]["num_classes"])
        # the draw a rank of the track's run makes: the noise of the whole global batch
        track_batch = track["budget"]["global_batch"]
        self.track_noise = train.noise_source(dataclasses.replace(cfg, global_batch=track_batch),
                                              track, unwrapped)
        net.train()

    def __call__(self) -> float:
        """The next step, exactly as train()'s loop runs it; returns its loss."""
        loss, _ = self.stepper.forward_backward(self.next_step)
        self.stepper.update()
        self.next_step += 1
        return loss

    def close(self) -> None:
        self.stepper.loader.close()
        self.stepper.noise_for.close()
        self.track_noise.close()


def count_flops(step: SRDiTStep) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def public_row(args) -> dict:
    """The public SR-DiT code's step, timed by its script in a process of its own: the median over
    its timed steps, like our rows (its mean and slowest step ride along in 'raw')."""
    label = "public SR-DiT code"
    try:
        out = subprocess.run([sys.executable, args.public, "--batch", str(args.batch), "--steps", str(args.steps)],
                             capture_output=True, text=True, timeout=400)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("SRDIT_PUBLIC")]
        if not line:
            raise RuntimeError(f"no SRDIT_PUBLIC line; rc {out.returncode}; {out.stderr[-1500:]}")
        fields = dict(kv.split("=") for kv in line[-1].split()[1:])
        ms = float(fields["ms_median"])
        row = {"variant": label, "ms": ms, "images_per_s": args.batch / ms * 1e3, "raw": line[-1]}
    except Exception as e:
        row = {"variant": label, "error": f"{e.__class__.__name__}: {str(e)[:1500]}"}
    print(json.dumps(row), flush=True)
    return row


def cudagraph_skips() -> int:
    """How often inductor has declined to capture a CUDA graph in this process (it then launches
    the kernels one by one and only logs a warning: a +cudagraphs row must say so)."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["cudagraph_skips"]


def time_steps(step: SRDiTStep, warmup: int, steps: int) -> tuple[float, float, float]:
    """(median ms/step, mean loss over all steps, seconds of warm-up incl. compilation)."""
    t0 = time.perf_counter()
    losses = [step() for _ in range(warmup)]
    sync(step.device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        a = time.perf_counter()
        losses.append(step())
        sync(step.device)
        times.append(time.perf_counter() - a)
    return statistics.median(times) * 1e3, statistics.fmean(losses), warm


def noise_draw_ms(step: SRDiTStep, reps: int = 10) -> float:
    """CPU time of one step's draws for the track's global batch (what each rank draws)."""
    t0 = time.perf_counter()
    for s in range(reps):
        step.track_noise.draw(s)
    return (time.perf_counter() - t0) / reps * 1e3


def profile(step: SRDiTStep, steps: int, path: Path | None) -> dict:
    """Device busy time per step (the sum of kernel times) against the wall time: a step far from
    busy is bound by the host (launches, syncs, the noise draw), not by the GPU's arithmetic."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    sync(step.device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(step.device)
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by="self_device_time_total", row_limit=30)
    if path is not None:  # one file for every variant (the device tool returns few files)
        with path.open("a") as f:
            f.write(f"\n### {step.variant}: {steps} steps, wall {wall * 1e3:.1f} ms/step\n{table}\n")
    return {"wall_ms": wall * 1e3, "device_busy_ms": busy / 1e3 / steps, "kernel_launches":
            sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) // steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="images per GPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", default="torch,triton",
                   help="comma-separated: torch | triton, each optionally +compile (+cudagraphs), "
                        "+nondeterministic, +flash; the first is the reference of the loss column")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="after timing, profile this many steps of each variant: device busy time and "
                        "kernel launches per step; the top-kernel tables go to --out_dir/profiles.txt")
    p.add_argument("--public", default=None,
                   help="a script that times the public SR-DiT code's step and prints "
                        "'SRDIT_PUBLIC ms_per_step=<x> images_per_s=<y>' (run in a subprocess)")
    p.add_argument("--json", default=None)
    p.add_argument("--out_dir", default=None, help="where profile tables go")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the code path (timings mean nothing)")
    p.add_argument("--model", default="", help="another SiT than the track's (e.g. SiT-S/1 for a smoke run)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_step: no CUDA GPU here (use --device cpu for a smoke run)")
        return 1
    if device.type == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # train.make_accelerator then stays on the CPU
    if device.type == "cuda":
        name, peak, bw = torch.cuda.get_device_name(device), matmul_peak_tflops(device), copy_bandwidth_gbs(device)
    else:
        name, peak, bw = "CPU", float("nan"), float("nan")
    print(f"device: {name}; torch {torch.__version__}; bf16 matmul peak {peak:.0f} TFLOP/s (8192^3); "
          f"copy {bw:.0f} GB/s", flush=True)
    results = {"device": name, "torch": torch.__version__, "matmul_peak_tflops": peak, "copy_gbs": bw,
               "batch_per_gpu": args.batch, "rows": []}
    flops = reference_loss = None
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench_gpu_step_")
    # four batches of samples: the loader reshuffles every four steps, as it would every epoch
    dataset = synthetic_dataset(Path(tmp.name) / "data", train.load_track(TRACK), 4 * args.batch)
    # the public code first: if the part's time limit cuts the run, it cuts our last variants, not
    # the comparison the 2x target needs
    public = public_row(args) if args.public else None
    for variant in args.variants.split(","):
        label = f"train.py {variant}"
        step = None
        skips = cudagraph_skips()
        try:
            step = SRDiTStep(variant, args.batch, device, dataset, args.model)
            ms, loss, warm = time_steps(step, args.warmup, args.steps)
            if flops is None:  # counted once, on the first variant that can count them, after its timing
                try:
                    flops, draw_ms = count_flops(step), noise_draw_ms(step)
                except Exception:  # keeps the timed row; the next variant counts them
                    traceback.print_exc()
                else:
                    print(f"model FLOPs per step (SiT fwd+bwd + DINOv2 fwd, batch {args.batch}): "
                          f"{flops / 1e12:.3f} TFLOP; {step.n_params / 1e6:.1f}M parameters; CPU noise draw of "
                          f"the global batch {draw_ms:.1f} ms (drawn a step ahead on a thread)", flush=True)
                    results.update(flops_per_step=flops, parameters=step.n_params, noise_draw_ms=draw_ms)
            reference_loss = loss if reference_loss is None else reference_loss
            row = {"variant": label, "backend": step.backend, "ms": ms, "images_per_s": args.batch / ms * 1e3,
                   "mfu": flops / (ms / 1e3) / (peak * 1e12) if flops else float("nan"),
                   "loss_rel_diff": abs(loss - reference_loss) / abs(reference_loss), "warmup_s": warm}
            if "cudagraphs" in variant:  # inductor falls back to plain launches with only a log warning
                row["cudagraph_skips"] = cudagraph_skips() - skips
            if args.profile_steps:
                table = out_dir / "profiles.txt" if out_dir else None
                row |= profile(step, args.profile_steps, table)
        except Exception as e:  # report and go on: one broken variant must not hide the others
            traceback.print_exc()  # into the part's log: a compile error is diagnosed without another call
            row = {"variant": label, "error": f"{e.__class__.__name__}: {str(e)[:300]}"}
        finally:
            if step is not None:
                step.close()
            del step
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        torch._dynamo.reset()  # compiled graphs (and CUDA-graph memory pools) of this variant
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if public is not None:
        if "ms" in public:  # its MFU against the FLOPs counted on our first variant
            public["mfu"] = flops / (public["ms"] / 1e3) / (peak * 1e12) if flops else float("nan")
        results["rows"].append(public)
    precision = "bf16" if device.type == "cuda" else "fp32"
    print(f"\n### SR-DiT {args.model or 'SiT-B/1'} training step, batch {args.batch}/GPU, {precision}, on {name}\n")
    print("| variant | ms/step | images/s | MFU | device busy ms/step | kernels/step | mean-loss rel. diff |\n"
          "|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'][:120]} | | | | | |")
        else:
            diff = f"{r['loss_rel_diff']:.1e}" if "loss_rel_diff" in r else ""
            busy = f"{r['device_busy_ms']:.1f}" if "device_busy_ms" in r else ""
            print(f"| {r['variant']} | {r['ms']:.1f} | {r['images_per_s']:.0f} | {100 * r['mfu']:.1f}% | {busy} | "
                  f"{r.get('kernel_launches', '')} | {diff} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
