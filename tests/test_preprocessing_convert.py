"""convert: the ADM crop, odd inputs and the skip report, determinism, archives, resume after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocessing.convert import ConvertError, convert
from preprocessing.images import SourceError, adm_center_crop, adm_resize_plan, decode_image, to_rgb
from preprocessing.shards import ShardDataset, verify_dataset
from preprocessing.synthetic import make_image_zoo, smooth_image

ROOT = Path(__file__).resolve().parent.parent
RES = 32


# --------------------------------------------------------------------------- the crop, by hand


def test_adm_crop_box_halving_then_centre_crop_hand_computed():
    # 8 wide x 4 high, target 2: short side 4 >= 2*2 -> one BOX halving to 4x2 (2x2 block means),
    # then scale 2/2 = 1 (bicubic to the same size is the identity), then the centre 2x2 window:
    # top = (2-2)//2 = 0, left = (4-2)//2 = 1, i.e. the blocks covering x in {2,3} and {4,5}.
    x = np.arange(8)[None, :]
    y = np.arange(4)[:, None]
    red = (10 * x + 40 * y).astype(np.uint8)
    image = Image.fromarray(np.stack([red, red // 2, np.full_like(red, 7)], axis=2))
    out = adm_center_crop(image, 2)
    # block means of 10x+40y: x{2,3} -> 25, x{4,5} -> 45; y{0,1} -> 20, y{2,3} -> 100
    assert out[..., 0].tolist() == [[45, 65], [125, 145]]
    assert out[..., 2].tolist() == [[7, 7], [7, 7]]
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)


def test_adm_crop_offsets_and_sizes():
    # no halving (4 < 2*4), scale 1, left offset (6-4)//2 = 1
    array = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    assert np.array_equal(adm_center_crop(Image.fromarray(array), 4), array[:, 1:5])
    # 1000x700 at 256: 700 >= 512 -> halve to 500x350; scale 256/350 -> round(365.71) = 366 x 256
    assert adm_resize_plan(1000, 700, 256) == (1, [(500, 350)], (366, 256))
    # 300x200 at 256: bicubic to 384x256, then columns 64..319
    array = smooth_image(np.random.default_rng(1), 300, 200)
    expect = np.asarray(Image.fromarray(array).resize((384, 256), Image.BICUBIC))[:, 64:320]
    assert np.array_equal(adm_center_crop(Image.fromarray(array), 256), expect)


def test_mode_conversions():
    clear = Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA")  # fully transparent black
    white, note = to_rgb(clear, "white")
    assert np.all(np.asarray(white) == 255) and "white" in note
    dropped, note = to_rgb(clear, "drop")
    assert np.all(np.asarray(dropped) == 0) and "dropped" in note
    grey16 = Image.fromarray(np.array([[0, 257 * 100, 65535, 128]], np.uint16))
    rgb, note = to_rgb(grey16)
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 100, 255, 0] and "8-bit" in note
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(to_rgb(cmyk)[0])[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(ValueError, match="unsupported mode F"):
        to_rgb(Image.new("F", (2, 2)))
    image, reason, _ = decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "x.png", 8)
    assert image is None and reason
    # a PNG tRNS colour key on greyscale, RGB and 16-bit greyscale images is transparency too
    import io
    keyed = {"L": (np.array([[17, 40]], np.uint8), 17), "RGB": (np.array([[[17] * 3, [40] * 3]], np.uint8), (17,) * 3),
             "I;16": (np.array([[17 * 257, 40 * 257]], np.uint16), 17 * 257)}
    for mode, (pixels, key) in keyed.items():
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", transparency=key)
        png = Image.open(io.BytesIO(buf.getvalue()))
        rgb, note = to_rgb(png, "white")
        assert np.asarray(rgb)[0].tolist() == [[255] * 3, [40] * 3] and "composited on white" in note, mode
        assert np.asarray(to_rgb(png, "drop")[0])[0].tolist() == [[17] * 3, [40] * 3], mode  # ADM's reading


# --------------------------------------------------------------------------- a whole folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "train"
    expect = make_image_zoo(root)
    return root, expect


@pytest.fixture(scope="module")
def converted(zoo, tmp_path_factory):
    src, _ = zoo
    out = tmp_path_factory.mktemp("conv") / "ds"
    convert(src, out, resolution=RES, shard_size=5, workers=2, progress=False, log=lambda *a: None)
    return out


def test_every_file_is_converted_or_reported(zoo, converted):
    src, expect = zoo
    manifest = verify_dataset(converted)
    report = json.loads((converted / "convert_report.json").read_text())
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    notes = {s["path"]: s["note"] for s in report["notes"]}
    for path, outcome in expect.items():
        if outcome.startswith("skip:"):
            assert path in skipped, path
            assert skipped[path].startswith(outcome[5:]), (path, skipped[path])
        else:
            assert path not in skipped, (path, skipped.get(path))
            assert (path in notes) == (outcome == "note"), (path, notes.get(path))
    kept = sum(1 for o in expect.values() if not o.startswith("skip:"))
    assert manifest["splits"]["train"]["count"] == kept == report["converted"]
    assert report["skipped_count"] == len(expect) - kept
    assert manifest["latent_encoder"] is None and manifest["image_shape"] == [RES, RES, 3]


def test_labels_follow_sorted_class_names_and_pixels_match_direct_decode(zoo, converted):
    src, expect = zoo
    ds = ShardDataset(converted, "train")
    assert ds.class_names == ["n01000002", "n02000001", "n03000003"]
    assert not ds.has_latents
    with pytest.raises(ValueError, match="no latents"):
        ds.get_latents([0])
    kept = sorted(p for p, o in expect.items() if not o.startswith("skip:"))
    classes = [p.split("/")[0] for p in kept]
    assert ds.labels.tolist() == [ds.class_names.index(c) for c in classes]
    for i in (0, len(kept) // 2, len(kept) - 1):
        direct, reason, _ = decode_image((src / kept[i]).read_bytes(), kept[i], RES)
        assert reason is None and np.array_equal(ds.get_images([i])[0], direct)
    # shards were split by slices of the listing: skips leave some shards short
    counts = [s["count"] for s in ds.manifest["splits"]["train"]["shards"]]
    assert sum(counts) == len(kept) and max(counts) <= 5 and min(counts) < 5


def _tree_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_runs_are_byte_identical_whatever_the_worker_count(zoo, converted, tmp_path):
    src, _ = zoo
    again = tmp_path / "again"
    convert(src, again, resolution=RES, shard_size=5, workers=0, progress=False, log=lambda *a: None)
    assert _tree_bytes(again) == _tree_bytes(converted)
    assert not (tmp_path / "again.partial").exists()


def test_tar_zip_and_nested_tar_give_the_same_dataset(zoo, converted, tmp_path):
    src, _ = zoo
    tar_path = tmp_path / "train.tar"
    with tarfile.open(tar_path, "w") as tar:  # wrapped in a top-level "train/" folder
        tar.add(src, arcname="train")
    zip_path = tmp_path / "train.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    nested = tmp_path / "imagenet_style.tar"  # one <class>.tar per class, like the official train tar
    with tarfile.open(nested, "w") as outer:
        for cls in sorted(d for d in src.iterdir() if d.is_dir()):
            inner = tmp_path / f"{cls.name}.tar"
            with tarfile.open(inner, "w") as t:
                for p in sorted(cls.iterdir()):
                    t.add(p, arcname=p.name)
            outer.add(inner, arcname=inner.name)
    reference = ShardDataset(converted, "train")
    for archive in (tar_path, zip_path, nested):
        out = tmp_path / f"from_{archive.name}"
        convert(archive, out, resolution=RES, shard_size=5, workers=0, progress=False, log=lambda *a: None)
        ds = ShardDataset(out, "train")
        assert ds.class_names == reference.class_names, archive
        assert np.array_equal(ds.labels, reference.labels), archive
        assert np.array_equal(ds.get_images(slice(None)), reference.get_images(slice(None))), archive
    gz = tmp_path / "train.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(src, arcname="train")
    with pytest.raises(SourceError, match="uncompressed"):
        convert(gz, tmp_path / "gz", resolution=RES, workers=0, progress=False, log=lambda *a: None)


def test_an_archive_whose_classes_sit_deeper_is_refused_before_converting(tmp_path):
    """Kaggle's ImageNet zip (ILSVRC/Data/CLS-LOC/train/<synset>/..., beside annotations) read
    without --archive-root lists one class, 'ILSVRC': refused at once, naming the flag; with it,
    the synsets are the classes."""
    kaggle = tmp_path / "kaggle.zip"
    with zipfile.ZipFile(kaggle, "w") as zf:
        zf.writestr("LOC_synset_mapping.txt", "n01 a\nn02 b\n")
        zf.writestr("ILSVRC/Annotations/CLS-LOC/val/v1.xml", "<annotation/>")
        for cls in ("n01", "n02"):
            png = tmp_path / f"{cls}.png"
            Image.fromarray(np.full((20, 20, 3), 50, np.uint8)).save(png)
            zf.write(png, f"ILSVRC/Data/CLS-LOC/train/{cls}/{cls}_1.png")
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=r"1 class folder\(s\) found \['ILSVRC'\].*--archive-root"):
        convert(kaggle, out, resolution=8, workers=0, progress=False, log=lambda *a: None)
    assert not out.exists()
    convert(kaggle, out, resolution=8, workers=0, archive_root="ILSVRC/Data/CLS-LOC/train", progress=False,
            log=lambda *a: None)
    assert ShardDataset(out, "train").class_names == ["n01", "n02"]


def test_an_empty_class_folder_keeps_its_class_id_in_every_source_kind(tmp_path):
    """n02 holds no image (only a hidden file): it is still class 1, n03's images are class 2, and
    the report lists n02 as empty, whether the source is a folder, a tar, a zip or a nested tar."""
    from PIL import Image
    src = tmp_path / "src"
    for cls in ("n01", "n03"):
        (src / cls).mkdir(parents=True)
        Image.fromarray(np.full((20, 20, 3), 100, np.uint8)).save(src / cls / "a.png")
    (src / "n02").mkdir()
    (src / "n02" / ".DS_Store").write_bytes(b"x")
    tar_path, zip_path, nested = tmp_path / "s.tar", tmp_path / "s.zip", tmp_path / "nested.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src, arcname="train")  # directory members included
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src).as_posix() + ("/" if p.is_dir() else ""))
    with tarfile.open(nested, "w") as outer:
        for cls in ("n01", "n02", "n03"):
            with tarfile.open(tmp_path / f"{cls}.tar", "w") as t:
                for p in sorted((src / cls).glob("*.png")):
                    t.add(p, arcname=p.name)
            outer.add(tmp_path / f"{cls}.tar", arcname=f"{cls}.tar")
    for source in (src, tar_path, zip_path, nested):
        out = tmp_path / f"out_{source.name}"
        convert(source, out, resolution=8, workers=0, progress=False, log=lambda *a: None)
        ds = ShardDataset(out, "train")
        assert ds.class_names == ["n01", "n02", "n03"], source
        assert sorted(ds.labels.tolist()) == [0, 2], source
        assert json.loads((out / "convert_report.json").read_text())["empty_classes"] == ["n02"], source


def test_refusals_keep_existing_output(zoo, converted, tmp_path):
    src, _ = zoo
    before = _tree_bytes(converted)
    with pytest.raises(ConvertError, match="--force"):
        convert(src, converted, resolution=RES, shard_size=5, workers=0, progress=False, log=lambda *a: None)
    assert _tree_bytes(converted) == before
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="non-empty"):
        convert(src, tmp_path / "full", resolution=RES, workers=0, progress=False, log=lambda *a: None)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(SourceError, match="does not exist"):
        convert(tmp_path / "missing", tmp_path / "x", resolution=RES, workers=0, progress=False)


# --------------------------------------------------------------------------- resume after a kill


def _cli(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "preprocessing", "convert", *map(str, args)], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_resume_after_kill_is_byte_identical(zoo, converted, tmp_path):
    src, _ = zoo
    out = tmp_path / "killed"
    args = (src, out, "--resolution", RES, "--shard-size", 5, "--workers", 1, "--no-progress")
    proc = _cli(*args, env={"PREPROCESSING_CONVERT_DELAY": "0.15"})
    markers = tmp_path / "killed.partial" / "train"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(markers.glob("slice-*.json"))) < 2:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in markers.glob("slice-*.json"))
    assert 2 <= len(done) < 5 and not out.exists()

    proc = _cli(*args)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log
    assert f"resuming: {len(done)} of 5 slices already done" in log
    assert _tree_bytes(out) == _tree_bytes(converted)
    assert not (tmp_path / "killed.partial").exists()


def test_partial_run_with_other_settings_is_refused(zoo, tmp_path):
    src, _ = zoo
    work = tmp_path / "ds.partial"
    work.mkdir()
    (work / "plan.json").write_text(json.dumps({"format": "speedrun-convert-plan-v1", "resolution": 64}))
    with pytest.raises(ConvertError, match="--restart"):
        convert(src, tmp_path / "ds", resolution=RES, shard_size=5, workers=0, progress=False, log=lambda *a: None)
    convert(src, tmp_path / "ds", resolution=RES, shard_size=5, workers=0, restart=True, progress=False,
            log=lambda *a: None)
    assert ShardDataset(tmp_path / "ds", "train").image_shape == (RES, RES, 3)


def test_a_finished_dataset_replaces_the_old_one_in_one_step(tmp_path, monkeypatch):
    """No moment without a dataset at OUT: the staging folder and OUT are exchanged atomically
    (os.replace, the two-rename fallback, is never reached here); the old copy is removed."""
    from preprocessing import shards
    out, staging = tmp_path / "out", tmp_path / ".out.staging"
    for folder, text in ((out, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "manifest.json").write_text(text)

    def no_two_step(*_args):
        raise AssertionError("replaced in two renames")
    monkeypatch.setattr(shards.os, "replace", no_two_step)
    shards.swap_into_place(staging, out, "t")
    assert (out / "manifest.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()
    staging.mkdir()
    (staging / "manifest.json").write_text("newer")
    monkeypatch.setattr(shards, "_exchange", lambda a, b: False)  # a system without renameat2
    shards.swap_into_place(staging, out, "t")
    assert (out / "manifest.json").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
