"""The SR-DiT components of train.py, each against an independent statement of what it must do."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from generate import shift_time, time_shift_for_shape
from train import ModelOptions, Routing, SiT

ALL_ON = dict(norm="rmsnorm", rope=True, qk_norm=True, value_residual=True, sprint=True)
ALL_FLAGS = ["--norm", "rmsnorm", "--rope", "true", "--qk_norm", "true", "--value_residual", "true",
             "--sprint", "true", "--sprint_dense_in", "2", "--sprint_dense_out", "2", "--repa_coef", "0.5",
             "--repa_depth", "2", "--repa_hidden", "32", "--reg_coef", "0.03", "--cfm_coef", "0.05",
             "--time_shift_base", "4096"]


def digits_model(**opts) -> SiT:
    torch.manual_seed(0)
    return SiT("SiT-Digits/2", 8, 1, 10, ModelOptions(**opts))


def linear(i: int, o: int) -> int:
    return i * o + o


def test_parameter_counts_against_the_architecture_formula():
    """SiT-B/1 on 32x16x16 latents with every SR-DiT component: 140.0M including the 7.3M REPA
    projector (the public reference's count); the plain count from the layer shapes."""
    d, blocks, classes, c = 768, 12, 1000, 32
    block = linear(d, 3 * d) + linear(d, d) + linear(d, 4 * d) + linear(4 * d, d) + linear(d, 6 * d)
    plain = (c * d + d) + linear(256, d) + linear(d, d) + (classes + 1) * d + blocks * block \
        + linear(d, c) + linear(d, 2 * d)
    assert train.count_parameters(SiT("SiT-B/1", 16, c, classes)) == plain
    opts = ModelOptions(**ALL_ON, repa_depth=2, repa_dim=768, reg_dim=768, time_shift_base=4096)
    model = SiT("SiT-B/1", 16, c, classes, opts)
    projector = linear(d, 2048) + linear(2048, 2048) + linear(2048, 768)
    extra = projector + (linear(768, d) + d) + linear(d, 768) + d + linear(2 * d, d) \
        + blocks * 2 * 64 + (blocks - 1)   # REG in+norm, REG head, mask token, fusion, QK-norm, lambdas
    assert train.count_parameters(model.projector) == projector
    assert train.count_parameters(model) == plain + extra
    assert round(train.count_parameters(model) / 1e6, 1) == 140.0
    assert round(projector / 1e6, 1) == 7.3


def test_components_are_absent_when_off():
    plain = digits_model()
    names = [n for n, _ in plain.named_parameters()]
    for absent in ("q_norm", "k_norm", "value_lambda", "mask_token", "fusion", "projector", "cls_"):
        assert not any(absent in n for n in names), absent
    assert all(isinstance(m, torch.nn.LayerNorm) for m in (plain.blocks[0].norm1, plain.final_layer.norm))
    on = digits_model(**ALL_ON, repa_depth=2, repa_dim=64, reg_dim=64)
    assert isinstance(on.blocks[0].norm1, torch.nn.RMSNorm) and on.blocks[0].norm1.weight is None
    assert isinstance(on.blocks[3].attn.q_norm, torch.nn.RMSNorm) and on.blocks[3].attn.q_norm.weight is not None
    assert not hasattr(on.blocks[0].attn, "value_lambda")


def test_all_components_shapes_and_gradient_flow():
    model = digits_model(**ALL_ON, repa_depth=2, repa_dim=64, reg_dim=64)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    y, cls_t = torch.tensor([0, 3, 9, 10]), torch.randn(4, 64)
    keep = torch.stack([torch.randperm(17)[:4].sort().values for _ in range(4)])  # class token + 16 patches
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(4):  # adaLN-Zero opens the network over a few steps
        opt.zero_grad()
        out = model(x, t, y, cls_t=cls_t, routing=Routing(keep=keep))
        assert out["v"].shape == x.shape and out["cls_v"].shape == (4, 64) and out["repa"].shape == (4, 17, 64)
        loss = (out["v"] - x).pow(2).mean() + (out["cls_v"] - cls_t).pow(2).mean() - out["repa"].mean()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_sprint_without_dropping_equals_the_dense_path_and_path_drop_ignores_the_middle():
    model = digits_model(**ALL_ON, reg_dim=64)
    x, t, y, cls_t = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 10]), torch.randn(3, 64)
    for p in model.parameters():  # leave the zero init so every path matters
        p.data.add_(0.05 * torch.randn_like(p))
    full = model(x, t, y, cls_t=cls_t)
    dense = full["v"]
    keep_all = torch.arange(17).expand(3, 17)  # token 0 is the class token
    torch.testing.assert_close(model(x, t, y, cls_t=cls_t, routing=Routing(keep=keep_all))["v"], dense)
    dropped = model(x, t, y, cls_t=cls_t, routing=Routing(keep=keep_all[:, ::4]))["v"]
    assert not torch.allclose(dropped, dense, atol=1e-4)
    # the class token is routed like any token: dropping it alone changes both outputs
    no_cls = model(x, t, y, cls_t=cls_t, routing=Routing(keep=keep_all[:, 1:]))
    assert not torch.allclose(no_cls["v"], dense, atol=1e-4)
    assert not torch.allclose(no_cls["cls_v"], full["cls_v"], atol=1e-4)
    # by hand: encoder blocks, middle blocks on all tokens, fusion, decoder blocks (same weights)
    h = torch.cat([model.cls_embedder(cls_t).unsqueeze(1),
                   model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed], dim=1)
    c = model.t_embedder(t) + model.y_embedder(y)
    rope, v1 = (model.rope_cos, model.rope_sin), None
    for block in model.blocks[:2]:
        h, values = block(h, c, rope, v1)
        v1 = values if v1 is None else v1
    g = h
    for block in model.blocks[2:4]:
        g, _ = block(g, c, rope, v1)
    h = model.fusion(torch.cat([h, g], dim=-1))
    for block in model.blocks[4:]:
        h, _ = block(h, c, rope, v1)
    torch.testing.assert_close(model.unpatchify(model.final_layer(h[:, 1:], c)), dense)
    # REG's head reads the class token after the final layer's modulated norm (SR-DiT's FinalLayer)
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    normed = torch.nn.functional.rms_norm(h[:, 0], (h.shape[-1],), eps=1e-6)
    torch.testing.assert_close(full["cls_v"], model.cls_head(normed * (1 + scale) + shift))
    # path drop: the middle blocks do not matter, with or without a gradient to compute
    before = model(x, t, y, cls_t=cls_t, routing=Routing(path_drop=True))["v"]
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y, cls_t=cls_t, routing=Routing(path_drop=True))["v"], before)
        for p in model.blocks[2].parameters():
            p.add_(1.0)
    torch.testing.assert_close(model(x, t, y, cls_t=cls_t, routing=Routing(path_drop=True))["v"], before)
    assert not torch.allclose(model(x, t, y, cls_t=cls_t)["v"], dense, atol=1e-4)
    # ...yet in training every middle parameter gets a gradient, zero: DDP fails a step after one
    # in which a parameter got none, and AdamW moves zero-gradient parameters by their momentum
    model(x, t, y, cls_t=cls_t, routing=Routing(keep=keep_all[:, ::4], path_drop=True))["v"].square().mean().backward()
    middle = [(n, p) for n, p in model.named_parameters() if n.startswith(("blocks.2.", "blocks.3."))]
    assert middle and all(p.grad is not None and not p.grad.any() for _, p in middle)
    assert model.mask_token.grad.abs().sum() > 0 and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_timestep_features_are_sinusoids_of_t_itself():
    """As SiT, REPA and SR-DiT embed t in [0, 1] (DiT's 1000 t made every feature a different,
    faster function of t): the MLP sees [cos(t f_k), sin(t f_k)], f_k = 10000^(-k/128)."""
    model = digits_model()
    seen = []
    model.t_embedder.mlp[0].register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    t = torch.tensor([0.0, 0.3, 1.0])
    model.t_embedder(t)
    f = 10000.0 ** (-torch.arange(128, dtype=torch.float64) / 128)
    angles = t.double().unsqueeze(1) * f
    torch.testing.assert_close(seen[0].double(), torch.cat([angles.cos(), angles.sin()], dim=1), atol=1e-6, rtol=0)


def test_rope_depends_only_on_relative_positions():
    head_dim, grid = 16, 6
    cos, sin = train.rope_tables(head_dim, grid, num_prefix=1)
    torch.testing.assert_close(cos[0], torch.ones(head_dim // 2))  # the class token is not rotated
    torch.testing.assert_close(sin[0], torch.zeros(head_dim // 2))
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def rotated(vec, r, col):
        i = 1 + r * grid + col
        return train.apply_rope(vec.float().view(1, 1, 1, -1), cos[i:i + 1], sin[i:i + 1]).view(-1).double()

    def score(p1, p2):
        return float(rotated(q, *p1) @ rotated(k, *p2))
    base = score((1, 2), (3, 0))
    assert math.isclose(score((2, 3), (4, 1)), base, rel_tol=1e-5, abs_tol=1e-5)
    assert math.isclose(score((0, 4), (2, 2)), base, rel_tol=1e-5, abs_tol=1e-5)
    assert not math.isclose(score((1, 2), (3, 1)), base, rel_tol=1e-3)
    # a rotation preserves norms
    assert math.isclose(float(rotated(q, 5, 5).norm()), float(q.norm()), rel_tol=1e-5)


def test_value_residual_starts_at_one_half_and_mixes_block_zero_values():
    model = digits_model(value_residual=True)
    lambdas = [b.attn.value_lambda.item() for b in model.blocks[1:]]
    assert lambdas == [0.5] * (len(model.blocks) - 1)
    attn = model.blocks[2].attn
    x, v1 = torch.randn(2, 16, 128), torch.randn(2, 4, 16, 32)
    with torch.no_grad():
        attn.value_lambda.fill_(1.0)
    _, mixed = attn(x, None, v1)
    torch.testing.assert_close(mixed, v1)
    with torch.no_grad():
        attn.value_lambda.fill_(0.0)
    _, own = attn(x, None, v1)
    _, _, v = attn.qkv(x).reshape(2, 16, 3, 4, 32).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(own, v)


def test_time_shift_formula_and_training_times():
    s = time_shift_for_shape((32, 16, 16), 4096)
    assert math.isclose(s, math.sqrt(2))
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_time(u, s), s * u / (1 + (s - 1) * u))
    noise = train.draw_step_noise(train.step_generator(0, 3), 1000, (1, 2, 2), 0.1, time_shift=s)
    raw = torch.rand(1000, generator=train.step_generator(0, 3), dtype=torch.float64)
    torch.testing.assert_close(noise.t, (s * raw / (1 + (s - 1) * raw)).float())
    assert noise.t.mean() > 0.55  # s > 1 spends more steps at high noise


class _Rows:
    """A dataset stand-in: latent i is filled with the value i, label i % 10."""

    def __init__(self, n):
        self.labels = np.arange(n) % 10

    def get_latents(self, idx):
        return np.stack([np.full((1, 2, 2), float(i), np.float32) for i in idx])


def test_cfm_negatives_are_the_global_batch_rolled_by_one_for_any_split():
    indices = np.array([7, 3, 5, 1, 0, 6, 2, 4])
    eps = torch.randn(8, 1, 2, 2)
    targets = eps - torch.from_numpy(_Rows(8).get_latents(indices))
    rolled = torch.roll(targets, shifts=1, dims=0)  # negative of sample i = target of sample i - 1
    x0 = torch.from_numpy(_Rows(8).get_latents(indices))
    for chunk in (8, 4, 2, 1):  # one rank's slice of the global batch: positions [a, a + chunk)
        loaded = []

        def latent_at(p):  # the trainer reads the one sample before the slice from the dataset
            loaded.append(p)
            return torch.from_numpy(_Rows(8).get_latents(indices[p:p + 1]))
        parts = [train.cfm_negatives(x0[a:a + chunk], eps, a, latent_at) for a in range(0, 8, chunk)]
        assert torch.equal(torch.cat(parts), rolled)
        assert loaded == ([] if chunk == 8 else [(a - 1) % 8 for a in range(0, 8, chunk)])


def test_loss_terms_signs_and_weights():
    cfg = train.Config(repa_coef=0.5, reg_coef=0.03, cfm_coef=0.05)
    model = digits_model(repa_depth=2, repa_dim=64, reg_dim=64)
    x0, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    noise = train.draw_step_noise(train.step_generator(0, 0), 4, (1, 8, 8), 0.0, reg_dim=64)
    teacher = (torch.randn(4, 64), torch.randn(4, 16, 64))
    negatives = torch.randn(4, 1, 8, 8)
    loss, parts = train.training_loss(model, cfg, x0, y, noise, 10, teacher, negatives)
    out = model(*train.flow_matching_inputs(x0, y, noise.t, noise.eps, noise.drop, 10)[:1], noise.t, y,
                cls_t=(1 - noise.t.view(-1, 1)) * teacher[0] + noise.t.view(-1, 1) * noise.cls_eps)
    target = noise.eps - x0
    torch.testing.assert_close(parts["mse"], ((out["v"] - target) ** 2).mean())
    torch.testing.assert_close(parts["cfm"], ((out["v"] - negatives) ** 2).mean())
    torch.testing.assert_close(parts["cls"], ((out["cls_v"] - (noise.cls_eps - teacher[0])) ** 2).mean())
    tokens = torch.cat([teacher[0].unsqueeze(1), teacher[1]], dim=1)  # class token first, with REG
    cos = torch.nn.functional.cosine_similarity(out["repa"], tokens, dim=-1)
    torch.testing.assert_close(parts["repa"], -cos.mean())
    torch.testing.assert_close(loss, parts["mse"] + 0.5 * parts["repa"] + 0.03 * parts["cls"] - 0.05 * parts["cfm"])


def test_reg_token_reaches_the_image_velocity():
    model = digits_model(reg_dim=64)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])
    a = model(x, t, y, cls_t=torch.zeros(2, 64))
    b = model(x, t, y, cls_t=torch.ones(2, 64))
    assert not torch.allclose(a["v"], b["v"]) and not torch.allclose(a["cls_v"], b["cls_v"])
    with pytest.raises(ValueError, match="pass cls_t"):
        model(x, t, y)
    assert torch.count_nonzero(digits_model(reg_dim=64)(x, t, y, cls_t=torch.ones(2, 64))["cls_v"]) == 0


def test_dinov2_teacher_preprocessing_and_tokens():
    """Random weights (tests only): 224*res/256 bicubic input, ImageNet normalisation, final-norm tokens."""
    teacher = train.DinoV2Teacher(resolution=256, random_init=True)
    assert teacher.size == 224 and teacher.dims == (768, 768)
    images = torch.randint(0, 256, (1, 256, 256, 3), dtype=torch.uint8)
    cls, patches = teacher(images)
    assert cls.shape == (1, 768) and patches.shape == (1, 256, 768)
    x = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float() / 255, size=(224, 224),
                                        mode="bicubic", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    tokens = teacher.model.norm(teacher.model.blocks(teacher.model._pos_embed(teacher.model.patch_embed((x - mean) / std))))
    torch.testing.assert_close(cls, tokens[:, 0], rtol=1e-4, atol=1e-4)
    with pytest.raises(train.ConfigError, match="needs --encoder_weights"):
        train.DinoV2Teacher(resolution=256)


def test_dinov2_weights_file_is_checked(tmp_path):
    from safetensors.torch import save_file
    donor = train.DinoV2Teacher(resolution=256, random_init=True)
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in donor.model.state_dict().items()}, str(path))
    from preprocessing.shards import sha256_file
    loaded = train.DinoV2Teacher(resolution=256, weights=str(path), sha256=sha256_file(path))
    for a, b in zip(loaded.model.state_dict().values(), donor.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(train.ConfigError, match="have sha256"):
        train.DinoV2Teacher(resolution=256, weights=str(path), sha256="0" * 64)
    pickled = tmp_path / "dinov2.pth"
    pickled.write_bytes(b"x")
    with pytest.raises(train.ConfigError, match="only .safetensors"):
        train.DinoV2Teacher(resolution=256, weights=str(pickled))


# ---- the whole trainer with every component on ----------------------------------------------
def test_all_components_train_sample_and_resume_exactly(tmp_path, run_args):
    from safetensors.torch import load_file
    args = run_args + ALL_FLAGS + ["--write_record", "false"]
    summary = train.train(train.parse_config(args + ["--run_name", "full"]))
    assert set(summary["metrics"]) >= {"fid", "precision"}
    run_dir = Path(summary["run_dir"])
    model, meta = train.load_model(run_dir / "model.safetensors")
    assert model.opts.reg_dim == 64 and model.opts.sprint and model.opts.time_shift_base == 4096
    resumed = tmp_path / "runs" / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil
    shutil.copy(train.list_checkpoints(run_dir)[0], resumed / "checkpoints")
    train.train(train.parse_config(args + ["--run_name", "resumed", "--resume", "auto"]))
    a = load_file(str(train.list_checkpoints(run_dir)[-1]))
    b = load_file(str(train.list_checkpoints(resumed)[-1]))
    for key in a:
        if key != "rng.torch_cpu":
            assert torch.equal(a[key], b[key]), key


def test_gradient_accumulation_counts_towards_the_global_batch(tmp_path, run_args):
    from safetensors.torch import load_file
    args = run_args + ALL_FLAGS + ["--write_record", "false", "--iterations", "3"]
    one = train.train(train.parse_config(args + ["--run_name", "a1"]))
    four = train.train(train.parse_config(args + ["--run_name", "a4", "--grad_accum", "4"]))
    a = load_file(str(train.list_checkpoints(Path(one["run_dir"]))[-1]))
    b = load_file(str(train.list_checkpoints(Path(four["run_dir"]))[-1]))
    for key in a:
        if key.startswith(("model.", "ema.")):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)
    with pytest.raises(train.ConfigError, match="not divisible"):
        train.train(train.parse_config(args + ["--run_name", "a3", "--grad_accum", "3"]))


@pytest.mark.parametrize("flash", [False, True], ids=["prologue+sdpa", "flash"])
def test_triton_kernels_match_torch_through_the_whole_model(monkeypatch, flash):
    """--kernels triton (the QK-norm + RoPE kernel feeding SDPA, or the fused flash attention,
    and, with RMSNorm, the fused modulated norm / gated residual; interpreted on CPU) gives the
    torch path's outputs and gradients, with value residual, REG token and SPRINT routing on."""
    opts = dict(ALL_ON, reg_dim=64)
    x, t, y, cls_t = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 10]), torch.randn(2, 64)
    keep = torch.stack([torch.randperm(17)[:4].sort().values for _ in range(2)])
    import kernels
    attention = "attention" if flash else "qk_norm_rope"
    calls = {"modulated_rmsnorm": 0, "gated_residual_modulated_rmsnorm": 0, attention: 0}
    assert kernels.selfcheck("cpu") == (True, "ok")  # set_kernels runs it (cached): not counted below
    for name in calls:  # count the fused calls, so a silent fallback to the torch path fails the test
        def counted(*a, _f=getattr(kernels, name), _n=name, **k):
            calls[_n] += 1
            return _f(*a, **k)
        monkeypatch.setattr(kernels, name, counted)
    results = []
    for backend in ("torch", "triton"):
        model = digits_model(**opts)
        for p in model.parameters():  # away from the zero init so every path carries signal
            p.data.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
        assert train.set_kernels(model, backend, torch.device("cpu"), flash_attention=flash) == backend
        out = model(x, t, y, cls_t=cls_t, routing=Routing(keep=keep))
        (out["v"].pow(2).mean() + out["cls_v"].pow(2).mean()).backward()
        results.append((out["v"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    depth = len(digits_model(**opts).blocks)
    assert calls == {"modulated_rmsnorm": depth, "gated_residual_modulated_rmsnorm": depth, attention: depth}
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert train.set_kernels(digits_model(), "auto", torch.device("cpu")) == "torch"
    with pytest.raises(train.ConfigError, match="--kernels must be"):
        train.set_kernels(digits_model(), "cuda", torch.device("cpu"))


def test_files_of_a_retired_format_are_refused_with_the_reason_and_a_misfit_moment_is_named(tmp_path):
    """v1 checkpoints and models hold networks that no longer exist (1000 t embedding, REG head
    before the final norm, class token never dropped): loading one must say so, not load weights
    into a network that computes something else. A moment that does not fit is named."""
    import copy

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    model = digits_model(**ALL_ON)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])
    model(x, t, y, routing=Routing(path_drop=True))["v"].square().mean().backward()
    opt.step()
    path = tmp_path / "ckpt.safetensors"
    train.save_checkpoint(path, model, ema, opt, 1, train.parse_config([]), {})
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
    fresh, fresh_ema = digits_model(**ALL_ON), digits_model(**ALL_ON)
    train.load_checkpoint(path, fresh, fresh_ema, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    assert torch.equal(fresh.mask_token, model.mask_token)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=metadata | {"format": "speedrun-ckpt-v1"})
    with pytest.raises(train.CheckpointError, match=r"'speedrun-ckpt-v1'.*1000 t.*retrain"):
        train.load_checkpoint(old, fresh, fresh_ema, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    save_file(tensors, str(old), metadata=metadata | {"format": "speedrun-model-v1"})
    with pytest.raises(train.CheckpointError, match=r"'speedrun-model-v1'.*retrain"):
        train.load_model(old)
    save_file({k: (v[:3] if k == "optim.mask_token.exp_avg" else v) for k, v in tensors.items()}, str(path),
              metadata=metadata)
    with pytest.raises(train.CheckpointError, match="mask_token"):
        train.load_checkpoint(path, fresh, fresh_ema, torch.optim.AdamW(fresh.parameters(), lr=1e-3))


def test_kernels_auto_is_the_measured_faster_torch_path(monkeypatch):
    """--kernels auto is torch on a GPU too (the faster step as measured on an H200, eager and
    compiled), without running the kernels' self-check; --kernels triton stands."""
    import kernels

    def no_selfcheck(device):
        raise AssertionError("auto must not compile the kernels")
    monkeypatch.setattr(kernels, "selfcheck", no_selfcheck)
    cuda = torch.device("cuda")
    model = digits_model(rope=True, qk_norm=True)
    assert train.set_kernels(model, "auto", cuda) == "torch"
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"torch"}
    monkeypatch.setattr(kernels, "selfcheck", lambda device: (True, "ok"))
    assert train.set_kernels(model, "triton", cuda) == "triton"
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"triton"}
