"""Sample-quality metrics with the meaning of the ADM evaluator.

This module holds only the metric *math*: it takes feature / logit arrays that
were produced elsewhere (Inception pool features, Inception logits, ...) and
returns numbers.  There is no file I/O, no network access and no printing here.

Every function documents which behaviour of the ADM evaluator
(guided-diffusion ``evaluations/evaluator.py``) or of the usual KID
implementations (StyleGAN2-ADA / torch-fidelity / dgm-eval) it reproduces, and
where it deliberately differs (always in the direction of more numerical
accuracy, never in what the number means).

Public API
----------
Frechet distance (FID / sFID / FD_DINOv2 once features are given):
    ``frechet_distance(mu1, sigma1, mu2, sigma2)``          eigenvalue route (default)
    ``frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps=1e-6)``  ADM route
Feature statistics:
    ``FeatureStatistics``  streaming float64 mean / covariance with ``merge``
    ``feature_statistics(features) -> (mu, sigma)``
Inception Score:
    ``inception_score(logits, splits=10) -> (mean, std)``
    ``inception_score_from_probs(probs, splits=10) -> (mean, std)``
Improved precision / recall (ADM ``ManifoldEstimator``):
    ``pairwise_squared_distances(x, y)``
    ``manifold_radii(features, k=3, batch_size=10000)``
    ``precision_recall(real_features, fake_features, k=3, batch_size=10000)``
    (``fp16_matmul="fp32_accumulate"``: float32-accumulated float16 product, faster on CPUs)
Kernel distance (KID):
    ``polynomial_mmd2_unbiased(x, y)``
    ``kernel_distance(x, y, num_subsets=100, subset_size=1000, seed=0) -> (mean, std)``
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import numpy as np
import scipy.linalg
import scipy.special
import torch

__all__ = [
    "FeatureStatistics",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_sqrtm",
    "inception_score",
    "inception_score_from_probs",
    "pairwise_squared_distances",
    "manifold_radii",
    "precision_recall",
    "polynomial_mmd2_unbiased",
    "kernel_distance",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _to_numpy(array: Any, dtype=np.float64) -> np.ndarray:
    """Convert a numpy array / torch tensor / sequence to a numpy array of ``dtype``."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu").numpy()
    return np.asarray(array, dtype=dtype)


def _as_2d(array: Any, name: str, dtype=np.float64) -> np.ndarray:
    out = _to_numpy(array, dtype)
    if out.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D); got shape {out.shape}")
    if not np.all(np.isfinite(out)):  # a NaN would otherwise become a NaN metric (or a LAPACK error)
        raise ValueError(f"{name} contains non-finite values")
    return out


# ---------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------


def _check_gaussian_stats(mu1, sigma1, mu2, sigma2):
    """Validate and convert the statistics of two Gaussians to float64.

    Like ADM, ``mu`` is passed through ``np.atleast_1d`` and ``sigma`` through
    ``np.atleast_2d`` (so scalars describe one-dimensional Gaussians).
    """
    mu1 = np.atleast_1d(_to_numpy(mu1))
    mu2 = np.atleast_1d(_to_numpy(mu2))
    sigma1 = np.atleast_2d(_to_numpy(sigma1))
    sigma2 = np.atleast_2d(_to_numpy(sigma2))
    if mu1.ndim != 1 or mu2.ndim != 1:
        raise ValueError(
            f"mean vectors must be 1-D; got mu1 shape {mu1.shape}, mu2 shape {mu2.shape}"
        )
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"mean vectors have different lengths: mu1 {mu1.shape} vs mu2 {mu2.shape}"
        )
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} contains non-finite values")
    d = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(
                f"{name} has shape {sigma.shape}, expected ({d}, {d}) to match the "
                f"mean vectors of length {d}"
            )
    if sigma1.shape != sigma2.shape:  # pragma: no cover - implied by the checks above
        raise ValueError(
            f"covariances have different shapes: sigma1 {sigma1.shape} vs sigma2 {sigma2.shape}"
        )
    return mu1, sigma1, mu2, sigma2


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via ``eigh`` (negative round-off eigenvalues clipped to 0)."""
    sym = 0.5 * (matrix + matrix.T)
    eigvals, eigvecs = np.linalg.eigh(sym)
    root = np.sqrt(np.clip(eigvals, 0.0, None))
    return (eigvecs * root) @ eigvecs.T


def _similar_symmetric_product(sigma1: np.ndarray, sigma2: np.ndarray, cholesky: bool = True) -> np.ndarray:
    """A symmetric PSD matrix with the spectrum of ``sigma1 @ sigma2``: ``L^T S2 L`` (S1 = L L^T) or
    ``sqrt(S1) S2 sqrt(S1)`` when S1 is not positive definite (or ``cholesky=False``)."""
    middle = None
    if cholesky:
        try:
            factor = np.linalg.cholesky(0.5 * (sigma1 + sigma1.T))
            middle = factor.T @ sigma2 @ factor
        except np.linalg.LinAlgError:
            middle = None
    if middle is None:
        sqrt_s1 = _psd_sqrt(sigma1)
        middle = sqrt_s1 @ sigma2 @ sqrt_s1
    return 0.5 * (middle + middle.T)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (eigenvalue route).

    ``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)``

    This is the quantity ADM's ``FIDStatistics.frechet_distance`` computes, but
    ``tr sqrt(S1 S2)`` is evaluated exactly through a symmetric eigenproblem
    instead of ``scipy.linalg.sqrtm`` of the non-symmetric product:
    ``S1 S2`` is similar to ``sqrt(S1) S2 sqrt(S1)`` (symmetric PSD), so
    ``tr sqrt(S1 S2) = sum_i sqrt(lambda_i)`` over the eigenvalues of
    ``sqrt(S1) S2 sqrt(S1)``, where ``sqrt(S1)`` is the symmetric PSD root from
    ``eigh``.  Tiny negative eigenvalues from round-off are clipped to 0.
    When ``S1`` is positive definite the same spectrum is obtained faster from
    its Cholesky factor ``S1 = L L^T``: ``S1 S2`` is also similar to
    ``L^T S2 L`` (``L^-1 S1 S2 L = L^T S2 L``), so only one symmetric
    eigenvalue problem is solved (values only); a singular ``S1`` (Cholesky
    fails) takes the ``sqrt(S1)`` route.  The two agree to round-off.
    Everything is computed in float64.  It agrees with the ADM route
    (:func:`frechet_distance_sqrtm`) to round-off on well-conditioned inputs,
    needs no ``eps`` retry, never produces an imaginary part and is faster.

    Raises ``ValueError`` when the shapes of the statistics do not match.
    """
    mu1, sigma1, mu2, sigma2 = _check_gaussian_stats(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    middle = _similar_symmetric_product(sigma1, sigma2)
    eigvals = np.linalg.eigvalsh(middle)
    tr_covmean = float(np.sum(np.sqrt(np.clip(eigvals, 0.0, None))))
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance computed exactly as ADM's ``FIDStatistics.frechet_distance``.

    Reference route (kept for cross-checking against published numbers):

    1. ``covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)``;
    2. if ``covmean`` is not finite, retry with ``eps * I`` added to both
       covariances (a ``RuntimeWarning`` is emitted, ADM prints a warning);
    3. if ``covmean`` is complex: raise ``ValueError`` when the largest
       ``|imag|`` on its diagonal exceeds ``1e-3`` (ADM's
       ``np.allclose(diag.imag, 0, atol=1e-3)``), otherwise keep the real part;
    4. ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(covmean)``.

    Inputs are converted to float64.  Raises ``ValueError`` on shape mismatch.
    """
    mu1, sigma1, mu2, sigma2 = _check_gaussian_stats(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_diag_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_diag_imag > 1e-3:
            raise ValueError(
                f"Imaginary component {float(np.max(np.abs(covmean.imag)))} "
                f"(max |imag| on the diagonal: {max_diag_imag})"
            )
        covmean = covmean.real
    tr_covmean = float(np.trace(covmean))
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# ---------------------------------------------------------------------------
# Feature statistics
# ---------------------------------------------------------------------------


class FeatureStatistics:
    """Streaming float64 mean and covariance of feature vectors.

    Reproduces ADM's ``mu = np.mean(acts, axis=0)`` and
    ``sigma = np.cov(acts, rowvar=False)`` (unbiased, ``ddof=1``) without
    holding all activations in memory.  Accumulation is done in float64 with
    the numerically stable pairwise-update (Chan et al.) form: the state is
    ``count``, the running mean and ``M2 = sum (x - mean)(x - mean)^T``.  A batch
    is folded in by computing its own centred statistics and combining

        ``delta = mean_b - mean_a``
        ``mean  = mean_a + delta * n_b / n``
        ``M2    = M2_a + M2_b + outer(delta, delta) * n_a * n_b / n``

    so the result does not depend on how the data were split into batches
    (up to float64 round-off, ~1e-15 relative) and two partial states (e.g. from
    different processes) can be combined with :meth:`merge`.  :meth:`state` /
    :meth:`from_state` give a plain-array representation for gathering across
    processes.
    """

    def __init__(self, dim: Optional[int] = None):
        self.dim: Optional[int] = None if dim is None else int(dim)
        self.count: int = 0
        self._mean: Optional[np.ndarray] = None
        self._m2: Optional[np.ndarray] = None
        if self.dim is not None:
            self._mean = np.zeros(self.dim, dtype=np.float64)
            self._m2 = np.zeros((self.dim, self.dim), dtype=np.float64)

    # -- internal ---------------------------------------------------------
    def _ensure_dim(self, dim: int) -> None:
        if self.dim is None:
            self.dim = int(dim)
            self._mean = np.zeros(self.dim, dtype=np.float64)
            self._m2 = np.zeros((self.dim, self.dim), dtype=np.float64)
        elif dim != self.dim:
            raise ValueError(f"feature dimension mismatch: statistics have D={self.dim}, got D={dim}")

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if n_b == 0:
            return
        n_a = self.count
        if n_a == 0:
            self.count = n_b
            self._mean = mean_b.copy()
            self._m2 = m2_b.copy()
            return
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    # -- public -----------------------------------------------------------
    def update(self, batch) -> "FeatureStatistics":
        """Fold a 2-D batch of shape (B, D) into the statistics (B may be 0)."""
        x = _as_2d(batch, "batch")
        self._ensure_dim(x.shape[1])
        n_b = x.shape[0]
        if n_b == 0:
            return self
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        self._combine(n_b, mean_b, m2_b)
        return self

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        """Combine another partial state into this one (in place); returns ``self``."""
        if not isinstance(other, FeatureStatistics):
            raise TypeError(f"can only merge FeatureStatistics, got {type(other).__name__}")
        if other.dim is None or other.count == 0:
            if other.dim is not None:
                self._ensure_dim(other.dim)
            return self
        self._ensure_dim(other.dim)
        self._combine(other.count, other._mean, other._m2)
        return self

    def mean(self) -> np.ndarray:
        """Float64 mean vector (``np.mean(x, axis=0)``); needs at least one sample."""
        if self.count < 1:
            raise ValueError("mean() needs at least one sample")
        return self._mean.copy()

    def covariance(self) -> np.ndarray:
        """Unbiased float64 covariance, equal to ``np.cov(x, rowvar=False)`` (``ddof=1``)."""
        if self.count < 2:
            raise ValueError(f"covariance() needs at least two samples, have {self.count}")
        cov = self._m2 / (self.count - 1)
        return 0.5 * (cov + cov.T)

    def state(self) -> dict:
        """Plain-array state ``{"count", "mean", "m2"}`` (for gathering across processes)."""
        if self.dim is None:
            raise ValueError("empty statistics have no dimension yet")
        return {"count": np.int64(self.count), "mean": self._mean.copy(), "m2": self._m2.copy()}

    @classmethod
    def from_state(cls, state: dict) -> "FeatureStatistics":
        """Inverse of :meth:`state`."""
        mean = np.asarray(state["mean"], dtype=np.float64)
        out = cls(dim=mean.shape[0])
        out._combine(int(state["count"]), mean, np.asarray(state["m2"], dtype=np.float64))
        return out


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a (N, D) feature array, as ADM's ``compute_statistics``.

    ``mu = np.mean(features, axis=0)`` and ``sigma = np.cov(features, rowvar=False)``
    (``ddof=1``), both computed in float64 (ADM takes the mean of float32
    activations; computing it in float64 only removes round-off).
    """
    x = _as_2d(features, "features")
    if x.shape[0] < 2:
        raise ValueError(f"need at least two feature vectors, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


# ---------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------


def _split_sizes_check(n: int, splits: int) -> int:
    splits = int(splits)
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if n < splits:
        raise ValueError(f"need at least as many samples as splits: N={n} < splits={splits}")
    if n % splits != 0:
        raise ValueError(
            f"N={n} is not divisible by splits={splits}; the Inception Score uses equal-size "
            f"consecutive chunks (ADM: split_size=5000 for 50k samples)"
        )
    return n // splits


def _inception_score_from_log_probs(log_p: np.ndarray, splits: int,
                                    split_size: Optional[int] = None) -> Tuple[float, float]:
    n = log_p.shape[0]
    if split_size is None:
        size = _split_sizes_check(n, splits)
    else:  # ADM's rule: chunks of split_size in order, the last one whatever is left
        size = int(split_size)
        if size < 1 or n < 1:
            raise ValueError(f"need split_size >= 1 and samples; got split_size={split_size}, N={n}")
    scores = []
    for start in range(0, n, size):
        part = log_p[start : start + size]
        # log p(y) of the chunk, computed stably as log(mean_i exp(log p(y|x_i)))
        log_py = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])
        p = np.exp(part)
        kl = np.sum(p * (part - log_py[None, :]), axis=1)  # p == 0 contributes exactly 0
        scores.append(np.exp(np.mean(kl)))
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits, splits: int = 10, split_size: Optional[int] = None) -> Tuple[float, float]:
    """Inception Score ``(mean, std)`` from classifier logits of shape (N, C).

    Reproduces ADM's ``compute_inception_score`` (itself the improved-gan
    formula): the N predictions are cut into ``splits`` CONSECUTIVE chunks of
    equal size N / splits, in the given order (no shuffling; ADM uses
    ``split_size=5000`` on 50k samples, i.e. 10 chunks).  For every chunk,
    ``IS_chunk = exp(mean_i KL(p(y|x_i) || p(y)))`` with ``p(y)`` the mean of the
    chunk's predictions.  Returns the mean over chunks (ADM's number) and the
    population std over chunks (``np.std``, ``ddof=0``, as improved-gan).

    The softmax is done in float64 in log space (``log_softmax``), so very
    confident predictions do not produce ``0 * log 0`` NaNs.

    Raises ``ValueError`` if N < splits or N is not divisible by ``splits``
    (equal chunk sizes are required rather than ``np.array_split``'s uneven ones).
    With ``split_size`` (the ImageNet evaluator passes ADM's 5000) the chunks are
    ``split_size`` rows each in order and the last one holds the rest, exactly
    ADM's loop, so the number matches ADM's for any N (IS grows with the chunk size).
    """
    x = _as_2d(logits, "logits")
    log_p = scipy.special.log_softmax(x, axis=1)
    return _inception_score_from_log_probs(log_p, splits, split_size)


def inception_score_from_probs(probs, splits: int = 10) -> Tuple[float, float]:
    """Inception Score ``(mean, std)`` from class probabilities p(y|x) of shape (N, C).

    Same chunking and formula as :func:`inception_score` (ADM's
    ``compute_inception_score`` applied to softmax outputs).  Probabilities
    must be non-negative and each row must sum to 1 within 1e-3 (they are not
    renormalised).  Zero probabilities contribute 0 to the KL term.
    """
    p = _as_2d(probs, "probs")
    if np.any(p < 0) or not np.all(np.isfinite(p)):
        raise ValueError("probabilities must be finite and non-negative")
    row_sums = p.sum(axis=1)
    if not np.allclose(row_sums, 1.0, atol=1e-3, rtol=0.0):
        raise ValueError(
            f"each row of probs must sum to 1 (max deviation {np.max(np.abs(row_sums - 1.0)):.3g})"
        )
    n = p.shape[0]
    size = _split_sizes_check(n, splits)
    scores = []
    for start in range(0, n, size):
        part = p[start : start + size]
        py = part.mean(axis=0, keepdims=True)
        kl = scipy.special.rel_entr(part, py).sum(axis=1)  # p*log(p/py), 0 where p == 0
        scores.append(np.exp(np.mean(kl)))
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------
# Improved precision / recall (ADM ManifoldEstimator)
# ---------------------------------------------------------------------------


def _features_tensor(features, name: str, device) -> torch.Tensor:
    """(N, D) float32 tensor (ADM feeds float32 activations to its distance block)."""
    if isinstance(features, torch.Tensor):
        t = features.detach().to(dtype=torch.float32)
    else:
        t = torch.from_numpy(_as_2d(features, name, dtype=np.float32))
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D); got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains non-finite values")
    if device is not None:
        t = t.to(device)
    return t


FP16_MATMUL_MODES = ("native", "fp32_accumulate")


def _check_fp16_matmul(mode: str) -> str:
    if mode not in FP16_MATMUL_MODES:
        raise ValueError(f"fp16_matmul must be one of {FP16_MATMUL_MODES}, got {mode!r}")
    return mode


def _sq_dists_in_dtype(u: torch.Tensor, v: torch.Tensor, fp16_matmul: str = "native") -> torch.Tensor:
    """``max(|u|^2 - 2 u.v + |v|^2, 0)`` evaluated in the dtype of ``u`` and ``v``.

    ``fp16_matmul="fp32_accumulate"`` computes the float16 ``u @ v.T`` as a float32 matrix product
    of the (exactly representable) float16 inputs rounded once to float16 -- the usual float16
    GEMM with float32 accumulation, 3-6x faster than PyTorch's float16 GEMM on CPUs; it can differ
    from "native" in the last float16 bit of a few entries (summation order).
    """
    norm_u = (u * u).sum(dim=1, keepdim=True)
    norm_v = (v * v).sum(dim=1).unsqueeze(0)
    if fp16_matmul == "fp32_accumulate" and u.dtype == torch.float16:
        uv = (u.to(torch.float32) @ v.to(torch.float32).T).to(torch.float16)
    else:
        uv = u @ v.T
    return torch.clamp(norm_u - 2 * uv + norm_v, min=0)


def _block_sq_dists(u32: torch.Tensor, v32: torch.Tensor, fp16_matmul: str = "native") -> torch.Tensor:
    """One block of ADM ``DistanceBlock`` distances, returned as float32.

    Computed in float16 first; if any entry of the float16 block is non-finite
    the whole block is recomputed in float32 (ADM's ``tf.cond`` fallback).
    """
    d16 = _sq_dists_in_dtype(u32.to(torch.float16), v32.to(torch.float16), fp16_matmul)
    if bool(torch.isfinite(d16).all()):
        return d16.to(torch.float32)
    return _sq_dists_in_dtype(u32, v32)


def pairwise_squared_distances(x, y, *, device=None, fp16_matmul: str = "native") -> np.ndarray:
    """Squared Euclidean distances as ADM's ``DistanceBlock`` computes them.

    ``|x|^2 - 2 x.y + |y|^2`` clipped at 0, evaluated in float16 (inputs are
    cast to float32, then float16), falling back to float32 when the float16
    result contains a non-finite value.  Returns a float32 (len(x), len(y))
    array.  This builds the full matrix: use it only on small inputs (the
    metric functions below work block by block).
    """
    u = _features_tensor(x, "x", device)
    v = _features_tensor(y, "y", device)
    if u.shape[1] != v.shape[1]:
        raise ValueError(f"feature dimensions differ: x has D={u.shape[1]}, y has D={v.shape[1]}")
    return _block_sq_dists(u, v, _check_fp16_matmul(fp16_matmul)).cpu().numpy()


def _check_k_batch(k: int, batch_size: int) -> Tuple[int, int]:
    k = int(k)
    batch_size = int(batch_size)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return k, batch_size


def _radii_tensor(feats: torch.Tensor, k: int, batch_size: int, fp16_matmul: str = "native") -> torch.Tensor:
    n = feats.shape[0]
    if n < k + 1:
        raise ValueError(f"need more than k={k} feature vectors to estimate radii, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=feats.device)
    for r0 in range(0, n, batch_size):
        rows = feats[r0 : r0 + batch_size]
        best = None  # running k+1 smallest distances of every row (self included)
        for c0 in range(0, n, batch_size):
            block = _block_sq_dists(rows, feats[c0 : c0 + batch_size], fp16_matmul)
            cand = block if best is None else torch.cat([best, block], dim=1)
            keep = min(k + 1, cand.shape[1])
            best = torch.topk(cand, keep, dim=1, largest=False, sorted=True).values
        radii[r0 : r0 + rows.shape[0]] = best[:, k]
    return radii


def manifold_radii(features, k: int = 3, batch_size: int = 10000, *, device=None,
                   fp16_matmul: str = "native") -> np.ndarray:
    """k-NN radii of a feature set, as ADM's ``ManifoldEstimator.manifold_radii``.

    The radius of point i is its (k+1)-th smallest squared distance to the
    points of its own set, the point itself included (distance 0), i.e. the
    squared distance to its k-th nearest neighbour (ADM ``nhood_sizes=(3,)``,
    no percentile clamping).  Distances are ADM's float16 squared distances
    with float32 fallback (:func:`pairwise_squared_distances`).  Work is done in
    ``batch_size x batch_size`` blocks while keeping a running top-(k+1) per
    row, so memory stays O(batch_size^2) (ADM holds a ``row_batch x N`` block;
    the values are the same).  Returns a float32 array of shape (N,).
    ``device`` optionally selects the torch device for the block computations;
    ``fp16_matmul`` the float16 product (see :func:`_sq_dists_in_dtype`; default "native").
    """
    k, batch_size = _check_k_batch(k, batch_size)
    feats = _features_tensor(features, "features", device)
    return _radii_tensor(feats, k, batch_size, _check_fp16_matmul(fp16_matmul)).cpu().numpy()


def precision_recall(
    real_features, fake_features, k: int = 3, batch_size: int = 10000, *, device=None,
    fp16_matmul: str = "native",
) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al.), as ADM computes them.

    Reproduces ``ManifoldEstimator.evaluate_pr`` with the reference set as
    ``features_1`` and the samples as ``features_2``:

    * radii of both sets from :func:`manifold_radii` (k-th nearest neighbour,
      squared distances, float16 with float32 fallback);
    * a fake point is inside the real manifold when its squared distance to
      some real point j is ``<=`` radius_real[j]; **precision** is the fraction
      of fake points inside the real manifold;
    * a real point is inside the fake manifold when its squared distance to
      some fake point j is ``<=`` radius_fake[j]; **recall** is the fraction of
      real points inside the fake manifold.

    Distances are evaluated in ``batch_size x batch_size`` blocks (real rows x
    fake columns, ADM's orientation); no larger matrix is ever built.
    ``fp16_matmul="fp32_accumulate"`` is the faster float16 product for CPUs
    (see :func:`_sq_dists_in_dtype`); the default "native" is unchanged.
    Returns ``(precision, recall)`` as Python floats.
    """
    k, batch_size = _check_k_batch(k, batch_size)
    fp16_matmul = _check_fp16_matmul(fp16_matmul)
    real = _features_tensor(real_features, "real_features", device)
    fake = _features_tensor(fake_features, "fake_features", device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"feature dimensions differ: real has D={real.shape[1]}, fake has D={fake.shape[1]}"
        )
    fake = fake.to(real.device)
    real_radii = _radii_tensor(real, k, batch_size, fp16_matmul)
    fake_radii = _radii_tensor(fake, k, batch_size, fp16_matmul)

    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)
    for r0 in range(0, real.shape[0], batch_size):
        r1 = min(r0 + batch_size, real.shape[0])
        rows = real[r0:r1]
        r_rad = real_radii[r0:r1]
        for c0 in range(0, fake.shape[0], batch_size):
            c1 = min(c0 + batch_size, fake.shape[0])
            block = _block_sq_dists(rows, fake[c0:c1], fp16_matmul)  # (rows, cols)
            fake_in[c0:c1] |= (block <= r_rad[:, None]).any(dim=0)
            real_in[r0:r1] |= (block <= fake_radii[None, c0:c1]).any(dim=1)
    precision = float(fake_in.to(torch.float64).mean().item())
    recall = float(real_in.to(torch.float64).mean().item())
    return precision, recall


# ---------------------------------------------------------------------------
# Kernel distance (KID)
# ---------------------------------------------------------------------------


def polynomial_mmd2_unbiased(x, y) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel ``k(a, b) = (a.b / d + 1)^3``.

    ``d`` is the feature dimension (the KID kernel of Binkowski et al., as in
    StyleGAN2-ADA / torch-fidelity / dgm-eval).  With m rows in ``x`` and n in
    ``y``::

        MMD^2 = sum_{i!=j} Kxx / (m(m-1)) + sum_{i!=j} Kyy / (n(n-1)) - 2 sum Kxy / (m n)

    (for m == n this is the usual ``[sum_{i!=j} Kxx + sum_{i!=j} Kyy]/(m(m-1))
    - 2 sum Kxy / m^2``).  Computed in float64, no x1000 scaling.
    """
    xa = _as_2d(x, "x")
    ya = _as_2d(y, "y")
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(f"feature dimensions differ: x has D={xa.shape[1]}, y has D={ya.shape[1]}")
    m, n = xa.shape[0], ya.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"need at least two samples in each set, got m={m}, n={n}")
    d = xa.shape[1]
    kxx = (xa @ xa.T / d + 1.0) ** 3
    kyy = (ya @ ya.T / d + 1.0) ** 3
    kxy = (xa @ ya.T / d + 1.0) ** 3
    sum_xx = kxx.sum() - np.trace(kxx)
    sum_yy = kyy.sum() - np.trace(kyy)
    return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * kxy.sum() / (m * n))


def kernel_distance(
    x, y, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> Tuple[float, float]:
    """Kernel (Inception) Distance: ``(mean, std)`` of unbiased polynomial MMD^2 over subsets.

    KID as in StyleGAN2-ADA / torch-fidelity / dgm-eval: ``num_subsets`` times,
    draw ``m`` rows of ``x`` and ``m`` rows of ``y``, each WITHOUT replacement,
    and evaluate :func:`polynomial_mmd2_unbiased` on the pair.  ``m =
    min(subset_size, len(x), len(y))``: if either set is smaller than
    ``subset_size`` the subsets shrink to the smaller set's size.  Indices come
    from ``numpy.random.Generator(PCG64(seed))``; per subset, first the ``x``
    indices then the ``y`` indices are drawn with ``rng.choice(N, m,
    replace=False)``, so a given seed always gives the same subsets.  Returns
    the mean and the population std (``ddof=0``) of the subset estimates, in
    raw units (no x1000 scaling).
    """
    xa = _as_2d(x, "x")
    ya = _as_2d(y, "y")
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(f"feature dimensions differ: x has D={xa.shape[1]}, y has D={ya.shape[1]}")
    if int(num_subsets) < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(int(subset_size), xa.shape[0], ya.shape[0])
    if m < 2:
        raise ValueError(f"subset size must be at least 2, got {m}")
    rng = np.random.Generator(np.random.PCG64(seed))
    values = np.empty(int(num_subsets), dtype=np.float64)
    for i in range(int(num_subsets)):
        ix = rng.choice(xa.shape[0], m, replace=False)
        iy = rng.choice(ya.shape[0], m, replace=False)
        values[i] = polynomial_mmd2_unbiased(xa[ix], ya[iy])
    return float(values.mean()), float(values.std())
