"""The trainer's data loader: memory-mapped shards, deterministic order, exact restart.

Order (``train.py`` reads its training data through this loader, so this is the
trainer's one definition of it):

* the data is a stream of epochs; epoch ``e`` is the permutation
  ``torch.randperm(N, generator=torch.Generator().manual_seed(k))`` with
  ``k = int.from_bytes(sha256(f"data/{seed}/{e}")[:8], "little") & (2**63 - 1)``;
* the global batch of step ``s`` is items ``[s*B, (s+1)*B)`` of that stream
  (a batch may straddle two epochs);
* rank ``r`` of ``W`` takes the contiguous slice ``[r*B/W, (r+1)*B/W)`` of it.

So the order depends on ``(seed, step)`` only -- not on the number of ranks,
not on restarts.  ``start_step`` (or :meth:`ShardLoader.load_state_dict`)
restarts at the exact sample a checkpoint left off at; the state dict holds
the step and the same ``{"epoch", "index_in_epoch"}`` position the trainer
logs, plus what the order depends on, which is checked on restore.

Batches are gathered from the memory-mapped shards (indices sorted per shard
for locality, then put back in order) by a background thread that keeps
``prefetch`` batches ready.  Each batch carries float32 latents, int64
labels and, with ``with_images=True``, the uint8 NHWC images that the
REPA/REG feature encoder needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import threading
import weakref
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import numpy as np
import torch

from preprocessing.shards import ShardDataset, ShardFormatError

PathLike = Union[str, os.PathLike]

__all__ = ["Batch", "ShardLoader", "epoch_permutation", "global_indices", "LoaderStateError"]


class LoaderStateError(ValueError):
    """A loader state dict does not match this loader (other seed, batch size or dataset)."""


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of one epoch (int64 indices into the split)."""
    key = hashlib.sha256(f"data/{seed}/{epoch}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    return torch.randperm(n, generator=gen).numpy()


def global_indices(step: int, n: int, global_batch: int, seed: int, cache: Optional[dict] = None) -> np.ndarray:
    """Dataset indices of the whole global batch of ``step``."""
    positions = np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)
    epochs = positions // n
    out = np.empty(global_batch, dtype=np.int64)
    for epoch in np.unique(epochs):
        epoch = int(epoch)
        if cache is not None:
            perm = cache.get(epoch)
            if perm is None:
                if len(cache) >= 2:
                    cache.pop(min(cache))
                perm = cache[epoch] = epoch_permutation(n, seed, epoch)
        else:
            perm = epoch_permutation(n, seed, epoch)
        mask = epochs == epoch
        out[mask] = perm[positions[mask] % n]
    return out


@dataclasses.dataclass
class Batch:
    """One step's samples for this rank."""

    step: int
    indices: np.ndarray  # dataset indices (into the split), in batch order
    labels: torch.Tensor  # int64 [b]
    latents: Optional[torch.Tensor]  # float32 [b, c, h, w]
    images: Optional[torch.Tensor]  # uint8 [b, H, W, C]


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    """Hand `item` to the consumer, unless the loader is stopped (then nobody will take it)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _produce(loader_ref, first: int, q: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: batches from `first` on into `q`, then None (or the failure)."""
    cache: Dict[int, np.ndarray] = {}
    step = first
    try:
        while not stop.is_set():
            loader = loader_ref()
            if loader is None or (loader.end_step is not None and step >= loader.end_step):
                break
            batch = loader.load(step, cache)
            del loader  # no strong reference while waiting on the queue
            _put(q, batch, stop)
            step += 1
        _put(q, None, stop)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer
        _put(q, _Failure(exc), stop)


class ShardLoader:
    """Per-step batches for one rank; iterate it (``for batch in loader``) or call ``next``.

    Args:
        root, split: the shard dataset and split.
        global_batch: samples per step over all ranks (divisible by ``world_size``).
        seed: data-order seed (the trainer's ``--seed``).
        rank, world_size: this process's slice of every global batch.
        start_step: first step to yield (0, or a checkpoint's step).
        end_step: stop before this step (``None``: never stop).
        with_latents / with_images: which arrays to read.
        prefetch: batches prepared ahead by the background thread (0: no thread).
        verify: check the sha256 of the split's files first (slow for large sets).
        pin_memory: return page-locked tensors (for fast ``.to("cuda", non_blocking=True)``).
        dataset: an already open :class:`ShardDataset` to use instead of ``root``/``split``.
    """

    def __init__(self, root: Optional[PathLike], split: str, global_batch: int, seed: int, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, with_images: bool = False, *,
                 with_latents: bool = True, end_step: Optional[int] = None, prefetch: int = 2,
                 verify: bool = False, pin_memory: bool = False, dataset: Optional[ShardDataset] = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not a positive multiple of world_size {world_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.dataset = dataset if dataset is not None else ShardDataset(root, split, verify=verify)
        if with_latents and not self.dataset.has_latents:
            raise ShardFormatError(
                f"{self.dataset.root}: split {self.dataset.split!r} has no latents; run "
                f"`python -m preprocessing encode {self.dataset.root}` (or pass with_latents=False)"
            )
        if len(self.dataset) == 0:
            raise ShardFormatError(f"{self.dataset.root}: split {self.dataset.split!r} is empty")
        self.n = len(self.dataset)
        self.global_batch, self.seed = int(global_batch), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_batch = self.global_batch // self.world_size
        self.with_images, self.with_latents = bool(with_images), bool(with_latents)
        self.end_step, self.prefetch, self.pin_memory = end_step, int(prefetch), bool(pin_memory)
        self._offsets = self.dataset.shard_offsets
        self._images = self.dataset.image_shards()
        self._latents = self.dataset.latent_shards() if self.with_latents else []
        self._labels = self.dataset.labels
        self._perm_cache: Dict[int, np.ndarray] = {}
        self._next_step = int(start_step)  # the step the consumer receives next
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ order

    def position(self, step: int) -> Dict[str, int]:
        """``{"epoch", "index_in_epoch"}`` of the first sample of ``step`` (as the trainer logs it)."""
        return {"epoch": step * self.global_batch // self.n, "index_in_epoch": step * self.global_batch % self.n}

    def rank_indices(self, step: int, cache: Optional[dict] = None) -> np.ndarray:
        """This rank's dataset indices for ``step``."""
        idx = global_indices(step, self.n, self.global_batch, self.seed, cache)
        return idx[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, int]:
        """Where the loader stands: the next step it will yield, and everything the order depends on."""
        return {"step": self._next_step, **self.position(self._next_step), "seed": self.seed,
                "global_batch": self.global_batch, "dataset_size": self.n}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restart at ``state["step"]`` (checks seed, batch size, dataset size and position agree)."""
        for key, mine in (("seed", self.seed), ("global_batch", self.global_batch), ("dataset_size", self.n)):
            if key in state and int(state[key]) != mine:
                raise LoaderStateError(f"loader state has {key}={state[key]}, this loader has {mine}")
        if "step" not in state:
            raise LoaderStateError(f"loader state has no 'step' (keys: {sorted(state)})")
        step = int(state["step"])
        expected = self.position(step)
        for key in ("epoch", "index_in_epoch"):
            if key in state and int(state[key]) != expected[key]:
                raise LoaderStateError(f"loader state {key}={state[key]} does not match step {step} ({expected})")
        self._shutdown()
        self._next_step = step

    @classmethod
    def step_from_position(cls, epoch: int, index_in_epoch: int, dataset_size: int, global_batch: int) -> int:
        """The step whose batch starts at ``(epoch, index_in_epoch)``."""
        pos = epoch * dataset_size + index_in_epoch
        if pos % global_batch:
            raise LoaderStateError(f"position {epoch}/{index_in_epoch} is not at a step boundary")
        return pos // global_batch

    # ------------------------------------------------------------------ reading

    def _gather(self, parts, indices: np.ndarray) -> np.ndarray:
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        first = parts[0]
        out = np.empty((len(indices),) + first.shape[1:], dtype=first.dtype)
        shard_of = np.searchsorted(self._offsets, sorted_idx, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(sorted_idx)]])
        for a, b in zip(starts, ends):
            s = shard_of[a]
            out[order[a:b]] = parts[s][sorted_idx[a:b] - self._offsets[s]]
        return out

    def load(self, step: int, cache: Optional[dict] = None) -> Batch:
        """Read the batch of ``step`` synchronously (no prefetch, no state change)."""
        idx = self.rank_indices(step, cache)
        labels = torch.from_numpy(self._labels[idx].astype(np.int64))
        latents = torch.from_numpy(self._gather(self._latents, idx)) if self.with_latents else None
        images = torch.from_numpy(self._gather(self._images, idx)) if self.with_images else None
        if self.pin_memory and torch.cuda.is_available():
            labels = labels.pin_memory()
            latents = latents.pin_memory() if latents is not None else None
            images = images.pin_memory() if images is not None else None
        return Batch(step, idx, labels, latents, images)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, self.prefetch))
        # the thread holds the loader only weakly: a loader dropped without close() is collected,
        # and its __del__ stops the thread (a bound method would keep both alive forever)
        self._thread = threading.Thread(target=_produce, args=(weakref.ref(self), self._next_step, self._queue,
                                                               self._stop), name="ShardLoader", daemon=True)
        self._thread.start()

    def _shutdown(self) -> None:
        if self._thread is threading.current_thread():
            # __del__ in the producer itself: its frame held the last reference. It is ending;
            # waiting for it here would wait forever.
            self._stop.set()
        elif self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
        self._thread, self._queue = None, None

    def close(self) -> None:
        """Stop the background thread (the loader can be iterated again afterwards)."""
        self._shutdown()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.end_step is not None and self._next_step >= self.end_step:
            raise StopIteration
        if self.prefetch <= 0:
            batch = self.load(self._next_step, self._perm_cache)
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if item is None:
                self._shutdown()
                raise StopIteration
            if isinstance(item, _Failure):
                self._shutdown()
                raise item.exc
            batch = item
        assert batch.step == self._next_step
        self._next_step += 1
        return batch

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._shutdown()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return (f"ShardLoader({self.dataset.root}, split={self.dataset.split!r}, n={self.n}, "
                f"global_batch={self.global_batch}, seed={self.seed}, rank={self.rank}/{self.world_size}, "
                f"next_step={self._next_step})")
