#!/usr/bin/env python
"""Time ONE training step of the *public* SR-DiT code, run unmodified.

This driver is ours; the third-party code it runs is NOT part of the repository: it
lives in a git-ignored folder, .srdit/ at the repository root by default
($SRDIT_CODE_DIR elsewhere), exported verbatim with `git archive` by
`bash benchmarks/fetch_public_srdit.sh` from (see its SOURCES.txt):
  srdit/      github.com/SwayStar123/SpeedrunDiT @ c24c2ff25699cce63174ca56c2afcfeeb225e367
              (branch main; its train.sh is the all-components SR-DiT run:
               REG + INVAE + SPRINT + RMSNorm + RoPE + QK-norm + value residual +
               CFM 0.05 + time shift)
  dinov2_hub/ github.com/facebookresearch/dinov2 @ b8931f7bf91576930313be2c6d6af376033b35f0
              (the code torch.hub.load('facebookresearch/dinov2', 'dinov2_vitb14')
               would download; only the backbone part)
  _vendor/    einops 0.8.2 from PyPI (pure python; used by their models/pos_embed.py;
              only put on sys.path when einops is not installed)

How the step is run
  * Config: their train.py `parse_args` (extracted from train.py by AST) applied to
    the argument list of their train.sh, so every default (cfg-prob 0.1, qk-norm,
    fused-attn, proj 0.5, cls 0.03, cfm 0.05 uniform, time shift base 4096,
    AdamW 1e-4 (0.9,0.999) eps 1e-8 wd 0, grad clip 1.0, bf16, tf32) is theirs.
    --batch-size in train.sh is the GLOBAL batch (256 on 8 GPUs = 32 per GPU);
    here --batch is the per-GPU batch.
  * Model / loss / encoder loading: their models.sit.SiT_models, loss.SILoss and
    utils.load_encoders, called as train.py calls them.
  * The step itself: the statements of train.py's inner training loop body
    (from `raw_image = raw_image.to(device)` through the
    `with accelerator.accumulate(model):` block = DINOv2 forward under
    accelerator.autocast, SILoss, backward, clip_grad_norm_, AdamW step,
    zero_grad, update_ema) plus its `logs = {...}` statement (6 gathers + .item())
    are extracted from train.py by AST and exec'd each step.  Their helper
    functions preprocess_raw_image / sample_posterior / update_ema / requires_grad
    are extracted the same way.  Nothing of train.py that imports wandb,
    diffusers (INVAE decoder), the dataset, or the sampler is imported.
  * Accelerate is used exactly like train.py (Accelerator(mixed_precision='bf16'),
    prepare(model, optimizer)), so the SiT forward runs under accelerate's
    autocast wrapper just like in their run.  train.py does not torch.compile.

Substitutions (documented):
  * DINOv2-B/14: their load_encoders() calls torch.hub.load (network).  We patch
    torch.hub.load so that their call for 'facebookresearch/dinov2' returns
      --dino hub  (default): dinov2.hub.backbones.dinov2_vitb14(pretrained=False)
                  from the exported facebookresearch/dinov2 code, i.e. the same
                  code torch.hub would fetch, with random init;
      --dino timm: timm 'vit_base_patch14_dinov2' (pretrained=False, img_size=224)
                  in a tiny adapter that returns the x_norm_* dict.
    Their first try (a placeholder local hub path) fails exactly as it does for
    anyone without that path.  Their code then deletes the head, resamples
    pos_embed to 16x16 and calls .eval() as usual.
  * huggingface_hub is only needed by utils.download_model (not used here); if
    it is not installed a stub module is inserted so `import utils` works.
  * torchvision.transforms.Normalize (used by their preprocess_raw_image): if
    torchvision is missing, a stand-in with identical math is used.
  * Data: random INVAE-like latents (B,1,32,16,16) fp32, random uint8 images
    (B,3,256,256) and labels, in pinned CPU memory; the step moves them to the
    device with .to(device) as train.py does (no DataLoader workers).

Usage (benchmarks/bench_gpu_step.py --public runs it in the same call as our step):
  python benchmarks/public_srdit_step.py [--batch 32] [--steps 20] [--warmup 5]
                             [--device cuda|cpu] [--dino hub|timm] [--no-log]
"""
import argparse
import ast
import copy
import math
import os
import re
import statistics
import sys
import time
import types
from collections import OrderedDict

HERE = os.environ.get("SRDIT_CODE_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".srdit")
SRDIT = os.path.join(HERE, "srdit")
DINOV2 = os.path.join(HERE, "dinov2_hub")
VENDOR = os.path.join(HERE, "_vendor")

sys.path.insert(0, DINOV2)
sys.path.insert(0, SRDIT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:  # their models/pos_embed.py needs einops
    import einops  # noqa: F401
except ImportError:
    sys.path.append(VENDOR)
    import einops  # noqa: F401

try:  # their utils.py imports huggingface_hub at top level (only for download_model)
    import huggingface_hub  # noqa: F401
except ImportError:
    # STUB: huggingface_hub is only used by utils.download_model, which is never called.
    _hf = types.ModuleType("huggingface_hub")

    def _no_hf(*a, **k):
        raise RuntimeError("huggingface_hub stub: no network downloads in public_srdit_step.py")

    _hf.hf_hub_download = _no_hf
    sys.modules["huggingface_hub"] = _hf

try:
    from torchvision.transforms import Normalize
except ImportError:
    # STAND-IN for torchvision.transforms.Normalize (same math as
    # torchvision.transforms.functional.normalize on a float tensor).
    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, x):
            mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            return x.sub(mean).div(std)

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from accelerate import Accelerator, DistributedDataParallelKwargs  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

# --- their code -------------------------------------------------------------
# their models/ has no __init__.py (namespace package); pin it to srdit/models so an
# unrelated installed package called `models` can never shadow it.
_models_pkg = types.ModuleType("models")
_models_pkg.__path__ = [os.path.join(SRDIT, "models")]
sys.modules["models"] = _models_pkg
from models.sit import SiT_models  # noqa: E402
from loss import SILoss  # noqa: E402
import utils as srdit_utils  # noqa: E402

TRAIN_PY = os.path.join(SRDIT, "train.py")
TRAIN_SH = os.path.join(SRDIT, "train.sh")


def _load_train_py_parts():
    """Extract helper functions and the loop-body statements from their train.py."""
    src = open(TRAIN_PY).read()
    tree = ast.parse(src, TRAIN_PY)
    want = {"preprocess_raw_image", "sample_posterior", "update_ema", "requires_grad", "parse_args"}
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in want]
    assert {f.name for f in funcs} == want, "train.py layout changed"
    ns = {
        "torch": torch, "F": F, "OrderedDict": OrderedDict, "argparse": argparse,
        "Normalize": Normalize, "IMAGENET_DEFAULT_MEAN": IMAGENET_DEFAULT_MEAN,
        "IMAGENET_DEFAULT_STD": IMAGENET_DEFAULT_STD, "math": math,
    }
    exec(compile(ast.Module(body=funcs, type_ignores=[]), TRAIN_PY, "exec"), ns)

    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    inner = None
    for node in ast.walk(main):
        if (isinstance(node, ast.For) and isinstance(node.iter, ast.Name)
                and node.iter.id == "train_dataloader"):
            inner = node
    assert inner is not None, "train loop not found in train.py"
    body = inner.body
    step_stmts, log_stmts = [], []
    for i, st in enumerate(body):
        step_stmts.append(st)
        if isinstance(st, ast.With) and "accelerator.accumulate" in ast.unparse(st.items[0]):
            break
    else:
        raise AssertionError("accumulate block not found")
    for st in body[i + 1:]:
        if isinstance(st, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "logs" for t in st.targets):
            log_stmts.append(st)
    assert len(log_stmts) == 1
    step_src = "\n".join(ast.unparse(s) for s in step_stmts)
    for needle in ("raw_image.to(device)", "encoder.forward_features", "accelerator.autocast()",
                   "loss_fn(model", "accelerator.backward(loss)", "clip_grad_norm_",
                   "optimizer.step()", "update_ema(ema, model)"):
        assert needle in step_src, f"expected '{needle}' in train.py step"
    step_code = compile(ast.Module(body=step_stmts, type_ignores=[]), TRAIN_PY, "exec")
    log_code = compile(ast.Module(body=log_stmts, type_ignores=[]), TRAIN_PY, "exec")
    log_src = "\n".join(ast.unparse(s) for s in log_stmts)
    return ns, step_code, log_code, step_src, log_src


def _train_sh_args():
    """The argument list of their train.sh (everything after `train.py`)."""
    txt = open(TRAIN_SH).read().replace("\\\n", " ")
    txt = txt[txt.index("train.py") + len("train.py"):]
    out = []
    for tok in re.findall(r"--[A-Za-z0-9-]+(?:=(?:\"[^\"]*\"|\S+))?", txt):
        out.append(tok.replace('"', ""))
    return out


class _TimmDinoV2(nn.Module):
    """Adapter: timm vit_base_patch14_dinov2 with the DINOv2-hub interface their code uses
    (.embed_dim, .pos_embed, .head, .forward_features -> dict of x_norm_* tensors)."""

    def __init__(self):
        super().__init__()
        import timm
        self.vit = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224,
                                     num_classes=0)
        self.embed_dim = self.vit.embed_dim
        self.head = nn.Identity()

    @property
    def pos_embed(self):
        return self.vit.pos_embed

    def forward_features(self, x):
        x = self.vit.forward_features(x)
        p = self.vit.num_prefix_tokens
        return {"x_norm_clstoken": x[:, 0], "x_norm_patchtokens": x[:, p:]}


def _patch_torch_hub(kind):
    real_load = torch.hub.load

    def fake_load(repo_or_dir, model, *a, **k):
        if repo_or_dir == "facebookresearch/dinov2":
            if kind == "timm":
                assert model == "dinov2_vitb14", model
                return _TimmDinoV2()
            from dinov2.hub import backbones
            return getattr(backbones, model)(pretrained=False)
        if k.get("source") == "local" and not os.path.isdir(repo_or_dir):
            # their placeholder 'your_path/.cache/torch/hub/...' -> fails as it would
            raise FileNotFoundError(repo_or_dir)
        return real_load(repo_or_dir, model, *a, **k)

    torch.hub.load = fake_load


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch (train.sh: 256 / 8 GPUs)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dino", choices=["hub", "timm"], default="hub")
    p.add_argument("--no-log", action="store_true",
                   help="skip train.py's per-step `logs = {... .item()}` statement")
    p.add_argument("--show-step", action="store_true", help="print the extracted train.py step")
    cli = p.parse_args()

    ns, step_code, log_code, step_src, log_src = _load_train_py_parts()
    sh_args = _train_sh_args()
    args = ns["parse_args"](sh_args)
    global_batch = args.batch_size
    args.batch_size = cli.batch  # per process
    print(f"train.sh args: {' '.join(sh_args)}")
    print(f"(train.sh global batch {global_batch}; timing per-GPU batch {cli.batch})")
    if cli.show_step:
        print("---- train.py step (exec'd each iteration) ----\n" + step_src)
        print("---- train.py logging ----\n" + log_src + "\n----")

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        cpu=(cli.device == "cpu"),
    )
    device = accelerator.device
    if args.seed is not None:
        set_seed(args.seed + accelerator.process_index)

    latent_size = args.resolution // 16
    _patch_torch_hub(cli.dino)
    encoders, encoder_types, architectures = srdit_utils.load_encoders(
        args.enc_type, device, args.resolution)

    channels = 32
    scaling_factor = 0.3099
    latents_scale = torch.tensor([scaling_factor] * channels).view(1, channels, 1, 1).to(device)
    latents_bias = torch.zeros(channels).view(1, channels, 1, 1).to(device)

    z_dims = [encoder.embed_dim for encoder in encoders]
    block_kwargs = {"fused_attn": args.fused_attn, "qk_norm": args.qk_norm}
    model = SiT_models[args.model](
        input_size=latent_size, in_channels=channels, num_classes=args.num_classes,
        use_cfg=(args.cfg_prob > 0), z_dims=z_dims, **block_kwargs)
    model = model.to(device)
    ema = copy.deepcopy(model).to(device)
    ns["requires_grad"](ema, False)

    loss_fn = SILoss(
        prediction=args.prediction, path_type=args.path_type, encoders=encoders,
        accelerator=accelerator, weighting=args.weighting, cfm_weighting=args.cfm_weighting,
        apply_time_shift=args.time_shifting, shift_base=args.shift_base)

    n_params = sum(p.numel() for p in model.parameters())
    n_proj = sum(p.numel() for p in model.projectors.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_dino = sum(p.numel() for e in encoders for p in e.parameters())
    print(f"SiT Parameters: {n_params:,} (REPA projector {n_proj:,}; trainable {n_train:,}; "
          f"excl. projector {n_params - n_proj:,})  DINOv2 ({cli.dino}) params: {n_dino:,}")

    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    ns["update_ema"](ema, model, decay=0)
    model.train()
    ema.eval()
    model, optimizer = accelerator.prepare(model, optimizer)

    # random data, shaped like their CustomDataset batches (pinned CPU memory like DataLoader)
    g = torch.Generator().manual_seed(0)
    B = cli.batch
    raw_cpu = torch.randint(0, 256, (B, 3, args.resolution, args.resolution), dtype=torch.uint8,
                            generator=g)
    x_cpu = torch.randn(B, 1, channels, latent_size, latent_size, generator=g)
    y_cpu = torch.randint(0, args.num_classes, (B,), generator=g)
    if device.type == "cuda":
        raw_cpu, x_cpu, y_cpu = raw_cpu.pin_memory(), x_cpu.pin_memory(), y_cpu.pin_memory()

    step_ns = dict(ns)
    step_ns.update(
        device=device, accelerator=accelerator, model=model, ema=ema, optimizer=optimizer,
        loss_fn=loss_fn, args=args, encoders=encoders, encoder_types=encoder_types,
        architectures=architectures, latents_scale=latents_scale, latents_bias=latents_bias)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_step():
        step_ns.update(raw_image=raw_cpu, x=x_cpu, y=y_cpu)
        exec(step_code, step_ns)
        if not cli.no_log:
            exec(log_code, step_ns)

    for _ in range(cli.warmup):
        one_step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []  # each step synchronised, as bench_gpu_step.py times ours: a median for both
    for _ in range(cli.steps):
        t0 = time.perf_counter()
        one_step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = sum(times)

    ms = 1000.0 * dt / cli.steps
    ms_median = 1000.0 * statistics.median(times)
    ips = B * cli.steps / dt
    if not cli.no_log:
        print("last logs: " + ", ".join(f"{k}: {v:.5f}" for k, v in step_ns["logs"].items()))
    extra = ""
    if device.type == "cuda":
        extra = (f" gpu={torch.cuda.get_device_name()} "
                 f"peak_mem_GiB={torch.cuda.max_memory_allocated() / 2**30:.2f}")
    print(f"torch={torch.__version__} device={device} batch={B} steps={cli.steps} "
          f"warmup={cli.warmup} dino={cli.dino} log={'off' if cli.no_log else 'on'}{extra}")
    print(f"SRDIT_PUBLIC ms_per_step={ms:.2f} ms_median={ms_median:.2f} ms_max={1000.0 * max(times):.2f} "
          f"images_per_s={ips:.1f} params={n_params}")


if __name__ == "__main__":
    main()
