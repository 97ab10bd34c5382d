"""Training-step throughput of train.py's SiT on this machine: every SR-DiT component on vs off.

    python benchmarks/bench_train_step.py [--steps 5] [--device cpu]

Prints a table of ms/step and images/s for the digits preset (1x8x8 pixels, batch 128) and for
SiT-S/2 on 32x32x4 latents (batch 16), plain vs all components (RMSNorm, RoPE, QK-norm, value
residual, SPRINT at drop ratio 0.75, REPA/REG with a random teacher-token stand-in, CFM, time
shift). The ratio column is all-on time / plain time, measured in the same process.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402

CASES = [("SiT-Digits/2", (1, 8, 8), 128), ("SiT-S/2", (4, 32, 32), 16)]


def step_time(model_name, shape, batch, all_on: bool, steps: int, device: str) -> float:
    c, h, _ = shape
    cfg = train.Config(model=model_name)
    if all_on:
        cfg = train.Config(model=model_name, norm="rmsnorm", rope=True, qk_norm=True, value_residual=True,
                           sprint=True, repa_coef=0.5, reg_coef=0.03, cfm_coef=0.05, time_shift_base=4096)
    teacher_dim = 64
    track = {"dataset": {"latent_shape": [c, h, h], "num_classes": 10}}
    torch.manual_seed(0)
    model = train.build_model(cfg, track, (teacher_dim, teacher_dim) if all_on else (0, 0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n = model.num_patches
    x0, y = torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device)
    teacher = (torch.randn(batch, teacher_dim, device=device), torch.randn(batch, n, teacher_dim, device=device))
    negatives = torch.randn_like(x0)

    def one(step: int) -> None:
        noise = train.draw_step_noise(train.step_generator(0, step), batch, shape, 0.1,
                                      time_shift=1.0 + all_on * 0.4, reg_dim=teacher_dim if all_on else 0,
                                      sprint_tokens=n if all_on else 0, sprint_drop_ratio=0.75)
        noise = noise.slice(slice(0, batch), device)
        loss, _ = train.training_loss(model, cfg, x0, y, noise, 10, teacher if all_on else None,
                                      negatives if all_on else None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    one(0)  # warm-up, untimed
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(steps):
        one(s + 1)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"device: {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'model':<14} {'latent':<10} {'batch':>5} {'plain ms':>9} {'all-on ms':>10} {'ratio':>6} "
          f"{'plain img/s':>12} {'all-on img/s':>13}")
    for name, shape, batch in CASES:
        plain = step_time(name, shape, batch, False, args.steps, args.device)
        full = step_time(name, shape, batch, True, args.steps, args.device)
        print(f"{name:<14} {'x'.join(map(str, shape)):<10} {batch:>5} {plain * 1e3:>9.1f} {full * 1e3:>10.1f} "
              f"{full / plain:>6.2f} {batch / plain:>12.1f} {batch / full:>13.1f}")


if __name__ == "__main__":
    main()
