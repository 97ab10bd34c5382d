"""End-to-end SR-DiT training step on one GPU: images/s, MFU, kernels on vs off.

    python benchmarks/bench_gpu_step.py [--batch 32] [--steps 20] [--compile] [--json out.json]
                                        [--public .srdit/time_step.py]

The step is train.py's, piece by piece: the track imagenet256_400k defaults (SR-DiT SiT-B/1 on
32x16x16 INVAE latents, every component on), the online DINOv2-B/14 forward on 256 px uint8 images
(random weights: the cost is the architecture's), the CPU noise draw of the global batch (256, as
each of 8 ranks draws it), host-to-device copies, bf16 autocast, backward, clipping, AdamW, EMA.
Only the shard reads are left out (benchmarks/bench_loader.py measures those).

Columns: median ms/step over the timed steps and images/s per GPU; MFU = model FLOPs per step
(counted once by torch.utils.flop_counter on the torch path: SiT forward+backward, DINOv2 forward)
/ step time / the bf16 matmul peak measured here (8192^3, random data); `loss diff` is the
relative difference of the mean loss over all (warm-up + timed) steps from the torch path's
(same initial weights, same draws and data: the trajectories may part only by rounding).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from generate import time_shift_for_shape  # noqa: E402


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


class SRDiTStep:
    """One training step of train.py's SR-DiT configuration, with its state."""

    def __init__(self, variant: str, batch: int, device: torch.device, seed: int = 0):
        """variant: 'torch' or 'triton' (--kernels), optionally '+compile' (--compile true),
        '+nondeterministic' (--deterministic false) and, with triton, '+flash' (the Triton
        flash-attention kernel instead of the QK-norm/RoPE kernel feeding SDPA)."""
        kernels, *extras = variant.split("+")
        unknown = set(extras) - {"compile", "nondeterministic", "flash"}
        if unknown:
            raise ValueError(f"unknown variant parts {sorted(unknown)} in {variant!r}")
        compile = "compile" in extras
        self.variant = variant
        self.cfg = train.parse_config(["--track", "imagenet256_400k", "--kernels", kernels,
                                       "--compile", str(compile),
                                       "--deterministic", str("nondeterministic" not in extras)])
        self.track = train.load_track("imagenet256_400k")
        self.batch, self.device = batch, device
        torch.manual_seed(seed)
        self.teacher = train.DinoV2Teacher(self.track["dataset"]["resolution"], random_init=True).to(device)
        model = train.build_model(self.cfg, self.track, self.teacher.dims).to(device)
        self.backend = train.set_kernels(model, kernels, device, flash_attention="flash" in extras)
        self.n_params = train.count_parameters(model)
        import copy
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.raw = model
        self.model = torch.compile(model) if compile else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2),
                                     weight_decay=self.cfg.weight_decay, fused=device.type == "cuda")  # as train.py
        self.shape = tuple(self.track["dataset"]["latent_shape"])
        self.time_shift = time_shift_for_shape(self.shape, self.cfg.time_shift_base)
        res = self.track["dataset"]["resolution"]
        g = torch.Generator().manual_seed(seed)
        # a few pinned host batches to cycle through, as a loader would hand them over
        pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)
        self.latents = [pin(torch.randn(batch, *self.shape, generator=g)) for _ in range(4)]
        self.images = [pin(torch.randint(0, 256, (batch, res, res, 3), generator=g, dtype=torch.uint8))
                       for _ in range(4)]
        self.labels = [torch.randint(0, 1000, (batch,), generator=g) for _ in range(4)]
        self.noise_for = train.NoisePrefetch(self.draw)  # as train.py: drawn a step ahead on a thread

    def draw(self, step: int) -> "train.StepNoise":
        cfg = self.cfg
        return train.draw_step_noise(train.step_generator(cfg.seed, step), cfg.global_batch, self.shape,
                                     cfg.class_dropout, self.time_shift, self.raw.opts.reg_dim,
                                     self.raw.num_patches, cfg.sprint_drop_ratio, cfg.sprint_path_drop)

    def __call__(self, step: int) -> torch.Tensor:
        cfg, dev = self.cfg, self.device
        train.set_determinism(cfg.deterministic)  # as train.train sets
        local = self.noise_for(step).slice(slice(0, self.batch), dev)
        k = step % len(self.latents)
        x0 = self.latents[k].to(dev, non_blocking=True)
        images = self.images[k].to(dev, non_blocking=True)
        y = self.labels[k].to(dev, non_blocking=True)
        negatives = torch.roll(local.eps - x0, 1, dims=0)  # CFM: the batch's targets rolled by one
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            teacher_out = self.teacher(images)
            loss, _ = train.training_loss(self.model, cfg, x0, y, local, 1000, teacher_out, negatives)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        train.update_ema(self.ema, self.raw, cfg.ema_decay)
        return loss.detach()


def count_flops(step: SRDiTStep) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step(10_000)
    return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: SRDiTStep, warmup: int, steps: int) -> tuple[float, float, float]:
    """(median ms/step, mean loss over all steps, seconds of warm-up incl. compilation)."""
    t0 = time.perf_counter()
    losses = [step(s) for s in range(warmup)]
    sync(step.device)
    warm = time.perf_counter() - t0
    times = []
    for s in range(steps):
        a = time.perf_counter()
        losses.append(step(warmup + s))
        sync(step.device)
        times.append(time.perf_counter() - a)
    return statistics.median(times) * 1e3, float(torch.stack(losses).double().mean()), warm


def noise_draw_ms(step: SRDiTStep, reps: int = 10) -> float:
    t0 = time.perf_counter()
    for s in range(reps):
        step.draw(s)
    return (time.perf_counter() - t0) / reps * 1e3


def profile(step: SRDiTStep, first: int, steps: int, path: Path | None) -> dict:
    """Device busy time per step (the sum of kernel times) against the wall time: a step far from
    busy is bound by the host (launches, syncs, the noise draw), not by the GPU's arithmetic."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    sync(step.device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for s in range(steps):
            step(first + s)
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
                   help="comma-separated: torch | triton, each optionally +compile, +nondeterministic, +flash; "
                        "the first is the reference of the loss column")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="after timing, profile this many steps of each variant: device busy time and "
                        "kernel launches per step; the top-kernel tables go to --out_dir/profiles.txt")
    p.add_argument("--public", default=None,
                   help="a script that times the public SR-DiT code's step and prints "
                        "'SRDIT_PUBLIC ms_per_step=<x> images_per_s=<y>' (run in a subprocess)")
    p.add_argument("--json", default=None)
    p.add_argument("--out_dir", default=None, help="where profile tables go")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the code path (timings mean nothing)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_step: no CUDA GPU here (use --device cpu for a smoke run)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.make_accelerator sets on GPU
    torch.backends.cudnn.allow_tf32 = True
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
    for variant in args.variants.split(","):
        label = f"train.py {variant}"
        try:
            step = SRDiTStep(variant, args.batch, device)
            ms, loss, warm = time_steps(step, args.warmup, args.steps)
            if flops is None:  # counted once, on the first variant after its timing
                flops, draw_ms = count_flops(step), noise_draw_ms(step)
                print(f"model FLOPs per step (SiT fwd+bwd + DINOv2 fwd, batch {args.batch}): {flops / 1e12:.3f} "
                      f"TFLOP; {step.n_params / 1e6:.1f}M parameters; CPU noise draw of the global batch "
                      f"{draw_ms:.1f} ms (drawn a step ahead on a thread)", flush=True)
                results.update(flops_per_step=flops, parameters=step.n_params, noise_draw_ms=draw_ms)
            reference_loss = loss if reference_loss is None else reference_loss
            row = {"variant": label, "backend": step.backend, "ms": ms, "images_per_s": args.batch / ms * 1e3,
                   "mfu": flops / (ms / 1e3) / (peak * 1e12),
                   "loss_rel_diff": abs(loss - reference_loss) / abs(reference_loss), "warmup_s": warm}
            if args.profile_steps:
                table = out_dir / "profiles.txt" if out_dir else None
                row |= profile(step, 1000, args.profile_steps, table)
            step.noise_for.close()
            del step
        except Exception as e:  # report and go on: one broken variant must not hide the others
            row = {"variant": label, "error": f"{e.__class__.__name__}: {str(e)[:300]}"}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.public:
        try:
            out = subprocess.run([sys.executable, args.public, "--batch", str(args.batch), "--steps", str(args.steps)],
                                 capture_output=True, text=True, timeout=400)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("SRDIT_PUBLIC")]
            if not line:
                raise RuntimeError(f"no SRDIT_PUBLIC line; rc {out.returncode}; {out.stderr[-1500:]}")
            fields = dict(kv.split("=") for kv in line[-1].split()[1:])
            ms = float(fields["ms_per_step"])
            row = {"variant": "public SR-DiT code", "ms": ms, "images_per_s": args.batch / ms * 1e3,
                   "mfu": flops / (ms / 1e3) / (peak * 1e12) if flops else float("nan"), "raw": line[-1]}
        except Exception as e:
            row = {"variant": "public SR-DiT code", "error": f"{e.__class__.__name__}: {str(e)[:1500]}"}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    print(f"\n### SR-DiT SiT-B/1 training step, batch {args.batch}/GPU, bf16, on {name}\n")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
