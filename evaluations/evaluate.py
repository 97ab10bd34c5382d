"""Scores a sample batch (.npz, ADM format) with a track's evaluation protocol.

    python -m evaluations.evaluate samples.npz --track digits --out metrics.json
    accelerate launch -m evaluations.evaluate samples.npz --track <imagenet track> --out metrics.json

An ImageNet track (evaluation.feature_network "inception_adm") is scored with FID, sFID, IS,
Precision/Recall as the ADM evaluator and KD, SR-DiT's KDD (evaluations/imagenet.py); its
reference batch is the ADM reference .npz the track names (<dataset.dir>/<reference>.npz, sha256
pinned by reference_sha256).

Sample statistics are always recomputed from `arr_0`: any mu/sigma a sample file carries is
ignored (a submitted file could carry made-up statistics). The reference batch is the track's
(for the digits track: the held-out split's `reference.npz`, built by preprocessing.digits).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from evaluations import metrics as M
from evaluations.features import get_feature_extractor
from evaluations.npz import SampleFileError  # noqa: F401  (public here)
from preprocessing.shards import sha256_file

IMAGENET_NETWORKS = ("inception_adm",)


def load_sample_batch(path: Path, resolution: int, channels: int, num_samples: int | None = None) -> np.ndarray:
    """arr_0 of an ADM-format .npz, validated: uint8, NHWC, the track's resolution and channels,
    and (when given) exactly num_samples images. Never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise SampleFileError(f"{path}: sample file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise SampleFileError(f"{path}: no 'arr_0' array (found {data.files})")
            images = data["arr_0"]
    except SampleFileError:
        raise
    except Exception as e:  # zipfile / format errors of a corrupt or truncated file
        raise SampleFileError(f"{path}: not a readable .npz file: {e}") from e
    if images.dtype != np.uint8:
        raise SampleFileError(f"{path}: arr_0 has dtype {images.dtype}, expected uint8 (0..255)")
    expected = (resolution, resolution, channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise SampleFileError(f"{path}: arr_0 has shape {tuple(images.shape)}, expected [N, "
                              f"{resolution}, {resolution}, {channels}] (NHWC)")
    if num_samples is not None and len(images) != num_samples:
        raise SampleFileError(f"{path}: {len(images)} samples, the protocol requires exactly {num_samples} "
                              f"(metrics over other counts are not comparable)")
    return images


def reference_images(track: dict) -> np.ndarray:
    data = track["dataset"]
    if data.get("builder") == "digits":
        from preprocessing.digits import REFERENCE_NAME, ensure_digits
        ensure_digits(data["dir"])
        return load_sample_batch(Path(data["dir"]) / REFERENCE_NAME, data["resolution"], data["channels"])
    raise NotImplementedError(f"track {track['name']!r}: reference batches for {data['name']!r} "
                              "come with the ImageNet evaluator")


def compute_metrics(sample_features: dict, reference_features: dict, protocol: dict) -> dict:
    """Pure: the protocol's metrics from pool features and logits."""
    real, fake = reference_features["pool"], sample_features["pool"]
    mu_r, sigma_r = M.feature_statistics(real)
    mu_f, sigma_f = M.feature_statistics(fake)
    out = {"fid": M.frechet_distance(mu_r, sigma_r, mu_f, sigma_f)}
    out["is"], out["is_std"] = M.inception_score(sample_features["logits"],
                                                 splits=int(protocol.get("inception_score_splits", 10)))
    out["precision"], out["recall"] = M.precision_recall(real, fake, k=int(protocol.get("precision_recall_k", 3)))
    kd = protocol.get("kernel_distance", {})
    out["kd"], out["kd_std"] = M.kernel_distance(real, fake, num_subsets=int(kd.get("num_subsets", 100)),
                                                 subset_size=int(kd.get("subset_size", 1000)),
                                                 seed=int(kd.get("seed", 0)))
    return {k: float(v) for k, v in out.items()}


def evaluate_samples(samples_path: Path, track: dict, **imagenet_options) -> dict:
    """The track's metrics (numbers only) for a sample batch (see score_samples)."""
    return score_samples(samples_path, track, **imagenet_options)[0]


def score_samples(samples_path: Path, track: dict, **imagenet_options) -> tuple[dict, dict]:
    """(metrics, provenance) for a sample batch: the track's metrics, and what scored them (the
    sha256 of the reference batch and of every network's weights, with their settings; no paths:
    it goes into records, where a reviewer compares it with the published files' digests).

    ImageNet tracks (feature network "inception_adm") go through
    :func:`evaluations.imagenet.evaluate_imagenet`; ``imagenet_options`` are passed on to it
    (backend, batch_size, cache_dir, reference_path, extractors, progress).
    """
    protocol, data = track["evaluation"], track["dataset"]
    if protocol.get("feature_network") in IMAGENET_NETWORKS:
        from evaluations.imagenet import evaluate_imagenet
        report = evaluate_imagenet(samples_path, track, **imagenet_options)
        metrics, used = report["metrics"], report["provenance"]
        provenance = {"reference_sha256": used["reference"]["sha256"],
                      "reference_statistics": used["reference"]["statistics"], "networks": used["networks"]}
    else:
        images = load_sample_batch(samples_path, data["resolution"], data["channels"],
                                   int(protocol["num_samples"]))
        extractor = get_feature_extractor(protocol["feature_network"])
        reference = reference_images(track)
        metrics = compute_metrics(extractor.extract(images), extractor.extract(reference), protocol)
        provenance = {"reference_sha256": hashlib.sha256(np.ascontiguousarray(reference).tobytes()).hexdigest(),
                      "networks": {protocol["feature_network"]: {"weights_sha256": sha256_file(extractor.path)}}}
    check_protocol_metrics(metrics, track)
    return metrics, provenance


def check_scoring_inputs(track: dict) -> None:
    """The files score_samples will need for this track are there and are the pinned ones
    (reference batch, feature networks' weights); the error score_samples would raise, raised now
    (train.py calls this before training, so a run does not end in it)."""
    protocol = track["evaluation"]
    if protocol.get("feature_network") in IMAGENET_NETWORKS:
        from evaluations.imagenet import check_evaluation_files
        check_evaluation_files(track)
    else:
        get_feature_extractor(protocol["feature_network"])
        reference_images(track)


def scoring_machine(device=None) -> dict:
    """Where a score was computed: the device and the libraries whose arithmetic the numbers rest
    on (features: torch; statistics: numpy; FID's matrix square root: scipy). Not part of a
    record's provenance, which must be the same wherever it is re-scored: a record's environment
    says where it was scored."""
    import scipy
    import torch

    from train import _cpu_model
    device = torch.device(device or "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return {"device": f"{device.type}: {name}", "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__}


def check_protocol_metrics(metrics: dict | None, track: dict) -> None:
    """Every metric the protocol lists was computed (a silently missing column would rank a record
    on fewer numbers than the track promises). ``None``: a process that does not score."""
    missing = sorted(set(track["evaluation"].get("metrics", [])) - set(metrics or {}))
    if metrics is not None and missing:
        raise ValueError(f"track {track.get('name')!r} lists the metrics {missing}, which its evaluation "
                         f"protocol did not compute (computed: {sorted(metrics)})")


def main(argv: list[str] | None = None) -> int:
    from preprocessing.shards import atomic_write, check_output_file
    from train import load_track

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("samples", help="ADM-format .npz with arr_0 = uint8 [N, H, W, C]")
    parser.add_argument("--track", default="digits", help="track name or JSON path")
    parser.add_argument("--out", default=None, help="write metrics.json here")
    imagenet = parser.add_argument_group("ImageNet tracks")
    imagenet.add_argument("--backend", choices=["torch", "tf"], default=None,
                          help="Inception backend: the PyTorch port (default) or the .pb run by TensorFlow")
    imagenet.add_argument("--reference", default=None, help="reference .npz (default: the track's)")
    imagenet.add_argument("--inception_weights", default=None, help=".pb or converted .safetensors")
    imagenet.add_argument("--dinov2_weights", default=None, help="DINOv2 ViT-L/14 .pth / .safetensors")
    imagenet.add_argument("--batch_size", type=int, default=None)
    imagenet.add_argument("--cache_dir", default=None, help="reference-feature cache (default data/eval_cache)")
    args = parser.parse_args(argv)
    try:
        track = load_track(args.track)
        if args.out:
            check_output_file(args.out)
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        print(f"[evaluate] error: {e}", file=sys.stderr)
        return 1
    if track["evaluation"].get("feature_network") in IMAGENET_NETWORKS:
        return _main_imagenet(args, track)
    try:
        metrics, provenance = score_samples(Path(args.samples), track)
    except SampleFileError as e:
        print(f"[evaluate] error: {e}", file=sys.stderr)
        return 1
    result = dict(metrics, provenance=dict(provenance, scored_on=scoring_machine()))
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    if args.out:
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text))
    print(text, end="")
    return 0


def _main_imagenet(args, track: dict) -> int:
    from preprocessing.shards import atomic_write

    from evaluations.imagenet import Distributed, build_extractors, evaluate_imagenet

    dist = Distributed.from_environment()
    try:
        extractors = build_extractors(track["evaluation"], backend=args.backend, device=dist.device,
                                      inception_weights=args.inception_weights,
                                      dinov2_weights=args.dinov2_weights)
        report = evaluate_imagenet(Path(args.samples), track, extractors=extractors, batch_size=args.batch_size,
                                   cache_dir=args.cache_dir, reference_path=args.reference, dist=dist)
        check_protocol_metrics(report["metrics"], track)
    except (ValueError, ImportError) as e:  # BatchFileError, WeightsFileError, InceptionGraphError too
        print(f"[evaluate] error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.close()  # the last collective is behind us: leave the process group before exit
    if not dist.is_main:
        return 0
    result = dict(report["metrics"])
    if "kd" in result:
        result["kd_definition"] = report["definitions"]["kd"]
    result["provenance"] = dict(report["provenance"], scored_on=scoring_machine(dist.device))
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    if args.out:
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
