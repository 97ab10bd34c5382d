"""train.py: the model, the data order, the loss inputs, checkpoints, resume and failure paths."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from preprocessing.loader import ShardLoader
from preprocessing.synthetic import write_synthetic_dataset
from train import SiT, flow_matching_inputs, parse_config, parse_model_name

ROOT = Path(__file__).resolve().parent.parent


# ---- model --------------------------------------------------------------------------------
def test_model_names_and_errors():
    assert parse_model_name("SiT-B/1") == (12, 768, 12, 1)
    assert parse_model_name("SiT-XL/2") == (28, 1152, 16, 2)
    for bad in ("SiT-Q/2", "SiT-B/3", "DiT-B/2", "SiT-B"):
        with pytest.raises(ValueError, match="unknown model"):
            parse_model_name(bad)
    with pytest.raises(ValueError, match="not divisible"):
        SiT("SiT-Digits/4", input_size=6, in_channels=1, num_classes=10)


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_unpatchify_inverts_patch_layout(patch):
    """The final layer's token t, slot (i, j, c) must land on pixel (gy*p+i, gx*p+j) of channel c."""
    torch.manual_seed(0)
    model = SiT(f"SiT-Digits/{patch}", input_size=8, in_channels=3, num_classes=10)
    x = torch.randn(2, 3, 8, 8)
    g = 8 // patch
    tokens = torch.zeros(2, g * g, patch * patch * 3)
    for gy in range(g):
        for gx in range(g):
            for i in range(patch):
                for j in range(patch):
                    for c in range(3):
                        tokens[:, gy * g + gx, (i * patch + j) * 3 + c] = x[:, c, gy * patch + i, gx * patch + j]
    assert torch.equal(model.unpatchify(tokens), x)


def test_forward_shape_zero_init_and_gradients():
    torch.manual_seed(0)
    model = SiT("SiT-Digits/2", input_size=8, in_channels=1, num_classes=10)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])  # 10 = null label
    out = model(x, t, y)["v"]
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the network starts at v = 0
    loss = (out - x).pow(2).mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    # zero-init opens layer by layer: output layer, then the gates, then the blocks' insides
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.step()
        model.zero_grad()
        (model(x, t, y)["v"] - x).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_sincos_position_embedding_formula():
    emb = train.sincos_pos_embed_2d(8, 3)
    assert emb.shape == (9, 8)
    # token (row 1, col 2): first half encodes the row, second half the column
    omega = 1.0 / 10000 ** (np.arange(2) / 2)
    expected = np.concatenate([np.sin(1 * omega), np.cos(1 * omega), np.sin(2 * omega), np.cos(2 * omega)])
    np.testing.assert_allclose(emb[1 * 3 + 2].numpy(), expected, rtol=1e-6)


# ---- data order and loss inputs -----------------------------------------------------------
def test_data_order_epochs_are_permutations_and_resume_safe(tmp_path):
    """The trainer's data order (preprocessing.loader.ShardLoader, as train.train builds it)."""
    root = tmp_path / "ds"
    write_synthetic_dataset(root, 10, resolution=4, latent_shape=(1, 2, 2), num_classes=3, shard_size=4)

    def stream(seed, world_size=1, start_step=0, steps=5):
        loaders = [ShardLoader(root, "train", 4, seed, rank=r, world_size=world_size, start_step=start_step,
                               end_step=start_step + steps) for r in range(world_size)]
        batches = [list(loader) for loader in loaders]  # each loader's prefetch thread ends with its range
        assert all(b.step == start_step + i for rank in batches for i, b in enumerate(rank))
        return np.concatenate([np.concatenate([rank[i].indices for rank in batches]) for i in range(steps)])
    items = stream(seed=3)  # 20 items = 2 epochs
    assert sorted(items[:10]) == list(range(10)) and sorted(items[10:]) == list(range(10))
    assert not np.array_equal(items[:10], items[10:])
    np.testing.assert_array_equal(stream(seed=3, start_step=3, steps=2), items[12:20])  # a resumed run: no history
    np.testing.assert_array_equal(stream(seed=3, world_size=2), items)  # ranks split each global batch
    np.testing.assert_array_equal(stream(seed=3, world_size=4), items)
    loader = ShardLoader(root, "train", 4, 3, start_step=3)
    assert loader.position(3) == {"epoch": 1, "index_in_epoch": 2}
    assert loader.state_dict() == {"step": 3, "epoch": 1, "index_in_epoch": 2, "seed": 3, "global_batch": 4,
                                   "dataset_size": 10}
    assert not np.array_equal(stream(seed=4), items)


def test_noise_prefetch_returns_the_direct_draws_in_any_step_order():
    def draw(step):
        return train.draw_step_noise(train.step_generator(7, step), 6, (1, 4, 4), 0.1, 1.3, 8, 16, 0.75, 0.05)
    prefetch = train.NoisePrefetch(draw)
    try:
        for step in (0, 1, 2, 5, 6, 3):  # consecutive steps hit the prefetched draw; jumps (resume) do not
            got, want = prefetch(step), draw(step)
            for name in ("t", "eps", "drop", "cls_eps", "keep"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (step, name)
            assert got.path_drop == want.path_drop
    finally:
        prefetch.close()


def test_determinism_switch_keeps_new_memory_unfilled():
    before = torch.are_deterministic_algorithms_enabled()
    try:
        train.set_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory  # the NaN-fill debugging aid stays off
        train.set_determinism(False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_flow_matching_inputs_formula_and_dropout():
    x0 = torch.randn(4000, 1, 2, 2)
    y = torch.arange(4000) % 10
    noise = train.draw_step_noise(train.step_generator(0, 7), 4000, (1, 2, 2), 0.25)
    t, eps, drop = noise.t, noise.eps, noise.drop
    gen = train.step_generator(0, 7)
    t_ref = torch.rand(4000, generator=gen, dtype=torch.float64).float()
    eps_ref = torch.randn((4000, 1, 2, 2), generator=gen)
    torch.testing.assert_close(t, t_ref)
    torch.testing.assert_close(eps, eps_ref)
    assert abs(drop.float().mean().item() - 0.25) < 0.03
    x_t, y_in, target = flow_matching_inputs(x0, y, t, eps, drop, 10)
    torch.testing.assert_close(x_t, (1 - t_ref.view(-1, 1, 1, 1)) * x0 + t_ref.view(-1, 1, 1, 1) * eps_ref)
    torch.testing.assert_close(target, eps_ref - x0)
    assert torch.equal(y_in == 10, drop) and torch.equal(y_in[~drop], y[~drop])
    again = train.draw_step_noise(train.step_generator(0, 7), 4000, (1, 2, 2), 0.25)
    assert all(torch.equal(a, b) for a, b in zip((again.t, again.eps, again.drop), (t, eps, drop)))
    other_step = train.draw_step_noise(train.step_generator(0, 8), 4000, (1, 2, 2), 0.25)
    assert not torch.equal(other_step.eps, eps)
    # optional parts are drawn after the base ones: switching them on leaves t/eps/dropout unchanged
    full = train.draw_step_noise(train.step_generator(0, 7), 4000, (1, 2, 2), 0.25, reg_dim=3,
                                 sprint_tokens=16, sprint_drop_ratio=0.75, sprint_path_drop=0.5)
    assert torch.equal(full.t, t) and torch.equal(full.eps, eps) and torch.equal(full.drop, drop)
    assert full.cls_eps.shape == (4000, 3) and full.keep.shape == (4000, 4)
    assert all(sorted(set(row.tolist())) == row.tolist() for row in full.keep[:50])
    # SR-DiT's count, over every token with REG's class token (token 0) among them: int(257 * 0.25)
    routed = train.draw_step_noise(train.step_generator(0, 7), 4000, (1, 2, 2), 0.25, reg_dim=3,
                                   sprint_tokens=257, sprint_drop_ratio=0.75)
    assert routed.keep.shape == (4000, 64)
    assert abs((routed.keep == 0).any(dim=1).float().mean().item() - 64 / 257) < 0.03


# ---- config -------------------------------------------------------------------------------
def test_config_layers_defaults_track_and_flags(tiny_track):
    cfg = parse_config(["--track", str(tiny_track), "--lr", "0.02", "--write_record", "false"])
    assert cfg.lr == 0.02 and cfg.write_record is False
    assert (cfg.iterations, cfg.global_batch) == (6, 16)          # from the track's budget
    assert cfg.model == "SiT-Digits/2" and cfg.ema_decay == 0.995  # from the track's defaults
    with pytest.raises(SystemExit):
        parse_config(["--track", str(tiny_track), "--no_such_flag", "1"])
    with pytest.raises(FileNotFoundError, match="known tracks"):
        parse_config(["--track", "no_such_track"])


def test_a_track_pins_sha256_as_lowercase_hex_or_null(tmp_path):
    """Pins are compared as strings with what hashlib prints: an uppercase or short digest would
    refuse every real file, so the track itself is refused, naming the field."""
    spec = json.loads((train.TRACKS_DIR / "imagenet256_400k.json").read_text())
    for name in sorted(p.stem for p in train.TRACKS_DIR.glob("*.json")):
        train.load_track(name)  # the committed tracks: pinned lowercase, or null
    digest = hashlib.sha256(b"x").hexdigest()
    spec["dataset"]["encoder_checkpoint_sha256"] = digest
    (tmp_path / "ok.json").write_text(json.dumps(spec))
    assert train.load_track(str(tmp_path / "ok.json"))["dataset"]["encoder_checkpoint_sha256"] == digest
    for bad in (digest.upper(), digest[:63], 7):
        spec["evaluation"]["reference_sha256"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(spec))
        with pytest.raises(train.ConfigError, match=r"bad\.json: evaluation\.reference_sha256 is .* 64 lowercase hex"):
            train.load_track(str(tmp_path / "bad.json"))


def test_a_run_that_could_not_score_its_model_is_refused_before_training(tmp_path, monkeypatch):
    """The end of an ImageNet run reads the reference batch and the evaluator's weights: missing,
    they stop the run before its first step, not after its last."""
    track = train.load_track("imagenet256_100k")
    track["dataset"] |= {"dir": str(tmp_path), "encoder": "identity"}  # the decoder is tested with the INVAE
    model = SiT("SiT-Digits/2", 8, 1, 10)
    train.check_run_can_finish(track, model, is_main=False)  # only rank 0 scores
    with pytest.raises(train.ConfigError, match=r"could not sample or score .*VIRTUAL_imagenet256_labeled\.npz: "
                                                r"reference batch not found; download it from https://"):
        train.check_run_can_finish(track, model, is_main=True)
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=np.zeros((2, 256, 256, 3), np.uint8))
    monkeypatch.delenv("SPEEDRUN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(train.ConfigError, match=r"no Inception weights given .*\$SPEEDRUN_INCEPTION_WEIGHTS"):
        train.check_run_can_finish(track, model, is_main=True)


# ---- checkpoints --------------------------------------------------------------------------
def _tiny_state(seed=0):
    torch.manual_seed(seed)
    model = SiT("SiT-Digits/2", 8, 1, 10)
    ema = SiT("SiT-Digits/2", 8, 1, 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2]))["v"].pow(2).mean().backward()
    opt.step()
    return model, ema, opt


def test_checkpoint_round_trip_is_exact(tmp_path):
    model, ema, opt = _tiny_state()
    cfg = train.Config()
    path = tmp_path / "ck.safetensors"
    train.save_checkpoint(path, model, ema, opt, 5, cfg, {"data_position": {"epoch": 0}})
    rng_after_save = torch.get_rng_state()
    torch.rand(10)  # move the global RNG; loading must restore it
    model2, ema2, opt2 = _tiny_state(seed=1)
    info = train.load_checkpoint(path, model2, ema2, opt2)
    assert info["step"] == 5 and info["extra"]["data_position"] == {"epoch": 0}
    assert torch.equal(torch.get_rng_state(), rng_after_save)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_a_fresh_run_never_shares_an_earlier_runs_folder(tmp_path, run_args):
    """Pruning keeps the newest checkpoints by name: a fresh run in a folder with an earlier run's
    higher-numbered checkpoints would lose its own. A named folder with checkpoints is refused
    (unless resumed); the default name moves on to -2."""
    train.train(train.parse_config(run_args + ["--run_name", "taken", "--write_record", "false"]))
    with pytest.raises(train.ConfigError, match="holds checkpoints of an earlier run"):
        train.train(train.parse_config(run_args + ["--run_name", "taken", "--iterations", "2"]))
    # nor does a resume from another run's checkpoint (it would prune and overwrite these)
    other = train.train(train.parse_config(run_args + ["--run_name", "other", "--seed", "1", "--iterations", "3",
                                                        "--write_record", "false"]))
    taken = tmp_path / "runs" / "taken"
    before = {p: p.read_bytes() for p in taken.rglob("*") if p.is_file()}
    with pytest.raises(train.ConfigError, match=f"run folder {taken} holds checkpoints of an earlier run"):
        train.train(train.parse_config(run_args + ["--run_name", "taken", "--resume",
                                                    str(train.list_checkpoints(Path(other["run_dir"]))[-1])]))
    assert {p: p.read_bytes() for p in taken.rglob("*") if p.is_file()} == before
    cfg = train.parse_config(run_args)
    first = train.default_run_name(cfg)
    (tmp_path / "runs" / first / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / first / "checkpoints" / "step_00000006.safetensors").write_bytes(b"x")
    assert train.default_run_name(cfg) == first + "-2"
    assert train.default_run_name(train.parse_config(run_args + ["--resume", "auto"])) == first


def test_checkpoints_without_optimizer_rng_or_step_are_rejected(tmp_path):
    from safetensors.torch import save_file
    model, ema, opt = _tiny_state()
    path = tmp_path / "ck.safetensors"
    train.save_checkpoint(path, model, ema, opt, 3, train.Config(), {})
    tensors, meta = train.read_safetensors(path, train.CHECKPOINT_FORMAT)
    for name, keep, new_meta, message in (
            ("no_optim", lambda k: not k.startswith("optim."), meta, r"\(step 3\) lacks the optimizer state"),
            ("no_rng", lambda k: k != "rng.torch_cpu", meta, "lacks rng.torch_cpu"),
            ("no_step", lambda k: True, {k: v for k, v in meta.items() if k != "step"}, "lacks or garbles 'step'")):
        broken = tmp_path / f"{name}.safetensors"
        save_file({k: v for k, v in tensors.items() if keep(k)}, str(broken), metadata=new_meta)
        with pytest.raises(train.CheckpointError, match=f"{name}.safetensors.*{message}"):
            train.load_checkpoint(broken, *_tiny_state())


@pytest.mark.parametrize("flags, message", [
    (["--grad_clip", "0"], "--grad_clip must be positive"),
    (["--grad_clip", "-1"], "--grad_clip must be positive"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be at least 1"),
    (["--ckpt_every", "0"], "--ckpt_every must be at least 1"),
    (["--grad_accum", "0"], "--grad_accum must be at least 1"),
    (["--ema_decay", "1.5"], r"--ema_decay must be in \[0, 1\)"),
    (["--ema_decay", "1.0"], r"--ema_decay must be in \[0, 1\)"),  # the EMA would never move
    (["--beta2", "1.0"], r"--beta2 must be in \[0, 1\)"),
    (["--mixed_precision", "fp16"], "--mixed_precision must be one of auto, no, bf16, not 'fp16'"),
    (["--repa_coef", "0.5", "--repa_depth", "0"], "--repa_coef 0.5 needs --repa_depth of at least 1"),
    (["--cfm_coef", "-0.05"], "--cfm_coef must be at least 0"),
    (["--weight_decay", "-0.1"], "--weight_decay must be at least 0"),
    (["--sprint", "true", "--sprint_dense_in", "0"], "SPRINT needs at least one dense block"),
])
def test_values_no_run_can_use_are_refused_up_front(tiny_track, flags, message):
    with pytest.raises(train.ConfigError, match=message):
        train.parse_config(["--track", str(tiny_track)] + flags)


def test_missing_truncated_and_foreign_checkpoints_are_rejected(tmp_path):
    model, ema, opt = _tiny_state()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.load_checkpoint(tmp_path / "nope.safetensors", model, ema, opt)
    path = tmp_path / "ck.safetensors"
    train.save_checkpoint(path, model, ema, opt, 1, train.Config(), {})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated.safetensors is corrupt or truncated"):
        train.load_checkpoint(truncated, model, ema, opt)
    with pytest.raises(ValueError, match="has format"):
        train.load_model(path)  # a training checkpoint is not an exported model
    other = SiT("SiT-Digits/1", 8, 1, 10)
    with pytest.raises(ValueError, match="do not match"):
        train.load_checkpoint(path, other, other, torch.optim.AdamW(other.parameters()))


# ---- the loop: train -> checkpoint -> resume ----------------------------------------------
def _final_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(train.list_checkpoints(run_dir)[-1]))


def test_resume_matches_uninterrupted_run_bitwise(tmp_path, run_args):
    """The README's resume command (--resume auto --run_name X, no other flags) continues what was
    started, including settings that own no parameters (RoPE, the norm, time shift, CFM, lr)."""
    threads_before = set(threading.enumerate())
    settings = ["--rope", "true", "--norm", "rmsnorm", "--time_shift_base", "16", "--cfm_coef", "0.05",
                "--lr", "2e-3", "--ema_decay", "0.9"]
    full = train.parse_config(run_args + settings + ["--run_name", "full", "--write_record", "false"])
    summary = train.train(full)
    assert summary["step"] == 6
    run_dir = Path(summary["run_dir"])
    assert [p.name for p in train.list_checkpoints(run_dir)] == ["step_00000003.safetensors",
                                                                 "step_00000006.safetensors"]
    # a second run that "died" after step 3: only the step-3 checkpoint survives
    resumed_dir = tmp_path / "runs" / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(train.list_checkpoints(run_dir)[0], resumed_dir / "checkpoints")
    # ... and the step-6 checkpoint it was writing when it was killed, half written
    stale = resumed_dir / "checkpoints" / ".step_00000006.safetensors.4242.tmp"
    stale.write_bytes(train.list_checkpoints(run_dir)[1].read_bytes()[:1000])
    resumed = train.parse_config(run_args + ["--run_name", "resumed", "--resume", "auto", "--write_record", "false"])
    assert not resumed.rope  # the command line alone: the track's defaults...
    train.train(resumed)
    exported = json.loads(train.read_safetensors(resumed_dir / "model.safetensors", train.MODEL_FORMAT)[1]["config"])
    assert {k: exported[k] for k in ("rope", "norm", "time_shift_base", "cfm_coef", "lr", "ema_decay")} == {
        "rope": True, "norm": "rmsnorm", "time_shift_base": 16.0, "cfm_coef": 0.05, "lr": 2e-3,
        "ema_decay": 0.9}  # ...but the run continued with the checkpoint's
    a, b = _final_tensors(run_dir), _final_tensors(resumed_dir)
    assert a.keys() == b.keys()
    for key in a:
        if key != "rng.torch_cpu":
            assert torch.equal(a[key], b[key]), key
    log = (resumed_dir / "train.log").read_text()  # a fresh run dir gets a full log header
    assert train.code_from_log(log) == (ROOT / "train.py").read_text() and "resumed from" in log
    assert not stale.exists() and f"removed {stale.name}" in log
    assert sorted(p.name for p in (resumed_dir / "checkpoints").iterdir()) == ["step_00000003.safetensors",
                                                                               "step_00000006.safetensors"]
    meta = train.read_safetensors(train.list_checkpoints(resumed_dir)[-1], train.CHECKPOINT_FORMAT)[1]
    assert json.loads(meta["extra"])["train_seconds"] > 0
    # the loader's state at step 6 (6 x 16 samples into the 1297 digits) and no prefetch thread left
    assert json.loads(meta["extra"])["data_position"] == {"step": 6, "epoch": 0, "index_in_epoch": 96,
                                                          "seed": full.seed, "global_batch": 16,
                                                          "dataset_size": 1297}
    assert not [t for t in set(threading.enumerate()) - threads_before if t.name == "ShardLoader"]


def test_resume_refuses_a_different_budget(tmp_path, run_args):
    train.train(train.parse_config(run_args + ["--run_name", "r", "--write_record", "false"]))
    ck = train.list_checkpoints(tmp_path / "runs" / "r")[0]
    with pytest.raises(ValueError, match="global_batch"):
        train.train(train.parse_config(run_args + ["--run_name", "r2", "--resume", str(ck),
                                                    "--global_batch", "8", "--write_record", "false"]))
    # a setting that owns no parameter is refused too when the command contradicts the checkpoint
    with pytest.raises(train.ConfigError, match=r"this run sets rope=True \(checkpoint: False\)"):
        train.train(train.parse_config(run_args + ["--run_name", "r2", "--resume", str(ck), "--rope", "true"]))
    # --resume auto in a folder without checkpoints (a mistyped run name) says so
    train.train(train.parse_config(run_args + ["--run_name", "typo", "--resume", "auto", "--iterations", "1"]))
    assert "--resume auto: no checkpoint in" in (tmp_path / "runs" / "typo" / "train.log").read_text()
    # where and how it runs may change
    assert train.resumed_config(train.parse_config(run_args + ["--log_every", "1", "--grad_accum", "2"]),
                                train.read_checkpoint_metadata(ck)["config"], ck).grad_accum == 2
    # a checkpoint whose data position belongs to another dataset is refused too
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(ck), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    extra = json.loads(meta["extra"])
    extra["data_position"]["dataset_size"] = 1000
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign), metadata=meta | {"extra": json.dumps(extra)})
    with pytest.raises(train.ConfigError, match="dataset_size=1000"):
        train.train(train.parse_config(run_args + ["--run_name", "r3", "--resume", str(foreign),
                                                    "--write_record", "false"]))


def test_resume_keeps_the_runs_settings_the_command_does_not_give(tmp_path, run_args):
    """`--resume auto --run_name X` alone continues what was started: settings that may change on
    resume (grad_accum, description, write_record...) stay the checkpoint's unless given."""
    started = train.parse_config(run_args + ["--run_name", "r", "--grad_accum", "2", "--description", "mine",
                                             "--contributors", "alice", "--write_record", "false",
                                             "--log_every", "3"])
    prior = dict(vars(started))
    prior.pop("flags_given")
    ck = tmp_path / "step.safetensors"
    resumed = train.resumed_config(train.parse_config(run_args + ["--resume", "auto", "--run_name", "r"]), prior, ck)
    assert (resumed.grad_accum, resumed.description, resumed.contributors, resumed.write_record,
            resumed.log_every) == (2, "mine", "alice", False, 3)
    assert resumed.resume == "auto"
    # given flags of that kind win; the command's own resume/run name/runs dir are always its own
    resumed = train.resumed_config(train.parse_config(run_args + ["--resume", str(ck), "--run_name", "r2",
                                                                  "--grad_accum", "4"]), prior, ck)
    assert (resumed.grad_accum, resumed.resume, resumed.run_name) == (4, str(ck), "r2")


def test_a_resume_continues_on_the_same_data_and_code(tmp_path):
    extra = {"data_manifest_sha256": "a" * 64, "code_sha256": "c" * 64}
    ck = tmp_path / "step_3.safetensors"
    train.check_same_run(extra, ck, "a" * 64, "c" * 64, write_record=True)
    with pytest.raises(train.ConfigError, match=f"cannot resume {ck}: it was trained on data with manifest "
                                                f"sha256 {'a' * 64}, this run's data has {'b' * 64}"):
        train.check_same_run(extra, ck, "b" * 64, "c" * 64, write_record=False)
    with pytest.raises(train.ConfigError, match="train.py changed since it was written"):
        train.check_same_run(extra, ck, "a" * 64, "d" * 64, write_record=True)
    train.check_same_run(extra, ck, "a" * 64, "d" * 64, write_record=False)  # no record: may continue
    train.check_same_run({}, ck, "b" * 64, "d" * 64, write_record=True)  # checkpoints from before these fields


def test_a_finished_run_resumed_again_and_a_renamed_track_copy_write_no_record(tmp_path, run_args, tiny_track,
                                                                                 capsys):
    records = tmp_path / "records"
    first = train.train(train.parse_config(run_args + ["--run_name", "r"]))
    assert (Path(first["record_dir"]) / "record.json").is_file()
    meta = train.read_checkpoint_metadata(train.list_checkpoints(tmp_path / "runs" / "r")[-1])
    assert meta["extra"]["data_manifest_sha256"] == first["data_manifest_sha256"]
    assert meta["extra"]["code_sha256"] == first["code_hash"]
    again = train.train(train.parse_config(run_args + ["--run_name", "r", "--resume", "auto"]))
    assert "record_dir" not in again
    assert f"this run's record was written before ({first['record_dir']}): no second record" in capsys.readouterr().out
    assert [p.name for p in records.glob("tiny/*")] == [Path(first["record_dir"]).name]
    # a copy of the digits track under its name, with a smaller budget, is not the digits track
    fake = json.loads(tiny_track.read_text()) | {"name": "digits"}
    (tmp_path / "fake.json").write_text(json.dumps(fake))
    train.train(train.parse_config(run_args[2:] + ["--track", str(tmp_path / "fake.json"), "--run_name", "f"]))
    out = capsys.readouterr().out
    assert "differs from the definition of track 'digits'" in out and "budget" in out and "no record" in out
    assert not (records / "digits").exists()
    real = json.loads((ROOT / "records" / "tracks" / "digits.json").read_text())
    real["dataset"]["dir"] = "elsewhere"  # where the data lives is no rule
    real["train_defaults"] = {}  # nor how the record was trained
    assert train.differs_from_definition(real, records) == ""


def test_a_checkpoint_that_cannot_be_written_names_its_file_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    import safetensors.torch
    model, ema, opt = _tiny_state()
    cfg = train.Config()
    path = tmp_path / "step_00000003.safetensors"
    train.save_checkpoint(path, model, ema, opt, 3, cfg, {})
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(train.CheckpointError, match=f"could not write {path} .*No space left on device"):
        train.save_checkpoint(path, model, ema, opt, 6, cfg, {})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_train_sh_counts_only_the_gpus_cuda_may_use(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: H100 (UUID: a)'\necho 'GPU 1: H100 (UUID: b)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    for visible, count in ((None, 2), ("0", 1), ("1,0", 2), ("0,1,2,3", 2), ("", 0), ("-1", 0), ("0,-1,1", 1)):
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        env["PATH"] = f"{fake}:{env['PATH']}"
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        out = subprocess.run(["bash", "-c", "source scripts/gpus.sh && visible_gpus"], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == str(count), (visible, out)
    # no nvidia-smi on the PATH: CUDA's count, through the project's Python (here one that says 3)
    (fake / "nvidia-smi").unlink()
    (fake / "python").write_text("#!/bin/sh\necho 3\n")
    (fake / "python").chmod(0o755)
    out = subprocess.run([shutil.which("bash"), "-c", "source scripts/gpus.sh && visible_gpus"], cwd=ROOT,
                         env={"PATH": str(fake), "PY": str(fake / "python")}, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "3"


def test_run_log_starts_with_source_and_environment(tmp_path, run_args):
    summary = train.train(train.parse_config(run_args + ["--run_name", "log", "--write_record", "false"]))
    text = (Path(summary["run_dir"]) / "train.log").read_text()
    assert train.code_from_log(text) == (ROOT / "train.py").read_text()
    env = text.split(train.RunLog.SEPARATOR)[1]
    for key in ("python:", "torch:", "triton:", "device: cpu", "world_size: 1"):
        assert key in env
    assert "step:6/6 loss:" in text and "img/s:" in text and "grad_norm:" in text


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, run_args, monkeypatch,
                                                                         capsys):
    real = train.flow_matching_inputs
    calls = {"n": 0}
    threads_before = set(threading.enumerate())

    def poisoned(*args):
        calls["n"] += 1
        x_t, y, target = real(*args)
        if calls["n"] == 5:  # step index 4, after the step-3 checkpoint
            target = target * float("nan")
        return x_t, y, target
    monkeypatch.setattr(train, "flow_matching_inputs", poisoned)
    assert train.main(run_args + ["--run_name", "nan"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss nan" in err and "at step 4" in err and "step_00000003" in err
    run_dir = tmp_path / "runs" / "nan"
    assert [p.name for p in train.list_checkpoints(run_dir)] == ["step_00000003.safetensors"]
    assert not (run_dir / "model.safetensors").exists() and not (tmp_path / "records").exists()
    assert not [t for t in set(threading.enumerate()) - threads_before if t.name == "ShardLoader"]  # on errors too


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes_identically(tmp_path, digits_dir):
    from conftest import make_track
    track = make_track(tmp_path / "t.json", digits_dir, iterations=400, global_batch=8)
    base = ["--track", str(track), "--runs_dir", str(tmp_path / "runs"), "--write_record", "false",
            "--ckpt_every", "1000", "--log_every", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *base, "--run_name", "killed"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = tmp_path / "runs" / "killed" / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "step:20/" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by signal" in out
    saved = train.list_checkpoints(tmp_path / "runs" / "killed")
    assert len(saved) == 1
    stopped_at = int(saved[0].stem.split("_")[1])
    assert 20 <= stopped_at < 400
    assert train.main(base + ["--run_name", "killed", "--resume", "auto"]) == 0
    assert train.main(base + ["--run_name", "straight"]) == 0
    a = _final_tensors(tmp_path / "runs" / "killed")
    b = _final_tensors(tmp_path / "runs" / "straight")
    for key in a:
        if key.startswith(("model.", "ema.", "optim.")):
            assert torch.equal(a[key], b[key]), key


def test_wandb_logging_is_offline_and_optional(tmp_path, run_args):
    summary = train.train(train.parse_config(run_args + ["--run_name", "wb", "--wandb", "offline",
                                                         "--write_record", "false"]))
    runs = list((Path(summary["run_dir"]) / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    with pytest.raises(ValueError, match="--wandb must be"):
        train.train(train.parse_config(run_args + ["--run_name", "wb2", "--wandb", "cloud"]))


def _launch_train_sh(tmp_path, track, name, extra_flags, envs):
    """`bash train.sh` once per environment in `envs` (each a node of one run), all at the same
    time; returns the run's directory after every launcher has exited cleanly. name None: the
    default run name (rank 0's, broadcast), in runs_dir/<name>... of its own."""
    env = dict(os.environ, SPEEDRUN_PYTHON=sys.executable)
    runs = tmp_path / "runs" / (name or "default")
    cmd = ["bash", "train.sh", "--track", str(track), "--runs_dir", str(runs.parent if name else runs),
           "--write_record", "false", *(["--run_name", name] if name else []), *extra_flags]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env | e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for e in envs]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    if name:
        return runs
    [run] = list(runs.iterdir())  # every rank trained, sampled and scored in one folder
    return run


def _assert_same_training(a: Path, b: Path) -> None:
    """Model and EMA weights equal within floating-point tolerance (gradients are averaged over
    ranks in another order than one process sums its micro-batches)."""
    ta, tb = _final_tensors(a), _final_tensors(b)
    for key in tb:
        if key.startswith(("model.", "ema.")):
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("components", ["plain", "all"])
def test_two_gloo_processes_match_one_process(tmp_path, tiny_track, components):
    """NPROC=2 bash train.sh on CPU (two real gloo ranks) ends where one process with the same
    global batch ends; with every SR-DiT component on too (CFM pairs across the rank boundary,
    SPRINT draws shared, and SPRINT path drops followed by further steps: DDP fails the step after
    one in which a parameter got no gradient)."""
    from test_components import ALL_FLAGS
    flags = ALL_FLAGS + ["--sprint_path_drop", "0.5"] if components == "all" else []
    two = _launch_train_sh(tmp_path, tiny_track, None, flags, [{"NPROC": "2"}])  # the agreed default name
    one = _launch_train_sh(tmp_path, tiny_track, "one", flags, [{"NPROC": "1"}])
    _assert_same_training(two, one)
    assert "world_size: 2" in (two / "train.log").read_text()
    if components == "all":  # the run's own draws: a path drop before the last step, and a step without
        cfg = train.parse_config(["--track", str(tiny_track), *flags])
        meta = train.read_safetensors(two / "model.safetensors", train.MODEL_FORMAT, with_tensors=False)[1]
        model = train.SiT(meta["model"], int(meta["input_size"]), int(meta["in_channels"]),
                          int(meta["num_classes"]), train.ModelOptions(**json.loads(meta["options"])))
        draws = train.noise_source(cfg, json.loads(tiny_track.read_text()), model)
        drops = [draws(step).path_drop for step in range(cfg.iterations - 1)]
        draws.close()
        assert any(drops) and not all(drops), drops


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_match_one_process(tmp_path, tiny_track):
    """NNODES=2 bash train.sh, started once per node (here two 'nodes' of two gloo processes each
    on this machine, rendezvous at MASTER_ADDR:MASTER_PORT): one run of world size 4, trained
    like one process with the same global batch."""
    nodes = [{"NNODES": "2", "NODE_RANK": str(r), "NPROC": "2", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(_free_port())} for r in range(2)]
    nodes[1]["MASTER_PORT"] = nodes[0]["MASTER_PORT"]
    four = _launch_train_sh(tmp_path, tiny_track, "four", [], nodes)
    one = _launch_train_sh(tmp_path, tiny_track, "one", [], [{"NPROC": "1"}])
    _assert_same_training(four, one)
    assert "world_size: 4" in (four / "train.log").read_text()


_WAIT_FOR_RANK0 = """
import sys, time
import torch.distributed as dist
import train
state = train.process_state(train.parse_config(["--dist_timeout_minutes", sys.argv[1]]))
if state.process_index == 0:
    time.sleep(8)  # rank 0 working alone, as when it scores at the end of a run
try:
    dist.barrier()
    print(f"rank {state.process_index} passed", flush=True)
except Exception as e:
    print(f"rank {state.process_index} gave up: {type(e).__name__}", flush=True)
"""


@pytest.mark.parametrize("minutes, ends", [("0.05", "gave up"), ("1", "passed")])
def test_the_collective_timeout_is_the_runs(tmp_path, minutes, ends):
    """--dist_timeout_minutes reaches the process group: a rank waits that long for rank 0, no less
    (NCCL's 10-minute default would abort the waiting ranks while rank 0 scores an ImageNet run)
    and no more."""
    script = tmp_path / "wait.py"
    script.write_text(_WAIT_FOR_RANK0)
    port = str(_free_port())
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
               ACCELERATE_USE_CPU="1")
    procs = [subprocess.Popen([sys.executable, str(script), minutes], cwd=tmp_path, text=True,
                              env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(2)]
    out = [p.communicate(timeout=120)[0] for p in procs]
    assert f"rank 1 {ends}" in out[1], out
    with pytest.raises(train.ConfigError, match="--dist_timeout_minutes must be positive"):
        train.process_state(train.parse_config(["--dist_timeout_minutes", "0"]))


def test_several_processes_get_time_to_checkpoint_after_a_sigterm(tmp_path):
    """torchrun SIGKILLs its workers 30 s after forwarding a SIGTERM: too short for rank 0 to write
    an ImageNet checkpoint, so train.sh gives them 600 s unless the caller chose otherwise."""
    fake = tmp_path / "python"  # stands in for the Python: counts no GPU, echoes the launch
    fake.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 0; exit 0; fi\n'
                    'echo "grace=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT $*"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    env |= {"SPEEDRUN_PYTHON": str(fake), "NPROC": "2"}
    for given, grace in ((None, "600"), ("45", "45")):
        extra = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": given} if given else {}
        out = subprocess.run(["bash", "train.sh", "--seed", "3"], cwd=ROOT, env=env | extra, capture_output=True,
                             text=True, check=True).stdout
        assert out.startswith(f"grace={grace} -m accelerate.commands.launch") and out.strip().endswith("--seed 3")


def test_multi_node_launch_needs_a_rank_and_an_address(tmp_path, tiny_track):
    env = dict(os.environ, SPEEDRUN_PYTHON=sys.executable, NNODES="2", NPROC="1")
    proc = subprocess.run(["bash", "train.sh", "--track", str(tiny_track)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "NODE_RANK" in proc.stderr and "MASTER_ADDR" in proc.stderr


def test_a_dataset_that_is_not_the_tracks_data_is_refused_before_training(tmp_path, digits_dir, capsys):
    from conftest import make_track
    spec = json.loads(make_track(tmp_path / "t.json", digits_dir).read_text())
    spec["dataset"]["latent_shape"] = [4, 8, 8]
    spec["dataset"]["encoder_posterior"] = "sample"  # identity shards record no posterior
    (tmp_path / "t.json").write_text(json.dumps(spec))
    args = ["--track", str(tmp_path / "t.json"), "--runs_dir", str(tmp_path / "runs"), "--run_name", "x"]
    assert train.main(args) == 1
    err = capsys.readouterr().err
    assert f"{digits_dir}: the dataset is not the data of track 'tiny'" in err
    assert "latent shape (1, 8, 8) (the track's: (4, 8, 8))" in err
    assert "encoder posterior None (the track's: sample)" in err
    assert "image shape" not in err and "latent encoder" not in err  # only what differs is named
    assert not list((tmp_path / "runs" / "x").glob("checkpoints/*"))


def test_cli_reports_bad_resume_files_and_flags_without_a_traceback(tmp_path, run_args, capsys):
    missing = tmp_path / "missing.safetensors"
    assert train.main(run_args + ["--run_name", "m", "--resume", str(missing)]) == 1
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    assert train.main(run_args + ["--run_name", "c", "--resume", str(truncated)]) == 1
    assert "cut.safetensors is corrupt or truncated" in capsys.readouterr().err
    assert train.main(run_args + ["--run_name", "b", "--model", "SiT-Q/2"]) == 1
    assert "unknown model 'SiT-Q/2'" in capsys.readouterr().err
    assert train.main(run_args + ["--run_name", "d", "--compile_mode", "fast"]) == 1
    assert "--compile_mode must be one of default, reduce-overhead" in capsys.readouterr().err
    assert train.main(run_args + ["--run_name", "e", "--compile", "true", "--compile_mode",
                                  "reduce-overhead", "--grad_accum", "2"]) == 1
    assert "(CUDA graphs) needs --grad_accum 1" in capsys.readouterr().err
    # without --compile the mode changes nothing, so it is no reason to refuse accumulation
    assert not train.uses_cuda_graphs(train.parse_config(
        run_args + ["--compile_mode", "max-autotune", "--grad_accum", "2"]))


@pytest.mark.slow
@pytest.mark.parametrize("components", ["plain", "all"])
def test_compiled_training_matches_eager_and_resumes(tmp_path, run_args, components, monkeypatch):
    """--compile true (torch.compile with inductor, the fastest setting on GPUs) runs train()'s
    whole loop, every SR-DiT component included: the weights match the eager run's to rounding,
    checkpoints hold the plain module's names (no torch.compile prefixes), and a compiled run
    resumes from a checkpoint. With every component, --compile_mode reduce-overhead (CUDA graphs
    on a GPU, the default compilation here) marks each step's start for the graph replays."""
    from test_components import ALL_FLAGS
    base = run_args + ["--write_record", "false"] + (ALL_FLAGS if components == "all" else [])
    if components == "all":
        base += ["--compile_mode", "reduce-overhead"]
    compile_modes, step_marks = [], []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda m, mode=None: compile_modes.append(mode) or real_compile(m, mode=mode))
    real_mark = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin",
                        lambda: step_marks.append(1) or real_mark())
    eager = train.train(train.parse_config(base + ["--run_name", "eager"]))
    assert compile_modes == [] and step_marks == []  # without --compile the mode does nothing
    compiled = train.train(train.parse_config(base + ["--run_name", "compiled", "--compile", "true"]))
    iterations = train.load_track(run_args[1])["budget"]["iterations"]
    want = "reduce-overhead" if components == "all" else None
    assert compile_modes and set(compile_modes) == {want}
    assert len(step_marks) == (iterations if components == "all" else 0)
    a, b = _final_tensors(Path(eager["run_dir"])), _final_tensors(Path(compiled["run_dir"]))
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith(("model.", "ema.")):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    resumed_dir = tmp_path / "runs" / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(train.list_checkpoints(Path(compiled["run_dir"]))[0], resumed_dir / "checkpoints")
    train.train(train.parse_config(base + ["--run_name", "resumed", "--compile", "true",
                                           "--resume", "auto"]))
    c = _final_tensors(resumed_dir)
    for key in a:
        if key.startswith(("model.", "ema.")):
            torch.testing.assert_close(c[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_device_seconds_add_up_each_legs_processes(tmp_path, run_args):
    """A run resumed on another number of processes: its device time (GPU-hours in the record) is
    each leg's training time x that leg's processes, not the whole time x the last leg's."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    first = train.train(train.parse_config(run_args + ["--run_name", "a", "--write_record", "false"]))
    assert first["device_train_seconds"] == pytest.approx(first["train_seconds"])  # one process
    ck = train.list_checkpoints(tmp_path / "runs" / "a")[0]  # step 3
    with safe_open(str(ck), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    extra = json.loads(meta["extra"])
    assert extra["device_train_seconds"] == pytest.approx(extra["train_seconds"])
    extra |= {"world_size": 8, "device_train_seconds": 8 * extra["train_seconds"]}  # as if its leg ran on 8
    eight = tmp_path / "eight.safetensors"
    save_file(tensors, str(eight), metadata=meta | {"extra": json.dumps(extra)})
    resumed = train.train(train.parse_config(run_args + ["--run_name", "b", "--resume", str(eight),
                                                         "--write_record", "false"]))
    second_leg = resumed["train_seconds"] - extra["train_seconds"]
    assert resumed["device_train_seconds"] == pytest.approx(8 * extra["train_seconds"] + second_leg)
