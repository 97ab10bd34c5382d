"""Single-file SiT trainer for the diffusion speedrun harness.

Read top to bottom: config and flags, model, loss, data, checkpoints, the training loop, and
the end of a run (samples, metrics, record, leaderboard). Every flag is a field of `Config`;
a track (records/tracks/<name>.json) fixes the budget, the defaults and the evaluation protocol.

    python train.py                      # the digits track, one CPU process
    accelerate launch train.py --track imagenet256_100k ...

The run log starts with this file's full source and the environment, so a log alone
reproduces the run (as modded-nanogpt's logs do).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from generate import shift_time, time_shift_for_shape
from preprocessing.shards import atomic_write, sha256_file


ROOT = Path(__file__).resolve().parent
TRACKS_DIR = ROOT / "records" / "tracks"
CHECKPOINT_FORMAT = "speedrun-ckpt-v2"
MODEL_FORMAT = "speedrun-model-v2"
# why a file of an earlier format cannot be loaded (read_safetensors says so)
RETIRED_FORMATS = dict.fromkeys(
    ("speedrun-ckpt-v1", "speedrun-model-v1"),
    "v1 networks differ from today's (they embedded 1000 t instead of t, read REG's class-token "
    "velocity before the final norm, and SPRINT never dropped the class token): retrain")


# =============================================================================================
# Config
# =============================================================================================
class ConfigError(ValueError):
    """A bad flag, track file or resume request."""


class CheckpointError(ValueError):
    """A checkpoint or model file that is corrupt, truncated or of the wrong kind."""


def flag(default, help: str):
    """A Config field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # ---- track and data
    track: str = flag("digits", "a track name under records/tracks/ or a path to a track JSON file")
    data_dir: str = flag("", "dataset shards; empty: the track's dataset directory")
    # ---- model
    model: str = flag("SiT-S/2", "SiT-{S,B,L,XL,Digits}/{1,2,4}")
    class_dropout: float = flag(0.1, "label dropout probability (enables classifier-free guidance)")
    # ---- SR-DiT components: each absent when off; all off is a plain SiT with LayerNorm
    norm: str = flag("layernorm", "layernorm | rmsnorm (no affine, eps 1e-6) in blocks and final layer")
    rope: bool = flag(False, "2D axial rotary position embedding on q and k")
    qk_norm: bool = flag(False, "RMSNorm with affine weight on q and k (per head)")
    value_residual: bool = flag(False, "mix block 0's values into every later block, lambda init 0.5")
    sprint: bool = flag(False, "SPRINT token routing: dense -> sparse -> dense blocks")
    sprint_dense_in: int = flag(2, "SPRINT: dense blocks before the sparse part")
    sprint_dense_out: int = flag(2, "SPRINT: dense blocks after the fusion")
    sprint_drop_ratio: float = flag(0.75, "SPRINT: share of tokens, REG's class token included, dropped "
                                          "in the sparse part (training)")
    sprint_path_drop: float = flag(0.05, "SPRINT: per-step probability of dropping the whole sparse path")
    repa_coef: float = flag(0.0, "REPA projection-loss weight (0: no REPA)")
    repa_depth: int = flag(2, "REPA: align the output of this block (1-based)")
    repa_hidden: int = flag(2048, "REPA: projector MLP width")
    reg_coef: float = flag(0.0, "REG class-token velocity loss weight (0: no REG token)")
    cfm_coef: float = flag(0.0, "contrastive flow matching weight (0: off); negatives = targets rolled by one")
    time_shift_base: float = flag(0.0, "time shift s = sqrt(C*H*W / base) in training and sampling (0: off; SR-DiT 4096)")
    encoder: str = flag("", "REPA/REG teacher: dinov2_vitb14 | digits_net; empty: the track's")
    encoder_weights: str = flag("", "teacher weights file (safetensors); required for DINOv2")
    encoder_sha256: str = flag("", "expected sha256 of --encoder_weights (checked when given)")
    # ---- optimisation
    iterations: int = flag(0, "training steps; 0: the track's budget")
    global_batch: int = flag(0, "samples per step over all processes and accumulation; 0: the track's")
    grad_accum: int = flag(1, "gradient accumulation micro-steps per step (part of the global batch)")
    lr: float = flag(1e-4, "AdamW learning rate (constant)")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.999, "AdamW beta2")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    grad_clip: float = flag(1.0, "gradient-norm clipping threshold")
    ema_decay: float = flag(0.9999, "EMA decay of the weights used for sampling")
    seed: int = flag(0, "seed of the model init, the data order and every step's noise")
    mixed_precision: str = flag("auto", "auto (bf16 on GPU, fp32 on CPU) | no | bf16")
    compile: bool = flag(False, "torch.compile the model and the REPA/REG teacher (use it on a GPU: 1.9-2.7x the "
                                "public SR-DiT step on an H200, 1.5x on an H100, benchmarks/RESULTS_GPU.md; ~1 min "
                                "of compilation first)")
    compile_mode: str = flag("default", "with --compile true: default | reduce-overhead (CUDA graphs around the "
                                        "compiled forward and backward: no per-kernel launches from the host; one "
                                        "process, --grad_accum 1; 3.0x the public SR-DiT step on an H100, "
                                        "benchmarks/RESULTS_GPU.md) | "
                                        "max-autotune-no-cudagraphs | max-autotune (both: longer compilation)")
    deterministic: bool = flag(True, "torch.use_deterministic_algorithms (warn-only): bitwise-repeatable steps "
                                     "where PyTorch has deterministic kernels; false lets it pick faster ones")
    kernels: str = flag("auto", "triton (kernels/: one fused QK-norm + RoPE pass before SDPA, and with --norm "
                                "rmsnorm, without --compile, the fused modulated norm and gated residual) | torch "
                                "(SDPA and plain ops) | auto (the faster step as measured on an H100, benchmarks/"
                                "RESULTS_GPU.md: triton with --compile on a GPU for a model with RoPE or QK-norm, "
                                "else torch)")
    # ---- bookkeeping
    run_name: str = flag("", "run folder name; empty: <date>_<model>_s<seed>")
    runs_dir: str = flag("runs", "where run folders go")
    records_dir: str = flag("records", "where record folders go")
    leaderboard: str = flag("LEADERBOARD.md", "the leaderboard file re-rendered after a record")
    log_every: int = flag(50, "steps between log lines")
    ckpt_every: int = flag(500, "steps between checkpoints")
    keep_checkpoints: int = flag(2, "how many recent checkpoints to keep")
    resume: str = flag("", "a checkpoint path, or auto (the latest in the run folder)")
    description: str = flag("baseline SiT", "one line for the leaderboard")
    contributors: str = flag("", "comma-separated names for the leaderboard")
    write_record: bool = flag(True, "write a record when the run used the track's budget")
    wandb: str = flag("off", "off | offline | online Weights & Biases logging")
    dist_timeout_minutes: float = flag(120, "how long a process waits in a collective before the run is "
                                            "aborted (NCCL's 10 min default is shorter than rank 0's scoring "
                                            "at the end of an ImageNet run)")


MODEL_ZOO = {  # name -> (depth, hidden size, heads); DiT/SiT sizes, plus the digits presets
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "Digits": (6, 128, 4),
}


def parse_model_name(name: str) -> tuple[int, int, int, int]:
    match = re.fullmatch(r"SiT-([A-Za-z]+)/(\d)", name)
    if not match or match.group(1) not in MODEL_ZOO or int(match.group(2)) not in (1, 2, 4):
        raise ConfigError(f"unknown model {name!r}: expected SiT-<{'|'.join(MODEL_ZOO)}>/<1|2|4>")
    depth, hidden, heads = MODEL_ZOO[match.group(1)]
    return depth, hidden, heads, int(match.group(2))


def load_track(track: str) -> dict:
    """A track by name (records/tracks/<name>.json) or by path to a JSON file."""
    path = Path(track) if track.endswith(".json") else TRACKS_DIR / f"{track}.json"
    if not path.is_file():
        known = sorted(p.stem for p in TRACKS_DIR.glob("*.json"))
        raise FileNotFoundError(f"track file {path} not found; known tracks: {known}")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"track file {path} is not valid JSON: {e}") from e
    for key in ("name", "dataset", "budget", "train_defaults", "evaluation", "primary_metric"):
        if key not in spec:
            raise ConfigError(f"track file {path} lacks the field {key!r}")
    for where, value in _sha256_pins(spec):  # compared as strings with what hashlib prints
        if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
            raise ConfigError(f"track file {path}: {where} is {value!r}, not a sha256 as 64 lowercase hex digits "
                              "(or null while unpinned)")
    return spec


def _sha256_pins(spec, prefix: str = ""):
    """(dotted key, value) of every field of a track whose name ends in 'sha256'."""
    for key, value in spec.items():
        if isinstance(value, dict):
            yield from _sha256_pins(value, f"{prefix}{key}.")
        elif key.endswith("sha256"):
            yield f"{prefix}{key}", value


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags override the track's train_defaults, which override Config's defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="A track's train_defaults override these defaults; flags override both.")
    for f in dataclasses.fields(Config):
        kind = {"bool": _str2bool}.get(f.type, {"int": int, "float": float}.get(f.type, str))
        parser.add_argument(f"--{f.name}", type=kind, default=None, metavar=f.type.upper(),
                            help=f"{f.metadata['help']} (default: {f.default!r})")
    args = vars(parser.parse_args(argv))
    track = load_track(args["track"] or Config.track)
    values = dataclasses.asdict(Config())
    values.update(track["train_defaults"])
    # (argparse reads a lone "--" value as an empty list)
    values.update({k: " ".join(v) if isinstance(v, list) else v for k, v in args.items() if v is not None})
    unknown = set(values) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ConfigError(f"track {track['name']!r} train_defaults has unknown fields {sorted(unknown)}")
    cfg = Config(**values)
    cfg.iterations = cfg.iterations or track["budget"]["iterations"]
    cfg.global_batch = cfg.global_batch or track["budget"]["global_batch"]
    cfg.data_dir = cfg.data_dir or track["dataset"]["dir"]
    # what the command line set (not a field: records store settings, not how they were given);
    # a resumed run takes every other setting from its checkpoint (resumed_config)
    cfg.flags_given = frozenset(k for k, v in args.items() if v is not None)
    validate_config(cfg)
    return cfg


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
MIXED_PRECISIONS = ("auto", "no", "bf16")  # fp16 would need a loss scaler the loop does not have


def uses_cuda_graphs(cfg: Config) -> bool:
    """torch.compile's reduce-overhead and max-autotune modes replay the compiled graphs as CUDA
    graphs (on CUDA devices; elsewhere they compile as the default mode)."""
    return cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune")


def validate_config(cfg: Config) -> None:
    """Values no run can use: refused before anything is set up (a zero period would divide by zero
    after the first step; a clip of 0 would freeze the weights, a negative one flip the gradients)."""
    parse_model_name(cfg.model)
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"--compile_mode must be one of {', '.join(COMPILE_MODES)}, not {cfg.compile_mode!r}")
    if uses_cuda_graphs(cfg) and cfg.grad_accum > 1:
        raise ConfigError(f"--compile_mode {cfg.compile_mode} (CUDA graphs) needs --grad_accum 1: a graph replayed "
                          "for the next micro-batch would overwrite the gradients being accumulated")
    for name in ("log_every", "ckpt_every", "keep_checkpoints", "grad_accum", "iterations", "global_batch"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("lr", "grad_clip"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name} must be positive, got {getattr(cfg, name)}")
    # a negative weight would not flip a component: the model leaves it out, silently
    for name in ("repa_coef", "reg_coef", "cfm_coef", "weight_decay", "time_shift_base"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    for name, value, low, high in (("class_dropout", cfg.class_dropout, 0.0, 1.0),
                                   ("sprint_drop_ratio", cfg.sprint_drop_ratio, 0.0, 1.0),
                                   ("sprint_path_drop", cfg.sprint_path_drop, 0.0, 1.0)):
        if not low <= value <= high:
            raise ConfigError(f"--{name} must be in [{low}, {high}], got {value}")
    # half-open: an EMA decay of 1 never moves (the exported model would be the initialisation),
    # AdamW refuses betas of 1
    for name in ("ema_decay", "beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.mixed_precision not in MIXED_PRECISIONS:
        raise ConfigError(f"--mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, not "
                          f"{cfg.mixed_precision!r}")
    if cfg.repa_coef > 0 and cfg.repa_depth < 1:
        raise ConfigError(f"--repa_coef {cfg.repa_coef} needs --repa_depth of at least 1 (the block whose output "
                          f"is aligned), got {cfg.repa_depth}")
    if cfg.sprint and (cfg.sprint_dense_in < 1 or cfg.sprint_dense_out < 0):
        raise ConfigError(f"SPRINT needs at least one dense block before the sparse part and none or more "
                          f"after it, got --sprint_dense_in {cfg.sprint_dense_in} --sprint_dense_out "
                          f"{cfg.sprint_dense_out}")


# Settings a resumed run may change: where and how it runs and what it reports, not what it trains
# (grad_accum: a run resumed on fewer processes needs more accumulation for the same global batch).
RESUME_MAY_CHANGE = frozenset({
    "data_dir", "encoder_weights", "grad_accum", "compile", "compile_mode", "deterministic", "kernels", "run_name",
    "runs_dir", "records_dir", "leaderboard", "log_every", "ckpt_every", "keep_checkpoints", "resume",
    "description", "contributors", "write_record", "wandb", "dist_timeout_minutes"})
# ...of which these name this command itself, never the checkpoint's (the collective timeout is
# set when the process group forms, before the checkpoint is read)
RESUME_FROM_COMMAND = frozenset({"resume", "run_name", "runs_dir", "dist_timeout_minutes"})


def resumed_config(cfg: Config, prior: dict, path: Path) -> Config:
    """The configuration a resumed run continues with: the checkpoint's. A flag of this command
    that contradicts it is an error, except for RESUME_MAY_CHANGE, which this command's flags may
    set; those it does not give stay the checkpoint's too (grad_accum: bitwise the same steps;
    description, write_record...). So `--resume auto --run_name X` alone continues exactly what
    was started. A Config built without parse_config counts every field as given."""
    given = getattr(cfg, "flags_given", None)
    values = dataclasses.asdict(cfg)
    conflicts = []
    for name, old in prior.items():
        if name not in values or name in RESUME_FROM_COMMAND or values[name] == old:
            continue
        if name in RESUME_MAY_CHANGE:
            if given is not None and name not in given:
                values[name] = old
            continue
        if given is None or name in given:
            conflicts.append(f"{name}={values[name]!r} (checkpoint: {old!r})")
        values[name] = old
    if conflicts:
        raise ConfigError(f"cannot resume {path}: this run sets {', '.join(conflicts)}; a resumed run "
                          "continues with its checkpoint's settings (drop these flags)")
    out = Config(**values)
    out.flags_given = given
    return out


def _str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


# =============================================================================================
# Model: SiT with adaLN-Zero (Peebles & Xie 2023; Ma et al. 2024) and the SR-DiT components,
# each switched by ModelOptions and absent (no parameters, no compute) when off.
# =============================================================================================
@dataclass
class ModelOptions:
    norm: str = "layernorm"          # layernorm | rmsnorm (no affine, eps 1e-6, blocks and final layer)
    rope: bool = False               # 2D axial rotary embedding on q and k (theta 10000)
    qk_norm: bool = False            # RMSNorm(head_dim) with affine weight on q and k
    value_residual: bool = False     # v = lam v1 + (1 - lam) v in blocks 1.., lam init 0.5
    sprint: bool = False             # SPRINT: dense -> sparse -> dense with token dropping
    sprint_dense_in: int = 2         # f: dense blocks before the sparse part
    sprint_dense_out: int = 2        # h: dense blocks after the fusion
    repa_depth: int = 0              # 0: no REPA projector; else align the output of this block (1-based)
    repa_dim: int = 0                # teacher token width (the projector's output)
    repa_hidden: int = 2048          # projector MLP width
    reg_dim: int = 0                 # 0: no REG class token; else the teacher CLS width
    time_shift_base: float = 0.0     # not a layer: how the model was trained, so how to sample it


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
    raise ConfigError(f"unknown norm {kind!r}: expected layernorm or rmsnorm")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [grid*grid, dim]: half the channels per axis."""
    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([one_axis(dim // 2, gy), one_axis(dim // 2, gx)], dim=1)
    return emb.float()


def rope_tables(head_dim: int, grid: int, num_prefix: int = 0, theta: float = 10000.0):
    """cos/sin [num_prefix + grid*grid, head_dim/2] for 2D axial RoPE on interleaved pairs.
    Pair j < head_dim/4 rotates with the row index, the rest with the column index, at frequency
    theta^(-(j mod head_dim/4) / (head_dim/4)). Prefix tokens (the REG class token) get no rotation."""
    if head_dim % 4:
        raise ConfigError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)
    angles = torch.cat([torch.zeros(num_prefix, 2 * quarter, dtype=torch.float64), angles])
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D]; cos/sin [N, D/2] or per sample [B, N, D/2] (SPRINT's kept tokens)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of t itself (as SiT, REPA and SR-DiT; not DiT's 1000 t)
    -> MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1))


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, opts: ModelOptions, mixes_values: bool):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        if opts.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        if mixes_values:  # value residual: the learnable share of block 0's values
            self.value_lambda = nn.Parameter(torch.tensor(0.5))

    backend = "torch"  # set_kernels() switches to the Triton kernels
    flash = False  # with Triton: the flash-attention kernel instead of prologue kernel + SDPA

    def forward(self, x: torch.Tensor, rope: tuple | None, v1: torch.Tensor | None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if hasattr(self, "value_lambda"):
            v = self.value_lambda * v1 + (1 - self.value_lambda) * v
        if self.backend == "triton":
            import kernels
            q_w = self.q_norm.weight if hasattr(self, "q_norm") else None
            k_w = self.k_norm.weight if hasattr(self, "k_norm") else None
            common = dict(rope=rope, q_norm_weight=q_w, k_norm_weight=k_w, eps=1e-6, backend="triton")
            if self.flash:  # QK-norm and RoPE fused into the Triton flash-attention kernel
                out = kernels.attention(q, k, v, **common)
            else:  # one Triton pass for QK-norm + RoPE, then the fastest SDPA backend
                q, k = kernels.qk_norm_rope(q, k, **common)
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            if hasattr(self, "q_norm"):
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), v


def kernels_problem(model: nn.Module, device: torch.device, attends: bool,
                    autocast_dtype: torch.dtype | None) -> str | None:
    """Why the Triton kernels cannot run this model on this device, or None."""
    import kernels
    shapes = {(m.heads * m.head_dim, m.head_dim if attends else None)
              for m in model.modules() if isinstance(m, Attention)}
    problem = next((p for p in (kernels.unsupported_model_shape(*s) for s in shapes) if p), None)
    if problem:
        return f"the kernels cannot run this model: {problem} (use torch)"
    if device.type == "cpu" and autocast_dtype == torch.bfloat16:
        return ("on CPU the kernels run in the Triton interpreter, which has no bf16: use "
                "--mixed_precision no, or --kernels torch")
    ok, why = kernels.selfcheck(device)
    return None if ok else f"the kernels' self-check failed on {device}: {why}"


def set_kernels(model: nn.Module, choice: str, device: torch.device, flash_attention: bool = False,
                compiled: bool = False, autocast_dtype: torch.dtype | None = None) -> str:
    """Resolves --kernels and sets it on every attention layer and block; returns the backend
    used. triton: the kernels. Attention is then the QK-norm/RoPE kernel feeding PyTorch SDPA's
    fused backends, or with flash_attention=True the Triton flash kernel, and with RMSNorm the
    blocks' modulated norms are the fused kernels; the same when compiled (inductor launches the
    kernels from its own code), except the modulated norms, which inductor fuses faster itself.
    Refused (ConfigError) for a model whose shapes no kernel serves (SiT-XL's head_dim 72 with
    RoPE or QK-norm), when kernels.selfcheck fails on the device (a broken kernel build, or no
    Triton, must not train) and on CPU under bf16 autocast (the interpreter has no bf16). A model
    with nothing the kernels fuse (no RoPE, QK-norm or flash kernel; no RMSNorm, or compiled)
    runs the torch path, and 'torch' is what is returned (and logged).
    auto: the kernels where they were measured faster, else torch. On an H100 (eleventh session,
    benchmarks/RESULTS_GPU.md) the compiled SR-DiT step took 58.3 ms with the kernels against
    68.6 ms without, and 27.5 against 31.5 ms replayed as CUDA graphs; eager, every kernel call
    is host-bound and the torch path was faster (70 vs 73 and 52 vs 67 ms on an H200). So auto
    is triton when compiled on a GPU for a model with RoPE or QK-norm whose shapes the kernels
    serve and whose self-check passes (else torch, with a warning naming why)."""
    if choice not in ("auto", "triton", "torch"):
        raise ConfigError(f"--kernels must be auto, triton or torch, not {choice!r}")
    opts = getattr(model, "opts", ModelOptions())
    # attention reaches a kernel only with RoPE or QK-norm to fuse, or the flash kernel
    attends = flash_attention or opts.rope or opts.qk_norm
    if choice == "auto":
        backend = "triton" if compiled and device.type == "cuda" and attends else "torch"
    else:
        backend = choice
    if backend == "triton" and not attends and (opts.norm != "rmsnorm" or compiled):
        backend = "torch"  # nothing to fuse: what runs is what is reported
    if backend == "triton":
        problem = kernels_problem(model, device, attends, autocast_dtype)
        if problem and choice == "auto":
            warnings.warn(f"--kernels auto: the torch path, since {problem}", RuntimeWarning)
            backend = "torch"
        elif problem:
            raise ConfigError(f"--kernels triton: {problem}")
    for module in model.modules():
        if isinstance(module, (Attention, SiTBlock)):
            module.backend = backend
        if isinstance(module, Attention):
            module.flash = flash_attention
    return backend


class SiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, opts: ModelOptions, index: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = make_norm(opts.norm, hidden)
        self.attn = Attention(hidden, heads, opts, mixes_values=opts.value_residual and index > 0)
        self.norm2 = make_norm(opts.norm, hidden)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.rmsnorm = opts.norm == "rmsnorm"

    backend = "torch"  # set_kernels() switches to the Triton kernels

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple | None = None,
                v1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        if self.backend == "triton" and self.rmsnorm and not torch.compiler.is_compiling():
            # one pass each for norm + modulation and for gated residual + norm + modulation;
            # the normalised activations come out in the dtype the next Linear consumes. Under
            # torch.compile inductor fuses these ops itself, 2x faster than the kernels on an
            # H200 (forward+backward, benchmarks/RESULTS_GPU.md), so the kernels are eager-only.
            import kernels
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            h = kernels.modulated_rmsnorm(x, shift1, scale1, eps=1e-6, out_dtype=dtype, backend="triton")
            attn_out, values = self.attn(h, rope, v1)
            x, h = kernels.gated_residual_modulated_rmsnorm(x, attn_out, gate1, shift2, scale2, eps=1e-6,
                                                            out_dtype=dtype, backend="triton")
            return x + gate2.unsqueeze(1) * self.mlp(h), values
        attn_out, values = self.attn(modulate(self.norm1(x), shift1, scale1), rope, v1)
        x = x + gate1.unsqueeze(1) * attn_out
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x, values


class FinalLayer(nn.Module):
    """The modulated norm of every token, then the patch projection of the patch tokens; REG's
    class-token head reads token 0 of the same modulated tokens (SiT.forward), as SR-DiT's does."""

    def __init__(self, hidden: int, patch: int, out_channels: int, norm: str):
        super().__init__()
        self.norm = make_norm(norm, hidden)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def modulated(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.modulated(x, c))


@dataclass
class Routing:
    """How one forward pass routes tokens through SPRINT's sparse middle blocks."""
    keep: torch.Tensor | None = None   # [B, n_keep] token indices kept (training; REG's class token
                                       # is token 0, dropped like any other); None: all
    path_drop: bool = False            # replace the sparse part's output by the mask token


class SiT(nn.Module):
    """Scalable interpolant transformer predicting the velocity of the linear path.

    forward(x [B,C,H,W], t [B] in [0,1] with t=1 noise, y [B] in 0..num_classes where the value
    num_classes is the null label, cls_t [B, reg_dim] the noised REG class token when REG is on,
    routing for SPRINT) -> dict(v [B,C,H,W], cls_v [B, reg_dim] with REG, repa [B, tokens,
    repa_dim] with REPA: the projected tokens of block `repa_depth`, class token first with REG).
    """

    def __init__(self, model: str, input_size: int, in_channels: int, num_classes: int,
                 opts: ModelOptions | None = None):
        super().__init__()
        opts = opts or ModelOptions()
        depth, hidden, heads, patch = parse_model_name(model)
        if input_size % patch:
            raise ConfigError(f"input size {input_size} is not divisible by patch size {patch}")
        self.model_name, self.num_classes, self.opts = model, num_classes, opts
        # the checkpoint sha256 of the autoencoder whose latents this model learns (None: pixels):
        # train.py sets it from the dataset manifest, exported models keep it, and sampling decodes
        # with that autoencoder only (preprocessing.encoders.latent_decoder)
        self.autoencoder_sha256: str | None = None
        self.in_channels, self.patch, self.input_size = in_channels, patch, input_size
        self.grid, self.hidden, self.depth = input_size // patch, hidden, depth
        self.num_prefix = 1 if opts.reg_dim else 0
        self.x_embedder = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden)  # last row: the null label
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, self.grid).unsqueeze(0),
                             persistent=False)
        if opts.rope:
            cos, sin = rope_tables(hidden // heads, self.grid, self.num_prefix)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden, heads, opts, i) for i in range(depth))
        self.final_layer = FinalLayer(hidden, patch, in_channels, opts.norm)
        if opts.reg_dim:  # REG: the teacher's class token enters as token 0, its velocity leaves
            self.cls_embedder = nn.Sequential(nn.Linear(opts.reg_dim, hidden), nn.RMSNorm(hidden, eps=1e-6))
            self.cls_head = nn.Linear(hidden, opts.reg_dim)
        if opts.sprint:
            if opts.sprint_dense_in + opts.sprint_dense_out >= depth:
                raise ConfigError(f"SPRINT split {opts.sprint_dense_in}+{opts.sprint_dense_out} leaves no "
                                  f"sparse blocks in depth {depth}")
            # 1-D: torch 2.11's compiled backward returned a [hidden] gradient for a [1, 1, hidden]
            # parameter ("invalid gradient ... expected [1, 1, 768]"). Zero at start, as SR-DiT's.
            self.mask_token = nn.Parameter(torch.zeros(hidden))
            self.fusion = nn.Linear(2 * hidden, hidden)
        if opts.repa_depth:
            if not 1 <= opts.repa_depth <= depth or not opts.repa_dim:
                raise ConfigError(f"REPA depth {opts.repa_depth} must be in 1..{depth} with a teacher width")
            if opts.sprint and opts.repa_depth > opts.sprint_dense_in:
                raise ConfigError(f"with SPRINT, REPA must align a dense block (depth <= {opts.sprint_dense_in})")
            h2 = opts.repa_hidden
            self.projector = nn.Sequential(nn.Linear(hidden, h2), nn.SiLU(), nn.Linear(h2, h2), nn.SiLU(),
                                           nn.Linear(h2, opts.repa_dim))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the outputs as zero
        for block in [*self.blocks, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        if self.opts.reg_dim:
            nn.init.zeros_(self.cls_head.weight)

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, g, c = x.shape[0], self.patch, self.grid, self.in_channels
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def _run(self, blocks, h, c, rope, v1):
        for block in blocks:
            h, values = block(h, c, rope, v1)
            if v1 is None and self.opts.value_residual:
                v1 = values  # block 0's values feed every later block
        return h, v1

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cls_t: torch.Tensor | None = None,
                routing: Routing | None = None) -> dict:
        opts, routing = self.opts, routing or Routing()
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        if opts.reg_dim:
            if cls_t is None:
                raise ValueError("this model has a REG class token: pass cls_t")
            h = torch.cat([self.cls_embedder(cls_t).unsqueeze(1), h], dim=1)
        c = self.t_embedder(t) + self.y_embedder(y)
        rope = (self.rope_cos, self.rope_sin) if opts.rope else None
        out = {}
        if opts.sprint:
            f, hh = opts.sprint_dense_in, opts.sprint_dense_out
            encoder, middle, decoder = self.blocks[:f], self.blocks[f:self.depth - hh], self.blocks[self.depth - hh:]
        else:
            encoder, middle, decoder = self.blocks, [], []
        if opts.repa_depth:
            h, v1 = self._run(encoder[:opts.repa_depth], h, c, rope, None)
            out["repa"] = self.projector(h)
            h, v1 = self._run(encoder[opts.repa_depth:], h, c, rope, v1)
        else:
            h, v1 = self._run(encoder, h, c, rope, None)
        if opts.sprint:
            h = self.fusion(torch.cat([h, self._sparse(middle, h, c, rope, v1, routing)], dim=-1))
            h, _ = self._run(decoder, h, c, rope, v1)
        h = self.final_layer.modulated(h, c)  # REG's head reads the class token's modulated norm too
        out["v"] = self.unpatchify(self.final_layer.linear(h[:, self.num_prefix:]))
        if opts.reg_dim:
            out["cls_v"] = self.cls_head(h[:, 0])
        return out

    def _sparse(self, blocks, h, c, rope, v1, routing: Routing) -> torch.Tensor:
        """SPRINT's middle: the kept tokens (all at evaluation) through the sparse blocks, the
        dropped positions refilled with the mask token; path drop gives the mask token alone."""
        filled = self.mask_token.to(h.dtype).expand(h.shape[0], h.shape[1], -1)  # [D] -> [B, N, D]
        if routing.path_drop and not torch.is_grad_enabled():
            return filled  # sampling's path-drop guidance: no gradient, so nothing to run
        if routing.keep is None:
            out = self._run(blocks, h, c, rope, v1)[0]
        else:
            index = routing.keep
            sub = torch.gather(h, 1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            sub_rope = (rope[0][index], rope[1][index]) if rope is not None else None
            sub_v1 = None
            if v1 is not None:
                sub_v1 = torch.gather(v1, 2, index[:, None, :, None].expand(-1, v1.shape[1], -1, v1.shape[-1]))
            sub, _ = self._run(blocks, sub, c, sub_rope, sub_v1)
            out = filled.scatter(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]), sub)
        if routing.path_drop:
            # training: the sparse blocks stay in the graph with zero gradients (SR-DiT's g * 0 + mask).
            # DDP (without find_unused_parameters) fails the next step if a parameter got no gradient,
            # and AdamW still moves a zero-gradient parameter by its momentum, as SR-DiT's does
            return out * 0 + filled
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_options(cfg: Config, teacher_dims: tuple[int, int] = (0, 0)) -> ModelOptions:
    """The architecture a config asks for; teacher_dims = (patch-token width, class-token width)."""
    return ModelOptions(norm=cfg.norm, rope=cfg.rope, qk_norm=cfg.qk_norm, value_residual=cfg.value_residual,
                        sprint=cfg.sprint, sprint_dense_in=cfg.sprint_dense_in,
                        sprint_dense_out=cfg.sprint_dense_out,
                        repa_depth=cfg.repa_depth if cfg.repa_coef > 0 else 0,
                        repa_dim=teacher_dims[0] if cfg.repa_coef > 0 else 0, repa_hidden=cfg.repa_hidden,
                        reg_dim=teacher_dims[1] if cfg.reg_coef > 0 else 0,
                        time_shift_base=cfg.time_shift_base)


def track_model_shape(track: dict) -> dict:
    """What a track's data fixes of the network: its input (the latent grid) and its classes."""
    channels, size, _ = track["dataset"]["latent_shape"]
    return {"input_size": int(size), "in_channels": int(channels), "num_classes": int(track["dataset"]["num_classes"])}


def build_model(cfg: Config, track: dict, teacher_dims: tuple[int, int] = (0, 0)) -> SiT:
    return SiT(cfg.model, **track_model_shape(track), opts=model_options(cfg, teacher_dims))


# =============================================================================================
# Teachers for REPA/REG: frozen encoders mapping uint8 NHWC images to (class token, patch tokens)
# =============================================================================================
class DigitsTeacher(nn.Module):
    """The digits metric network: its 4x4 spatial features are the patch tokens, its pooled
    feature the class token (64-d each)."""

    def __init__(self, weights: str = "", sha256: str = ""):
        super().__init__()
        from evaluations import digits_net
        kwargs = {"expected_sha256": sha256} if sha256 else {}
        self.net = digits_net.load_digits_net(weights or digits_net.DEFAULT_WEIGHTS_PATH, **kwargs)
        self.preprocess = digits_net.preprocess
        self.dims = (64, 64)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(self.preprocess(images))
        return out["pool"], out["spatial"]


class DinoV2Teacher(nn.Module):
    """DINOv2-B/14 through timm, as REPA/REG use it: pixels/255, bicubic resize to 224*res/256,
    ImageNet mean/std; returns the final-norm class token and patch tokens (768-d).
    Weights: a local safetensors file of timm's `vit_base_patch14_dinov2.lvd142m` (sha256 checked);
    random weights only when `random_init` (tests)."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, resolution: int, weights: str = "", sha256: str = "", random_init: bool = False):
        super().__init__()
        import timm
        self.size = 224 * resolution // 256
        self.model = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=self.size,
                                       num_classes=0)
        if not random_init:
            self.model.load_state_dict(_load_teacher_weights(weights, sha256, self.model))
        self.model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)
        self.dims = (self.model.embed_dim, self.model.embed_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        tokens = self.model.forward_features((x - self.mean) / self.std)
        prefix = self.model.num_prefix_tokens
        return tokens[:, 0], tokens[:, prefix:]


def _load_teacher_weights(path: str, sha256: str, model: nn.Module) -> dict:
    from safetensors.torch import load_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not path:
        raise ConfigError("DINOv2 needs --encoder_weights: a safetensors file of timm's "
                          "vit_base_patch14_dinov2.lvd142m (e.g. the model.safetensors of that timm "
                          "release); pass --encoder_sha256 to pin it")
    if not Path(path).is_file():
        raise ConfigError(f"encoder weights {path} not found (DINOv2-B/14: the model.safetensors of timm's "
                          "vit_base_patch14_dinov2.lvd142m)")
    if not path.endswith(".safetensors"):
        raise ConfigError(f"encoder weights {path}: only .safetensors files are loaded (no pickles)")
    if sha256 and sha256_file(path) != sha256:
        raise ConfigError(f"encoder weights {path} have sha256 {sha256_file(path)}, expected {sha256}")
    return checkpoint_filter_fn(load_file(path), model)  # resamples the position embedding


def build_teacher(cfg: Config, track: dict) -> nn.Module | None:
    if cfg.repa_coef <= 0 and cfg.reg_coef <= 0:
        return None
    name = cfg.encoder or track["dataset"].get("teacher", "")
    if name == "digits_net":
        return DigitsTeacher(cfg.encoder_weights, cfg.encoder_sha256)
    if name == "dinov2_vitb14":
        return DinoV2Teacher(track["dataset"]["resolution"], cfg.encoder_weights, cfg.encoder_sha256)
    raise ConfigError(f"REPA/REG need a teacher: --encoder dinov2_vitb14 | digits_net (got {name!r})")


# =============================================================================================
# Loss: linear flow matching with velocity prediction
# =============================================================================================
def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """Randomness of a training step depends on (seed, step) only: resume- and rank-count-proof."""
    key = hashlib.sha256(f"train/{seed}/{step}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


@dataclass
class StepNoise:
    """Every random draw of one step, for the GLOBAL batch; each micro-batch takes its slice."""
    t: torch.Tensor                       # [B] times (time-shifted when on)
    eps: torch.Tensor                     # [B, C, H, W] noise
    drop: torch.Tensor                    # [B] label dropped -> null class
    cls_eps: torch.Tensor | None = None   # [B, reg_dim] REG class-token noise
    keep: torch.Tensor | None = None      # [B, n_keep] SPRINT kept tokens, class token included (sorted)
    path_drop: bool = False               # SPRINT path drop, one decision for every rank

    def slice(self, part: slice, device: torch.device | str = "cpu") -> "StepNoise":
        def cut(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else v[part].to(device)
        return StepNoise(cut(self.t), cut(self.eps), cut(self.drop), cut(self.cls_eps), cut(self.keep),
                         self.path_drop)


def draw_step_noise(gen: torch.Generator, global_batch: int, sample_shape: tuple, class_dropout: float,
                    time_shift: float = 1.0, reg_dim: int = 0, sprint_tokens: int = 0,
                    sprint_drop_ratio: float = 0.0, sprint_path_drop: float = 0.0) -> StepNoise:
    """Draws on CPU in a fixed order (t, eps, dropout, then the optional parts), so turning a
    component on does not change the draws of the components before it."""
    t = torch.rand(global_batch, generator=gen, dtype=torch.float64)
    t = (shift_time(t, time_shift) if time_shift != 1.0 else t).float()
    noise = StepNoise(t, torch.randn((global_batch, *sample_shape), generator=gen),
                      torch.rand(global_batch, generator=gen) < class_dropout)
    if reg_dim:
        noise.cls_eps = torch.randn((global_batch, reg_dim), generator=gen)
    if sprint_tokens:  # every token, REG's class token included, may be dropped (as SR-DiT's)
        n_keep = max(1, int(sprint_tokens * (1 - sprint_drop_ratio)))  # SR-DiT's count: 64 of 257
        order = torch.rand((global_batch, sprint_tokens), generator=gen).argsort(dim=1)
        noise.keep = order[:, :n_keep].sort(dim=1).values
        noise.path_drop = bool(torch.rand(1, generator=gen).item() < sprint_path_drop)
    return noise


class NoisePrefetch:
    """Draws step s+1's noise on a worker thread while step s runs on the device, so prefetching
    changes no number, only when the CPU does the work. Every draw runs on the one worker in the
    order asked for, so draws that advance generators (generate.py's per-sample streams, called
    for steps 0, 1, 2...) come out as drawn in line; draws that depend only on (seed, step) may be
    asked for in any order (a resume)."""

    def __init__(self, draw):
        from concurrent.futures import ThreadPoolExecutor
        self.draw, self.pool, self.pending = draw, ThreadPoolExecutor(1, thread_name_prefix="noise"), {}

    def __call__(self, step: int):
        future = self.pending.pop(step, None) or self.pool.submit(self.draw, step)
        self.pending = {step + 1: self.pool.submit(self.draw, step + 1)}  # drops stale ones (resume)
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def flow_matching_inputs(x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                         drop: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """Linear path x_t = (1-t) x0 + t eps, velocity target eps - x0, dropped labels -> null class."""
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - tb) * x0 + tb * eps
    return x_t, torch.where(drop, torch.full_like(y, num_classes), y), eps - x0


def cfm_negatives(x0: torch.Tensor, eps: torch.Tensor, first: int, latent_at) -> torch.Tensor:
    """CFM negatives of the global-batch positions [first, first + len(x0)) whose latents are x0:
    the velocity targets of the GLOBAL batch rolled by one (position i gets the target of i - 1,
    the first gets the last), so the pairing does not depend on how the batch is split over ranks.
    eps is the global batch's noise; latent_at(p) returns the latent [1, ...] of global position p
    and is called for the one sample just before the run (unless the run is the whole batch)."""
    prev = (first - 1) % len(eps)
    x_prev = x0[-1:] if len(x0) == len(eps) else latent_at(prev)
    return torch.cat([eps[prev:prev + 1] - x_prev, eps[first:first + len(x0)] - x0])[:-1]


def training_loss(model: nn.Module, cfg: Config, x0: torch.Tensor, y: torch.Tensor, noise: StepNoise,
                  num_classes: int, teacher_out: tuple | None, negatives: torch.Tensor | None
                  ) -> tuple[torch.Tensor, dict]:
    """MSE_v + repa_coef (-cos to the teacher) + reg_coef MSE_cls - cfm_coef MSE(v, negatives).
    negatives: the velocity targets of the batch rolled by one sample (CFM)."""
    x_t, y_in, target = flow_matching_inputs(x0, y, noise.t, noise.eps, noise.drop, num_classes)
    cls_t = cls_target = None
    if cfg.reg_coef > 0:
        c = teacher_out[0]
        tb = noise.t.view(-1, 1)
        cls_t, cls_target = (1 - tb) * c + tb * noise.cls_eps, noise.cls_eps - c
    out = model(x_t, noise.t, y_in, cls_t=cls_t, routing=Routing(noise.keep, noise.path_drop))
    pred = out["v"].float()
    parts = {"mse": F.mse_loss(pred, target)}
    loss = parts["mse"]
    if cfg.repa_coef > 0:
        cls, patches = teacher_out
        tokens = torch.cat([cls.unsqueeze(1), patches], dim=1) if cfg.reg_coef > 0 else patches
        parts["repa"] = -F.cosine_similarity(out["repa"].float(), tokens.float(), dim=-1).mean()
        loss = loss + cfg.repa_coef * parts["repa"]
    if cfg.reg_coef > 0:
        parts["cls"] = F.mse_loss(out["cls_v"].float(), cls_target)
        loss = loss + cfg.reg_coef * parts["cls"]
    if cfg.cfm_coef > 0:
        parts["cfm"] = F.mse_loss(pred, negatives)
        loss = loss - cfg.cfm_coef * parts["cfm"]
    return loss, parts


# =============================================================================================
# Data: preprocessing.loader.ShardLoader (memory-mapped shards, a prefetch thread). The global
# batch at step s is items [s*B, (s+1)*B) of an endless stream of per-epoch permutations seeded
# by (seed, epoch); rank r takes its contiguous slice of that batch, which Stepper.forward_backward
# splits into grad_accum consecutive micro-batches. The order depends on (seed, step) only.
# =============================================================================================


def check_run_can_finish(track: dict, model: nn.Module, is_main: bool) -> None:
    """What the end of the run reads, checked before training (it would otherwise fail after it):
    on every rank the decoder of the samples (for INVAE latents the checkpoint that encoded the
    data, $SPEEDRUN_INVAE_WEIGHTS), on rank 0, which scores, the evaluator's reference batch and
    network weights."""
    from evaluations.evaluate import check_scoring_inputs
    from preprocessing.encoders import latent_decoder
    try:
        latent_decoder(track["dataset"]["encoder"], model.autoencoder_sha256, device="cpu")
        if is_main:
            check_scoring_inputs(track)
    except (ValueError, ImportError, NotImplementedError) as e:  # weights, reference, decoder, TF backend
        raise ConfigError(f"this run could not sample or score its model at the end: {e}") from e


def latent_encoder_info(dataset) -> dict:
    """What `preprocessing encode` recorded of the encoder that made the shards' latents (its
    checkpoint_sha256, posterior, ...); empty for pixel datasets."""
    return (dataset.manifest.get("metadata") or {}).get("latent_encoder_info") or {}


def check_dataset_fits_track(dataset, track: dict) -> None:
    """The shards (a preprocessing.shards.ShardDataset) are the data the track names: its latent
    encoder, latent and image shapes and classes, and, where the track pins them, the encoder's
    checkpoint and posterior (what ``preprocessing encode`` recorded in the manifest). Another
    encoding would train a run whose record no other record can be compared with, or fail deep
    inside the model."""
    data, where = track["dataset"], f"{dataset.root}: the dataset"
    if not dataset.has_latents:
        raise ConfigError(f"{where} has no latents yet: run python -m preprocessing encode {dataset.root} "
                          f"--encoder {data['encoder']} (preprocessing/README.md)")
    wanted = {"latent encoder": data["encoder"], "latent shape": tuple(data["latent_shape"]),
              "image shape": (data["resolution"], data["resolution"], data["channels"]),
              "number of classes": data["num_classes"]}
    found = {"latent encoder": dataset.latent_encoder, "latent shape": tuple(dataset.latent_shape),
             "image shape": tuple(dataset.image_shape), "number of classes": dataset.num_classes}
    info = latent_encoder_info(dataset)
    for field, key in (("encoder_checkpoint_sha256", "checkpoint_sha256"), ("encoder_posterior", "posterior")):
        if data.get(field) is not None:
            wanted[f"encoder {key}"], found[f"encoder {key}"] = data[field], info.get(key)
    differ = [f"{k} {found[k]} (the track's: {v})" for k, v in wanted.items() if found[k] != v]
    if differ:
        raise ConfigError(f"{where} is not the data of track {track['name']!r}: {'; '.join(differ)}")


# =============================================================================================
# Checkpoints: safetensors, written atomically (temporary file + fsync + rename)
# =============================================================================================
def save_checkpoint(path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, cfg: Config, extra: dict) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().cpu().reshape(value.shape).contiguous()
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(step), "config": json.dumps(dataclasses.asdict(cfg)),
                "extra": json.dumps(extra)}
    write_safetensors(path, tensors, metadata)


def write_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    """Atomically; a failure (a full disk) names the file and leaves every earlier file as it was."""
    from safetensors.torch import save_file
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except Exception as e:
        raise CheckpointError(f"could not write {path} ({type(e).__name__}: {e}); earlier checkpoints "
                              "are untouched") from e


def read_safetensors(path: Path, expected_format: str, with_tensors: bool = True) -> tuple[dict, dict]:
    """Loads tensors (unless with_tensors is False) + metadata; never unpickles. Clear errors for
    missing/corrupt files."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()} if with_tensors else {}
    except Exception as e:  # safetensors raises several types for truncated/corrupt headers
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (not a readable safetensors "
                         f"file): {e}") from e
    if metadata.get("format") != expected_format:
        why = RETIRED_FORMATS.get(metadata.get("format"))
        raise CheckpointError(f"checkpoint {path} has format {metadata.get('format')!r}, "
                              f"expected {expected_format!r}" + (f": {why}" if why else ""))
    return tensors, metadata


def _checkpoint_state(path: Path, metadata: dict) -> dict:
    try:
        return {"step": int(metadata["step"]), "config": json.loads(metadata["config"]),
                "extra": json.loads(metadata.get("extra", "{}"))}
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its metadata lacks or garbles {e}") from e


def read_checkpoint_metadata(path: Path) -> dict:
    """A checkpoint's step, config and extra without reading its tensors."""
    return _checkpoint_state(path, read_safetensors(path, CHECKPOINT_FORMAT, with_tensors=False)[1])


def load_checkpoint(path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    tensors, metadata = read_safetensors(path, CHECKPOINT_FORMAT)
    info = _checkpoint_state(path, metadata)
    missing = [name for name in ("rng.torch_cpu",) if name not in tensors]
    if info["step"] > 0 and not any(k.startswith("optim.") for k in tensors):
        missing.append("the optimizer state")
    if missing:  # resuming without them would silently not continue the run exactly
        raise CheckpointError(f"checkpoint {path} (step {info['step']}) lacks {', '.join(missing)}")
    def section(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for module, prefix in ((model, "model."), (ema, "ema.")):
        try:
            module.load_state_dict(section(prefix), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path}: {prefix[:-1]} weights do not match the model: {e}") from e
    by_name = dict(model.named_parameters())
    optim_state = section("optim.")
    for p_name, p in by_name.items():
        state = {key.rsplit(".", 1)[1]: v for key, v in optim_state.items() if key.rsplit(".", 1)[0] == p_name}
        if state:  # a moment of another shape than its parameter is refused, naming the parameter
            try:
                optimizer.state[p] = {k: v if k == "step" else v.to(p.device).view_as(p) for k, v in state.items()}
            except RuntimeError as e:
                raise CheckpointError(f"checkpoint {path}: optimizer state of {p_name} does not fit: {e}") from e
    torch.set_rng_state(tensors["rng.torch_cpu"])
    return info


def export_model(path: Path, ema: nn.Module, cfg: Config, track: dict) -> None:
    """The inference artefact: EMA weights + what is needed to rebuild the network."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    metadata = {"format": MODEL_FORMAT, "model": cfg.model, "config": json.dumps(dataclasses.asdict(cfg)),
                "input_size": str(ema.input_size), "in_channels": str(ema.in_channels),
                "num_classes": str(ema.num_classes), "track": track["name"],
                "options": json.dumps(dataclasses.asdict(ema.opts))}
    if ema.autoencoder_sha256:
        metadata["autoencoder_sha256"] = ema.autoencoder_sha256
    write_safetensors(path, tensors, metadata)


def load_model(path: Path) -> tuple[SiT, dict]:
    """Rebuilds a SiT from an exported model file (safetensors; never pickle)."""
    tensors, metadata = read_safetensors(path, MODEL_FORMAT)
    opts = ModelOptions(**json.loads(metadata["options"])) if "options" in metadata else ModelOptions()
    model = SiT(metadata["model"], int(metadata["input_size"]), int(metadata["in_channels"]),
                int(metadata["num_classes"]), opts)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"model file {path}: weights do not match {metadata['model']}: {e}") from e
    model.autoencoder_sha256 = metadata.get("autoencoder_sha256")
    return model.eval(), metadata


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoints/step_*.safetensors"))


def default_run_name(cfg: Config) -> str:
    """<date>_<model>_s<seed>, with -2, -3, ... when a fresh run would land in an earlier run's
    folder (a resume keeps the plain name). Every rank computes the same folder list: nothing is
    written before all ranks have joined the process group; the date is rank 0's (rank0_value)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    base = f"{stamp}_{cfg.model.replace('/', '')}_s{cfg.seed}"
    if cfg.resume:
        return base
    name, n = base, 2
    while list_checkpoints(Path(cfg.runs_dir) / name):
        name, n = f"{base}-{n}", n + 1
    return name


# =============================================================================================
# Logging: a run log that carries its code and environment
# =============================================================================================
def environment_report(accelerator) -> dict:
    import accelerate
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "accelerate": accelerate.__version__, "platform": platform.platform(),
           "cpu": _cpu_model(), "cpu_threads": torch.get_num_threads(),
           "device": str(accelerator.device), "world_size": accelerator.num_processes,
           "mixed_precision": accelerator.mixed_precision}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


class RunLog:
    SEPARATOR = "=" * 100

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def start(self, source: str, env: dict, cfg: Config, track: dict, n_params: int) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as fh:
            fh.write(source)
            fh.write(f"\n{self.SEPARATOR}\n")
            for key, value in env.items():
                fh.write(f"{key}: {value}\n")
            smi = _nvidia_smi()
            if smi:
                fh.write(smi + "\n")
            fh.write(f"{self.SEPARATOR}\n")
            fh.write(f"track: {track['name']}\nconfig: {json.dumps(dataclasses.asdict(cfg), sort_keys=True)}\n")
            fh.write(f"parameters: {n_params}\n")

    def line(self, text: str) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(text + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def code_from_log(log_text: str) -> str:
    """The train.py source a run log embeds (everything before the first separator line)."""
    marker = f"\n{RunLog.SEPARATOR}\n"
    if marker not in log_text:
        raise ValueError("run log has no code/environment separator")
    return log_text.split(marker, 1)[0]


def code_hash(source: str) -> str:
    """sha256 of train.py's source as the run log embeds it."""
    return hashlib.sha256(source.encode()).hexdigest()


# =============================================================================================
# Training
# =============================================================================================
class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the step was not applied."""


def _on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "") not in ("1", "true")


def process_state(cfg: Config):
    """This process's place in the run (accelerate's PartialState), joining the process group on
    first use, with cfg's timeout for every collective. The waiting ranks sit in one while rank 0
    works alone: it scores 3 x 50K samples at the end of an ImageNet run (~13 min on an H100,
    benchmarks/RESULTS_GPU.md) and writes sample batches of up to 39 GB, beyond the 10 minutes
    after which NCCL's watchdog would abort them and take the run's record with them."""
    from accelerate import PartialState
    if not cfg.dist_timeout_minutes > 0:
        raise ConfigError(f"--dist_timeout_minutes must be positive, got {cfg.dist_timeout_minutes}")
    return PartialState(cpu=not _on_gpu(), timeout=datetime.timedelta(minutes=cfg.dist_timeout_minutes))


def rank0_value(cfg: Config, value):
    """value as rank 0 has it, on every rank. The default run name: ranks started on either side
    of UTC midnight (or nodes whose clocks differ) would otherwise train into two folders, and rank
    0 would miss the others' sample files. --resume auto's checkpoint: nodes listing a shared
    folder a moment apart (or through a stale directory cache) could resume different steps."""
    from accelerate.utils import broadcast_object_list
    box = [value]
    if process_state(cfg).num_processes > 1:
        broadcast_object_list(box)
    return box[0]


def use_tf32() -> None:
    """TF32 matmuls and convolutions on GPUs, for training and for sampling (SR-DiT's train.py and
    generate.py enable them too), so a record's samples and their regeneration (generate.py,
    eval.sh) use the same arithmetic."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    on_gpu = _on_gpu()
    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if on_gpu else "no")
    process_state(cfg)  # the process group with the run's collective timeout (unless rank0_value made it)
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=precision)
    if on_gpu:
        use_tf32()
    return accelerator


def set_determinism(deterministic: bool) -> None:
    """Deterministic kernels where PyTorch has them (warn-only elsewhere). PyTorch's companion
    debugging aid, filling every new tensor with NaN, stays off: it changes no result of correct
    code and cost ~1,400 extra fill kernels per SR-DiT step on an H200 (benchmarks/RESULTS_GPU.md)."""
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def compile_for_training(cfg: Config, module: nn.Module) -> nn.Module:
    """torch.compile'd with --compile true (in --compile_mode): the SiT and the REPA/REG teacher
    (whose eager forward would otherwise launch a few hundred kernels per step), else as is."""
    if not cfg.compile:
        return module
    return torch.compile(module, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)


def make_optimizer(cfg: Config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with a constant learning rate (fused kernels on CUDA)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def unwrap_model(accelerator, module: nn.Module) -> nn.Module:
    """The module without its DDP and torch.compile wrappers."""
    return accelerator.unwrap_model(module, keep_torch_compile=False)


def noise_source(cfg: Config, track: dict, model: nn.Module) -> NoisePrefetch:
    """Every step's draws for the global batch (a step ahead on a thread); model unwrapped."""
    latent_shape = tuple(track["dataset"]["latent_shape"])
    time_shift = time_shift_for_shape(latent_shape, cfg.time_shift_base) if cfg.time_shift_base > 0 else 1.0
    sprint_tokens = model.num_prefix + model.num_patches if cfg.sprint else 0
    return NoisePrefetch(lambda step: draw_step_noise(
        step_generator(cfg.seed, step), cfg.global_batch, latent_shape, cfg.class_dropout, time_shift,
        model.opts.reg_dim, sprint_tokens, cfg.sprint_drop_ratio, cfg.sprint_path_drop))


@dataclass
class Stepper:
    """One optimisation step of train(): `forward_backward` over this rank's micro-batches of the
    global batch, then `update`. train() builds it; benchmarks/bench_gpu_step.py times the same."""
    cfg: Config
    accelerator: object
    model: nn.Module              # as prepared: DDP and torch.compile wrappers
    teacher: nn.Module | None     # REPA/REG: the online DINOv2 (or digits) teacher
    optimizer: torch.optim.Optimizer
    ema: nn.Module
    loader: object                # preprocessing.loader.ShardLoader: this rank's slice of each batch
    noise_for: NoisePrefetch
    num_classes: int
    perm_cache: dict = field(default_factory=dict)  # epoch permutations for CFM's one sample before the slice

    def unwrap(self) -> nn.Module:
        return unwrap_model(self.accelerator, self.model)

    def forward_backward(self, step: int) -> tuple[float, torch.Tensor]:
        """Forward/backward over this rank's micro-batches of the global batch; returns the mean
        loss over every process and micro-batch, and the clipped gradient norm."""
        from preprocessing.loader import global_indices
        cfg, accelerator, loader, model = self.cfg, self.accelerator, self.loader, self.model
        micro_batch = cfg.global_batch // (accelerator.num_processes * cfg.grad_accum)
        if uses_cuda_graphs(cfg):  # a new iteration: last step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        batch = next(loader)  # this rank's contiguous slice of the global batch of `step`
        assert batch.step == step, (batch.step, step)
        noise = self.noise_for(step)
        device = accelerator.device
        first = accelerator.process_index * loader.local_batch  # global position of the slice
        x0 = batch.latents.to(device, non_blocking=True)
        y = batch.labels.to(device, non_blocking=True)
        images = batch.images.to(device, non_blocking=True) if self.teacher is not None else None
        negatives = None
        if cfg.cfm_coef > 0:
            def latent_at(p: int) -> torch.Tensor:  # the sample just before the slice (another rank's)
                idx = global_indices(step, loader.n, cfg.global_batch, cfg.seed, self.perm_cache)[p:p + 1]
                return torch.from_numpy(loader.dataset.get_latents(idx))
            negatives = cfm_negatives(batch.latents, noise.eps, first, latent_at).to(device, non_blocking=True)
        total = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            # chunk process_index * grad_accum + micro of the global batch: the rank's slice in
            # consecutive micro-batches; the noise is taken at the same global positions
            rows = slice(micro * micro_batch, (micro + 1) * micro_batch)
            local = noise.slice(slice(first + rows.start, first + rows.stop), device)
            sync = accelerator.no_sync(model) if micro < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                teacher_out = None  # the teacher runs in the training precision too (bf16 on GPU)
                if self.teacher is not None:
                    teacher_out = self.teacher(images[rows])
                loss, _ = training_loss(model, cfg, x0[rows], y[rows], local, self.num_classes, teacher_out,
                                        None if negatives is None else negatives[rows])
                accelerator.backward(loss / cfg.grad_accum)
            total += loss.detach() / cfg.grad_accum
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        return accelerator.reduce(total, reduction="mean").item(), grad_norm

    def update(self) -> None:
        """The optimiser step on the accumulated gradients, then the EMA."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.unwrap(), self.cfg.ema_decay)


def train(cfg: Config) -> dict:
    """Trains for the configured budget; at the end samples, scores and writes the record.
    Returns a summary dict (run dir, metrics, record path)."""
    import copy

    from tqdm import tqdm

    from preprocessing.loader import LoaderStateError, ShardLoader
    from preprocessing.shards import ShardDataset

    source = Path(__file__).read_text()  # read once: the log and the code hash describe this code
    code = code_hash(source)
    if not cfg.run_name:
        cfg.run_name = rank0_value(cfg, default_run_name(cfg))
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    resume_path = rank0_value(cfg, _resolve_resume(cfg, run_dir))
    own = resume_path is not None and resume_path.resolve().parent == (run_dir / "checkpoints").resolve()
    if list_checkpoints(run_dir) and not own:  # its pruning would delete them, its log append to theirs
        raise ConfigError(f"run folder {run_dir} holds checkpoints of an earlier run: continue it with "
                          "--resume auto, or start this one under another --run_name")
    prior = read_checkpoint_metadata(resume_path) if resume_path else None
    if prior:  # before anything is built: the model follows the checkpoint's settings
        cfg = resumed_config(cfg, prior["config"], resume_path)
    validate_config(cfg)
    track = load_track(cfg.track)
    accelerator = make_accelerator(cfg)
    is_main = accelerator.is_main_process

    def unwrap(module: nn.Module) -> nn.Module:
        return unwrap_model(accelerator, module)
    world = accelerator.num_processes
    if uses_cuda_graphs(cfg) and world > 1:
        raise ConfigError(f"--compile_mode {cfg.compile_mode} (CUDA graphs) is supported on one process only "
                          f"(not tried with DDP); this run has {world}")
    if cfg.global_batch % (world * cfg.grad_accum):
        raise ConfigError(f"global batch {cfg.global_batch} is not divisible by {world} processes x "
                          f"{cfg.grad_accum} accumulation steps")
    set_determinism(cfg.deterministic)
    log = RunLog(run_dir / "train.log", enabled=is_main)

    if is_main and track["dataset"].get("builder") == "digits":
        from preprocessing.digits import ensure_digits
        ensure_digits(cfg.data_dir)
    accelerator.wait_for_everyone()
    # the split's sha256 are checked by one process per node (294 GB at 256 px: minutes of hashing,
    # eight times over if every rank of the node did it); the node's other ranks open it after that
    with accelerator.local_main_process_first():
        dataset = ShardDataset(cfg.data_dir, track["dataset"]["train_split"],
                               verify=accelerator.is_local_main_process)
    check_dataset_fits_track(dataset, track)
    data_manifest = sha256_file(Path(cfg.data_dir) / "manifest.json")
    if prior:
        check_same_run(prior["extra"], resume_path, data_manifest, code, cfg.write_record)

    torch.manual_seed(cfg.seed)
    teacher = build_teacher(cfg, track)
    model = build_model(cfg, track, teacher.dims if teacher is not None else (0, 0))
    model.autoencoder_sha256 = latent_encoder_info(dataset).get("checkpoint_sha256")
    check_run_can_finish(track, model, is_main)
    if teacher is not None:
        teacher.to(accelerator.device)
        probe = teacher(torch.from_numpy(dataset.get_images(np.arange(1))).to(accelerator.device))[1]
        if cfg.repa_coef > 0 and probe.shape[1] != model.num_patches:
            raise ConfigError(f"REPA: the teacher gives {probe.shape[1]} patch tokens, {cfg.model} has "
                              f"{model.num_patches}; choose a patch size that matches")
    kernel_backend = set_kernels(model, cfg.kernels, accelerator.device, compiled=cfg.compile,
                                 autocast_dtype=torch.bfloat16 if accelerator.mixed_precision == "bf16" else None)
    if cfg.kernels == "triton" and kernel_backend == "torch" and is_main:
        print("[train] --kernels triton: this model has nothing the kernels fuse (no RoPE, QK-norm or "
              "RMSNorm outside torch.compile); it runs, and logs, the torch path", flush=True)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    n_params = count_parameters(model)
    cap = track.get("parameter_cap")
    if cap and n_params > cap:
        raise ConfigError(f"{cfg.model} has {n_params} parameters, over the track's cap of {cap}")
    optimizer = make_optimizer(cfg, model, accelerator.device)

    # device_train_seconds: train time x processes, summed over the legs (a run resumed on another
    # number of GPUs used each count for its own part of the time: the record's GPU-hours)
    start_step, train_seconds, device_train_seconds = 0, 0.0, 0.0
    if resume_path:
        state = load_checkpoint(resume_path, model, ema, optimizer)
        start_step, train_seconds = state["step"], state["extra"].get("train_seconds", 0.0)
        device_train_seconds = state["extra"].get(
            "device_train_seconds", train_seconds * state["extra"].get("world_size", world))
    model = compile_for_training(cfg, model)
    if teacher is not None:
        teacher = compile_for_training(cfg, teacher)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    # this rank's slice of every global batch from start_step on; its thread starts at the first batch
    loader = ShardLoader(None, track["dataset"]["train_split"], cfg.global_batch, cfg.seed,
                         rank=accelerator.process_index, world_size=world, start_step=start_step,
                         with_images=teacher is not None, end_step=cfg.iterations,
                         pin_memory=accelerator.device.type == "cuda", dataset=dataset)
    if resume_path:  # the checkpoint's data position must be its step's in this dataset and order
        try:
            loader.load_state_dict({**state["extra"].get("data_position", {}), "step": start_step})
        except LoaderStateError as e:
            raise ConfigError(f"cannot resume {resume_path}: {e}") from None

    env = environment_report(accelerator) | {"kernels": kernel_backend}
    if not (resume_path and log.path.exists()):
        log.start(source, env, cfg, track, n_params)
    if resume_path:
        log.line(f"resumed from {resume_path} at step {start_step}")
    elif cfg.resume == "auto":  # a mistyped --run_name must not pass for a resume
        log.line(f"--resume auto: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        if is_main:
            print(f"[train] --resume auto: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0",
                  flush=True)
    # what this leg ran on and with which data, as records.validate reads them back
    log.line(f"environment: {json.dumps(env, sort_keys=True)}")
    log.line(f"data_manifest_sha256: {data_manifest}")
    if is_main:
        print(f"[train] track {track['name']}: {cfg.model} ({n_params / 1e6:.2f}M parameters), "
              f"{cfg.iterations} iterations x global batch {cfg.global_batch} on {world} x {accelerator.device}; "
              f"run dir {run_dir}", flush=True)

    tracker = start_wandb(cfg, run_dir) if is_main else None
    stop_requested = {"signal": None}
    def request_stop(signum, _frame):
        stop_requested["signal"] = signum
    previous_handler = signal.signal(signal.SIGTERM, request_stop)

    def checkpoint(step: int) -> None:
        if is_main:
            path = run_dir / "checkpoints" / f"step_{step:08d}.safetensors"
            data_position = loader.state_dict()  # step, epoch, index_in_epoch + what the order depends on
            assert data_position["step"] == step, (data_position, step)
            save_checkpoint(path, unwrap(model), ema, optimizer, step, cfg,
                            {"data_position": data_position, "world_size": world,
                             "train_seconds": train_seconds, "device_train_seconds": device_train_seconds,
                             "data_manifest_sha256": data_manifest,
                             "code_sha256": code})
            for old in list_checkpoints(run_dir)[:-cfg.keep_checkpoints]:
                if old != path:  # never the one just written
                    old.unlink()
            # a process killed mid-write (SIGKILL, a node lost) leaves its temporary file, as large
            # as a checkpoint; only this process writes here, and its own is renamed by now
            for stale in path.parent.glob(".step_*.safetensors.*.tmp"):
                stale.unlink(missing_ok=True)
                log.line(f"removed {stale.name}: a checkpoint a killed process did not finish writing")
        accelerator.wait_for_everyone()

    stepper = Stepper(cfg, accelerator, model, teacher, optimizer, ema, loader,
                      noise_source(cfg, track, unwrap(model)), track["dataset"]["num_classes"])

    model.train()
    window_start, window_step = time.perf_counter(), start_step
    run_start = window_start
    bar = tqdm(total=cfg.iterations, initial=start_step, disable=not is_main, desc="train",
               dynamic_ncols=True, mininterval=1.0)
    step = start_step
    try:
        while step < cfg.iterations:
            t0 = time.perf_counter()
            loss_value, grad_norm = stepper.forward_backward(step)
            if not math.isfinite(loss_value) or not math.isfinite(float(grad_norm)):
                raise NonFiniteLoss(f"non-finite loss {loss_value} / grad norm {float(grad_norm)} at step "
                                    f"{step}; parameters were not updated; last good checkpoint: "
                                    f"{(list_checkpoints(run_dir) or [resume_path or 'none'])[-1]}")
            stepper.update()
            step += 1
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            device_train_seconds += seconds * world
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.iterations:
                now = time.perf_counter()
                its = (step - window_step) / max(now - window_start, 1e-9)
                window_start, window_step = now, step
                line = (f"step:{step}/{cfg.iterations} loss:{loss_value:.4f} grad_norm:{float(grad_norm):.3f} "
                        f"it/s:{its:.2f} img/s:{its * cfg.global_batch:.1f} train_time:{train_seconds:.1f}s "
                        f"elapsed:{now - run_start:.1f}s")
                log.line(line)
                if tracker:
                    tracker.log({"loss": loss_value, "grad_norm": float(grad_norm), "it_per_s": its,
                                 "images_per_s": its * cfg.global_batch}, step=step)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if is_main:
                    tqdm.write(line)
            if step % cfg.ckpt_every == 0 and step < cfg.iterations:
                checkpoint(step)
            signum = stop_signal_received(stop_requested["signal"] or 0, accelerator)
            if signum:
                checkpoint(step)
                log.line(f"stopped by signal {signum} (received by at least one rank) at step {step}; "
                         "checkpoint saved")
                raise SystemExit(f"stopped by signal at step {step}; resume with --resume auto "
                                 f"--run_name {cfg.run_name}")
    finally:
        bar.close()
        loader.close()  # stops the prefetch thread (end of training, error or signal)
        stepper.noise_for.close()
        signal.signal(signal.SIGTERM, previous_handler)
        if tracker:
            tracker.finish()

    checkpoint(step)
    log.line(f"training done: {step} iterations, train_time:{train_seconds:.1f}s")
    summary = {"run_dir": str(run_dir), "step": step, "train_seconds": train_seconds,
               "device_train_seconds": device_train_seconds,
               "data_manifest_sha256": data_manifest,
               "parameters": n_params, "environment": env, "code_hash": code}
    if is_main:
        export_model(run_dir / "model.safetensors", ema, cfg, track)
    accelerator.wait_for_everyone()
    summary |= finish_run(cfg, track, run_dir, ema, accelerator, log, summary)
    return summary


def stop_signal_received(signum: int, accelerator) -> int:
    """The signal any rank received (0: none), on every rank: all ranks stop at the same step, and
    rank 0's log names the signal whichever rank got it."""
    if accelerator.num_processes == 1:
        return signum
    local = torch.tensor([signum], device=accelerator.device)
    return int(accelerator.gather(local).max().item())


def start_wandb(cfg: Config, run_dir: Path):
    """Optional Weights & Biases logging; offline (files under the run dir) unless asked."""
    if cfg.wandb == "off":
        return None
    if cfg.wandb not in ("offline", "online"):
        raise ConfigError(f"--wandb must be off, offline or online, not {cfg.wandb!r}")
    import wandb
    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project="diffusion-speedrun", name=cfg.run_name, mode=cfg.wandb, dir=str(run_dir),
                      config=dataclasses.asdict(cfg))


def check_same_run(extra: dict, path: Path, data_manifest: str, code: str, write_record: bool) -> None:
    """A resumed run continues on the data and code its checkpoint was trained with: each leg's log
    names only its own, and a record must describe the whole run. (Checkpoints written before
    these fields existed are not checked.)"""
    before = extra.get("data_manifest_sha256")
    if before and before != data_manifest:
        raise ConfigError(f"cannot resume {path}: it was trained on data with manifest sha256 {before}, this "
                          f"run's data has {data_manifest}")
    before = extra.get("code_sha256")
    if before and before != code and write_record:
        raise ConfigError(f"cannot resume {path} with a record at the end: train.py changed since it was "
                          f"written (code sha256 {before}, now {code}), so no one code trained the whole run; "
                          "restore that train.py, or continue with --write_record false")


def _resolve_resume(cfg: Config, run_dir: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    return Path(cfg.resume)


# =============================================================================================
# End of a run: samples with the track's protocol, metrics, record, leaderboard
# =============================================================================================
def evaluation_sample_files(track: dict, out_dir: Path) -> list[tuple[int, Path]]:
    """(seed, samples file) of every evaluation seed of the track's protocol, named as the record's
    artefacts: samples.npz for the first seed, samples_seed<k>.npz for the others (the grid,
    grid.png, shows the first)."""
    from records.record import artefact_file_name, seed_samples_key
    protocol = track["evaluation"]
    seeds = protocol.get("eval_seeds", [protocol["seed"]])
    return [(seed, out_dir / artefact_file_name("samples" if k == 0 else seed_samples_key(seed)))
            for k, seed in enumerate(seeds)]


def sample_evaluation_seeds(model: nn.Module, track: dict, out_dir: Path, accelerator=None,
                            batch_size: int = 1000) -> float:
    """Every evaluation seed's samples (evaluation_sample_files) and the first seed's grid, sharded
    over the accelerator's processes; returns the seconds it took."""
    import generate
    from records.record import artefact_file_name
    t0 = time.perf_counter()
    for k, (seed, path) in enumerate(evaluation_sample_files(track, out_dir)):
        generate.generate_to_npz(model, track, dict(track["evaluation"], seed=seed), path,
                                 grid_path=out_dir / artefact_file_name("grid") if k == 0 else None,
                                 accelerator=accelerator, batch_size=batch_size)
    return time.perf_counter() - t0


def score_evaluation_seeds(track: dict, out_dir: Path) -> dict:
    """The evaluation output of the samples sample_evaluation_seeds wrote: every seed's metrics
    ("runs"), their mean and sample standard deviation, and what scored them ("provenance": the
    reference batch's and the networks' sha256)."""
    from evaluations.evaluate import score_samples
    runs, provenance = [], None
    for seed, path in evaluation_sample_files(track, out_dir):
        metrics, provenance = score_samples(path, track)  # the same networks and reference every seed
        runs.append({"seed": seed, "metrics": metrics})
    names = sorted(runs[0]["metrics"])
    values = {m: np.array([r["metrics"][m] for r in runs], dtype=np.float64) for m in names}
    return {"protocol": track["evaluation"], "runs": runs,
            "mean": {m: float(v.mean()) for m, v in values.items()},
            "std": {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()},
            "provenance": provenance}


def score_model(model: nn.Module, track: dict, out_dir: Path, accelerator=None) -> tuple[dict, float, float]:
    """The track's evaluation protocol over its evaluation seeds: samples on every process, then
    the metrics on rank 0. Returns (score_evaluation_seeds' output | {} on other ranks, sampling
    seconds, scoring seconds)."""
    sample_seconds = sample_evaluation_seeds(model, track, out_dir, accelerator)
    if accelerator is not None and not accelerator.is_main_process:
        return {}, sample_seconds, 0.0
    t0 = time.perf_counter()
    evaluation = score_evaluation_seeds(track, out_dir)
    return evaluation, sample_seconds, time.perf_counter() - t0


def finish_run(cfg: Config, track: dict, run_dir: Path, ema: nn.Module, accelerator, log: RunLog,
               summary: dict) -> dict:
    evaluation, sample_seconds, eval_seconds = score_model(ema, track, run_dir, accelerator)
    out = {"sample_seconds": sample_seconds, "eval_seconds": eval_seconds}
    log.line(f"evaluation done: sample_seconds:{sample_seconds:.2f} eval_seconds:{eval_seconds:.2f}")
    if accelerator.is_main_process:
        metrics = evaluation["mean"]
        out |= {"metrics": metrics, "evaluation": evaluation}
        text = json.dumps(evaluation, indent=2, sort_keys=True) + "\n"
        atomic_write(run_dir / "metrics.json", lambda tmp: Path(tmp).write_text(text))
        log.line("metrics: " + json.dumps(metrics, sort_keys=True))
        print(f"[train] metrics (mean over {len(evaluation['runs'])} evaluation seeds): " +
              ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        official = (cfg.iterations, cfg.global_batch) == (track["budget"]["iterations"],
                                                         track["budget"]["global_batch"])
        pinned = track["dataset"].get("manifest_sha256")
        earlier = cfg.write_record and official and record_of_run(log.path)
        unlike = cfg.write_record and official and differs_from_definition(track, Path(cfg.records_dir))
        if cfg.write_record and official and pinned and summary["data_manifest_sha256"] != pinned:
            print(f"[train] not a track run: the data in {cfg.data_dir} is not the track's (manifest sha256 "
                  f"{summary['data_manifest_sha256']}, the track pins {pinned}): no record", flush=True)
        elif earlier:
            print(f"[train] this run's record was written before ({earlier}): no second record", flush=True)
        elif unlike:
            print(f"[train] not a track run: {cfg.track} differs from the definition of track "
                  f"{track['name']!r} ({unlike}): no record", flush=True)
        elif cfg.write_record and official:
            from records.record import write_record
            from records.leaderboard import render_leaderboard
            record_dir = write_record(cfg, track, run_dir, summary | out)
            out["record_dir"] = str(record_dir)
            log.line(f"record written: {record_dir}")  # after the record's copy of the log was taken
            try:
                render_leaderboard(Path(cfg.records_dir), Path(cfg.leaderboard))
                print(f"[train] record written to {record_dir}; {cfg.leaderboard} re-rendered", flush=True)
            except Exception as e:  # the record is safe; the page can be re-rendered later
                print(f"[train] record written to {record_dir}; {cfg.leaderboard} NOT re-rendered "
                      f"({type(e).__name__}: {e}); run python -m records.leaderboard", flush=True)
        elif cfg.write_record:
            print(f"[train] not a track run ({cfg.iterations} x {cfg.global_batch} differs from the track "
                  f"budget {track['budget']['iterations']} x {track['budget']['global_batch']}): no record",
                  flush=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return out


def record_of_run(log_path: Path) -> Path | None:
    """The record an earlier leg of this run wrote (a finished run resumed again), if it still exists."""
    if not log_path.exists():
        return None
    text = log_path.read_text()
    for folder in reversed(re.findall(r"^record written: (.*)$", text[len(code_from_log(text)):], re.M)):
        if (Path(folder) / "record.json").is_file():
            return Path(folder)
    return None


def differs_from_definition(track: dict, records_dir: Path) -> str:
    """What a track file given by path changes in the definition of the track it names, which
    records.validate will judge its record by ('' when nothing, or when no definition exists):
    a copy of digits.json with a smaller budget must not write a digits record."""
    from records.leaderboard import tracks_dir_of
    path = tracks_dir_of(records_dir) / f"{track['name']}.json"
    if not path.is_file():
        return ""
    definition = json.loads(path.read_text())
    ignored = {"train_defaults"}  # how the record was trained is in its config; the rules are the rest
    keys = sorted(k for k in set(track) | set(definition)
                  if k not in ignored and _without_dir(track.get(k), k) != _without_dir(definition.get(k), k))
    return f"{path}: {', '.join(keys)} differ" if keys else ""


def _without_dir(value, key: str):
    return {k: v for k, v in value.items() if k != "dir"} if key == "dataset" and isinstance(value, dict) else value


def main(argv: list[str] | None = None) -> int:
    from evaluations.imagenet import leave_process_group
    from preprocessing.shards import ShardFormatError
    try:
        train(parse_config(argv))
    except (NonFiniteLoss, ConfigError, CheckpointError, FileNotFoundError, ShardFormatError) as e:
        print(f"[train] error: {e}", file=sys.stderr)
        return 1
    finally:
        leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
