"""Weight files of the ImageNet metric networks: where they come from and how they are checked.

Nothing is downloaded at run time.  A user fetches each file once (the sources are listed in
``SOURCES`` and in ``evaluations/README.md``) and gives its path; the file's sha256 is checked
against the value the track pins before the file is used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

from preprocessing.shards import sha256_file  # the project's one file hash (re-exported here)

PathLike = Union[str, Path]

# Where each file comes from (documentation only: nothing here is ever fetched by the code).
SOURCES = {
    "inception_pb": (
        "ADM's Inception graph classify_image_graph_def.pb (TensorFlow Inception, 2015-12-05): "
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb "
        "(the same file is inside http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz). "
        "Use it directly with the TensorFlow extra installed (pip install -r requirements-tf.txt), or convert it "
        "once: python -m evaluations.inception convert classify_image_graph_def.pb inception_adm.safetensors"
    ),
    "dinov2_vitl14": (
        "DINOv2 ViT-L/14 weights: Meta's dinov2_vitl14_pretrain.pth "
        "(https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth, the file torch.hub's "
        "facebookresearch/dinov2 'dinov2_vitl14' loads) or timm's conversion of it "
        "(Hugging Face timm/vit_large_patch14_dinov2.lvd142m, model.safetensors)"
    ),
}


class WeightsFileError(ValueError):
    """A weights / reference file is missing, unreadable or not the pinned one."""


def _expected_set(expected: Union[None, str, Iterable[str]]) -> Optional[set]:
    if expected is None:
        return None
    if isinstance(expected, str):
        expected = [expected]
    values = {str(e).strip().lower() for e in expected if e}
    return values or None


def check_file(path: PathLike, what: str, source: str,
               expected_sha256: Union[None, str, Iterable[str]] = None) -> str:
    """Check that ``path`` exists (and, when pinned, has one of the expected sha256); return its sha256.

    Raises :class:`WeightsFileError` naming the file, what it is and where it comes from.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: {what} not found. It comes from {source}")
    actual = sha256_file(path)
    wanted = _expected_set(expected_sha256)
    if wanted is not None and actual not in wanted:
        raise WeightsFileError(
            f"{path}: sha256 {actual} does not match the pinned {', '.join(sorted(wanted))} ({what}); "
            f"the file is corrupt or not the expected one. It comes from {source}")
    return actual
