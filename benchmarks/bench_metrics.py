"""Speed and memory of the ImageNet metrics, each against a baseline measured in the same run.

    .venv/bin/python benchmarks/bench_metrics.py                 # everything (CPU: ~30-60 min on 2 cores)
    .venv/bin/python benchmarks/bench_metrics.py --only frechet  # one part: frechet | pr | extraction

1. Frechet distance, d = 2048 and 2023 (FID, sFID): the eigenvalue route (metrics.frechet_distance)
   against ADM's scipy.linalg.sqrtm route (metrics.frechet_distance_sqrtm) on random SPD matrices:
   relative difference and speed ratio.
2. Precision/Recall (k = 3, ADM's float16 distances), 10k reference x 50k samples of random 2048-d
   features, in a child process so its peak memory (ru_maxrss) is its own; baselines in the same
   run at a smaller size: PyTorch's float16 GEMM ("native") vs float32-accumulated ("fp32_accumulate"),
   and full distance matrices in float32 (what k-NN metric code without blocking holds).
3. Feature extraction throughput (images/s) on this machine's device: the PyTorch Inception port vs
   TensorFlow running the same graph (the ADM reference path; synthetic graph with the real widths
   and random weights -- the speed does not depend on the weight values), and DINOv2 ViT-L/14 at 224.

Prints a table; nothing is written.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} CPU threads visible, torch threads {torch.get_num_threads()}, {gpu}; "
            f"load average at start {load:.1f}; torch {torch.__version__}, numpy {np.__version__}")


def _best(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def _spd(rng, d, kind):
    if kind == "random":  # covariance of 2d Gaussian samples: well conditioned
        g = rng.standard_normal((d, 2 * d))
        return g @ g.T / (2 * d) + 1e-3 * np.eye(d)
    # Inception-like spectrum: eigenvalues decaying as 1/i^1.5 over 5 decades, random eigenvectors
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.maximum(1.0 / np.arange(1, d + 1) ** 1.5, 1e-5)
    return (q * lam) @ q.T


def bench_frechet(rows, repeats=2):
    """Eigenvalue route vs sqrtm route, interleaved (eig, sqrtm, eig, sqrtm): min wall time of each,
    with 1 BLAS thread and with the default count (on a shared machine multithreaded LAPACK can
    stall on descheduled threads; interleaving exposes both routes to the same load)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from evaluations import metrics as M
    default = max((p.get("num_threads", 1) for p in threadpool_info() if p.get("user_api") == "blas"), default=1)
    for d, kind in ((2048, "random"), (2048, "decaying spectrum"), (2023, "random")):
        rng = np.random.default_rng(d)
        s1, s2 = _spd(rng, d, kind), _spd(rng, d, kind)
        mu1, mu2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
        for threads in sorted({1, default}):
            wall = {"eig": [], "sqrtm": []}
            values = {}
            with threadpool_limits(limits=threads, user_api="blas"):
                for _ in range(repeats):
                    for name, fn in (("eig", M.frechet_distance), ("sqrtm", M.frechet_distance_sqrtm)):
                        t = time.perf_counter()
                        values[name] = fn(mu1, s1, mu2, s2)
                        wall[name].append(time.perf_counter() - t)
            rel = abs(values["eig"] - values["sqrtm"]) / abs(values["sqrtm"])
            t_eig, t_sqrtm = min(wall["eig"]), min(wall["sqrtm"])
            rows.append((f"Frechet d={d} ({kind}), {threads} BLAS thread{'s' if threads > 1 else ''}",
                         f"eigenvalue route {t_eig:.2f} s", f"sqrtm route {t_sqrtm:.2f} s",
                         f"{t_sqrtm / t_eig:.1f}x faster", f"FD {values['eig']:.6g}, rel. diff {rel:.1e}"))
            print(rows[-1], flush=True)


def _pr_worker(n_real, n_fake, dim, mode, batch_size, full_matrix) -> dict:
    """Runs in a child process: time and peak RSS of one precision/recall computation."""
    import torch

    from evaluations import metrics as M
    rng = np.random.default_rng(0)
    real = rng.standard_normal((n_real, dim), dtype=np.float32)
    fake = rng.standard_normal((n_fake, dim), dtype=np.float32)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if full_matrix:  # baseline: whole float32 distance matrices (no blocking), k-th neighbour by sort
        r, f = torch.from_numpy(real), torch.from_numpy(fake)
        d_rr = torch.cdist(r, r).pow_(2)
        rad_r = d_rr.kthvalue(4, dim=1).values
        del d_rr
        d_ff = torch.cdist(f, f).pow_(2)
        rad_f = d_ff.kthvalue(4, dim=1).values
        del d_ff
        d_rf = torch.cdist(r, f).pow_(2)
        p = float((d_rf <= rad_r[:, None]).any(0).double().mean())
        rc = float((d_rf <= rad_f[None, :]).any(1).double().mean())
    else:
        p, rc = M.precision_recall(real, fake, k=3, batch_size=batch_size, fp16_matmul=mode)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_gb": peak / 2 ** 20, "inputs_gb": (real.nbytes + fake.nbytes) / 2 ** 30,
            "before_gb": base / 2 ** 20, "precision": p, "recall": rc}


def _run_pr(n_real, n_fake, dim=2048, mode="fp32_accumulate", batch_size=10000, full_matrix=False) -> dict:
    args = [sys.executable, __file__, "--pr-worker",
            json.dumps([n_real, n_fake, dim, mode, batch_size, full_matrix])]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_pr(rows, full=True):
    small = (2000, 10000)
    native = _run_pr(*small, mode="native")
    fast = _run_pr(*small, mode="fp32_accumulate")
    naive = _run_pr(*small, full_matrix=True)
    rows.append((f"P/R {small[0] // 1000}k x {small[1] // 1000}k, float16 GEMM (native)",
                 f"{native['seconds']:.1f} s", f"peak {native['peak_gb']:.2f} GB", "baseline",
                 f"P {native['precision']:.4f} R {native['recall']:.4f}"))
    rows.append((f"P/R {small[0] // 1000}k x {small[1] // 1000}k, fp32-accumulated GEMM",
                 f"{fast['seconds']:.1f} s", f"peak {fast['peak_gb']:.2f} GB",
                 f"{native['seconds'] / fast['seconds']:.1f}x faster than native",
                 f"P {fast['precision']:.4f} R {fast['recall']:.4f}"))
    rows.append((f"P/R {small[0] // 1000}k x {small[1] // 1000}k, full float32 matrices (no blocks)",
                 f"{naive['seconds']:.1f} s", f"peak {naive['peak_gb']:.2f} GB",
                 f"{naive['peak_gb'] / fast['peak_gb']:.1f}x the blocked peak",
                 f"P {naive['precision']:.4f} R {naive['recall']:.4f} (float32 distances)"))
    for r in rows[-3:]:
        print(r, flush=True)
    if full:
        big = _run_pr(10000, 50000, mode="fp32_accumulate")
        rows.append(("P/R 10k x 50k, 2048-d, blocks of 10000, fp32-accumulated",
                     f"{big['seconds']:.0f} s", f"peak {big['peak_gb']:.2f} GB (inputs {big['inputs_gb']:.2f} GB)",
                     "<= 3 GB" if big["peak_gb"] <= 3 else "OVER 3 GB",
                     f"P {big['precision']:.4f} R {big['recall']:.4f}"))
        print(rows[-1], flush=True)
        est_native = big["seconds"] * native["seconds"] / fast["seconds"]
        rows.append(("P/R 10k x 50k with the native float16 GEMM", f"~{est_native:.0f} s (estimated)",
                     "same blocks", "from the small-size ratio", ""))


def bench_extraction(rows, n_images=8, batch=4):
    """Images/s of the Inception port (at 1 thread and at torch's default thread count: on a shared
    machine every OpenMP parallel region can wait ~10 ms for a descheduled partner thread), of TF
    running the same graph (its own thread pools) and of DINOv2 ViT-L/14."""
    import torch

    from evaluations import inception as I
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 256, 256, 3), dtype=np.uint8)
    tf = I.import_tensorflow()
    graph_def = None
    if tf is not None:
        from evaluations.inception_graph import build_synthetic_inception_graph
        graph_def = build_synthetic_inception_graph(seed=0, width_divisor=1)
        state, _ = I.convert_graph_def(graph_def, "synthetic")
        model = I.InceptionADM.from_state_dict(state)
    else:
        model = I.InceptionADM()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    default_threads = torch.get_num_threads()

    def rate(fn, threads):
        torch.set_num_threads(threads)
        fn(images[:batch])  # warm-up
        def one_pass():
            for s in range(0, n_images, batch):
                fn(images[s:s + batch])
            if device.type == "cuda":
                torch.cuda.synchronize()
        seconds, _ = _best(one_pass, 2)
        torch.set_num_threads(default_threads)
        return n_images / seconds

    thread_counts = [default_threads] if device.type == "cuda" else sorted({1, default_threads})
    port = {t: rate(model, t) for t in thread_counts}
    best_port = max(port.values())
    port_text = ", ".join(f"{r:.2f} img/s ({t} thread{'s' if t > 1 else ''})" for t, r in port.items())
    if graph_def is not None:
        from evaluations.inception_tf import InceptionTFGraph
        graph = InceptionTFGraph(graph_def)
        rate_tf = rate(graph.run, default_threads)
        rows.append((f"Inception features, 256 px -> 299, batch {batch} ({device.type})",
                     f"PyTorch port {port_text}", f"TF graph {rate_tf:.2f} img/s",
                     f"{best_port / rate_tf:.2f}x TF", f"50k samples + 10k ref: ~{60000 / best_port / 3600:.1f} h"))
    else:
        rows.append((f"Inception features, 256 px -> 299, batch {batch} ({device.type})",
                     f"PyTorch port {port_text}", "TF not installed", "", ""))
    print(rows[-1], flush=True)
    from evaluations import dinov2
    net = dinov2.build_dinov2().to(device)
    dino = {t: rate(lambda x: dinov2.dinov2_features(net, x, device), t) for t in thread_counts}
    best_dino = max(dino.values())
    rows.append((f"DINOv2 ViT-L/14 features, 256 px -> 224, batch {batch} ({device.type})",
                 ", ".join(f"{r:.2f} img/s ({t} thread{'s' if t > 1 else ''})" for t, r in dino.items()), "",
                 f"{best_dino / best_port:.2f}x the Inception port", f"50k + 10k: ~{60000 / best_dino / 3600:.1f} h"))
    print(rows[-1], flush=True)
    rows.append((f"50k images through the Inception port and DINOv2 (fp32) ({device.type})",
                 f"{50000 / best_port + 50000 / best_dino:.0f} s", "", "", ""))
    print(rows[-1], flush=True)
    if device.type == "cuda":  # the opt-in TF32 DINOv2 (kdd.precision = "tf32"): speed and feature change
        rate_tf32 = rate(lambda x: dinov2.dinov2_features(net, x, device, precision="tf32"), default_threads)
        ref = dinov2.dinov2_features(net, images[:batch], device).double()
        fast = dinov2.dinov2_features(net, images[:batch], device, precision="tf32").double()
        rel = ((fast - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
        rows.append((f"DINOv2 ViT-L/14 with TF32 matmuls, batch {batch} (cuda)", f"{rate_tf32:.2f} img/s",
                     f"feature rel. change vs fp32 {rel:.1e} (random weights)",
                     f"{rate_tf32 / best_dino:.2f}x fp32",
                     f"50k through Inception + DINOv2 (tf32): {50000 / best_port + 50000 / rate_tf32:.0f} s"))
        print(rows[-1], flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["frechet", "pr", "extraction"], default=None)
    parser.add_argument("--no-full-pr", action="store_true", help="skip the 10k x 50k run")
    parser.add_argument("--pr-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--extraction-images", type=int, default=8,
                        help="images per extraction timing (use thousands on a GPU)")
    parser.add_argument("--extraction-batch", type=int, default=4)
    args = parser.parse_args(argv)
    if args.pr_worker:
        print(json.dumps(_pr_worker(*json.loads(args.pr_worker))))
        return 0
    print(f"machine: {_machine()}", flush=True)
    rows = []
    if args.only in (None, "frechet"):
        bench_frechet(rows)
    if args.only in (None, "pr"):
        bench_pr(rows, full=not args.no_full_pr)
    if args.only in (None, "extraction"):
        bench_extraction(rows, args.extraction_images, args.extraction_batch)
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    print()
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
