"""The digits metric network: the digits track's analogue of the Inception network.

A small CNN on 8x8 grayscale digits (uint8 NHWC ``[N, 8, 8, 1]``)::

    x = image / 255 * 2 - 1                       float32 NCHW [N, 1, 8, 8]
    conv3x3(1 -> 32)  + ReLU                      [N, 32, 8, 8]
    conv3x3(32 -> 48) + ReLU, maxpool 2           [N, 48, 4, 4]
    conv3x3(48 -> 64) + ReLU                      [N, 64, 4, 4] -> "spatial" [N, 16, 64]
    global average pool                           "pool"   [N, 64]
    linear(64 -> 10)                              "logits" [N, 10]

"spatial" is flattened in (H, W) order with channels last.  "pool" feeds the
FID / precision / recall / kernel distance metrics, "logits" the
Inception-Score-style score.

The committed weights (``evaluations/digits_net.safetensors``) are trained on
the digits TRAIN split only -- the held-out split is the metric reference and
is never trained on -- by a deterministic script::

    python -m evaluations.digits_net train --data data/digits --out evaluations/digits_net.safetensors

``load_digits_net()`` checks the file against ``DIGITS_NET_SHA256`` before use.
Retraining on another machine (other CPU kernels) may give different bits;
the committed file, not a retrained one, defines the metric.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ARCH_VERSION = "digits_net-v1"
NUM_CLASSES = 10
RESOLUTION = 8
CHANNELS = 1
POOL_DIM = 64
SPATIAL_POSITIONS = 16

DEFAULT_WEIGHTS_PATH = Path(__file__).resolve().with_name("digits_net.safetensors")
# The committed weights file: produced by the train command below with the
# default recipe (seed 0, 30 epochs); 493 / 500 held-out images correct.
DIGITS_NET_SHA256 = "062db5925731823868f783ad8dc7e39ea025727c2e99b802b62f4e29c990bee6"
DIGITS_NET_HELDOUT_ACCURACY = 0.986

# Training recipe of the committed weights.
TRAIN_SEED = 0
TRAIN_EPOCHS = 30
TRAIN_BATCH_SIZE = 64
TRAIN_LR = 2e-3
TRAIN_WEIGHT_DECAY = 0.0
METADATA_KEY = "digits_net"

PathLike = Union[str, Path]

__all__ = [
    "ARCH_VERSION", "DEFAULT_WEIGHTS_PATH", "DIGITS_NET_SHA256", "DIGITS_NET_HELDOUT_ACCURACY",
    "DigitsNet", "preprocess", "load_digits_net", "read_metadata", "train_digits_net",
    "evaluate_accuracy", "save_digits_net", "main",
]


def preprocess(images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 NHWC ``[N, 8, 8, 1]`` -> float32 NCHW in [-1, 1]: ``image / 255 * 2 - 1``."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images of rank 4, got shape {tuple(x.shape)}")
    return (x.to(torch.float32) / 255.0 * 2.0 - 1.0).permute(0, 3, 1, 2).contiguous()


class DigitsNet(nn.Module):
    """See the module docstring.  ``forward`` takes preprocessed float32 NCHW input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(CHANNELS, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 48, 3, padding=1)
        self.conv3 = nn.Conv2d(48, POOL_DIM, 3, padding=1)
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))  # [N, 64, 4, 4]
        spatial = h.flatten(2).transpose(1, 2)  # [N, 16, 64], (H, W) order, channels last
        pool = h.mean(dim=(2, 3))
        logits = self.fc(pool)
        return {"pool": pool, "logits": logits, "spatial": spatial}


# --------------------------------------------------------------------------- weights I/O


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    return _sha256_bytes(Path(path).read_bytes())


def _recreate_hint(path: Path) -> str:
    return (
        "re-create it with `python -m evaluations.digits_net train --data data/digits "
        f"--out {path}` (a retrained file only matches DIGITS_NET_SHA256 on a machine that "
        "reproduces the committed bits; otherwise restore the committed file)"
    )


def save_digits_net(model: DigitsNet, path: PathLike, metadata: Dict[str, object]) -> str:
    """Save weights (safetensors) with ``metadata``; returns the file's sha256.

    All metadata goes into one JSON string under ``__metadata__["digits_net"]``
    so the header is byte-deterministic (safetensors does not order several keys).
    """
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {"architecture": ARCH_VERSION, **{k: metadata[k] for k in metadata}}
    payload = save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    from preprocessing.shards import atomic_write
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))
    return _sha256_bytes(payload)


def _read_weights_bytes(path: Path, expected_sha256: Optional[str]) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"digits net weights not found: {path}; {_recreate_hint(path)}")
    data = path.read_bytes()
    if expected_sha256 is not None:
        actual = _sha256_bytes(data)
        if actual != expected_sha256:
            raise ValueError(
                f"digits net weights {path} failed verification: sha256 {actual} != expected "
                f"{expected_sha256} (file corrupt or not the committed weights); "
                f"{_recreate_hint(path)}"
            )
    return data


def read_metadata(path: PathLike = DEFAULT_WEIGHTS_PATH) -> Dict[str, object]:
    """The training metadata stored in a weights file (no verification)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path}: no {METADATA_KEY!r} metadata; not a digits net weights file")
    return json.loads(raw)


def load_digits_net(
    path: PathLike = DEFAULT_WEIGHTS_PATH,
    verify: bool = True,
    device: Union[str, torch.device] = "cpu",
    expected_sha256: Optional[str] = None,
) -> DigitsNet:
    """Load the metric network (safetensors only, never pickle) in eval mode.

    ``verify=True`` checks the file's sha256 against ``expected_sha256``
    (default ``DIGITS_NET_SHA256``) and raises ``ValueError`` naming the file
    and both hashes on mismatch.  A missing file raises ``FileNotFoundError``
    saying how to re-create it.
    """
    from safetensors.torch import load

    path = Path(path)
    data = _read_weights_bytes(path, (expected_sha256 or DIGITS_NET_SHA256) if verify else None)
    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"digits net weights {path}: not a valid safetensors file ({exc})") from None
    # Architecture check from the header.
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = json.loads((header.get("__metadata__") or {}).get(METADATA_KEY, "{}"))
    if meta.get("architecture") != ARCH_VERSION:
        raise ValueError(
            f"digits net weights {path}: architecture {meta.get('architecture')!r}, "
            f"expected {ARCH_VERSION!r}"
        )
    model = DigitsNet()
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


# --------------------------------------------------------------------------- training


def _load_split(data_dir: PathLike, split: str, verify: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    from preprocessing.shards import ShardDataset

    ds = ShardDataset(data_dir, split, verify=verify)
    return ds.get_images(np.arange(len(ds))), np.array(ds.labels)


@torch.no_grad()
def evaluate_accuracy(model: DigitsNet, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(preprocess(images[start : start + batch_size]))["logits"]
        correct += int((logits.argmax(1).numpy() == labels[start : start + batch_size]).sum())
    return correct / len(images)


def train_digits_net(
    data_dir: PathLike,
    epochs: int = TRAIN_EPOCHS,
    seed: int = TRAIN_SEED,
    batch_size: int = TRAIN_BATCH_SIZE,
    lr: float = TRAIN_LR,
    verbose: bool = False,
) -> Tuple[DigitsNet, Dict[str, object]]:
    """Train DigitsNet deterministically on the TRAIN split of the digits dataset at ``data_dir``.

    Returns ``(model in eval mode, info)``; ``info`` holds the held-out accuracy
    and the recipe.  Sets ``torch.use_deterministic_algorithms(True)`` and one
    intra-op thread for the duration of the call (restored afterwards).
    """
    train_x, train_y = _load_split(data_dir, "train")
    held_x, held_y = _load_split(data_dir, "heldout")

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = DigitsNet()
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=TRAIN_WEIGHT_DECAY)
        steps_per_epoch = (len(train_x) + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
        )
        gen = torch.Generator().manual_seed(seed)
        x_all = preprocess(train_x)
        y_all = torch.from_numpy(train_y.astype(np.int64))
        t0 = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x_all), generator=gen)
            total = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(model(x_all[idx])["logits"], y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            if verbose:
                print(f"epoch {epoch + 1:3d}/{epochs}  train loss {total / len(x_all):.4f}", flush=True)
        model.eval()
        heldout_acc = evaluate_accuracy(model, held_x, held_y)
        train_acc = evaluate_accuracy(model, train_x, train_y)
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
    info: Dict[str, object] = {
        "heldout_accuracy": heldout_acc,
        "train_accuracy": train_acc,
        "train_seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": "adam+onecycle",
        "train_split": "train",
        "train_count": int(len(train_x)),
        "heldout_count": int(len(held_x)),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "data_manifest_sha256": _file_sha256(Path(data_dir) / "manifest.json"),
    }
    return model, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluations.digits_net")
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the digits metric network (train split only)")
    tr.add_argument("--data", default="data/digits", help="digits dataset dir (built if missing)")
    tr.add_argument("--out", default=str(Path("evaluations") / "digits_net.safetensors"))
    tr.add_argument("--epochs", type=int, default=TRAIN_EPOCHS)
    tr.add_argument("--seed", type=int, default=TRAIN_SEED)
    ev = sub.add_parser("eval", help="held-out accuracy of a weights file")
    ev.add_argument("--data", default="data/digits")
    ev.add_argument("--weights", default=str(DEFAULT_WEIGHTS_PATH))
    ev.add_argument("--no-verify", action="store_true")
    args = parser.parse_args(argv)

    from preprocessing.digits import ensure_digits

    ensure_digits(args.data, verbose=True)
    if args.cmd == "train":
        model, info = train_digits_net(args.data, epochs=args.epochs, seed=args.seed, verbose=True)
        train_seconds = info.pop("train_seconds")
        sha = save_digits_net(model, args.out, info)
        size = Path(args.out).stat().st_size
        print(f"trained in {train_seconds:.1f}s")
        print(f"train accuracy   {info['train_accuracy']:.4f}")
        print(f"held-out accuracy {info['heldout_accuracy']:.4f}")
        print(f"wrote {args.out} ({size} bytes) sha256 {sha}")
    else:
        model = load_digits_net(args.weights, verify=not args.no_verify)
        held_x, held_y = _load_split(args.data, "heldout")
        print(f"held-out accuracy {evaluate_accuracy(model, held_x, held_y):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
