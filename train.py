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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


ROOT = Path(__file__).resolve().parent
TRACKS_DIR = ROOT / "records" / "tracks"
CHECKPOINT_FORMAT = "speedrun-ckpt-v1"
MODEL_FORMAT = "speedrun-model-v1"


# =============================================================================================
# Config
# =============================================================================================
class ConfigError(ValueError):
    """A bad flag, track file or resume request."""


class CheckpointError(ValueError):
    """A checkpoint or model file that is corrupt, truncated or of the wrong kind."""


@dataclass
class Config:
    # track: a name under records/tracks/ or a path to a track JSON file
    track: str = "digits"
    data_dir: str = ""                 # empty: the track's dataset directory
    # model
    model: str = "SiT-S/2"             # SiT-{S,B,L,XL}/{1,2,4} or a small preset, see MODEL_ZOO
    class_dropout: float = 0.1         # label dropout, enables classifier-free guidance
    # optimisation
    iterations: int = 0                # 0: the track's budget
    global_batch: int = 0              # 0: the track's budget
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    mixed_precision: str = "auto"      # auto (bf16 on GPU, fp32 on CPU) | no | bf16
    # bookkeeping
    run_name: str = ""                 # empty: <date>_<model>_<seed>
    runs_dir: str = "runs"
    records_dir: str = "records"
    leaderboard: str = "LEADERBOARD.md"
    log_every: int = 50
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    resume: str = ""                   # a checkpoint path, or "auto" (latest in the run dir)
    description: str = "baseline SiT"
    contributors: str = ""
    write_record: bool = True
    wandb: str = "off"                 # off | offline | online


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
    return spec


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags override the track's train_defaults, which override Config's defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        kind = {"bool": _str2bool}.get(f.type, {"int": int, "float": float}.get(f.type, str))
        parser.add_argument(f"--{f.name}", type=kind, default=None, help=f"default: {f.default!r}")
    args = vars(parser.parse_args(argv))
    track = load_track(args["track"] or Config.track)
    values = dataclasses.asdict(Config())
    values.update(track["train_defaults"])
    values.update({k: v for k, v in args.items() if v is not None})
    unknown = set(values) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ConfigError(f"track {track['name']!r} train_defaults has unknown fields {sorted(unknown)}")
    cfg = Config(**values)
    cfg.iterations = cfg.iterations or track["budget"]["iterations"]
    cfg.global_batch = cfg.global_batch or track["budget"]["global_batch"]
    cfg.data_dir = cfg.data_dir or track["dataset"]["dir"]
    parse_model_name(cfg.model)
    return cfg


def _str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


# =============================================================================================
# Model: SiT with adaLN-Zero (Peebles & Xie 2023; Ma et al. 2024)
# =============================================================================================
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


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t -> MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float().unsqueeze(1) * freqs.unsqueeze(0)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1))


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class SiT(nn.Module):
    """Scalable interpolant transformer predicting the velocity of the linear path.

    forward(x [B,C,H,W], t [B] in [0,1] with t=1 noise, y [B] in 0..num_classes where the
    value num_classes is the null label used for guidance) -> v [B,C,H,W].
    """

    def __init__(self, model: str, input_size: int, in_channels: int, num_classes: int):
        super().__init__()
        depth, hidden, heads, patch = parse_model_name(model)
        if input_size % patch:
            raise ConfigError(f"input size {input_size} is not divisible by patch size {patch}")
        self.model_name, self.num_classes = model, num_classes
        self.in_channels, self.patch, self.input_size = in_channels, patch, input_size
        self.grid = input_size // patch
        self.x_embedder = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden)  # last row: the null label
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, self.grid).unsqueeze(0),
                             persistent=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden, heads) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch, in_channels)
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
        # adaLN-Zero: every block starts as the identity and the output as zero
        for block in [*self.blocks, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, g, c = x.shape[0], self.patch, self.grid, self.in_channels
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: Config, track: dict) -> SiT:
    data = track["dataset"]
    channels, size, _ = data["latent_shape"]
    return SiT(cfg.model, input_size=size, in_channels=channels, num_classes=data["num_classes"])


# =============================================================================================
# Loss: linear flow matching with velocity prediction
# =============================================================================================
def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """Randomness of a training step depends on (seed, step) only: resume- and rank-count-proof."""
    key = hashlib.sha256(f"train/{seed}/{step}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def draw_step_noise(gen: torch.Generator, global_batch: int, sample_shape: tuple,
                    class_dropout: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t ~ U(0,1), eps ~ N(0,I) and the label-dropout mask for the GLOBAL batch, on CPU; every
    rank draws the same numbers and takes its slice, so training does not depend on the rank count."""
    t = torch.rand(global_batch, generator=gen, dtype=torch.float64).float()
    eps = torch.randn((global_batch, *sample_shape), generator=gen)
    drop = torch.rand(global_batch, generator=gen) < class_dropout
    return t, eps, drop


def flow_matching_inputs(x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                         drop: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """Linear path x_t = (1-t) x0 + t eps, velocity target eps - x0, dropped labels -> null class."""
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - tb) * x0 + tb * eps
    return x_t, torch.where(drop, torch.full_like(y, num_classes), y), eps - x0


# =============================================================================================
# Data: the global batch at step s is items [s*B, (s+1)*B) of an endless stream of per-epoch
# permutations seeded by (seed, epoch); rank r takes its contiguous slice of that batch.
# =============================================================================================
class StepSampler:
    def __init__(self, dataset_size: int, global_batch: int, seed: int):
        self.n, self.batch, self.seed = dataset_size, global_batch, seed
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            key = hashlib.sha256(f"data/{self.seed}/{epoch}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm

    def global_indices(self, step: int) -> np.ndarray:
        positions = np.arange(step * self.batch, (step + 1) * self.batch)
        out = np.empty(self.batch, dtype=np.int64)
        for epoch in np.unique(positions // self.n):
            mask = positions // self.n == epoch
            out[mask] = self.permutation(int(epoch)).numpy()[positions[mask] % self.n]
        return out

    def position(self, step: int) -> dict:
        return {"epoch": step * self.batch // self.n, "index_in_epoch": step * self.batch % self.n}


# =============================================================================================
# Checkpoints: safetensors, written atomically (temporary file + fsync + rename)
# =============================================================================================
def atomic_write(path: Path, write_fn) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_fn(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, cfg: Config, extra: dict) -> None:
    from safetensors.torch import save_file
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
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(path: Path, expected_format: str) -> tuple[dict, dict]:
    """Loads tensors + metadata; never unpickles. Clear errors for missing/corrupt files."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises several types for truncated/corrupt headers
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (not a readable safetensors "
                         f"file): {e}") from e
    if metadata.get("format") != expected_format:
        raise CheckpointError(f"checkpoint {path} has format {metadata.get('format')!r}, "
                         f"expected {expected_format!r}")
    return tensors, metadata


def load_checkpoint(path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    tensors, metadata = read_safetensors(path, CHECKPOINT_FORMAT)
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
        if state:
            optimizer.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in state.items()}
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    return {"step": int(metadata["step"]), "config": json.loads(metadata["config"]),
            "extra": json.loads(metadata.get("extra", "{}"))}


def export_model(path: Path, ema: nn.Module, cfg: Config, track: dict) -> None:
    """The inference artefact: EMA weights + what is needed to rebuild the network."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    metadata = {"format": MODEL_FORMAT, "model": cfg.model, "config": json.dumps(dataclasses.asdict(cfg)),
                "input_size": str(ema.input_size), "in_channels": str(ema.in_channels),
                "num_classes": str(ema.num_classes), "track": track["name"]}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_model(path: Path) -> tuple[SiT, dict]:
    """Rebuilds a SiT from an exported model file (safetensors; never pickle)."""
    tensors, metadata = read_safetensors(path, MODEL_FORMAT)
    model = SiT(metadata["model"], int(metadata["input_size"]), int(metadata["in_channels"]),
                int(metadata["num_classes"]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"model file {path}: weights do not match {metadata['model']}: {e}") from e
    return model.eval(), metadata


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoints/step_*.safetensors"))


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


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    on_gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "") not in ("1", "true")
    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if on_gpu else "no")
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=precision)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def train(cfg: Config) -> dict:
    """Trains for the configured budget; at the end samples, scores and writes the record.
    Returns a summary dict (run dir, metrics, record path)."""
    import copy

    from tqdm import tqdm

    from preprocessing.shards import ShardDataset

    source = Path(__file__).read_text()  # read once: the log and the code hash describe this code
    track = load_track(cfg.track)
    accelerator = make_accelerator(cfg)
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    if cfg.global_batch % world:
        raise ConfigError(f"global batch {cfg.global_batch} is not divisible by {world} processes")
    local_batch = cfg.global_batch // world
    torch.use_deterministic_algorithms(True, warn_only=True)

    if not cfg.run_name:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        cfg.run_name = f"{stamp}_{cfg.model.replace('/', '')}_s{cfg.seed}"
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    log = RunLog(run_dir / "train.log", enabled=is_main)

    if is_main and track["dataset"].get("builder") == "digits":
        from preprocessing.digits import ensure_digits
        ensure_digits(cfg.data_dir)
    accelerator.wait_for_everyone()
    dataset = ShardDataset(cfg.data_dir, track["dataset"]["train_split"])

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, track)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    n_params = count_parameters(model)
    cap = track.get("parameter_cap")
    if cap and n_params > cap:
        raise ConfigError(f"{cfg.model} has {n_params} parameters, over the track's cap of {cap}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)

    start_step, train_seconds = 0, 0.0
    resume_path = _resolve_resume(cfg, run_dir)
    if resume_path:
        state = load_checkpoint(resume_path, model, ema, optimizer)
        start_step, train_seconds = state["step"], state["extra"].get("train_seconds", 0.0)
        prior = state["config"]
        for key in ("model", "global_batch", "seed", "iterations", "track"):
            if prior[key] != getattr(cfg, key):
                raise ConfigError(f"cannot resume {resume_path}: it was trained with {key}={prior[key]!r}, "
                                 f"this run has {getattr(cfg, key)!r}")
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    sampler = StepSampler(len(dataset), cfg.global_batch, cfg.seed)
    num_classes = track["dataset"]["num_classes"]
    latent_shape = tuple(track["dataset"]["latent_shape"])

    env = environment_report(accelerator)
    if not (resume_path and log.path.exists()):
        log.start(source, env, cfg, track, n_params)
    if resume_path:
        log.line(f"resumed from {resume_path} at step {start_step}")
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
            save_checkpoint(path, accelerator.unwrap_model(model), ema, optimizer, step, cfg,
                            {"data_position": sampler.position(step), "world_size": world,
                             "train_seconds": train_seconds})
            for old in list_checkpoints(run_dir)[:-cfg.keep_checkpoints]:
                old.unlink()
        accelerator.wait_for_everyone()

    rank_slice = slice(accelerator.process_index * local_batch, (accelerator.process_index + 1) * local_batch)
    model.train()
    window_start, window_step = time.perf_counter(), start_step
    run_start = window_start
    bar = tqdm(total=cfg.iterations, initial=start_step, disable=not is_main, desc="train",
               dynamic_ncols=True, mininterval=1.0)
    step = start_step
    try:
        while step < cfg.iterations:
            t0 = time.perf_counter()
            idx = sampler.global_indices(step)[rank_slice]  # this rank reads only its own samples
            t, eps, drop = (v[rank_slice] for v in draw_step_noise(step_generator(cfg.seed, step),
                                                                  cfg.global_batch, latent_shape, cfg.class_dropout))
            x0 = torch.from_numpy(dataset.get_latents(idx))
            y = torch.from_numpy(dataset.labels[idx].astype(np.int64))
            x_t, y_in, target = (v.to(accelerator.device) for v in
                                 flow_matching_inputs(x0, y, t, eps, drop, num_classes))
            t = t.to(accelerator.device)
            with accelerator.autocast():
                pred = model(x_t, t, y_in)
            loss = F.mse_loss(pred.float(), target)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            if not math.isfinite(loss_value) or not math.isfinite(float(grad_norm)):
                raise NonFiniteLoss(f"non-finite loss {loss_value} / grad norm {float(grad_norm)} at step "
                                    f"{step}; parameters were not updated; last good checkpoint: "
                                    f"{(list_checkpoints(run_dir) or ['none'])[-1]}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, accelerator.unwrap_model(model), cfg.ema_decay)
            step += 1
            train_seconds += time.perf_counter() - t0
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
            if stop_signal_received(stop_requested["signal"] is not None, accelerator):
                checkpoint(step)
                log.line(f"stopped by signal {stop_requested['signal']} at step {step}; checkpoint saved")
                raise SystemExit(f"stopped by signal at step {step}; resume with --resume auto "
                                 f"--run_name {cfg.run_name}")
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)
        if tracker:
            tracker.finish()

    checkpoint(step)
    log.line(f"training done: {step} iterations, train_time:{train_seconds:.1f}s")
    summary = {"run_dir": str(run_dir), "step": step, "train_seconds": train_seconds,
               "parameters": n_params, "environment": env, "code_hash": code_hash(source)}
    if is_main:
        export_model(run_dir / "model.safetensors", ema, cfg, track)
    accelerator.wait_for_everyone()
    summary |= finish_run(cfg, track, run_dir, ema, accelerator, log, summary)
    return summary


def stop_signal_received(local: bool, accelerator) -> bool:
    """True on every rank when any rank got SIGTERM, so all ranks stop at the same step."""
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([int(local)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


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
def finish_run(cfg: Config, track: dict, run_dir: Path, ema: nn.Module, accelerator, log: RunLog,
               summary: dict) -> dict:
    import generate
    from evaluations.evaluate import evaluate_samples

    protocol = track["evaluation"]
    t0 = time.perf_counter()
    samples_path = run_dir / "samples.npz"
    generate.generate_to_npz(ema, track, protocol, samples_path, grid_path=run_dir / "grid.png",
                             accelerator=accelerator)
    sample_seconds = time.perf_counter() - t0
    out = {"sample_seconds": sample_seconds}
    if accelerator.is_main_process:
        t0 = time.perf_counter()
        metrics = evaluate_samples(samples_path, track)
        out["eval_seconds"] = time.perf_counter() - t0
        out["metrics"] = metrics
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        log.line("metrics: " + json.dumps(metrics, sort_keys=True))
        print("[train] metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                               if isinstance(v, float)), flush=True)
        official = (cfg.iterations, cfg.global_batch) == (track["budget"]["iterations"],
                                                         track["budget"]["global_batch"])
        if cfg.write_record and official:
            from records.record import write_record
            from records.leaderboard import render_leaderboard
            record_dir = write_record(cfg, track, run_dir, summary | out)
            render_leaderboard(Path(cfg.records_dir), Path(cfg.leaderboard))
            out["record_dir"] = str(record_dir)
            print(f"[train] record written to {record_dir}; {cfg.leaderboard} re-rendered", flush=True)
        elif cfg.write_record:
            print(f"[train] not a track run ({cfg.iterations} x {cfg.global_batch} differs from the track "
                  f"budget {track['budget']['iterations']} x {track['budget']['global_batch']}): no record",
                  flush=True)
    accelerator.wait_for_everyone()
    return out


def main(argv: list[str] | None = None) -> int:
    from preprocessing.shards import ShardFormatError
    try:
        train(parse_config(argv))
    except (NonFiniteLoss, ConfigError, CheckpointError, FileNotFoundError, ShardFormatError) as e:
        print(f"[train] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
