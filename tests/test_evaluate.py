"""The evaluator's edges: sample-file validation, the CLI, and metrics on real digits."""
from __future__ import annotations

import json

import numpy as np
import pytest

from evaluations import evaluate
from evaluations.evaluate import SampleFileError, load_sample_batch


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_sample_batch_validation_names_file_and_problem(tmp_path):
    good = np.zeros((4, 8, 8, 1), np.uint8)
    assert load_sample_batch(_write(tmp_path / "ok.npz", arr_0=good), 8, 1, 4).shape == (4, 8, 8, 1)
    cases = {
        "float.npz": (dict(arr_0=good.astype(np.float32)), "dtype float32, expected uint8"),
        "nchw.npz": (dict(arr_0=np.zeros((4, 1, 8, 8), np.uint8)), r"shape \(4, 1, 8, 8\), expected"),
        "rgb.npz": (dict(arr_0=np.zeros((4, 8, 8, 3), np.uint8)), "expected"),
        "noarr.npz": (dict(images=good), "no 'arr_0'"),
        "count.npz": (dict(arr_0=good[:3]), "3 samples, the protocol requires exactly 4"),
    }
    for name, (arrays, message) in cases.items():
        with pytest.raises(SampleFileError, match=message) as err:
            load_sample_batch(_write(tmp_path / name, **arrays), 8, 1, 4)
        assert name in str(err.value)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes((tmp_path / "ok.npz").read_bytes()[:50])
    with pytest.raises(SampleFileError, match="corrupt.npz: not a readable .npz"):
        load_sample_batch(corrupt, 8, 1, 4)
    with pytest.raises(SampleFileError, match="not found"):
        load_sample_batch(tmp_path / "missing.npz", 8, 1, 4)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, arr_0=np.array([object()], dtype=object))
    with pytest.raises(SampleFileError, match="pickled.npz"):
        load_sample_batch(pickled, 8, 1, 4)


def test_sample_statistics_are_recomputed_not_read(tmp_path, tiny_track):
    """A sample file that carries made-up mu/sigma gets the same score as one that does not."""
    from train import load_track
    track = load_track(str(tiny_track))
    from preprocessing.shards import ShardDataset
    images = ShardDataset(track["dataset"]["dir"], "train").get_images(np.arange(20))
    plain = _write(tmp_path / "plain.npz", arr_0=images)
    forged = _write(tmp_path / "forged.npz", arr_0=images, mu=np.zeros(64), sigma=np.eye(64))
    assert evaluate.evaluate_samples(plain, track) == evaluate.evaluate_samples(forged, track)


def test_real_training_digits_score_far_better_than_noise(tmp_path, digits_dir):
    """Held-out-free sanity: real train digits vs noise images against the held-out reference."""
    from preprocessing.shards import ShardDataset
    from train import load_track
    track = load_track("digits")
    track["dataset"]["dir"] = str(digits_dir)
    n = track["evaluation"]["num_samples"]
    real = ShardDataset(digits_dir, "train").get_images(np.arange(n) % 1297)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    m_real = evaluate.evaluate_samples(_write(tmp_path / "r.npz", arr_0=real), track)
    m_noise = evaluate.evaluate_samples(_write(tmp_path / "n.npz", arr_0=noise), track)
    assert m_real["fid"] < 2 and m_noise["fid"] > 50 * m_real["fid"]
    assert m_real["precision"] > 0.9 and m_real["recall"] > 0.85 and m_noise["precision"] < 0.05
    assert m_real["is"] > 8 and m_noise["is"] < m_real["is"] / 2


def test_cli_writes_metrics_and_fails_on_bad_input(tmp_path, tiny_track, capsys):
    from preprocessing.shards import ShardDataset
    from train import load_track
    images = ShardDataset(load_track(str(tiny_track))["dataset"]["dir"], "train").get_images(np.arange(20))
    out = tmp_path / "metrics.json"
    assert evaluate.main([str(_write(tmp_path / "s.npz", arr_0=images)), "--track", str(tiny_track),
                          "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"fid", "is", "is_std", "precision", "recall", "kd", "kd_std", "provenance"}
    # what scored it (as a record stores it) and where (the CLI's output only)
    track = load_track(str(tiny_track))
    assert {k: v for k, v in metrics["provenance"].items() if k != "scored_on"} == \
        evaluate.score_samples(tmp_path / "s.npz", track)[1]
    assert metrics["provenance"]["scored_on"]["device"].startswith("cpu: ")
    assert metrics["provenance"]["scored_on"]["scipy"] == __import__("scipy").__version__
    bad = _write(tmp_path / "bad.npz", arr_0=images.astype(np.int16))
    assert evaluate.main([str(bad), "--track", str(tiny_track)]) == 1
    assert "bad.npz: arr_0 has dtype int16" in capsys.readouterr().err


def test_cli_refuses_a_bad_track_or_output_before_scoring(tmp_path, tiny_track, capsys):
    samples = str(_write(tmp_path / "s.npz", arr_0=np.zeros((20, 8, 8, 1), np.uint8)))
    assert evaluate.main([samples, "--track", "nosuch"]) == 1
    assert "track file" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert evaluate.main([samples, "--track", str(tiny_track), "--out", str(tmp_path / "folder")]) == 1
    assert f"output {tmp_path / 'folder'} is a folder" in capsys.readouterr().err
