"""ShardLoader: the trainer's exact order (train.StepSampler), rank splits, exact restart, images, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import train
from preprocessing.loader import LoaderStateError, ShardLoader
from preprocessing.shards import ShardDataset, ShardFormatError, write_dataset
from preprocessing.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "ds"
    # 103 samples over shards of 20: batches straddle shards and epochs
    write_synthetic_dataset(root, 103, resolution=8, latent_shape=(2, 2, 2), num_classes=7, shard_size=20, seed=1)
    return root


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_same_order_as_train_step_sampler(digits_dir, world_size):
    ds = ShardDataset(digits_dir, "train")
    sampler = train.StepSampler(len(ds), 128, seed=5)
    loaders = [ShardLoader(digits_dir, "train", 128, seed=5, rank=r, world_size=world_size, dataset=ds)
               for r in range(world_size)]
    local = 128 // world_size
    for step in range(25):  # 25 * 128 > 2 epochs of 1297
        expect = sampler.global_indices(step)
        got = [next(loader) for loader in loaders]
        for r, batch in enumerate(got):
            assert batch.step == step
            assert np.array_equal(batch.indices, expect[r * local : (r + 1) * local])
        x0 = torch.cat([b.latents for b in got])
        assert torch.equal(x0, torch.from_numpy(ds.get_latents(expect)))
        assert torch.equal(torch.cat([b.labels for b in got]), torch.from_numpy(ds.labels[expect].astype(np.int64)))
        assert loaders[0].state_dict()["epoch"] == sampler.position(step + 1)["epoch"]
        assert loaders[0].state_dict()["index_in_epoch"] == sampler.position(step + 1)["index_in_epoch"]
    for loader in loaders:
        loader.close()


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
