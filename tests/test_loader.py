"""ShardLoader (the trainer's data): the documented order, rank splits, exact restart, images, errors."""
from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest
import torch

from preprocessing.loader import LoaderStateError, ShardLoader, global_indices
from preprocessing.shards import ShardDataset, ShardFormatError, write_dataset
from preprocessing.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "ds"
    # 103 samples over shards of 20: batches straddle shards and epochs
    write_synthetic_dataset(root, 103, resolution=8, latent_shape=(2, 2, 2), num_classes=7, shard_size=20, seed=1)
    return root


def documented_stream(n: int, seed: int, items: int) -> np.ndarray:
    """The order as the module docstring states it, written out independently: epoch e is
    torch.randperm(n) seeded by the first 8 bytes (little endian, 63 bits) of sha256("data/{seed}/{e}"),
    and the epochs follow one another."""
    epochs = []
    for e in range(-(-items // n)):
        key = hashlib.sha256(f"data/{seed}/{e}".encode()).digest()
        seed_e = int.from_bytes(key[:8], "little") & (2**63 - 1)
        epochs.append(torch.randperm(n, generator=torch.Generator().manual_seed(seed_e)).numpy())
    return np.concatenate(epochs)[:items]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_order_is_the_documented_one(digits_dir, world_size):
    ds = ShardDataset(digits_dir, "train")
    steps, batch_size = 25, 128  # 25 * 128 > 2 epochs of 1297: batches straddle epochs
    stream = documented_stream(len(ds), 5, steps * batch_size)
    loaders = [ShardLoader(digits_dir, "train", batch_size, seed=5, rank=r, world_size=world_size, dataset=ds)
               for r in range(world_size)]
    local = batch_size // world_size
    for step in range(steps):
        expect = stream[step * batch_size : (step + 1) * batch_size]  # batch s = items [sB, (s+1)B)
        got = [next(loader) for loader in loaders]
        for r, batch in enumerate(got):  # rank r: the contiguous slice [rB/W, (r+1)B/W)
            assert batch.step == step
            assert np.array_equal(batch.indices, expect[r * local : (r + 1) * local])
            assert np.array_equal(loaders[r].rank_indices(step), batch.indices)
        assert np.array_equal(global_indices(step, len(ds), batch_size, 5), expect)
        x0 = torch.cat([b.latents for b in got])
        assert torch.equal(x0, torch.from_numpy(ds.get_latents(expect)))
        assert torch.equal(torch.cat([b.labels for b in got]), torch.from_numpy(ds.labels[expect].astype(np.int64)))
        done = (step + 1) * batch_size  # samples consumed so far
        for loader in loaders:
            assert loader.state_dict() == {"step": step + 1, "epoch": done // len(ds),
                                           "index_in_epoch": done % len(ds), "seed": 5,
                                           "global_batch": batch_size, "dataset_size": len(ds)}
    for loader in loaders:
        loader.close()
    assert (stream[:len(ds)] != np.arange(len(ds))).any()  # really shuffled
    assert not np.array_equal(stream[:len(ds)], stream[len(ds):2 * len(ds)])  # a new permutation per epoch


def test_exact_restart_from_step_and_from_state(synthetic):
    full = ShardLoader(synthetic, "train", 16, seed=3, rank=1, world_size=2, with_images=True, end_step=20)
    batches = list(full)
    assert [b.step for b in batches] == list(range(20))
    # restart at a step given by the checkpoint
    resumed = list(ShardLoader(synthetic, "train", 16, seed=3, rank=1, world_size=2, start_step=13,
                               with_images=True, end_step=20))
    for a, b in zip(batches[13:], resumed):
        assert a.step == b.step and np.array_equal(a.indices, b.indices)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
    # restart from a saved state dict (taken after 7 steps were consumed)
    loader = ShardLoader(synthetic, "train", 16, seed=3, rank=1, world_size=2, end_step=20)
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    loader.close()
    assert state["step"] == 7 and state == {**state, **loader.position(7)}
    fresh = ShardLoader(synthetic, "train", 16, seed=3, rank=1, world_size=2, end_step=20)
    fresh.load_state_dict(state)
    assert [b.step for b in fresh] == list(range(7, 20))
    step = ShardLoader.step_from_position(state["epoch"], state["index_in_epoch"], 103, 16)
    assert step == 7
    with pytest.raises(LoaderStateError, match="seed"):
        ShardLoader(synthetic, "train", 16, seed=4).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="does not match"):
        fresh.load_state_dict({**state, "index_in_epoch": 5})


def test_images_and_labels_match_the_shards(synthetic):
    ds = ShardDataset(synthetic, "train")
    loader = ShardLoader(synthetic, "train", 24, seed=0, with_images=True, prefetch=0)
    for _ in range(6):
        batch = next(loader)
        assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape) == (24, 8, 8, 3)
        assert np.array_equal(batch.images.numpy(), ds.get_images(batch.indices))
        assert np.array_equal(batch.latents.numpy(), ds.get_latents(batch.indices))
        assert np.array_equal(batch.labels.numpy(), ds.labels[batch.indices])
    # each epoch visits every sample exactly once
    n_steps = 103 * 24 // np.gcd(103, 24) // 24  # whole epochs
    seen = np.concatenate([ShardLoader(synthetic, "train", 24, seed=0, prefetch=0).load(s).indices
                           for s in range(n_steps)])
    assert np.array_equal(np.sort(seen), np.repeat(np.arange(103), 24 // np.gcd(103, 24)))


def test_a_dropped_loader_does_not_leave_its_thread_running(synthetic):
    """An unclosed loader dropped while its producer still runs: the producer's own frame then holds
    the last reference, so __del__ runs in the producer thread; it must end, not wait for itself."""
    gate = threading.Event()

    class Gated(ShardLoader):
        def load(self, step, cache=None):
            if step == 1:
                gate.wait(10)
            return super().load(step, cache)
    before = set(threading.enumerate())
    loader = Gated(synthetic, "train", 8, seed=0, end_step=2, prefetch=2)
    assert next(loader).step == 0
    [thread] = [t for t in threading.enumerate() if t not in before]
    del loader
    gate.set()  # the producer finishes step 1 and returns, dropping the last reference
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_loaders_dropped_with_a_full_queue_are_collected_and_stop(synthetic):
    """`for batch in loader: break` without close(): the producer must not keep the loader alive
    (it holds it weakly), so garbage collection stops the thread."""
    import gc
    before = set(threading.enumerate())
    for _ in range(3):
        loader = ShardLoader(synthetic, "train", 8, seed=0, prefetch=2)  # endless: the queue fills up
        next(loader)
        time.sleep(0.3)
        del loader
    gc.collect()
    deadline = time.time() + 10
    while time.time() < deadline and [t for t in threading.enumerate() if t not in before and t.is_alive()]:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t not in before and t.is_alive()]


def test_bad_arguments_and_missing_latents(synthetic, tmp_path):
    with pytest.raises(ValueError, match="multiple of world_size"):
        ShardLoader(synthetic, "train", 10, seed=0, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        ShardLoader(synthetic, "train", 8, seed=0, rank=2, world_size=2)
    root = tmp_path / "images_only"
    images = np.zeros((5, 4, 4, 3), np.uint8)
    write_dataset(root, "x", {"train": (images, np.zeros(5, np.int64))}, None, ["a"])
    with pytest.raises(ShardFormatError, match="no latents"):
        ShardLoader(root, "train", 2, seed=0)
    batch = next(ShardLoader(root, "train", 2, seed=0, with_latents=False, with_images=True))
    assert batch.latents is None and tuple(batch.images.shape) == (2, 4, 4, 3)
    with pytest.raises(ShardFormatError, match="missing file"):
        ShardLoader(tmp_path / "nowhere", "train", 2, seed=0)


def test_atomic_write_syncs_the_file_then_its_folder_after_the_rename(tmp_path, monkeypatch):
    """What makes a checkpoint or record survive a power cut: the data, then the rename."""
    import os
    import stat

    from preprocessing.shards import atomic_write
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        synced.append(("folder" if stat.S_ISDIR(mode) else "file", (tmp_path / "f.bin").exists()))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(tmp_path / "f.bin", lambda tmp: tmp.write_bytes(b"x"))
    assert synced == [("file", False), ("folder", True)]
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
