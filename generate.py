"""Sampling for class-conditional flow-matching models (SiT / SR-DiT linear path).

Conventions
-----------
* Interpolant: ``x_t = (1 - t) * x0 + t * eps`` with ``t`` in ``[0, 1]``;
  ``t = 1`` is pure Gaussian noise, ``t = 0`` is data.
* The model predicts the velocity ``v = dx_t/dt = eps - x0``.
* ``velocity_fn(x, t)`` takes ``x`` of shape ``[B, ...]`` and ``t`` as a float
  tensor of shape ``[B]`` (the same value for every row) and returns a tensor
  shaped like ``x``.  Classifier-free guidance, class labels etc. are closed
  over by the caller.
* Every sampler integrates from ``t = 1`` (``x1`` = noise) down to ``t = 0``.
* Samplers compute in float32, or in float64 when ``x1`` is float64, and return
  the final state in that compute dtype; a protocol's ``state_dtype`` picks it
  (:func:`state_dtype`), and the network always runs in float32.  They keep only
  the current state (no list of intermediates) and run under ``torch.no_grad()``.
* ``progress`` (optional) is called as ``progress(1)`` once per step, so a
  ``tqdm`` bar's ``update`` method can be passed directly.

The sampler section at the top holds pure functions only; model loading and
the command line live further down.
"""

import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import torch

# ---- samplers ----

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]
ProgressFn = Optional[Callable[[int], object]]


def shift_time(t, shift: float):
    """Resolution time shift ``t' = s t / (1 + (s - 1) t)``.

    Works on floats and tensors.  ``shift == 1`` is the identity; ``s > 1``
    moves every interior time towards 1 (more steps spent at high noise).
    The endpoints 0 and 1 are fixed points.  Inverse:
    ``t = t' / (s - (s - 1) t')``.
    """
    shift = float(shift)
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def time_shift_for_shape(latent_shape: Sequence[int], base: float = 4096.0) -> float:
    """SR-DiT shift for a latent of shape ``(C, H, W)``: ``sqrt(C*H*W / base)``, base 4096.

    A 4x32x32 latent (SD-VAE at 256px) gives 1.0 (no shift); INVAE's 32x16x16 gives sqrt(2).
    """
    shape = tuple(int(d) for d in latent_shape)
    if len(shape) != 3:
        raise ValueError(f"latent_shape must be (C, H, W), got {shape}")
    c, h, w = shape
    return math.sqrt(c * h * w / float(base))


def ode_time_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``linspace(1, 0, num_steps + 1)`` time-shifted; float64, decreasing."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    t = shift_time(t, shift)
    # Pin the endpoints exactly (the shift maps them to themselves up to rounding).
    t[0] = 1.0
    t[-1] = 0.0
    return t


def sde_time_grid(num_steps: int, shift: float = 1.0, t_last: float = 0.04) -> torch.Tensor:
    """SR-DiT SDE grid: ``linspace(1, t_last, num_steps)`` then a final ``0``.

    ``num_steps + 1`` points, ``num_steps`` intervals; the shift is applied to
    every point (0 and 1 are fixed), so the penultimate point is
    ``shift_time(t_last, shift)``.  float64, decreasing.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < t_last < 1.0:
        raise ValueError(f"t_last must be in (0, 1), got {t_last}")
    head = torch.linspace(1.0, float(t_last), num_steps, dtype=torch.float64)
    t = torch.cat([head, torch.zeros(1, dtype=torch.float64)])
    t = shift_time(t, shift)
    t[0] = 1.0
    t[-1] = 0.0
    return t


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _t_batch(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def _velocity(velocity_fn: VelocityFn, x: torch.Tensor, t: float) -> torch.Tensor:
    v = velocity_fn(x, _t_batch(t, x))
    if v.shape != x.shape:
        raise ValueError(f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(x.shape)}")
    return v.to(x.dtype)


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
    """Score ``grad log p_t(x)`` from the velocity, for the linear path.

    With ``x = (1 - t) x0 + t eps``: ``E[eps | x] = (1 - t) v + x`` and the
    score is ``-E[eps | x] / t``.  Undefined at ``t = 0``.
    """
    return -((1.0 - t) * v + x) / t


def sde_drift(v: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
    """Reverse-time SDE drift ``v - 0.5 w(t) s`` with ``w(t) = 2t``.

    Equals ``v - t * score = (2 - t) v + x`` (no 1/t singularity).
    """
    return v - t * score_from_velocity(v, x, t)


@torch.no_grad()
def euler_ode(
    velocity_fn: VelocityFn,
    x1: torch.Tensor,
    num_steps: int,
    shift: float = 1.0,
    progress: ProgressFn = None,
) -> torch.Tensor:
    """Explicit Euler on the probability-flow ODE ``dx/dt = v``; NFE = num_steps."""
    ts = ode_time_grid(num_steps, shift).tolist()
    x = x1.to(_compute_dtype(x1))
    for i in range(num_steps):
        t, t_next = ts[i], ts[i + 1]
        x = x + (t_next - t) * _velocity(velocity_fn, x, t)
        if progress is not None:
            progress(1)
    return x


@torch.no_grad()
def heun_ode(
    velocity_fn: VelocityFn,
    x1: torch.Tensor,
    num_steps: int,
    shift: float = 1.0,
    progress: ProgressFn = None,
) -> torch.Tensor:
    """Heun's method (explicit trapezoid, 2nd order) on ``dx/dt = v``.

    On every interval ``[t, t_next]`` with ``dt = t_next - t``:
    predictor ``x_p = x + dt * v(x, t)`` (an Euler step), corrector
    ``x_next = x + dt * (v(x, t) + v(x_p, t_next)) / 2``.  The corrector is
    applied on the last interval too (evaluating the model at ``t = 0``),
    so NFE = 2 * num_steps.  Global error is O(1 / num_steps^2).
    """
    ts = ode_time_grid(num_steps, shift).tolist()
    x = x1.to(_compute_dtype(x1))
    for i in range(num_steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = _velocity(velocity_fn, x, t)
        x_pred = x + dt * v
        v_pred = _velocity(velocity_fn, x_pred, t_next)
        x = x + (0.5 * dt) * (v + v_pred)
        del v, v_pred, x_pred
        if progress is not None:
            progress(1)
    return x


@torch.no_grad()
def euler_maruyama_sde(
    velocity_fn: VelocityFn,
    x1: torch.Tensor,
    num_steps: int,
    noise_fn: NoiseFn,
    shift: float = 1.0,
    t_last: float = 0.04,
    progress: ProgressFn = None,
) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE with diffusion ``w(t) = 2t``.

    ``dx = [v - 0.5 w(t) s(x, t)] dt + sqrt(w(t)) dW``, integrated from 1 down
    to 0 on :func:`sde_time_grid`, with the score ``s`` from
    :func:`score_from_velocity`.  For every interval but the last:
    ``x_next = x + d dt + sqrt(w(t) |dt|) z`` with ``z = noise_fn(i)`` (i is
    the step index 0 .. num_steps - 2; a standard-normal tensor shaped like
    ``x`` that the caller derives from (seed, sample index) only).  The last
    interval ``shift(t_last) -> 0`` is a deterministic "mean" step
    ``x + d dt``.  NFE = num_steps; ``noise_fn`` is called num_steps - 1 times.
    """
    ts = sde_time_grid(num_steps, shift, t_last).tolist()
    x = x1.to(_compute_dtype(x1))
    for i in range(num_steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = _velocity(velocity_fn, x, t)
        x_mean = x + dt * sde_drift(v, x, t)
        del v
        if i < num_steps - 1:
            z = noise_fn(i)
            if z.shape != x.shape:
                raise ValueError(f"noise_fn returned shape {tuple(z.shape)}, expected {tuple(x.shape)}")
            x = x_mean + math.sqrt(2.0 * t * abs(dt)) * z.to(device=x.device, dtype=x.dtype)
            del z
        else:
            x = x_mean
        del x_mean
        if progress is not None:
            progress(1)
    return x


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A sampler and how it is called / counted."""

    name: str
    fn: Callable[..., torch.Tensor]
    evals_per_step: int  # model evaluations per step (NFE = evals_per_step * num_steps)
    stochastic: bool  # True: fn also takes noise_fn (and t_last)


SAMPLERS = {
    "euler": SamplerSpec("euler", euler_ode, 1, False),
    "heun": SamplerSpec("heun", heun_ode, 2, False),
    "euler_maruyama": SamplerSpec("euler_maruyama", euler_maruyama_sde, 1, True),
}


def nfe(sampler: Union[str, SamplerSpec], num_steps: int) -> int:
    """Number of velocity evaluations (per sample batch, before CFG doubling)."""
    spec = SAMPLERS[sampler] if isinstance(sampler, str) else sampler
    return spec.evals_per_step * int(num_steps)


# ---- generation: labels, noise, guidance, sharding, files ----
# Sample i's label and every random number it uses depend on (seed, i) only, never on the
# number of processes or the batch size, so any sharding reproduces the same samples.

import hashlib
import json
import sys
from pathlib import Path

import numpy as np


STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def state_dtype(protocol: dict) -> torch.dtype:
    """The dtype the sampler integrates the state (and combines guidance) in: protocol['state_dtype'],
    default float32. REPA's and SR-DiT's SDE samplers keep it in float64 and call the network in
    float32 (SR-DiT samplers.py @ c24c2ff), so the ImageNet tracks name float64."""
    name = protocol.get("state_dtype", "float32")
    if name not in STATE_DTYPES:
        raise ValueError(f"unknown state_dtype {name!r} in the protocol: expected one of {sorted(STATE_DTYPES)}")
    return STATE_DTYPES[name]


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of sample `index` under `seed`. Torch's CPU generator (MT19937) keeps 32
    bits of the seed, so two keys share a stream with probability 2^-32: about 3 pairs among the
    3 x 50K samples of an ImageNet evaluation, no measurable effect on a metric."""
    key = hashlib.sha256(f"sample/{seed}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def sample_labels(indices: Sequence[int], num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """balanced: label = global index mod classes (exactly N/classes each when N divides);
    random: uniform, drawn from a stream keyed by (seed, index)."""
    idx = torch.as_tensor(list(indices), dtype=torch.int64)
    if mode == "balanced":
        return idx % num_classes
    if mode == "random":
        key = lambda i: hashlib.sha256(f"label/{seed}/{i}".encode()).digest()  # noqa: E731
        return torch.tensor([int.from_bytes(key(int(i))[:8], "little") % num_classes for i in idx])
    raise ValueError(f"unknown label mode {mode!r}: expected 'balanced' or 'random'")


# the interval is inclusive; grid times arrive rounded to float32 (float32(0.6) > 0.6)
GRID_TIME_TOLERANCE = 1e-6


def guided_velocity(model: torch.nn.Module, y: torch.Tensor, num_classes: int, latent_shape: Sequence[int],
                    scale: float = 1.0, interval: Sequence[float] = (0.0, 1.0), cls_scale: Optional[float] = None,
                    path_drop_guidance: bool = False, reg_dim: int = 0) -> VelocityFn:
    """The velocity of the packed state z = [latent (flattened), REG class token (reg_dim)].

    Classifier-free guidance v_u + w (v_c - v_u) with w = `scale` on the latent and `cls_scale`
    (default: scale) on the class token, as SR-DiT's samplers define them: guidance applies when
    scale > 1 and t is in [low, high] (the guidance interval), otherwise the conditional velocity
    alone; a class-token scale of 0 leaves the class token conditional (unguided). Each network
    evaluation is gated by its own t, so a Heun step across a bound mixes a guided and an unguided
    velocity (REPA's Heun gates both by the step's start). The unconditional branch uses the null
    label, and with `path_drop_guidance` also SPRINT's path drop (SR-DiT's path-drop guidance)."""
    from train import Routing

    low, high = interval
    if low > high:
        raise ValueError(f"guidance interval [{low}, {high}] is empty (low > high): guidance would never apply")
    opts = getattr(model, "opts", None)
    if path_drop_guidance and not (opts is not None and opts.sprint):
        raise ValueError("path-drop guidance needs a model trained with SPRINT (this one has no sparse path "
                         "to drop)")
    if cls_scale is not None and cls_scale != scale and not reg_dim:
        raise ValueError("a class-token guidance scale needs a model trained with REG (this one has no "
                         "class token)")
    # SR-DiT and REPA guide only above 1: refuse what they would silently ignore
    if scale < 1:
        raise ValueError(f"guidance scale {scale} is below 1: 1 is no guidance, above 1 guides")
    if cls_scale is not None and cls_scale < 0:
        raise ValueError(f"class-token guidance scale {cls_scale} is negative (0: the class token unguided)")
    if scale == 1 and cls_scale not in (None, 0, 1):
        raise ValueError(f"class-token guidance scale {cls_scale} without guidance of the latent "
                         "(guidance scale 1): SR-DiT guides the class token only alongside the latent")
    low, high = low - GRID_TIME_TOLERANCE, high + GRID_TIME_TOLERANCE
    cls_scale = scale if cls_scale is None else cls_scale
    null = torch.full_like(y, num_classes)
    n = math.prod(latent_shape)

    def call(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, path_drop: bool) -> torch.Tensor:
        z, t = z.float(), t.float()  # the network runs in float32 whatever the state's dtype
        x = z[:, :n].reshape(-1, *latent_shape)
        out = model(x, t, labels, cls_t=z[:, n:] if reg_dim else None, routing=Routing(path_drop=path_drop))
        parts = [out["v"].flatten(1)] + ([out["cls_v"]] if reg_dim else [])
        return torch.cat(parts, dim=1)

    weights = torch.cat([torch.full((n,), float(scale)), torch.full((reg_dim,), float(cls_scale))])

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0 or not (low <= float(t[0]) <= high):
            return call(z, t, y, False).to(z.dtype)
        if path_drop_guidance:
            cond, uncond = call(z, t, y, False), call(z, t, null, True)
        else:
            cond, uncond = call(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, null]), False).chunk(2)
        cond, uncond = cond.to(z.dtype), uncond.to(z.dtype)  # guidance combined in the state's dtype
        guided = uncond + weights.to(z.device, z.dtype) * (cond - uncond)
        return guided if cls_scale else torch.cat([guided[:, :n], cond[:, n:]], dim=1)
    return velocity


@torch.no_grad()
def sample_latents(model: torch.nn.Module, indices: Sequence[int], latent_shape: Sequence[int],
                   num_classes: int, protocol: dict, device: Union[str, torch.device] = "cpu",
                   progress: ProgressFn = None, prefetch_noise: Optional[bool] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples the given global indices in one batch; returns (latents fp32 CPU, labels).
    With REG the class-token latent is integrated jointly and then discarded; the time grid is
    shifted when the model was trained with a time shift. The SDE's per-step noise is drawn on a
    worker thread one step ahead (prefetch_noise; default: on CUDA devices, where the CPU is
    otherwise idle while the model runs: ~30 ms per step for 1000 samples of 32x16x16 latents on a
    2-core CPU, 7 s of a 250-step batch); the same numbers either way."""
    opts = getattr(model, "opts", None)
    reg_dim = opts.reg_dim if opts is not None else 0
    shift_base = opts.time_shift_base if opts is not None else 0.0
    spec = SAMPLERS[protocol["sampler"]]
    seed = int(protocol["seed"])
    dim = math.prod(latent_shape) + reg_dim
    gens = [sample_generator(seed, int(i)) for i in indices]
    # drawn in float32 whatever the state's dtype, so a float64 state starts from the same numbers
    z1 = torch.stack([torch.randn(dim, generator=g) for g in gens]).to(device, state_dtype(protocol))
    y = sample_labels(indices, num_classes, protocol.get("labels", "balanced"), seed).to(device)
    velocity = guided_velocity(model, y, num_classes, latent_shape, float(protocol.get("guidance_scale", 1.0)),
                               protocol.get("guidance_interval", (0.0, 1.0)), protocol.get("cls_guidance_scale"),
                               bool(protocol.get("path_drop_guidance", False)), reg_dim)
    shift = time_shift_for_shape(latent_shape, shift_base) if shift_base > 0 else 1.0
    kwargs = dict(num_steps=int(protocol["num_steps"]), shift=shift, progress=progress)
    prefetch = None
    if spec.stochastic:
        def draw(_step: int) -> torch.Tensor:  # each sample's stream, step after step
            return torch.stack([torch.randn(dim, generator=g) for g in gens])
        if torch.device(device).type == "cuda" if prefetch_noise is None else prefetch_noise:
            from train import NoisePrefetch  # the next step's draws on the CPU while the GPU works
            prefetch = NoisePrefetch(draw)

        def noise(step: int) -> torch.Tensor:
            return (prefetch or draw)(step).to(device)
        kwargs.update(noise_fn=noise, t_last=float(protocol.get("t_last", 0.04)))
    try:
        z = spec.fn(velocity, z1, **kwargs).float().cpu()
    finally:
        if prefetch is not None:
            prefetch.close()
    return z[:, :math.prod(latent_shape)].reshape(-1, *latent_shape), y.cpu()


def shard_indices(num_samples: int, rank: int, world_size: int) -> range:
    """Contiguous block of global indices owned by `rank`."""
    per = -(-num_samples // world_size)
    return range(min(rank * per, num_samples), min((rank + 1) * per, num_samples))


def grid_pixels(images: np.ndarray, columns: int = 10, upscale: int = 1) -> np.ndarray:
    """uint8 NHWC images -> one grid image (row-major, 1 px gaps), nearest-neighbour upscaled:
    HxW for one channel, HxWxC otherwise (what the PNG holds)."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
    canvas = canvas.repeat(upscale, 0).repeat(upscale, 1)
    return canvas[..., 0] if c == 1 else canvas


GRID_SAMPLES = 100
GRID_CLASS_COLUMNS = 20  # up to this many classes, balanced labels get one column per class


def protocol_grid(images: np.ndarray, track: dict, protocol: dict) -> np.ndarray:
    """The grid a run shows of its samples: the first 100 in 10 columns, upscaled to at least 64 px
    per image; with balanced labels and few classes one class per column (with ImageNet's 1000 the
    first 100 samples are 100 classes: one row of 1000 columns would be 90% empty)."""
    data = track["dataset"]
    by_class = protocol.get("labels") == "balanced" and data["num_classes"] <= GRID_CLASS_COLUMNS
    return grid_pixels(images[:GRID_SAMPLES], columns=data["num_classes"] if by_class else 10,
                       upscale=max(1, 64 // data["resolution"]))


def write_samples_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """ADM sample-batch format: arr_0 uint8 NHWC images, arr_1 int64 labels; written atomically."""
    from preprocessing.shards import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, arr_0=images, arr_1=labels)
    atomic_write(Path(path), write)


def generate_to_npz(model: torch.nn.Module, track: dict, protocol: dict, out_path: Path,
                    grid_path: Optional[Path] = None, accelerator=None, batch_size: int = 1000) -> Path:
    """Samples protocol['num_samples'] images sharded over the accelerator's processes.
    Each rank writes its block to a part file beside out_path; rank 0 merges them in index order."""
    from tqdm import tqdm

    from preprocessing.encoders import latent_decoder

    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    device = accelerator.device if accelerator else next(model.parameters()).device
    data = track["dataset"]
    encoder = latent_decoder(data["encoder"], getattr(model, "autoencoder_sha256", None))
    num = int(protocol["num_samples"])
    mine = shard_indices(num, rank, world)
    out_path = Path(out_path)
    part = out_path.with_name(f".{out_path.stem}.part{rank:05d}.npz")
    model.eval()
    images, labels = [], []
    total_steps = -(-len(mine) // batch_size) * int(protocol["num_steps"])
    with tqdm(total=total_steps, disable=rank != 0, desc=f"sample ({protocol['sampler']})",
              dynamic_ncols=True, mininterval=1.0) as bar:
        for start in range(mine.start, mine.stop, batch_size):
            block = range(start, min(start + batch_size, mine.stop))
            latents, y = sample_latents(model, block, data["latent_shape"], data["num_classes"],
                                        protocol, device, bar.update)
            images.append(encoder.decode(latents).numpy())
            labels.append(y.numpy())
    shape = (0, data["resolution"], data["resolution"], data["channels"])
    write_samples_npz(part, np.concatenate(images) if images else np.zeros(shape, np.uint8),
                      np.concatenate(labels) if labels else np.zeros(0, np.int64))
    if accelerator:
        accelerator.wait_for_everyone()
    if rank == 0:
        parts = [out_path.with_name(f".{out_path.stem}.part{r:05d}.npz") for r in range(world)]
        part_labels = []
        for p in parts:
            with np.load(p) as f:
                part_labels.append(f["arr_1"])
        all_labels = np.concatenate(part_labels)
        # filled part by part: one copy of the batch in memory (50K images at 512 px are 39 GB)
        all_images, start = np.empty((len(all_labels),) + shape[1:], np.uint8), 0
        for p in parts:
            with np.load(p) as f:
                block = f["arr_0"]
            all_images[start:start + len(block)] = block
            start += len(block)
            del block
        try:
            write_samples_npz(out_path, all_images, all_labels)
        finally:  # written or not, the parts are not an output
            for p in parts:
                p.unlink(missing_ok=True)
        if grid_path is not None:
            from PIL import Image

            from preprocessing.shards import atomic_write
            grid = Image.fromarray(protocol_grid(all_images, track, protocol))
            atomic_write(Path(grid_path), lambda tmp: grid.save(tmp, format=_image_format(Path(grid_path))))
    if accelerator:
        accelerator.wait_for_everyone()
    return out_path


def to_sampling_device(model: torch.nn.Module) -> torch.device:
    """Puts an exported model where one process samples it (eval.sh, the ablation ladder): the
    GPU when there is one, with train.py's TF32, on the torch path (--kernels auto)."""
    from train import _on_gpu, set_kernels, use_tf32
    device = torch.device("cuda" if _on_gpu() else "cpu")
    if device.type == "cuda":
        use_tf32()  # the arithmetic train.py samples a record with
    model.to(device)
    set_kernels(model, "auto", device)
    return device


def _image_format(path: Path) -> str:
    """PIL's format for a file name's extension (ValueError naming the file when it has none PIL knows)."""
    from PIL import Image
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"grid {path}: {path.suffix or 'no extension'} is not an image format (use .png)")
    return fmt


def check_model_fits_track(meta: dict, track: dict) -> None:
    """A model samples a track only with the latent shape and classes it was trained on (else it
    fails deep in its forward, or samples labels it has no embedding for)."""
    from train import track_model_shape
    wanted = track_model_shape(track)
    differ = [f"{k} {meta.get(k)} (the track's: {v})" for k, v in wanted.items() if int(meta.get(k, -1)) != v]
    if differ:
        raise ValueError(f"the model was trained for other data than track {track['name']!r}: {', '.join(differ)}")


def main(argv: Optional[list] = None) -> int:
    import argparse

    from train import (Config, ConfigError, _on_gpu, _str2bool, evaluation_sample_files, load_model, load_track,
                       process_state, sample_evaluation_seeds, set_kernels, use_tf32)

    parser = argparse.ArgumentParser(description="Sample an exported model with a track's protocol "
                                     "(flags override single protocol fields) into an ADM .npz")
    parser.add_argument("model", help="exported model file (model.safetensors of a run or record)")
    parser.add_argument("--track", default=None, help="track name or JSON path (default: the model's)")
    parser.add_argument("--out", default=None, help="the .npz to write (default: samples.npz)")
    parser.add_argument("--grid", default=None, help="PNG grid of the first 100 samples")
    parser.add_argument("--eval_dir", default=None,
                        help="instead of --out/--grid/--seed: every evaluation seed of the protocol into this "
                             "folder, named as a record's artefacts (samples.npz, samples_seed<k>.npz, grid.png), "
                             "as train.py samples at the end of a run and eval.sh regenerates a record")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    parser.add_argument("--num_steps", type=int, default=None)
    parser.add_argument("--num_samples", type=int, default=None)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=None,
                        help="apply guidance only for t in [low, high]")
    parser.add_argument("--cls_guidance_scale", type=float, default=None,
                        help="guidance scale of the REG class token (default: --guidance_scale; 0: unguided)")
    parser.add_argument("--path_drop_guidance", type=_str2bool, default=None,
                        help="SPRINT path drop in the unconditional branch (true/false)")
    parser.add_argument("--labels", choices=["balanced", "random"], default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--state_dtype", choices=sorted(STATE_DTYPES), default=None,
                        help="dtype the sampler integrates in (the network runs in float32)")
    parser.add_argument("--batch_size", type=int, default=1000)
    parser.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                        help="triton: the fused kernels of kernels/; torch: SDPA and plain ops; auto: torch, "
                             "the faster path as measured (train.set_kernels)")
    args = parser.parse_args(argv)
    from accelerate import Accelerator

    process_state(Config())  # the process group with train.py's collective timeout: rank 0 merges alone
    accelerator = Accelerator(cpu=not _on_gpu())
    if accelerator.device.type == "cuda":
        use_tf32()  # as train.py samples at the end of a run
    try:
        model, meta = load_model(Path(args.model))
    except (FileNotFoundError, ValueError) as e:
        print(f"[generate] error: {e}", file=sys.stderr)
        return 1
    try:
        track = load_track(args.track or meta["track"])
    except (FileNotFoundError, ConfigError) as e:
        hint = "" if args.track else (f"; the model was trained on track {meta['track']!r}: pass --track "
                                      "with that track's name or JSON file")
        print(f"[generate] error: {e}{hint}", file=sys.stderr)
        return 1
    protocol = dict(track["evaluation"])
    for key in ("sampler", "num_steps", "num_samples", "guidance_scale", "guidance_interval", "cls_guidance_scale",
                "path_drop_guidance", "labels", "seed", "state_dtype"):
        if getattr(args, key) is not None:
            protocol[key] = getattr(args, key)
    if args.eval_dir is None:
        protocol.pop("eval_seeds", None)  # one batch, of protocol["seed"]
    try:  # before any sampling: what cannot be written or run
        from preprocessing.shards import check_output_file
        if args.eval_dir is not None:
            given = [f"--{k}" for k in ("out", "grid", "seed") if getattr(args, k) is not None]
            if given:
                raise ValueError(f"--eval_dir samples the protocol's evaluation seeds into its own file names; "
                                 f"drop {', '.join(given)}")
            eval_files = evaluation_sample_files({"evaluation": protocol}, Path(args.eval_dir))
            for _, path in eval_files:
                check_output_file(path)
            from records.record import artefact_file_name
            check_output_file(Path(args.eval_dir) / artefact_file_name("grid"))
        else:
            args.out = args.out or "samples.npz"
            check_output_file(args.out)
            if args.grid:
                _image_format(check_output_file(args.grid))
        check_model_fits_track(meta, track)
    except ValueError as e:
        print(f"[generate] error: {e}", file=sys.stderr)
        return 1
    model.to(accelerator.device)
    from evaluations.imagenet import leave_process_group
    try:
        set_kernels(model, args.kernels, accelerator.device)  # ConfigError: a ValueError
        if args.eval_dir is not None:
            sample_evaluation_seeds(model, dict(track, evaluation=protocol), Path(args.eval_dir), accelerator,
                                    args.batch_size)
        else:
            generate_to_npz(model, track, protocol, Path(args.out), args.grid and Path(args.grid),
                            accelerator, args.batch_size)
    except ValueError as e:  # kernels or a protocol this model cannot be run with
        print(f"[generate] error: {e}", file=sys.stderr)
        return 1
    finally:
        leave_process_group()
    if accelerator.is_main_process:
        wrote = args.out if args.eval_dir is None else \
            f"{args.eval_dir}/ (evaluation seeds {[seed for seed, _ in eval_files]})"
        print(f"[generate] wrote {wrote} ({protocol['num_samples']} samples, {protocol['sampler']} "
              f"{protocol['num_steps']} steps, NFE/sample {nfe(protocol['sampler'], protocol['num_steps'])}"
              f"{' x2 with guidance' if protocol.get('guidance_scale', 1.0) != 1.0 else ''}); "
              f"protocol: {json.dumps(protocol, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
