"""INVAE: the REPA-E ImageNet autoencoder with 16x downsampling and 32 latent channels ("f16d32").

What is established (facts from the public REPA-E code, End2End-Diffusion/REPA-E,
``models/autoencoder.py``, its ``f16d32`` preset, and its README):

* an SD-VAE / latent-diffusion style KL autoencoder (``AutoencoderKL``):
  base width ``ch = 128``, channel multipliers ``(1, 1, 2, 2, 4)`` (five levels,
  four stride-2 downsamplings = 16x), 2 residual blocks per level in the
  encoder and 3 in the decoder, GroupNorm(32, eps 1e-6) + swish,
  single-head self-attention at the deepest level (the 16x16 level for a
  256 px input; the preset derives it from ``attn_resolutions=(16,)`` at the
  construction resolution 256) and in both middle blocks, no dropout, no
  time embedding;
* downsampling: zero pad right/bottom by 1, 3x3 conv stride 2; upsampling:
  nearest x2 then 3x3 conv;
* the encoder outputs ``2 * 32`` channels (mean, log-variance), followed by a
  1x1 ``quant_conv`` (64 -> 64); the decoder starts with a 1x1
  ``post_quant_conv`` (32 -> 32); log-variance is clamped to [-30, 20];
* input pixels scaled to [-1, 1];
* IN-VAE was trained from scratch on ImageNet-1K; E2E-INVAE is its REPA-E
  end-to-end-tuned version (same architecture), published on the Hugging
  Face hub (``REPA-E/invae``, ``REPA-E/e2e-invae``) as pickled PyTorch files,
  and later as a diffusers ``AutoencoderKL`` release (``REPA-E/e2e-invae-hf``).
* SR-DiT (reference/sr-dit.md) trains on INVAE latents 32x16x16 at 256 px,
  scaled by 0.3099 with no bias.  Its preprocessing (SwayStar123/SpeedrunDiT
  @ c24c2ff, ``preprocessing/encoders.py`` and ``dataset_tools.py``) loads
  ``e2e-invae-400k.pt`` from
  https://huggingface.co/REPA-E/e2e-invae/resolve/main/e2e-invae-400k.pt as a
  bare state dict, strictly, into a copy of REPA-E's f16d32 class, and stores
  ONE POSTERIOR SAMPLE per image (``encode(x).sample()``, pixels / 127.5 - 1,
  float32), drawn once from the global RNG: the ``sample`` posterior below
  (the default) reproduces that distribution with reproducible noise.

Checked against the public code: REPA-E's ``models/autoencoder.py``
(End2End-Diffusion/REPA-E @ 3ad8046; SR-DiT's ``models/invae.py`` is the same
file) builds ``VAE_F16D32`` with the same 342 tensor names and shapes as
:class:`INVAE`; its randomly initialised (and perturbed) state dict loads here
strictly, and at 256 px the posterior mean, log-variance and the decoded image
agree with REPA-E's to 8e-6 (float32 rounding; CPU, torch 2.14).

What is NOT established here (no network access while writing this):

* the published file's sha256 -- you must pass the sha256 of the file you
  downloaded (the hub's file page shows it); nothing is trusted without it;
* whether the diffusers ``-hf`` release uses the same tensor names (it does
  not: diffusers names differ) -- only the REPA-E / latent-diffusion key
  layout below is loaded; convert other layouts first.

The module names below reproduce the latent-diffusion layout, so a state dict
with keys such as ``encoder.down.0.block.0.conv1.weight``,
``encoder.mid.attn_1.q.weight``, ``decoder.up.4.attn.2.proj_out.bias``,
``quant_conv.weight`` loads with ``strict`` key and shape checking.

Checkpoints are loaded from ``.safetensors`` only, after their sha256 has
been checked.  A pickled ``.pt`` is refused; convert it once with
``python -m preprocessing invae-convert-checkpoint in.pt out.safetensors``
(which unpickles with ``torch.load(weights_only=True)``: tensors and plain
containers only, no code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from preprocessing.encoders import LatentEncoder, _check_images, exact_float32, unit_range_to_uint8
from preprocessing.shards import atomic_write, sha256_file

PathLike = Union[str, os.PathLike]

INVAE_SCALE = 0.3099
LATENT_CHANNELS = 32
DOWNSAMPLE = 16

__all__ = [
    "INVAE_SCALE", "INVAEConfig", "INVAE", "CheckpointError", "load_invae", "INVAEEncoder",
    "POSTERIORS", "posterior_noise", "convert_checkpoint", "sha256_file",
]


class CheckpointError(ValueError):
    """A checkpoint file is missing, of the wrong kind, fails its checksum, or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class INVAEConfig:
    """Architecture hyper-parameters; the defaults are the published f16d32 model."""

    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_levels: Tuple[int, ...] = (4,)  # level indices with attention (4 = the deepest, 16x16 at 256 px)
    z_channels: int = LATENT_CHANNELS
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# --------------------------------------------------------------------------- building blocks


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> conv3x3, plus a (1x1-projected) skip."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [b, hw, c]
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _run_level(level: _Level, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: INVAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, cout in enumerate(widths):
            level = _Level()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, cout, g))
                cin = cout
                if i in cfg.attn_levels:
                    level.attn.append(AttnBlock(cout, g))
            if i != len(widths) - 1:
                level.downsample = Downsample(cout)
            self.down.append(level)
        self.mid = _Mid(cin, g)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: INVAEConfig):
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin, g)
        levels = []
        for i in reversed(range(len(widths))):
            level = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, widths[i], g))
                cin = widths[i]
                if i in cfg.attn_levels:
                    level.attn.append(AttnBlock(cin, g))
            if i != 0:
                level.upsample = Upsample(cin)
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))  # up[i] is level i, as in the checkpoint
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class INVAE(nn.Module):
    """The autoencoder.  ``encode_moments`` -> (mean, logvar); ``decode`` maps unscaled latents to [-1, 1]."""

    def __init__(self, cfg: INVAEConfig = INVAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode_moments(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


# --------------------------------------------------------------------------- checkpoints


def _normalise_hex(value: str, what: str) -> str:
    value = str(value).strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise CheckpointError(f"{what}: expected a 64-digit hex sha256, got {value!r}")
    return value


def _check_sha256(path: Path, expected: str) -> str:
    expected = _normalise_hex(expected, f"{path}")
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: checksum mismatch: sha256 is {actual}, expected {expected} "
            "(a different or damaged file; download it again)"
        )
    return actual


_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def load_state_dict_checked(model: nn.Module, tensors: Dict[str, torch.Tensor], path: PathLike) -> None:
    """``model.load_state_dict(tensors)`` with every missing/unexpected/misshaped key named."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {show(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {show(unexpected)}")
        if shapes:
            problems.append(
                f"{len(shapes)} shape mismatches: "
                + ", ".join(f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:5])
            )
        raise CheckpointError(f"{path}: does not fit the INVAE architecture: " + "; ".join(problems))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=True)


def load_invae(path: PathLike, sha256: str, config: INVAEConfig = INVAEConfig(),
               device: Union[str, torch.device] = "cpu") -> INVAE:
    """Build the INVAE and load a ``.safetensors`` checkpoint after verifying its sha256."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found (REPA-E's e2e-invae checkpoint, converted "
                              "once with python -m preprocessing invae-convert-checkpoint: preprocessing/README.md)")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix != ".safetensors" or head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(
            f"{path}: only .safetensors checkpoints are loaded (pickled files can run code); convert it with "
            f"`python -m preprocessing invae-convert-checkpoint {path.name} {path.stem}.safetensors`"
        )
    _check_sha256(path, sha256)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    model = INVAE(config)
    load_state_dict_checked(model, tensors, path)
    return model.to(device).eval().requires_grad_(False)


_WRAPPER_KEYS = ("state_dict", "model", "vae", "module")
_PREFIXES = ("module.", "vae.", "model.")


def _extract_state_dict(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        tensors = dict(obj)
    elif isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _extract_state_dict(obj[key], path)
        raise CheckpointError(f"{path}: no tensor state dict found (top-level keys: {sorted(map(str, obj))[:10]})")
    else:
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    for prefix in _PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def convert_checkpoint(src: PathLike, dst: PathLike, expected_sha256: Optional[str] = None,
                       config: INVAEConfig = INVAEConfig()) -> str:
    """Pickled INVAE state dict (``.pt``) -> ``.safetensors``; returns the new file's sha256.

    Unpickles with ``torch.load(weights_only=True)`` only; checks the source's
    sha256 when given, and that the tensors fit :class:`INVAE` before writing
    (atomically).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CheckpointError(f"{src}: checkpoint file not found (the REPA-E e2e-invae .pt: preprocessing/README.md "
                              "says where it is published)")
    if expected_sha256:
        _check_sha256(src, expected_sha256)
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{src}: cannot be loaded with weights_only=True ({exc})") from None
    tensors = _extract_state_dict(obj, src)
    load_state_dict_checked(INVAE(config), tensors, src)
    from safetensors.torch import save_file

    metadata = {"format": "invae-f16d32", "source_sha256": sha256_file(src)}
    atomic_write(dst, lambda tmp: save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp),
                                            metadata=metadata))
    return sha256_file(dst)


# --------------------------------------------------------------------------- the latent encoder


def _pick_device(device: Union[str, torch.device, None]) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


POSTERIORS = ("sample", "mean")


def posterior_noise(images: np.ndarray, seed: int, shape: Tuple[int, int, int]) -> torch.Tensor:
    """Standard normal noise [n, *shape] (float32, CPU) for the posterior sample of each image, a
    function of (seed, the image's bytes) only: the same image gets the same noise whatever its
    batch, shard, split, position or device. Image i's generator is seeded with the first 8 bytes
    (little-endian, top bit cleared) of sha256(b"invae-posterior|<seed>|" + its uint8 HWC bytes)."""
    noise = torch.empty((len(images),) + tuple(shape), dtype=torch.float32)
    prefix = f"invae-posterior|{int(seed)}|".encode()
    gen = torch.Generator()
    for i, image in enumerate(images):
        digest = hashlib.sha256(prefix + np.ascontiguousarray(image).tobytes()).digest()
        gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        noise[i] = torch.randn(shape, generator=gen)
    return noise


class INVAEEncoder(LatentEncoder):
    """uint8 images -> ``0.3099 * z`` (float32, ``[n, 32, H/16, W/16]``) and back, where z is
    the posterior sample ``mean + exp(logvar / 2) * eps`` (``posterior="sample"``, the default:
    SR-DiT's preprocessing stores one posterior sample per image, drawn once) or the posterior
    mean (``posterior="mean"``). The sample's noise eps is :func:`posterior_noise` of the image
    and ``seed``, so encoding is reproducible and independent of batching and sharding (SR-DiT
    draws from the global RNG, so its exact draws cannot be reproduced; their distribution is).

    Build it from a checkpoint (``checkpoint=..., sha256=...``) or wrap an
    existing :class:`INVAE` (``model=...``, e.g. randomly initialised in tests).
    Runs on ``device`` (default: CUDA when available) in float32 with cuDNN
    autotuning and TF32 off, so a given machine gives the same latents and pixels
    run after run; only inside encode() and decode() (encoders.exact_float32),
    so the sampler around decode() keeps its own settings.
    """

    name = "invae"
    scale = INVAE_SCALE

    def __init__(self, checkpoint: Optional[PathLike] = None, sha256: Optional[str] = None, *,
                 model: Optional[INVAE] = None, config: INVAEConfig = INVAEConfig(),
                 device: Union[str, torch.device, None] = "auto", batch_size: int = 64,
                 posterior: str = "sample", seed: int = 0):
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, got {posterior!r}")
        self.posterior, self.seed = posterior, int(seed)
        self.device = _pick_device(device)
        if model is None:
            if checkpoint is None or not sha256:
                raise CheckpointError(
                    "the invae encoder needs checkpoint=<file.safetensors> and sha256=<its 64-digit sha256>"
                )
            model = load_invae(checkpoint, sha256, config, self.device)
            self.checkpoint_sha256 = _normalise_hex(sha256, str(checkpoint))
        else:
            model = model.to(self.device).eval().requires_grad_(False)
            self.checkpoint_sha256 = None
        self.model = model
        self.batch_size = int(batch_size)

    def describe(self) -> Dict[str, Any]:
        cfg = self.model.cfg
        return {"name": self.name, "scale": self.scale, "checkpoint_sha256": self.checkpoint_sha256,
                "posterior": self.posterior, "posterior_seed": self.seed if self.posterior == "sample" else None,
                "config": dataclasses.asdict(cfg)}

    def latent_shape(self, image_shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
        h, w, c = (int(v) for v in image_shape)
        f = self.model.cfg.downsample
        if c != 3 or h % f or w % f:
            raise ValueError(f"invae needs RGB images with sides divisible by {f}, got {tuple(image_shape)}")
        return (self.model.cfg.z_channels, h // f, w // f)

    @torch.inference_mode()
    @exact_float32(deterministic_convolutions=True)
    def encode(self, images):
        _check_images(images)
        as_numpy = isinstance(images, np.ndarray)
        if as_numpy:
            images = np.ascontiguousarray(images)
            x = torch.from_numpy(images if images.flags.writeable else images.copy())
        else:
            x = images
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = x[start : start + self.batch_size]
            pixels = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
            mean, logvar = self.model.encode_moments(pixels)
            z = mean
            if self.posterior == "sample":
                eps = posterior_noise(batch.cpu().numpy(), self.seed, tuple(mean.shape[1:]))
                z = mean + torch.exp(0.5 * logvar) * eps.to(mean.device)
            out.append((z * self.scale).float())
        latents = torch.cat(out) if out else torch.zeros((0,) + self.latent_shape(tuple(x.shape[1:])))
        return latents.cpu().numpy() if as_numpy else latents

    @torch.inference_mode()
    @exact_float32(deterministic_convolutions=True)
    def decode(self, latents) -> torch.Tensor:
        z = torch.from_numpy(np.asarray(latents)) if isinstance(latents, np.ndarray) else latents
        if not isinstance(z, torch.Tensor) or z.ndim != 4:
            raise ValueError(f"decode() expects NCHW latents of rank 4, got {getattr(z, 'shape', type(z))}")
        param = next(self.model.parameters())
        out = []
        for start in range(0, z.shape[0], self.batch_size):  # full-resolution activations: by batches
            pixels = self.model.decode(z[start : start + self.batch_size].to(param.device, torch.float32) / self.scale)
            out.append(unit_range_to_uint8(pixels, truncate=True).to(z.device))  # as SR-DiT stores samples
        if not out:
            f = self.model.cfg.downsample
            return torch.zeros((0, z.shape[2] * f, z.shape[3] * f, self.model.cfg.out_channels), dtype=torch.uint8,
                               device=z.device)
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"INVAEEncoder(device={self.device}, checkpoint_sha256={self.checkpoint_sha256})"



# --------------------------------------------------------------------------- CLI


def add_convert_arguments(parser) -> None:
    parser.add_argument("src", help="pickled INVAE state dict (.pt), as published")
    parser.add_argument("dst", help="output .safetensors")
    parser.add_argument("--sha256", default=None, help="expected sha256 of SRC (strongly recommended)")


def convert_main_args(args) -> int:
    if not args.sha256:
        print("warning: no --sha256 given for the source file; its integrity is not checked")
    digest = convert_checkpoint(args.src, args.dst, args.sha256)
    print(f"wrote {args.dst}\nsha256 {digest}\n(pass this to `python -m preprocessing encode --vae-sha256`)")
    return 0
