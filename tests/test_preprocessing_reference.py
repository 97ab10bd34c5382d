"""reference: ADM-format .npz from a held-out folder or a shard split; the digits reference byte for byte."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from preprocessing.convert import convert
from preprocessing.digits import REFERENCE_NAME
from preprocessing.images import SourceError
from preprocessing.reference import build_reference
from preprocessing.shards import ShardDataset
from preprocessing.synthetic import make_image_zoo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref") / "val"
    expect = make_image_zoo(root, seed=7, per_class=3)
    return root, expect


def _quiet(*_a, **_k):
    pass


def test_reference_from_folder_matches_convert_and_reports_skips(heldout, tmp_path):
    src, expect = heldout
    out = build_reference(tmp_path / "ref.npz", folder=src, resolution=16, workers=2, progress=False, log=_quiet)
    with np.load(out, allow_pickle=False) as data:
        assert sorted(data.files) == ["arr_0", "labels"]
        arr, labels = data["arr_0"], data["labels"]
    convert(src, tmp_path / "ds", resolution=16, workers=0, progress=False, log=_quiet)
    ds = ShardDataset(tmp_path / "ds", "train")
    assert arr.dtype == np.uint8 and arr.shape == (len(ds), 16, 16, 3)
    assert np.array_equal(arr, ds.get_images(slice(None))) and np.array_equal(labels, ds.labels)
    report = json.loads((tmp_path / "ref.npz.report.json").read_text())
    assert {s["path"] for s in report["skipped"]} == {p for p, o in expect.items() if o.startswith("skip:")}


def test_subset_is_seeded_and_independent_of_workers(heldout, tmp_path):
    src, _ = heldout
    a = build_reference(tmp_path / "a.npz", folder=src, resolution=16, num_images=5, seed=3, workers=0,
                        progress=False, log=_quiet)
    b = build_reference(tmp_path / "b.npz", folder=src, resolution=16, num_images=5, seed=3, workers=2,
                        progress=False, log=_quiet)
    c = build_reference(tmp_path / "c.npz", folder=src, resolution=16, num_images=5, seed=4, workers=0,
                        progress=False, log=_quiet)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert (tmp_path / "a.npz.report.json").read_bytes() == (tmp_path / "b.npz.report.json").read_bytes()
    with np.load(a) as data:
        assert data["arr_0"].shape == (5, 16, 16, 3)
        assert np.all(np.diff(data["labels"]) >= 0)  # returned in source (class) order


def test_flat_folder_has_no_labels(heldout, tmp_path):
    src, _ = heldout
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(src.glob("*/*_0.JPEG")):
        (flat / p.name).write_bytes(p.read_bytes())
    out = build_reference(tmp_path / "f.npz", folder=flat, resolution=16, flat=True, workers=0, progress=False,
                          log=_quiet)
    with np.load(out) as data:
        assert data.files == ["arr_0"] and data["arr_0"].shape == (3, 16, 16, 3)


def test_digits_reference_rebuilt_byte_for_byte_with_statistics(digits_dir, tmp_path):
    out = tmp_path / "digits_ref.npz"
    proc = subprocess.run([sys.executable, "-m", "preprocessing", "reference", "--shards", str(digits_dir),
                           "--split", "heldout", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (digits_dir / REFERENCE_NAME).read_bytes()



def test_statistics_are_inception_statistics_of_arr_0(heldout, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from conftest import random_inception
    from evaluations import inception as I
    from evaluations.features import get_feature_extractor
    from evaluations.metrics import feature_statistics
    src, _ = heldout
    model = random_inception(divisor=16)  # the real architecture, random weights, a sixteenth of the width
    weights = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"format": I.FORMAT, "source_sha256": "ab" * 32})
    monkeypatch.setenv("SPEEDRUN_INCEPTION_WEIGHTS", str(weights))
    stats = build_reference(tmp_path / "stats.npz", folder=src, resolution=16, features="inception_adm",
                            workers=0, progress=False, log=_quiet)
    with np.load(stats) as data:
        assert sorted(data.files) == ["arr_0", "labels", "mu", "mu_s", "sigma", "sigma_s"]
        feats = get_feature_extractor("inception_adm").extract(data["arr_0"])
        mu, sigma = feature_statistics(feats["pool"])
        np.testing.assert_allclose(data["mu"], mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(data["sigma"], sigma, rtol=1e-10, atol=1e-12)
        assert data["mu_s"].shape == (feats["spatial"].reshape(len(data["arr_0"]), -1).shape[1],)
    # ADM's keys mean Inception statistics: another network's are refused, not stored under them
    with pytest.raises(ValueError, match="ADM reference statistics are Inception"):
        build_reference(tmp_path / "digits.npz", folder=src, resolution=16, features="digits_net",
                        workers=0, progress=False, log=_quiet)
    # more images than the source can give is an error, not a shorter (incomparable) batch
    with pytest.raises(ValueError, match="asked for 1000 images, only"):
        build_reference(tmp_path / "short.npz", folder=src, resolution=16, num_images=1000, workers=0,
                        progress=False, log=_quiet)
    assert not (tmp_path / "short.npz").exists()


def test_failures_keep_an_existing_reference(tmp_path):
    out = tmp_path / "ref.npz"
    out.write_bytes(b"previous")
    with pytest.raises(SourceError, match="does not exist"):
        build_reference(out, folder=tmp_path / "missing", resolution=16, progress=False, log=_quiet)
    with pytest.raises(ValueError, match="exactly one source"):
        build_reference(out, log=_quiet)
    assert out.read_bytes() == b"previous"
