"""Tests for evaluations/metrics.py.

Every metric is checked against an independent formula (closed forms, explicit
loops in float64, or scipy's reference routines), never against its own code path.
"""

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from evaluations import metrics as M


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def random_spd(rng, d, ridge=0.1):
    g = rng.standard_normal((d, 2 * d))
    return g @ g.T / (2 * d) + ridge * np.eye(d)


# ---------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [M.frechet_distance, M.frechet_distance_sqrtm])
def test_frechet_identical_statistics_is_zero(fn):
    rng = np.random.default_rng(0)
    d = 32
    mu = rng.standard_normal(d)
    sigma = random_spd(rng, d)
    assert abs(fn(mu, sigma, mu, sigma)) < 1e-8


@pytest.mark.parametrize("fn", [M.frechet_distance, M.frechet_distance_sqrtm])
def test_frechet_diagonal_closed_form(fn):
    rng = np.random.default_rng(1)
    d = 20
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a = rng.uniform(0.1, 3.0, d)
    b = rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fn(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_frechet_diagonal_closed_form_with_zero_variances():
    # Rank-deficient covariances (as with fewer samples than dimensions):
    # the eigenvalue route clips round-off and stays exact.
    rng = np.random.default_rng(2)
    d = 16
    a = rng.uniform(0.5, 2.0, d)
    b = rng.uniform(0.5, 2.0, d)
    a[:5] = 0.0
    b[3:8] = 0.0
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("fn", [M.frechet_distance, M.frechet_distance_sqrtm])
def test_frechet_commuting_matrices_closed_form(fn):
    rng = np.random.default_rng(3)
    d = 48
    q = random_orthogonal(rng, d)
    a = rng.uniform(0.05, 4.0, d)
    b = rng.uniform(0.05, 4.0, d)
    s1 = q @ np.diag(a) @ q.T
    s2 = q @ np.diag(b) @ q.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fn(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("d", [64, 256])
def test_frechet_eigen_route_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
    s1, s2 = random_spd(rng, d), random_spd(rng, d, ridge=0.3)
    # Independent reference: textbook formula with scipy's sqrtm of the product.
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    eig = M.frechet_distance(mu1, s1, mu2, s2)
    adm = M.frechet_distance_sqrtm(mu1, s1, mu2, s2)
    assert eig == pytest.approx(ref, rel=1e-8)
    assert eig == pytest.approx(adm, rel=1e-8)


def test_frechet_is_symmetric_and_accepts_float32():
    rng = np.random.default_rng(5)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    a = M.frechet_distance(mu1, s1, mu2, s2)
    b = M.frechet_distance(mu2, s2, mu1, s1)
    assert a == pytest.approx(b, rel=1e-10)
    c = M.frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu2, s2)
    assert c == pytest.approx(a, rel=1e-5)


@pytest.mark.parametrize("fn", [M.frechet_distance, M.frechet_distance_sqrtm])
def test_frechet_shape_mismatch_raises(fn):
    mu = np.zeros(4)
    sigma = np.eye(4)
    with pytest.raises(ValueError, match="mu1"):
        fn(np.zeros(5), sigma, mu, sigma)
    with pytest.raises(ValueError, match="sigma2"):
        fn(mu, sigma, mu, np.eye(3))
    with pytest.raises(ValueError, match="sigma1"):
        fn(mu, np.ones((4, 3)), mu, sigma)


def test_frechet_sqrtm_raises_on_large_imaginary_part():
    # sigma2 is not PSD: sqrtm(S1 S2) has an imaginary diagonal entry of 1.
    with pytest.raises(ValueError, match="Imaginary component"):
        M.frechet_distance_sqrtm(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))


# ---------------------------------------------------------------------------
# FeatureStatistics
# ---------------------------------------------------------------------------


def _features(seed=0, n=517, d=12):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d))
    # non-zero mean and correlated dimensions, float32 like real activations
    return (rng.standard_normal((n, d)) @ mix + 5.0).astype(np.float32)


def _stream(x, sizes):
    stats = M.FeatureStatistics()
    start = 0
    for size in sizes:
        stats.update(x[start : start + size])
        start += size
    assert start == len(x)
    return stats


def test_feature_statistics_streaming_matches_numpy():
    x = _features()
    stats = _stream(x, [1, 7, 100, 0, 3, 250, 156])
    ref_mu = np.mean(x.astype(np.float64), axis=0)
    ref_cov = np.cov(x, rowvar=False)
    assert stats.count == len(x)
    np.testing.assert_allclose(stats.mean(), ref_mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(stats.covariance(), ref_cov, rtol=0, atol=1e-10)
    assert stats.mean().dtype == np.float64 and stats.covariance().dtype == np.float64


def test_feature_statistics_merge_of_halves_equals_whole():
    x = _features(1)
    whole = _stream(x, [len(x)])
    a = _stream(x[:200], [50, 150])
    b = _stream(x[200:], [17, 300])
    state_a, state_b = a.state(), b.state()
    merged = a.merge(b)  # in place: `a` now holds the whole set
    assert merged is a and b.count == len(x) - 200
    assert merged.count == len(x)
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=0, atol=1e-10)
    # merging an empty state is a no-op; merging into an empty state copies
    before = merged.covariance()
    merged.merge(M.FeatureStatistics())
    np.testing.assert_array_equal(merged.covariance(), before)
    fresh = M.FeatureStatistics().merge(whole)
    np.testing.assert_allclose(fresh.covariance(), whole.covariance(), rtol=0, atol=1e-12)
    # state round trip (used to gather partial sums across processes)
    restored = M.FeatureStatistics.from_state(state_a).merge(M.FeatureStatistics.from_state(state_b))
    np.testing.assert_allclose(restored.covariance(), whole.covariance(), rtol=0, atol=1e-10)


def test_feature_statistics_independent_of_batch_split():
    x = _features(2)
    splits = [[len(x)], [1] * len(x), [64] * 8 + [5], [500, 17]]
    results = [_stream(x, s) for s in splits]
    for r in results[1:]:
        np.testing.assert_allclose(r.mean(), results[0].mean(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(r.covariance(), results[0].covariance(), rtol=0, atol=1e-10)


def test_feature_statistics_accepts_torch_and_validates():
    x = _features(3, n=40, d=5)
    stats = M.FeatureStatistics()
    stats.update(torch.from_numpy(x[:20]))
    stats.update(x[20:])
    np.testing.assert_allclose(stats.covariance(), np.cov(x, rowvar=False), atol=1e-10)
    with pytest.raises(ValueError):
        stats.update(np.zeros((3, 6)))
    with pytest.raises(ValueError):
        stats.update(np.zeros(5))
    one = M.FeatureStatistics().update(x[:1])
    with pytest.raises(ValueError):
        one.covariance()


def test_feature_statistics_helper_matches_numpy():
    x = _features(4)
    mu, sigma = M.feature_statistics(x)
    np.testing.assert_allclose(mu, np.mean(x.astype(np.float64), axis=0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), atol=1e-12)
    assert M.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


# ---------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------


def loop_inception_score(probs, splits):
    """Direct transcription of IS = exp(E_x KL(p(y|x) || p(y))) per consecutive chunk."""
    n, c = len(probs), len(probs[0])
    size = n // splits
    scores = []
    for s in range(splits):
        chunk = probs[s * size : (s + 1) * size]
        py = [sum(chunk[i][j] for i in range(size)) / size for j in range(c)]
        kls = []
        for i in range(size):
            kl = 0.0
            for j in range(c):
                p = chunk[i][j]
                if p > 0:
                    kl += p * (math.log(p) - math.log(py[j]))
            kls.append(kl)
        scores.append(math.exp(sum(kls) / size))
    mean = sum(scores) / splits
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)
    return mean, std


def test_inception_score_confident_and_uniform_is_num_classes():
    c, splits = 5, 10
    labels = np.tile(np.arange(c), 10 * splits)  # every chunk holds each class equally
    probs = np.eye(c)[labels]
    mean, std = M.inception_score_from_probs(probs, splits=splits)
    assert mean == pytest.approx(c, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)
    mean, std = M.inception_score(50.0 * np.eye(c)[labels], splits=splits)
    assert mean == pytest.approx(c, rel=1e-9)
    # extremely confident logits must not produce NaN (0 * log 0)
    mean, _ = M.inception_score(1e4 * np.eye(c)[labels], splits=splits)
    assert mean == pytest.approx(c, abs=1e-12)


def test_inception_score_single_class_and_uniform_are_one():
    n, c = 40, 7
    probs = np.zeros((n, c))
    probs[:, 3] = 1.0
    assert M.inception_score_from_probs(probs, splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    assert M.inception_score(30.0 * probs, splits=4)[0] == pytest.approx(1.0, abs=1e-9)
    assert M.inception_score(np.zeros((n, c)), splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert M.inception_score_from_probs(np.full((n, c), 1.0 / c), splits=4)[0] == pytest.approx(1.0)


def test_inception_score_matches_loop_on_random_logits():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((60, 9)) * 2.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = probs / probs.sum(1, keepdims=True)
    ref = loop_inception_score(probs.tolist(), 6)
    got = M.inception_score(logits, splits=6)
    assert got[0] == pytest.approx(ref[0], rel=1e-12)
    assert got[1] == pytest.approx(ref[1], rel=1e-9, abs=1e-12)
    got_p = M.inception_score_from_probs(probs, splits=6)
    assert got_p[0] == pytest.approx(ref[0], rel=1e-12)
    assert got_p[1] == pytest.approx(ref[1], rel=1e-9, abs=1e-12)
    assert M.inception_score(torch.from_numpy(logits), splits=6)[0] == pytest.approx(ref[0], rel=1e-12)


def test_inception_score_uses_consecutive_chunks():
    # chunk 0: confident over 4 classes (IS 4); chunk 1: all class 0 (IS 1);
    # chunk 2: confident over classes {0, 1} (IS 2); chunk 3: uniform probs (IS 1).
    c, size = 4, 8
    chunk0 = np.eye(c)[np.tile(np.arange(4), 2)]
    chunk1 = np.eye(c)[np.zeros(size, dtype=int)]
    chunk2 = np.eye(c)[np.tile(np.arange(2), 4)]
    chunk3 = np.full((size, c), 1.0 / c)
    probs = np.concatenate([chunk0, chunk1, chunk2, chunk3])
    scores = np.array([4.0, 1.0, 2.0, 1.0])
    mean, std = M.inception_score_from_probs(probs, splits=4)
    assert mean == pytest.approx(scores.mean(), abs=1e-12)
    assert std == pytest.approx(scores.std(), abs=1e-12)
    # a single split sees the pooled marginal instead: different number
    assert M.inception_score_from_probs(probs, splits=1)[0] != pytest.approx(mean, abs=1e-3)


def test_inception_score_with_adm_split_size_keeps_a_short_last_chunk():
    """ADM's rule (the ImageNet evaluator's): chunks of split_size in order, the rest last."""
    eye = np.eye(4)
    chunks = [eye[np.tile(np.arange(4), 2)], eye[np.zeros(8, dtype=int)], eye[[0, 1, 0, 1]]]
    logits = 1e4 * np.concatenate(chunks)  # one-hot predictions: IS 4, 1 and 2
    mean, std = M.inception_score(logits, split_size=8)
    assert (mean, std) == pytest.approx((np.mean([4.0, 1.0, 2.0]), np.std([4.0, 1.0, 2.0])), abs=1e-12)
    assert M.inception_score(logits, split_size=20)[0] != pytest.approx(mean, abs=1e-3)
    with pytest.raises(ValueError, match="split_size"):
        M.inception_score(logits, split_size=0)


def test_non_finite_features_are_refused_by_every_metric():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((30, 4))
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="batch contains non-finite values"):
        M.FeatureStatistics().update(bad)
    with pytest.raises(ValueError, match="mu1 contains non-finite values"):
        M.frechet_distance(bad.mean(0), np.eye(4), y.mean(0), np.eye(4))
    with pytest.raises(ValueError, match="sigma2 contains non-finite values"):
        M.frechet_distance(x.mean(0), np.eye(4), y.mean(0), np.cov(bad, rowvar=False))
    with pytest.raises(ValueError, match="logits contains non-finite values"):
        M.inception_score(bad, splits=3)
    with pytest.raises(ValueError, match="y contains non-finite values"):
        M.kernel_distance(x, np.where(bad > 0, np.inf, bad), num_subsets=2, subset_size=10)


def test_inception_score_validates_splits():
    probs = np.full((10, 3), 1.0 / 3)
    with pytest.raises(ValueError):
        M.inception_score_from_probs(probs, splits=3)  # 10 not divisible by 3
    with pytest.raises(ValueError):
        M.inception_score_from_probs(probs, splits=11)  # N < splits
    with pytest.raises(ValueError):
        M.inception_score_from_probs(np.full((10, 3), 0.5), splits=2)  # rows do not sum to 1


# ---------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------


def brute_radii(x, k):
    n = len(x)
    radii = []
    for i in range(n):
        d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n))
        radii.append(d[k])  # self (0) included -> k-th nearest neighbour
    return np.array(radii)


def brute_precision_recall(real, fake, k):
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    r_real, r_fake = brute_radii(real, k), brute_radii(fake, k)
    fake_in = 0
    for f in fake:
        if any(np.sum((f - real[j]) ** 2) <= r_real[j] for j in range(len(real))):
            fake_in += 1
    real_in = 0
    for r in real:
        if any(np.sum((r - fake[j]) ** 2) <= r_fake[j] for j in range(len(fake))):
            real_in += 1
    return fake_in / len(fake), real_in / len(real)


def integer_points(rng, n, d=4, high=6):
    """Small-integer points: every fp16/fp32 distance computation on them is exact."""
    return rng.integers(0, high, size=(n, d)).astype(np.float32)


def test_pairwise_distances_fp16_with_fp32_fallback():
    # fp16 path: 1.0001 rounds to 1.0 in float16, so ADM's distance is exactly 1.
    d = M.pairwise_squared_distances(np.array([[1.0001]]), np.array([[0.0]]))
    assert d.dtype == np.float32 and d[0, 0] == 1.0
    # fp16 overflow (300^2 > 65504) -> float32 recomputation, exact here.
    d = M.pairwise_squared_distances(np.array([[300.0], [1.0]]), np.array([[0.0]]))
    np.testing.assert_array_equal(d, np.array([[90000.0], [1.0]], dtype=np.float32))
    # never negative
    x = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    assert (M.pairwise_squared_distances(x, x) >= 0).all()


def test_manifold_radii_small_example():
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    np.testing.assert_array_equal(M.manifold_radii(x, k=1), [1.0, 1.0, 4.0, 9.0, 16.0])
    np.testing.assert_array_equal(M.manifold_radii(x, k=3), [36.0, 25.0, 9.0, 25.0, 81.0])
    rng = np.random.default_rng(11)
    pts = integer_points(rng, 50)
    for k in (1, 3, 5):
        np.testing.assert_array_equal(M.manifold_radii(pts, k=k, batch_size=7), brute_radii(pts, k))
    with pytest.raises(ValueError):
        M.manifold_radii(x[:3], k=3)


def test_precision_recall_identical_sets():
    x = np.random.default_rng(12).standard_normal((200, 16)).astype(np.float32)
    assert M.precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_far_away_fake_set():
    rng = np.random.default_rng(13)
    real = integer_points(rng, 60)
    fake = integer_points(rng, 60) + 40.0
    assert M.precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_collapsed_fake_set():
    rng = np.random.default_rng(14)
    # 20 distinct real points, then one duplicate of point 3 -> 21 real points
    grid = np.array(list(itertools.product(range(5), repeat=3)), dtype=np.float32)
    real = grid[rng.choice(len(grid), 20, replace=False)]
    real = np.concatenate([real, real[3:4]])
    fake = np.repeat(real[3:4], 10, axis=0)  # every fake sample is real point 3
    precision, recall = M.precision_recall(real, fake)
    # every fake point sits on a real point (distance 0 <= its radius) -> precision 1;
    # fake radii are 0, so only the real points equal to real[3] (2 of 21) are recalled.
    assert precision == 1.0
    assert recall == pytest.approx(2.0 / 21.0, abs=1e-15)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(15 + k)
    real = integer_points(rng, 60, d=5)
    fake = integer_points(rng, 70, d=5) + rng.integers(0, 2, size=(70, 5)).astype(np.float32)
    ref = brute_precision_recall(real, fake, k)
    assert 0.0 < ref[0] < 1.0 and 0.0 < ref[1] < 1.0  # a non-trivial example
    assert M.precision_recall(real, fake, k=k) == pytest.approx(ref, abs=1e-15)


def test_precision_recall_fp32_fallback_matches_brute_force():
    # scaled by 256: fp16 squared norms overflow, float32 is still exact.
    rng = np.random.default_rng(21)
    real = integer_points(rng, 40, d=5) * 256.0
    fake = (integer_points(rng, 45, d=5) + 1.0) * 256.0
    ref = brute_precision_recall(real, fake, 3)
    assert M.precision_recall(real, fake, k=3, batch_size=16) == pytest.approx(ref, abs=1e-15)


def test_precision_recall_independent_of_batch_size():
    rng = np.random.default_rng(22)
    real = integer_points(rng, 90)
    fake = integer_points(rng, 75) + 1.0
    ref = M.precision_recall(real, fake)
    for bs in (7, 32, 89):
        assert M.precision_recall(real, fake, batch_size=bs) == ref
    # batch_size < k + 1: the running top-(k+1) starts from a narrower block
    small_ref = M.precision_recall(real[:30], fake[:25])
    assert M.precision_recall(real[:30], fake[:25], batch_size=2) == small_ref
    xr = rng.standard_normal((300, 32)).astype(np.float32)
    xf = (rng.standard_normal((250, 32)) * 1.2 + 0.2).astype(np.float32)
    ref = M.precision_recall(xr, xf)
    assert 0.0 < ref[0] < 1.0 and 0.0 < ref[1] < 1.0
    assert M.precision_recall(xr, xf, batch_size=64) == ref
    np.testing.assert_array_equal(M.manifold_radii(xr, batch_size=37), M.manifold_radii(xr))


def test_precision_recall_validates_inputs():
    with pytest.raises(ValueError):
        M.precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    bad = np.zeros((10, 3))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        M.precision_recall(bad, np.zeros((10, 3)))


# ---------------------------------------------------------------------------
# Kernel distance
# ---------------------------------------------------------------------------


def loop_mmd2_unbiased(x, y):
    d = x.shape[1]

    def k(a, b):
        return (sum(a[t] * b[t] for t in range(d)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n))
    return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * sxy / (m * n)


@pytest.mark.parametrize("m,n", [(8, 8), (6, 9)])
def test_polynomial_mmd2_matches_double_loop(m, n):
    rng = np.random.default_rng(30 + n)
    x = rng.standard_normal((m, 3))
    y = rng.standard_normal((n, 3)) + 0.5
    assert M.polynomial_mmd2_unbiased(x, y) == pytest.approx(loop_mmd2_unbiased(x, y), rel=1e-12)


def test_polynomial_mmd2_is_unbiased_for_same_distribution():
    rng = np.random.default_rng(40)
    draws, m, d = 2000, 10, 4
    unbiased = np.empty(draws)
    biased = np.empty(draws)
    for t in range(draws):
        x = rng.standard_normal((m, d))
        y = rng.standard_normal((m, d))
        unbiased[t] = M.polynomial_mmd2_unbiased(x, y)
        # V-statistic (diagonal included) for contrast: biased upwards
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        biased[t] = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    se = unbiased.std(ddof=1) / np.sqrt(draws)
    assert abs(unbiased.mean()) < 4 * se
    # the test has power: the biased estimator is detected as biased
    assert biased.mean() > 4 * biased.std(ddof=1) / np.sqrt(draws)


def test_kernel_distance_positive_for_different_distributions():
    rng = np.random.default_rng(41)
    x = rng.standard_normal((300, 8))
    y = rng.standard_normal((300, 8)) * 1.3 + 0.3
    mean, std = M.kernel_distance(x, y, num_subsets=20, subset_size=100)
    assert mean > 0 and mean > 5 * std / np.sqrt(20)
    same_mean, _ = M.kernel_distance(x, rng.standard_normal((300, 8)), num_subsets=20, subset_size=100)
    assert same_mean < mean / 5


def test_kernel_distance_subsets_and_seed():
    rng = np.random.default_rng(42)
    x = rng.standard_normal((50, 6))
    y = rng.standard_normal((40, 6)) + 0.2
    a = M.kernel_distance(x, y, num_subsets=5, subset_size=20, seed=3)
    b = M.kernel_distance(x, y, num_subsets=5, subset_size=20, seed=3)
    c = M.kernel_distance(x, y, num_subsets=5, subset_size=20, seed=4)
    assert a == b
    assert a != c
    # documented protocol: per subset, x indices then y indices, without replacement
    gen = np.random.Generator(np.random.PCG64(3))
    vals = []
    for _ in range(5):
        ix = gen.choice(50, 20, replace=False)
        iy = gen.choice(40, 20, replace=False)
        assert len(set(ix.tolist())) == 20 and len(set(iy.tolist())) == 20
        vals.append(loop_mmd2_unbiased(x[ix], y[iy]))
    assert a[0] == pytest.approx(np.mean(vals), rel=1e-10)
    assert a[1] == pytest.approx(np.std(vals), rel=1e-8)


def test_kernel_distance_subset_size_capped_by_smaller_set():
    rng = np.random.default_rng(43)
    x = rng.standard_normal((30, 5))
    y = rng.standard_normal((30, 5)) + 0.1
    # subset_size > 30 -> subsets are permutations of the full sets (m = 30)
    mean, std = M.kernel_distance(x, y, num_subsets=3, subset_size=1000)
    full = loop_mmd2_unbiased(x, y)
    assert mean == pytest.approx(full, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError):
        M.kernel_distance(x, np.zeros((20, 4)))
