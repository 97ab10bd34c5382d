"""The ImageNet path end to end, shrunk to run on a CPU in seconds: images encoded to INVAE latents
by a checkpoint file, train.py at an ImageNet track's budget with every SR-DiT component (REPA and
REG with the DINOv2-B/14 teacher from a weights file), SDE sampling in float64 decoded by that same
INVAE, the ADM metrics from the Inception port loaded from a converted weights file, a record that
validates, and its reproduction. Only the sizes and the random weights differ from an ImageNet run;
every file goes through the code real runs use."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import generate
import train
from conftest import ROOT, random_inception
from preprocessing.encode import encode_dataset
from preprocessing.invae import INVAE, INVAEConfig, INVAEEncoder
from preprocessing.shards import write_dataset

# the published INVAE's 16x downsampling (so the SiT's tokens are the teacher's patches), narrow
TINY_INVAE = INVAEConfig(ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_levels=(4,), z_channels=4,
                         norm_groups=4)


def _save(tensors: dict, path, metadata=None) -> str:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_an_imagenet_shaped_track_trains_samples_scores_and_records(tmp_path, monkeypatch):
    from evaluations import inception as I
    from records.validate import validate_tree

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    images, labels = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), np.arange(24) % 3
    write_dataset(data, "imagenet", {"train": (images, labels)}, None, ["a", "b", "c"], shard_size=8)
    # the published INVAE architecture, shrunk (4 x 2 x 2 latents of 32 px images), from a file
    monkeypatch.setitem(INVAEEncoder.__init__.__kwdefaults__, "config", TINY_INVAE)
    torch.manual_seed(0)
    vae = INVAE(TINY_INVAE).eval()
    vae_file = tmp_path / "invae.safetensors"
    vae_sha = _save(vae.state_dict(), vae_file)
    encode_dataset(data, INVAEEncoder(vae_file, vae_sha, device="cpu"), progress=False, log=lambda *a: None)
    np.savez(data / "REF.npz", arr_0=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))
    teacher_file = tmp_path / "dinov2_vitb14.safetensors"  # timm's layout, random weights
    teacher_sha = _save(train.DinoV2Teacher(resolution=256, random_init=True).model.state_dict(), teacher_file)
    inception_file = tmp_path / "inception_adm.safetensors"
    inception_sha = _save(random_inception(divisor=16, logits_scale=0.3).state_dict(), inception_file,
                          {"format": I.FORMAT, "source_sha256": "cd" * 32})

    spec = json.loads((ROOT / "records" / "tracks" / "imagenet256_100k.json").read_text())
    spec["name"] = "tiny_imagenet"
    spec["dataset"] |= {"dir": str(data), "resolution": 32, "latent_shape": [4, 2, 2], "num_classes": 3,
                        "encoder_checkpoint_sha256": vae_sha}
    spec["budget"] = {"iterations": 4, "global_batch": 6}
    spec["train_defaults"] |= {"model": "SiT-Digits/1", "log_every": 2, "ckpt_every": 2}
    spec["evaluation"] |= {"num_samples": 6, "num_steps": 3, "eval_seeds": [0, 1, 2], "reference": "REF",
                           "inception": {"weights": str(inception_file), "sha256": inception_sha}}
    del spec["evaluation"]["kernel_distance"]  # DINOv2-L's KD is tested on its own (test_kdd.py)
    spec["evaluation"]["metrics"].remove("kd")
    del spec["reproduction_tolerance"]["kd"]
    records = tmp_path / "records"
    (records / "tracks").mkdir(parents=True)
    track_file = records / "tracks" / "tiny_imagenet.json"
    track_file.write_text(json.dumps(spec, indent=2))
    args = ["--track", str(track_file), "--runs_dir", str(tmp_path / "runs"), "--records_dir", str(records),
            "--leaderboard", str(tmp_path / "LEADERBOARD.md"), "--run_name", "run",
            "--encoder_weights", str(teacher_file), "--encoder_sha256", teacher_sha]

    monkeypatch.delenv("SPEEDRUN_INVAE_WEIGHTS", raising=False)
    with pytest.raises(train.ConfigError, match="SPEEDRUN_INVAE_WEIGHTS"):  # before the first step
        train.train(train.parse_config(args))
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()
    monkeypatch.setenv("SPEEDRUN_INVAE_WEIGHTS", str(vae_file))
    summary = train.train(train.parse_config(args))
    assert summary["step"] == 4

    valid, invalid = validate_tree(records)
    assert not invalid and len(valid) == 1
    (record_dir, record), = valid.items()
    assert set(spec["evaluation"]["metrics"]) <= set(record["metrics"]) and record["evaluation"] == spec["evaluation"]
    model, meta = train.load_model(record_dir / "model.safetensors")
    config = json.loads(meta["config"])
    assert model.autoencoder_sha256 == vae_sha and config["sprint"] and config["reg_coef"] == 0.03
    assert config["repa_coef"] == 0.5 and model.opts.reg_dim == 768  # the teacher's class token
    # the stored samples are the float64 SDE's latents decoded by the data's INVAE, truncated to uint8
    protocol = spec["evaluation"]
    latents, y = generate.sample_latents(model, range(6), (4, 2, 2), 3, protocol)
    with np.load(record_dir / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], INVAEEncoder(model=vae, device="cpu").decode(latents).numpy())
        np.testing.assert_array_equal(f["arr_1"], y.numpy())
    provenance = json.loads((record_dir / "metrics.json").read_text())["provenance"]
    assert provenance["networks"]["inception"]["weights_sha256"] == inception_sha
    # eval.sh's reproduction: the same samples again (decoded by $SPEEDRUN_INVAE_WEIGHTS), the same numbers
    from records import reproduce
    assert reproduce.main([str(record_dir), "--root", str(records)]) == 0
