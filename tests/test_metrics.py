"""Metrics against known answers: closed forms, exact shifts, and identities (difflab.metrics)."""

import math

import pytest
import scipy.linalg
import torch

from difflab import metrics


def _gaussian(n, mean, cov, gen):
    L = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64))
    return torch.as_tensor(mean, dtype=torch.float64) + torch.randn(n, len(mean), generator=gen, dtype=torch.float64) @ L.T


def _random_cov(d, gen, scale=1.0):
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return scale * (A @ A.T / d + 0.2 * torch.eye(d, dtype=torch.float64))


def test_frechet_closed_form_matches_scipy_formula(gen):
    # Reference: the textbook formula with scipy's (non-symmetric) sqrtm of Σ1Σ2; agreement to round-off.
    d = 5
    mu1, mu2 = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    c1, c2 = _random_cov(d, gen), _random_cov(d, gen, 3.0)
    covmean = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    ref = float(((mu1 - mu2) ** 2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * float(covmean.trace()))
    assert metrics.frechet_distance_gaussians(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_frechet_commuting_covariances_is_sum_of_sqrt_differences():
    # Diagonal Σ's commute, so FD = |Δμ|² + Σ_i (√a_i − √b_i)² exactly.
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    mu1, mu2 = torch.zeros(3), torch.tensor([1.0, 0.0, -2.0])
    expected = 5.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert metrics.frechet_distance_gaussians(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_of_sample_sets_approaches_closed_form(gen):
    d, n = 4, 40_000
    mu1, mu2 = torch.zeros(d), torch.full((d,), 0.5)
    c1, c2 = _random_cov(d, gen), _random_cov(d, gen, 2.0)
    exact = metrics.frechet_distance_gaussians(mu1, c1, mu2, c2)
    fd = metrics.frechet_distance(_gaussian(n, mu1, c1, gen), _gaussian(n, mu2, c2, gen))
    # The plug-in estimate is biased by O(d·tr Σ / n) ≈ 4·6/40000 ≈ 6e-4 and fluctuates by ~|Δμ|·√(tr Σ/n) ≈ 0.01;
    # 5 % of an O(1) answer is several standard deviations away.
    assert fd == pytest.approx(exact, rel=0.05)
    assert exact > 0.5  # the test is not vacuous


def test_frechet_same_distribution_is_small(gen):
    c = _random_cov(3, gen)
    fd = metrics.frechet_distance(_gaussian(20_000, torch.zeros(3), c, gen), _gaussian(20_000, torch.zeros(3), c, gen))
    assert 0.0 <= fd < 2e-2  # bias O(d·tr Σ/n) ≈ 3·3/20000 plus fluctuations of the same order


def test_mmd_zero_for_same_and_positive_for_shifted(gen):
    x, y = torch.randn(800, 2, generator=gen), torch.randn(800, 2, generator=gen)
    same = metrics.mmd_rbf(x, y)
    shifted = metrics.mmd_rbf(x, y + 1.0)
    # Unbiased MMD² of equal distributions is 0 ± O(1/n) ≈ 1e-3 at n = 800; the unit shift gives ≈ 0.2.
    assert abs(same) < 5e-3
    assert shifted > 20 * 5e-3


def test_sliced_w2_of_exact_shift(gen):
    # y = x + δ exactly: every 1-D projection shifts by θᵀδ, so SW2² = mean_θ (θᵀδ)², with expectation |δ|²/D.
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    delta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    sw = metrics.sliced_wasserstein2(x, x + delta, num_projections=4096, generator=gen)
    # (θᵀu)² for unit θ on the 3-D sphere is Beta(½, 1): relative std 0.89, so the 4096-projection mean has
    # relative std 1.4 % and SW2 (its square root) 0.7 %; 3 % is over 4 standard deviations.
    assert sw == pytest.approx(float(delta.norm()) / math.sqrt(3), rel=0.03)


def test_sliced_w2_of_shifted_gaussians(gen):
    # Independent samples of N(0, I) and N(δ, I): SW2² = |δ|²/D plus a 1/√n quantile-noise term.
    d, n = 2, 4000
    delta = torch.tensor([3.0, 0.0], dtype=torch.float64)
    x, y = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen, dtype=torch.float64)
    sw = metrics.sliced_wasserstein2(x, y + delta, num_projections=2048, generator=gen)
    # cos²φ has relative std 0.71, so 2048 projections give SW2 a relative std of 0.8 %; the empirical-quantile
    # noise (W2² ~ 1e-3 at n = 4000) is negligible against SW2² = 4.5.
    assert sw == pytest.approx(float(delta.norm()) / math.sqrt(d), rel=0.03)


def test_precision_recall_identical_and_disjoint(gen):
    x = torch.randn(500, 3, generator=gen)
    same = metrics.precision_recall(x, x.clone(), k=3)
    assert same.precision == 1.0 and same.recall == 1.0  # every point lies in its own ball
    far = metrics.precision_recall(x, x + 100.0, k=3)
    assert far.precision == 0.0 and far.recall == 0.0


def test_precision_recall_of_a_dropped_mode(gen):
    # Real: two far-apart blobs; fake: only one of them. Precision ≈ 1 (all fakes are realistic), recall ≈ ½.
    real = torch.cat([torch.randn(1000, 2, generator=gen), torch.randn(1000, 2, generator=gen) + 20.0])
    fake = torch.randn(1000, 2, generator=gen)
    pr = metrics.precision_recall(real, fake, k=5)
    # k-NN balls of the 1000 real points of the kept blob cover all but a few per cent of fresh draws.
    assert pr.precision > 0.95
    assert pr.recall == pytest.approx(0.5, abs=0.03)


def test_kid_is_unbiased(gen):
    # Same distribution: the mean of many independent KID estimates is 0 within 4 standard errors, whereas the
    # biased V-statistic would sit at a strictly positive O(1/n) offset.
    values = [metrics.kernel_distance(torch.randn(200, 4, generator=gen), torch.randn(200, 4, generator=gen),
                                      subset_size=100, num_subsets=5, generator=gen).mean for _ in range(40)]
    v = torch.tensor(values)
    sem = float(v.std() / math.sqrt(len(values)))
    assert abs(float(v.mean())) < 4 * sem
    shifted = metrics.kernel_distance(torch.randn(200, 4, generator=gen), torch.randn(200, 4, generator=gen) + 1.0,
                                      subset_size=100, num_subsets=5, generator=gen)
    assert shifted.mean > 10 * float(v.std())


@pytest.mark.parametrize("fn", [metrics.frechet_distance, metrics.mmd_rbf, metrics.sliced_wasserstein2,
                                metrics.kernel_distance, metrics.precision_recall])
def test_dimension_mismatch_is_a_value_error(fn):
    with pytest.raises(ValueError, match="dimension mismatch"):
        fn(torch.randn(10, 2), torch.randn(10, 3))


# --- difflab.evaluation -----------------------------------------------------------------------------------
def test_evaluate_samples_points_reports_counts_and_floors(gen):
    from difflab import mixture_bed_2d
    from difflab.evaluation import evaluate_samples

    bed = mixture_bed_2d(num_classes=4)
    reference = bed.sample(1000, gen)
    good = evaluate_samples(bed.sample(800, gen), reference, "points", seed=1)
    bad = evaluate_samples(bed.sample(800, gen) + 1.0, reference, "points", seed=1)
    for name in ("sliced_w2", "mmd_rbf", "FD-raw", "precision", "recall"):
        entry = good["metrics"][name]
        assert entry["n_samples"] == 500 and entry["n_reference"] == 500  # matched to the reference halves
        assert "noise_floor" in entry
    # Exact samples sit at the floor (within its own noise); a unit shift of blobs with std 0.3 is far above it.
    assert good["metrics"]["FD-raw"]["value"] < 3 * good["metrics"]["FD-raw"]["noise_floor"] + 0.02
    assert bad["metrics"]["FD-raw"]["value"] > 1.5  # |shift|² = 2 exactly, minus O(1/n) noise
    assert bad["metrics"]["sliced_w2"]["value"] > 5 * bad["metrics"]["sliced_w2"]["noise_floor"]
    assert bad["metrics"]["precision"]["value"] < 0.5 < good["metrics"]["precision"]["value"]


def test_feature_network_cache_roundtrip_and_image_metrics(tmp_path):
    from difflab.data import load_dataset
    from difflab.evaluation import evaluate_samples, feature_network

    ds = load_dataset("digits8")
    x, y = ds.x[:600], ds.y[:600]
    net, info = feature_network("digits8-test", x, y, 10, root=tmp_path, max_seconds=5.0)
    assert not info["cached"] and (tmp_path / "features" / "digits8-test.safetensors").exists()
    again, info2 = feature_network("digits8-test", root=tmp_path)
    assert info2["cached"]
    assert torch.equal(net.embed(x[:50]), again.embed(x[:50]))  # the cached weights are the trained ones
    result = evaluate_samples(x[:300], x[300:], "image", dataset="digits8", feature_net=net,
                              sample_labels=y[:300], reference_labels=y[300:])
    m = result["metrics"]
    assert {"FD-digits8", "KID-digits8", "precision", "recall", "class_accuracy"} <= set(m)
    assert m["class_accuracy"]["n_samples"] == 300 and 0.0 <= m["class_accuracy"]["value"] <= 1.0
    with pytest.raises(ValueError, match="feature network"):
        evaluate_samples(x[:10], x[10:20], "image")


def test_evaluate_run_on_a_tiny_trained_run(tmp_path):
    from pathlib import Path

    from difflab.config import load_config
    from difflab.evaluation import evaluate_run
    from difflab.training import train

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny2d.yaml", ["train.steps=4"])
    train(cfg, tmp_path / "run", progress=False)
    result = evaluate_run(tmp_path / "run", num_samples=200, sampler="ddim", steps=5)
    assert result["run"]["nfe"] == 5 and result["run"]["reference"].startswith("held-out")
    assert result["metrics"]["sliced_w2"]["n_samples"] == 200
    assert result["metrics"]["sliced_w2"]["value"] > 0.0
