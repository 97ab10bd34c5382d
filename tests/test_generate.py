"""generate.py beyond the pure samplers: labels, per-sample noise, guidance, sharding, files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import generate
from generate import guided_velocity, sample_labels, sample_latents, shard_indices


class LinearField(torch.nn.Module):
    """v = a_y * x + b_y: depends on the label, so guidance and labels are observable."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.a = torch.nn.Parameter(torch.linspace(-0.5, 0.5, num_classes + 1))
        self.b = torch.nn.Parameter(torch.linspace(1.0, -1.0, num_classes + 1))

    def forward(self, x, t, y, cls_t=None, routing=None):
        shape = (-1,) + (1,) * (x.dim() - 1)
        return {"v": self.a[y].view(shape) * x + self.b[y].view(shape) * (1 + t.view(shape))}


def test_balanced_and_random_labels():
    assert sample_labels(range(25), 10, "balanced", 0).tolist() == [i % 10 for i in range(25)]
    random = sample_labels(range(2000), 10, "random", 0)
    assert set(random.tolist()) == set(range(10))
    assert torch.equal(sample_labels([5, 1999], 10, "random", 0), random[[5, 1999]])  # keyed by index
    assert not torch.equal(sample_labels(range(2000), 10, "random", 1), random)
    with pytest.raises(ValueError, match="unknown label mode"):
        sample_labels(range(3), 10, "uniform", 0)


def test_guidance_formula_and_interval():
    model = LinearField(10)
    x, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 3, 7, 9])
    null = torch.full_like(y, 10)
    for t_val, applied in ((0.5, True), (0.9, False), (0.1, False)):
        t = torch.full((4,), t_val)
        v = guided_velocity(model, y, 10, (1, 2, 2), scale=4.0, interval=(0.2, 0.8))(x.flatten(1), t)
        cond, uncond = model(x, t, y)["v"], model(x, t, null)["v"]
        expected = uncond + 4.0 * (cond - uncond) if applied else cond
        torch.testing.assert_close(v, expected.flatten(1))


def test_guidance_interval_is_inclusive_and_refuses_settings_that_do_nothing():
    model = LinearField(10)
    x, y = torch.randn(2, 1, 2, 2), torch.tensor([1, 2])
    for bound in (0.6, 0.7):  # float32(0.6) > 0.6 and float32(0.7) < 0.7: both bounds still count
        t = torch.full((2,), bound, dtype=torch.float32)
        for interval in ((0.0, bound), (bound, 1.0)):
            v = guided_velocity(model, y, 10, (1, 2, 2), scale=3.0, interval=interval)(x.flatten(1), t)
            assert not torch.allclose(v, model(x, t, y)["v"].flatten(1)), (bound, interval)
    with pytest.raises(ValueError, match="empty"):
        guided_velocity(model, y, 10, (1, 2, 2), scale=3.0, interval=(0.9, 0.1))
    with pytest.raises(ValueError, match="path-drop guidance needs a model trained with SPRINT"):
        guided_velocity(model, y, 10, (1, 2, 2), scale=3.0, path_drop_guidance=True)
    with pytest.raises(ValueError, match="needs a model trained with REG"):
        guided_velocity(model, y, 10, (1, 2, 2), scale=3.0, cls_scale=2.0)


class WithClassToken(LinearField):
    """LinearField plus a REG class-token velocity that depends on the label too."""

    def forward(self, x, t, y, cls_t=None, routing=None):
        return super().forward(x, t, y) | {"cls_v": self.a[y].view(-1, 1) * cls_t + self.b[y].view(-1, 1)}


def test_class_token_guidance_scales_mean_what_sr_dit_means():
    """SR-DiT's samplers: the class token follows the latent's guidance, at its own scale when one
    is given, and a class-token scale of 0 leaves it conditional; scales that SR-DiT would ignore
    (below 1, or a class-token scale without latent guidance) are refused, not ignored."""
    model = WithClassToken(10)
    x, c, y = torch.randn(3, 1, 2, 2), torch.randn(3, 5), torch.tensor([1, 4, 8])
    z, t = torch.cat([x.flatten(1), c], dim=1), torch.full((3,), 0.5)
    cond, uncond = model(x, t, y, cls_t=c), model(x, t, torch.full_like(y, 10), cls_t=c)

    def velocity(**scales):
        return guided_velocity(model, y, 10, (1, 2, 2), reg_dim=5, **scales)(z, t)
    for cls_scale, w in ((None, 3.0), (1.5, 1.5)):
        v = velocity(scale=3.0, cls_scale=cls_scale)
        torch.testing.assert_close(v[:, :4], (uncond["v"] + 3.0 * (cond["v"] - uncond["v"])).flatten(1))
        torch.testing.assert_close(v[:, 4:], uncond["cls_v"] + w * (cond["cls_v"] - uncond["cls_v"]))
    unguided_token = velocity(scale=3.0, cls_scale=0.0)
    torch.testing.assert_close(unguided_token[:, :4], v[:, :4])
    assert torch.equal(unguided_token[:, 4:], cond["cls_v"])
    assert torch.equal(velocity(scale=1.0, cls_scale=0.0), torch.cat([cond["v"].flatten(1), cond["cls_v"]], 1))
    for scales, message in (({"scale": 0.5}, "below 1"), ({"scale": 2.0, "cls_scale": -1.0}, "negative"),
                            ({"scale": 1.0, "cls_scale": 2.0}, "without guidance of the latent")):
        with pytest.raises(ValueError, match=message):
            velocity(**scales)


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_maruyama"])
def test_samples_do_not_depend_on_batching_or_sharding(sampler):
    model = LinearField(10)
    protocol = {"sampler": sampler, "num_steps": 4, "seed": 3, "labels": "balanced", "guidance_scale": 1.5}
    whole, labels = sample_latents(model, range(10), (1, 2, 2), 10, protocol)
    parts = [sample_latents(model, r, (1, 2, 2), 10, protocol)[0]
             for r in (shard_indices(10, k, 3) for k in range(3))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-6)
    assert labels.tolist() == [i % 10 for i in range(10)]
    other_seed, _ = sample_latents(model, range(10), (1, 2, 2), 10, protocol | {"seed": 4})
    assert not torch.allclose(other_seed, whole)



class Float32Only(LinearField):
    """LinearField that insists on float32 inputs, as a network in float32 would."""

    def forward(self, x, t, y, cls_t=None, routing=None):
        assert x.dtype == t.dtype == torch.float32, (x.dtype, t.dtype)
        return super().forward(x, t, y)


def test_float64_state_is_integrated_in_float64_around_a_float32_network():
    """SR-DiT's sampler (the ImageNet tracks' protocol): state and guidance in float64, network
    inputs cast to float32. Rebuilt here step by step from the protocol's definition."""
    model = Float32Only(10)
    protocol = {"sampler": "euler_maruyama", "num_steps": 6, "seed": 2, "labels": "balanced",
                "guidance_scale": 2.5, "guidance_interval": [0.3, 1.0], "state_dtype": "float64"}
    idx, shape, dim = range(5), (1, 2, 2), 4
    got, y = sample_latents(model, idx, shape, 10, protocol)

    gens = [generate.sample_generator(2, i) for i in idx]
    x = torch.stack([torch.randn(dim, generator=g) for g in gens]).double()
    ts = torch.cat([torch.linspace(1.0, 0.04, 6, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    null = torch.full_like(y, 10)
    for i in range(6):
        t, dt = float(ts[i]), float(ts[i + 1] - ts[i])
        t32 = torch.full((5,), t, dtype=torch.float32)
        cond = model(x.float().view(-1, *shape), t32, y)["v"].flatten(1).double()
        v = cond
        if 0.3 <= t <= 1.0:
            uncond = model(x.float().view(-1, *shape), t32, null)["v"].flatten(1).double()
            v = uncond + 2.5 * (cond - uncond)
        x = x + dt * ((2.0 - t) * v + x)
        if i < 5:
            x = x + (2.0 * t * abs(dt)) ** 0.5 * torch.stack([torch.randn(dim, generator=g) for g in gens]).double()
    torch.testing.assert_close(got.double(), x.float().double().view(-1, *shape), rtol=0, atol=0)

    in_float32, _ = sample_latents(model, idx, shape, 10, protocol | {"state_dtype": "float32"})
    assert not torch.equal(in_float32, got)  # the state's rounding is observable ...
    torch.testing.assert_close(in_float32, got, rtol=1e-5, atol=1e-5)  # ... and small
    with pytest.raises(ValueError, match="unknown state_dtype 'bfloat16'"):
        sample_latents(model, idx, shape, 10, protocol | {"state_dtype": "bfloat16"})


def test_sde_noise_drawn_ahead_on_a_thread_is_the_noise_drawn_in_line():
    """What CUDA runs use by default: the same per-sample streams, step after step."""
    import threading
    model = LinearField(10)
    protocol = {"sampler": "euler_maruyama", "num_steps": 12, "seed": 5, "labels": "balanced"}
    threads = set(threading.enumerate())
    inline, _ = sample_latents(model, range(7), (1, 2, 2), 10, protocol, prefetch_noise=False)
    ahead, _ = sample_latents(model, range(7), (1, 2, 2), 10, protocol, prefetch_noise=True)
    assert torch.equal(inline, ahead)
    assert not [t for t in set(threading.enumerate()) - threads if t.name.startswith("noise")]


def test_shard_indices_cover_everything_once():
    for n, w in ((10, 3), (7, 8), (1000, 4)):
        blocks = [list(shard_indices(n, r, w)) for r in range(w)]
        assert sum(blocks, []) == list(range(n))


def test_npz_is_adm_format_and_grid_written(tmp_path, digits_dir):
    from train import SiT
    track = {"dataset": {"encoder": "identity", "latent_shape": [1, 8, 8], "num_classes": 10,
                         "resolution": 8, "channels": 1}}
    protocol = {"sampler": "euler", "num_steps": 2, "num_samples": 13, "seed": 0, "labels": "balanced"}
    torch.manual_seed(0)
    model = SiT("SiT-Digits/2", 8, 1, 10)
    out = generate.generate_to_npz(model, track, protocol, tmp_path / "s.npz", grid_path=tmp_path / "g.png",
                                   batch_size=5)
    with np.load(out) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (13, 8, 8, 1)
        assert f["arr_1"].tolist() == [i % 10 for i in range(13)]
        # an untrained (zero-velocity) model returns its starting noise: decode(x1) exactly
        x1 = torch.stack([torch.randn((1, 8, 8), generator=generate.sample_generator(0, i)) for i in range(13)])
        expected = torch.clamp(torch.round((x1 + 1) * 127.5), 0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        np.testing.assert_array_equal(f["arr_0"], expected.numpy())
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size[0] > 8 * 10
    assert not list(tmp_path.glob(".s.part*"))


def test_generate_cli_rejects_a_bad_model_file(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert generate.main([str(bad), "--out", str(tmp_path / "x.npz")]) == 1
    assert "model.safetensors is corrupt or truncated" in capsys.readouterr().err


def test_generate_cli_names_the_track_and_settings_it_cannot_use(tmp_path, capsys, monkeypatch):
    import json

    import train
    cfg = train.Config(model="SiT-Digits/2", track="digits", rope=True)  # RoPE: a kernel would run
    track = train.load_track("digits")
    model = train.build_model(cfg, track)
    train.export_model(tmp_path / "model.safetensors", model, cfg, track | {"name": "my_track"})
    args = [str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "x.npz"), "--num_samples", "4",
            "--num_steps", "1"]
    assert generate.main(args) == 1  # trained on a track file that is not under records/tracks
    assert "trained on track 'my_track': pass --track" in capsys.readouterr().err
    (tmp_path / "my_track.json").write_text(json.dumps(track | {"name": "my_track"}))
    assert generate.main(args + ["--track", str(tmp_path / "my_track.json"), "--path_drop_guidance", "true",
                                 "--guidance_scale", "2"]) == 1
    assert "path-drop guidance needs a model trained with SPRINT" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a typo is not read as false
        generate.main(args + ["--path_drop_guidance", "ture"])
    import kernels  # kernels the model cannot use: an error message, not a traceback
    monkeypatch.setattr(kernels, "unsupported_model_shape", lambda *a: "head_dim 72 not in (32, 64, 128)")
    assert generate.main(args + ["--track", str(tmp_path / "my_track.json"), "--kernels", "triton"]) == 1
    assert "--kernels triton: the kernels cannot run this model: head_dim 72" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_generate_cli_kernels_triton_equals_torch(tmp_path, monkeypatch):
    """--kernels triton (the QK-norm/RoPE kernel before SDPA + the modulated norms, interpreted on
    CPU) samples the same images as --kernels torch from the same exported SR-DiT-style model."""
    import train
    cfg = train.Config(model="SiT-Digits/2", track="digits", norm="rmsnorm", rope=True, qk_norm=True,
                       value_residual=True)
    track = train.load_track("digits")
    torch.manual_seed(0)
    model = train.build_model(cfg, track)
    for p in model.parameters():  # away from the zero init, so the samples depend on every layer
        p.data.add_(0.05 * torch.randn_like(p))
    train.export_model(tmp_path / "model.safetensors", model, cfg, track)
    import kernels
    fused_calls = []
    real_prologue = kernels.qk_norm_rope
    monkeypatch.setattr(kernels, "qk_norm_rope", lambda *a, **k: fused_calls.append(1) or real_prologue(*a, **k))
    arrays = {}
    for backend in ("torch", "triton"):
        out = tmp_path / f"{backend}.npz"
        assert generate.main([str(tmp_path / "model.safetensors"), "--out", str(out), "--num_samples", "12",
                              "--num_steps", "3", "--sampler", "euler", "--kernels", backend]) == 0
        with np.load(out) as f:
            arrays[backend] = f["arr_0"].astype(int)
        assert bool(fused_calls) == (backend == "triton")
    difference = np.abs(arrays["triton"] - arrays["torch"])
    assert difference.max() <= 1 and (difference == 0).mean() > 0.98  # float rounding at pixel edges only
    assert arrays["torch"].std() > 10  # the samples are images, not a constant


def test_protocol_grid_columns_follow_the_classes_only_when_few():
    """Digits (10 classes, balanced): one class per column. ImageNet (1000 classes): 100 samples
    in 10 columns, not one row of 1000 mostly empty columns."""
    import json
    root = Path(generate.__file__).resolve().parent / "records" / "tracks"
    for name, size, columns in (("digits", 8, 10), ("imagenet256_400k", 256, 10)):
        track = json.loads((root / f"{name}.json").read_text())
        channels = 1 if name == "digits" else 3
        images = np.random.default_rng(0).integers(0, 256, (100, size, size, channels), dtype=np.uint8)
        grid = generate.protocol_grid(images, track, dict(track["evaluation"], labels="balanced"))
        upscale = max(1, 64 // size)
        assert grid.shape[:2] == ((10 * (size + 1) + 1) * upscale, (columns * (size + 1) + 1) * upscale)
        # column c of row 0 holds sample c, whose balanced label is c
        top_left = grid[upscale:upscale * (size + 1), upscale * (size + 2):upscale * (2 * size + 2)]
        expected = images[1].repeat(upscale, 0).repeat(upscale, 1)
        np.testing.assert_array_equal(top_left, expected[..., 0] if channels == 1 else expected)
    track = {"dataset": {"num_classes": 15, "resolution": 32}}
    grid = generate.protocol_grid(np.zeros((100, 32, 32, 3), np.uint8), track, {"labels": "balanced"})
    assert grid.shape[1] == (15 * 33 + 1) * 2  # few classes: one column each


def test_generate_cli_refuses_unwritable_outputs_and_other_tracks_before_sampling(tmp_path, capsys, monkeypatch):
    import json

    import train
    cfg = train.Config(model="SiT-Digits/2", track="digits")
    track = train.load_track("digits")
    train.export_model(tmp_path / "model.safetensors", train.build_model(cfg, track), cfg, track)
    sampled = []
    monkeypatch.setattr(generate, "sample_latents", lambda *a, **k: sampled.append(1))
    args = [str(tmp_path / "model.safetensors"), "--num_samples", "4", "--num_steps", "1"]
    (tmp_path / "folder").mkdir()
    assert generate.main(args + ["--out", str(tmp_path / "folder")]) == 1
    assert f"output {tmp_path / 'folder'} is a folder" in capsys.readouterr().err
    assert generate.main(args + ["--out", str(tmp_path / "s.npz"), "--grid", str(tmp_path / "grid")]) == 1
    assert "grid" in capsys.readouterr().err and not (tmp_path / "s.npz").exists()
    other = json.loads(json.dumps(track))
    other["dataset"]["num_classes"] = 20
    other["dataset"]["latent_shape"] = [1, 16, 16]
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert generate.main(args + ["--out", str(tmp_path / "s.npz"), "--track", str(tmp_path / "other.json")]) == 1
    err = capsys.readouterr().err
    assert "trained for other data than track 'digits': input_size 8 (the track's: 16), num_classes 10" in err
    # --eval_dir names its own files: a single-batch output or seed beside it is refused, as is a
    # folder whose seed file is taken by a folder
    for extra in (["--out", str(tmp_path / "s.npz")], ["--seed", "4"], ["--grid", str(tmp_path / "g.png")]):
        assert generate.main(args + ["--eval_dir", str(tmp_path / "eval"), *extra]) == 1
        assert f"drop {extra[0]}" in capsys.readouterr().err
    (tmp_path / "eval" / "samples_seed1.npz").mkdir(parents=True)
    assert generate.main(args + ["--eval_dir", str(tmp_path / "eval")]) == 1
    assert f"output {tmp_path / 'eval' / 'samples_seed1.npz'} is a folder" in capsys.readouterr().err
    assert not sampled and not [p for p in tmp_path.rglob("*.npz*") if p.is_file()]
    assert not list(tmp_path.rglob(".*part*"))
