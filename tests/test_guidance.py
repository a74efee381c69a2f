"""Guidance against the exact answer on a labelled Gaussian mixture (SPEC §7, §8).

On a labelled mixture the conditional and unconditional denoisers and the classifier p(y | x_t) are
exact, and ∇log p_t(x|y) = ∇log p_t(x) + ∇log p_t(y|x) holds exactly, so:
- CFG is checked pointwise against its formula, and classifier guidance with weight w equals CFG with λ = w;
- λ = 1 (CFG) and w = 1 (classifier guidance) must sample the exact conditional at the noise floor;
- λ > 1 is measured against the tilted target p(x) p(y|x)^λ.
"""

from functools import partial

import pytest
import torch

from difflab import DiscretePath, NetworkDenoiser, TrigPath, VPPath, mixture_bed_2d, sample_ddim, sample_ddpm
from difflab.guidance import (NULL_LABEL, BedClassifier, ClassifierFreeGuidance, NullLabelDenoiser, class_mode,
                              exact_cfg, exact_classifier_guidance, tilted_target_importance, tilted_target_langevin)
from difflab.guidance_experiment import compare_guidance_to_tilted, plot_sweep, sweep_guidance_scale
from difflab.metrics import sliced_wasserstein2
from difflab.networks import MLPDenoiser
from difflab.parameterization import from_x0_eps
from difflab.samplers.ode import sample_dpmpp_2m, sample_heun
from difflab.samplers.time_grids import karras
from difflab.utils import bcast

N = 2000  # samples per distribution in the distributional tests
FLOOR_FACTOR = 2.0  # guided-vs-exact sliced W2 must be within this factor of the real-vs-real floor (see below)
PATHS = [DiscretePath.from_schedule("linear", T=1000), VPPath(), TrigPath()]
TIMES = {True: [1, 50, 300, 700, 1000], False: [0.01, 0.2, 0.5, 0.8, 0.99]}


@pytest.fixture(scope="module")
def path():
    return DiscretePath.from_schedule("linear", T=1000)


@pytest.fixture(scope="module")
def overlap_bed():
    """Four classes whose blobs overlap (std 1 on a radius-2 circle): Bayes accuracy ≈ 0.84, so guidance has work to do."""
    return mixture_bed_2d(4, std=1.0)


def _sw2(u, v):
    return sliced_wasserstein2(u, v, 256, torch.Generator().manual_seed(7))


def _noisy(bed, path, t, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, y = bed.sample(n, g, return_labels=True, dtype=torch.float64)
    t = torch.full((n,), t, dtype=torch.long if path.discrete else torch.float64)
    return path.sample(x0, t, generator=g)[0], t, y


def _floor(bed, y, n, seed=11, repeats=3):
    """Real-vs-real sliced W2 between independent exact draws of p(x|y), averaged over a few pairs."""
    g = torch.Generator().manual_seed(seed)
    return sum(_sw2(bed.sample(n, g, y=y, dtype=torch.float64), bed.sample(n, g, y=y, dtype=torch.float64))
               for _ in range(repeats)) / repeats


# --- pointwise identities ---------------------------------------------------------------------
@pytest.mark.parametrize("path_", PATHS, ids=["discrete", "vp", "trig"])
@pytest.mark.parametrize("lam", [0.0, 1.0, 2.5])
def test_cfg_is_the_affine_combination_and_stays_consistent(mix2d, path_, lam):
    den = mix2d.denoiser(path_)
    for t in TIMES[path_.discrete]:
        x, t_b, y = _noisy(mix2d, path_, t)
        p_c, p_u = den(x, t_b, y=y), den(x, t_b)
        g = exact_cfg(mix2d, path_, lam)(x, t_b, y=y)
        # float64 arithmetic on O(1) numbers: agreement to ~1e-12 (slack for the exact model's own rounding)
        torch.testing.assert_close(g.eps, p_u.eps + lam * (p_c.eps - p_u.eps), rtol=0, atol=1e-10)
        torch.testing.assert_close(g.x0, p_u.x0 + lam * (p_c.x0 - p_u.x0), rtol=0, atol=1e-10)
        a, s = bcast(path_.a(t_b), x), bcast(path_.s(t_b), x)
        torch.testing.assert_close(a * g.x0 + s * g.eps, x, rtol=0, atol=1e-10)
        if lam == 1.0:
            torch.testing.assert_close(g.eps, p_c.eps, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path_", PATHS, ids=["discrete", "vp", "trig"])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_exact_classifier_guidance_equals_exact_cfg(mix2d, path_, w):
    """∇log p(y|x) = ∇log p(x|y) − ∇log p(x) exactly, so ε − w s ∇log p(y|x) = ε_u + w (ε_c − ε_u) pointwise;
    at w = 1 it is the exact conditional ε."""
    den = mix2d.denoiser(path_)
    for t in TIMES[path_.discrete]:
        x, t_b, y = _noisy(mix2d, path_, t)
        cg = exact_classifier_guidance(mix2d, path_, w)(x, t_b, y=y)
        cfg = exact_cfg(mix2d, path_, w)(x, t_b, y=y)
        scale = 1.0 + cfg.eps.abs().max()  # the autograd gradient of a float64 log-density: ~1e-12 relative
        torch.testing.assert_close(cg.eps / scale, cfg.eps / scale, rtol=0, atol=1e-9)
        torch.testing.assert_close(cg.x0 / (1.0 + cfg.x0.abs().max()), cfg.x0 / (1.0 + cfg.x0.abs().max()), rtol=0, atol=1e-9)
        if w == 1.0:
            torch.testing.assert_close(cg.eps, den(x, t_b, y=y).eps, rtol=0, atol=1e-9 * float(scale))


def test_bed_classifier_is_the_exact_class_posterior(mix2d, path):
    x, t, _ = _noisy(mix2d, path, 400)
    log_p = BedClassifier(mix2d, path)(x, t)
    torch.testing.assert_close(log_p.exp(), mix2d.class_posterior(x, path.a(t), path.s(t)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(x.shape[0], dtype=torch.float64))


def test_null_label_adapter_routes_rows(mix2d, path):
    x, t, y = _noisy(mix2d, path, 300, n=8)
    den = mix2d.denoiser(path)
    y_mixed = torch.where(torch.arange(8) % 2 == 0, y, torch.full_like(y, NULL_LABEL))
    p = NullLabelDenoiser(den)(x, t, y=y_mixed)
    p_c, p_u = den(x, t, y=y), den(x, t)
    even = torch.arange(8) % 2 == 0
    torch.testing.assert_close(p.eps[even], p_c.eps[even])
    torch.testing.assert_close(p.eps[~even], p_u.eps[~even])


# --- distributions: λ = 1 and w = 1 sample the exact conditional ------------------------------
@pytest.mark.parametrize("guide,sampler", [
    (exact_cfg, partial(sample_ddim, steps=100)),
    (exact_classifier_guidance, partial(sample_ddim, steps=100)),
    (exact_cfg, partial(sample_ddpm, steps=200)),
], ids=["cfg-ddim100", "classifier-ddim100", "cfg-ddpm200"])
def test_unit_scale_samples_the_exact_conditional(mix2d, path, guide, sampler):
    """Sliced W2 (256 fixed projections) to exact conditional draws, against the real-vs-real floor (≈ 0.02 at
    n = 2000, ≈ 0.03 at n = 1000 for the slower DDPM chain). Factor 2: measured 0.016–0.03 at n = 2000 for these
    samplers on the exact model (their discretisation error is near the floor); a wrong guide fails by far
    (λ = 2 gives ≈ 0.22, i.e. 10× the floor)."""
    y, n = 1, (N if sampler.func is sample_ddim else N // 2)
    g = torch.Generator().manual_seed(0)
    x_T = path.prior_sample((n, 2), generator=g, dtype=torch.float64)
    out = sampler(guide(mix2d, path, 1.0), x_T, generator=g, y=y)
    reference = mix2d.sample(n, torch.Generator().manual_seed(99), y=y, dtype=torch.float64)
    floor = _floor(mix2d, y, n)
    assert _sw2(out.x, reference) < FLOOR_FACTOR * floor


def test_guidance_above_one_sharpens_but_is_not_the_tilted_target(overlap_bed, path):
    """Deterministic DDIM (the PF-ODE) on overlapping classes: λ = 2 moves samples into their class (purity up,
    closer to the class mode), λ = 1 is the tilted target (= p(x|y)) at the floor, and λ = 5 is far from the
    tilted target p(x) p(y|x)^5: it overshoots the class mode (away from the other classes) while the target
    stays near it. (The ancestral DDPM chain overshoots less: the guided field is no score, so samplers differ.)"""
    rows = compare_guidance_to_tilted(overlap_bed, path, y=0, scales=[1.0, 2.0, 5.0], n=N,
                                      sampler=partial(sample_ddim, steps=50), generator=torch.Generator().manual_seed(0))
    r1, r2, r5 = rows
    assert r1["sw2_target"] < FLOOR_FACTOR * r1["sw2_floor"]
    # purity: 0.84 at λ=1 (the Bayes accuracy of the class), ≈ 1.0 at λ=2 (measured 0.999); binomial SE ≈ 0.01
    assert r2["purity_guided"] > r1["purity_guided"] + 0.1
    # mean distance to the mode: SE ≈ 0.6/√2000 ≈ 0.013 per estimate; measured gap 0.07, required 0.03 (> 2 SE of the gap)
    assert r2["mode_dist_guided"] < r1["mode_dist_guided"] - 0.03
    # λ = 5: measured sW2 ≈ 1.3 against a floor ≈ 0.06, mode distance 2.3 (guided) vs 1.1 (target)
    assert r5["sw2_target"] > 5 * r5["sw2_floor"]
    assert r5["mode_dist_guided"] > r5["mode_dist_target"] + 0.5


def test_tilted_target_importance_agrees_with_langevin(overlap_bed):
    """Two independent estimators of p(x) p(y|x)^3: SNIS from p(x|y) and MALA on the exact score started from
    p(x|y) itself, which is far from the target (checked), so agreement is not by construction."""
    y, lam, n = 0, 3.0, 1000
    g = torch.Generator().manual_seed(3)
    snis = tilted_target_importance(overlap_bed, y, lam, 4 * n, g)
    assert 0.5 * 4 * n < snis.ess <= 4 * n  # weights p(y|x)^2 ≤ 1: a mild reweighting (measured ESS ≈ 0.81·N)
    start = overlap_bed.sample(n, g, y=y, dtype=torch.float64)
    # 150 steps of h = 0.1 diffuse over √(2·0.1·150) ≈ 5.5 ≫ the class width 1; measured acceptance 0.97
    x_mala, acceptance = tilted_target_langevin(overlap_bed, y, lam, start, steps=150, step_size=0.1, generator=g)
    assert 0.5 < acceptance < 1.0
    target = snis.resample(n, g)
    floor = _sw2(snis.resample(n, g), tilted_target_importance(overlap_bed, y, lam, 4 * n, g).resample(n, g))
    assert _sw2(start, target) > 2 * FLOOR_FACTOR * floor  # the start is measurably off-target
    assert _sw2(x_mala, target) < FLOOR_FACTOR * floor


def test_class_mode_of_a_single_gaussian_class_is_its_mean(mix2d):
    torch.testing.assert_close(class_mode(mix2d, 2), mix2d.means[2], rtol=0, atol=1e-8)


@pytest.mark.parametrize("solver", [sample_heun, sample_dpmpp_2m], ids=["heun", "dpmpp_2m"])
def test_cfg_composes_with_ode_solvers_on_a_continuous_path(mix2d, solver):
    """On the VP path with the PF-ODE solvers, λ = 1 CFG retraces the exact conditional model's trajectory
    (same x_T, deterministic solver) to float64 rounding, at exactly twice the network evaluations."""
    path_ = VPPath()
    grid = karras(path_, 10)
    x_T = path_.prior_sample((256, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = solver(mix2d.denoiser(path_), x_T, grid, y=2)
    guided = solver(exact_cfg(mix2d, path_, 1.0), x_T, grid, y=2)
    torch.testing.assert_close(guided.x, plain.x, rtol=0, atol=1e-10)
    assert guided.nfe == 2 * plain.nfe
    assert (solver(exact_cfg(mix2d, path_, 2.0), x_T, grid, y=2).x - plain.x).abs().max() > 0.05


def test_cfg_drives_a_class_conditional_network_in_one_batch():
    """With a label-conditioned MLP (NULL_LABEL = its learned null row), the batched guided prediction equals
    the CFG formula on two separate calls (float32 network: tolerance 1e-5)."""
    torch.manual_seed(0)
    path_ = DiscretePath.from_schedule("linear", T=100)
    net = MLPDenoiser(2, hidden=32, depth=2, time_dim=16, num_classes=3)
    for p in net.parameters():  # the untrained net is zero-initialised at the output; make the halves differ
        torch.nn.init.normal_(p, std=0.3)
    den = NetworkDenoiser(net, path_, target="eps")
    x, t, y = torch.randn(8, 2), torch.full((8,), 40), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with torch.no_grad():
        g = ClassifierFreeGuidance(den, 3.0)(x, t, y=y)
        p_c, p_u = den(x, t, y=y), den(x, t, y=torch.full_like(y, NULL_LABEL))
    assert (p_c.eps - p_u.eps).abs().max() > 1e-2
    torch.testing.assert_close(g.eps, p_u.eps + 3.0 * (p_c.eps - p_u.eps), rtol=1e-5, atol=1e-5)


# --- NFE honesty, interval and rescale --------------------------------------------------------
class CountingDenoiser:
    """Records the batch size and labels of every call to the wrapped denoiser."""

    def __init__(self, denoiser):
        self.denoiser, self.path, self.calls = denoiser, denoiser.path, []

    def __call__(self, x, t, y=None, **cond):
        self.calls.append((x.shape[0], None if y is None else torch.as_tensor(y).clone()))
        return self.denoiser(x, t, y=y, **cond)


@pytest.mark.parametrize("sampler", [partial(sample_ddim, steps=10), partial(sample_ddpm, steps=10)], ids=["ddim", "ddpm"])
def test_cfg_makes_one_batched_call_per_step(mix2d, path, sampler):
    B, y = 16, 3
    counter = CountingDenoiser(NullLabelDenoiser(mix2d.denoiser(path)))
    out = sampler(ClassifierFreeGuidance(counter, 2.0), path.prior_sample((B, 2), torch.Generator().manual_seed(0)),
                  generator=torch.Generator().manual_seed(1), y=y)
    assert len(counter.calls) == 10
    for batch, labels in counter.calls:
        assert batch == 2 * B
        assert (labels[:B] == y).all() and (labels[B:] == NULL_LABEL).all()
    assert out.nfe == 20


def test_guidance_interval_applies_scale_only_inside(mix2d, path):
    B, y, lo, hi = 16, 0, 300, 600
    counter = CountingDenoiser(NullLabelDenoiser(mix2d.denoiser(path)))
    cfg = ClassifierFreeGuidance(counter, 3.0, interval=(lo, hi))
    out = sample_ddim(cfg, path.prior_sample((B, 2), torch.Generator().manual_seed(0)), steps=10, y=y)
    # trailing grid evaluates t = 1000, 900, …, 100: four times (300…600) are inside the interval
    assert [batch for batch, _ in counter.calls] == [B, B, B, B, 2 * B, 2 * B, 2 * B, 2 * B, B, B]
    assert out.nfe == 6 * 1 + 4 * 2
    den = mix2d.denoiser(path)
    t = torch.tensor([100, 300, 450, 600, 601, 1000] * 2)  # mixed per-sample times
    x, _, _ = _noisy(mix2d, path, 500, n=12)
    g = cfg(x, t, y=y)
    inside = (t >= lo) & (t <= hi)
    plain = exact_cfg(mix2d, path, 3.0)(x, t, y=y)
    torch.testing.assert_close(g.eps[inside], plain.eps[inside])
    torch.testing.assert_close(g.eps[~inside], den(x, t, y=torch.full((12,), y)).eps[~inside])


def test_rescale_zero_is_plain_cfg_and_one_matches_conditional_std(mix2d, path):
    lam = 4.0
    for t in [100, 500, 900]:
        x, t_b, y = _noisy(mix2d, path, t)
        den = mix2d.denoiser(path)
        p_c, p_u = den(x, t_b, y=y), den(x, t_b)
        plain = exact_cfg(mix2d, path, lam)(x, t_b, y=y)
        torch.testing.assert_close(exact_cfg(mix2d, path, lam, rescale=0.0)(x, t_b, y=y).eps, plain.eps, rtol=0, atol=0)
        full = exact_cfg(mix2d, path, lam, rescale=1.0)(x, t_b, y=y)
        half = exact_cfg(mix2d, path, lam, rescale=0.5)(x, t_b, y=y)
        v = lambda p: from_x0_eps(p.x0, p.eps, x, t_b, path, "v")  # noqa: E731
        std = lambda u: u.std(dim=-1, correction=0)  # noqa: E731
        torch.testing.assert_close(std(v(full)), std(v(p_c)), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v(half), 0.5 * (v(full) + v(plain)), rtol=1e-10, atol=1e-12)
        a, s = bcast(path.a(t_b), x), bcast(path.s(t_b), x)
        torch.testing.assert_close(a * full.x0 + s * full.eps, x, rtol=0, atol=1e-10)


def test_bad_arguments_raise(mix2d, path):
    den = NullLabelDenoiser(mix2d.denoiser(path))
    with pytest.raises(ValueError, match="interval"):
        ClassifierFreeGuidance(den, 2.0, interval=(600, 300))
    with pytest.raises(ValueError, match="rescale"):
        ClassifierFreeGuidance(den, 2.0, rescale=1.5)
    with pytest.raises(ValueError, match="y="):
        ClassifierFreeGuidance(den, 2.0)(torch.zeros(4, 2), torch.full((4,), 10))
    with pytest.raises(ValueError, match="one per sample"):
        exact_classifier_guidance(mix2d, path, 1.0)(torch.zeros(4, 2), torch.full((4,), 10), y=torch.zeros(3))


# --- the λ-sweep core -------------------------------------------------------------------------
def test_sweep_guidance_scale_on_the_bed(mix2d, path, tmp_path):
    """Exact CFG, reference classifier = exact Bayes classifier of clean data. λ=0 draws the unconditional
    mixture (accuracy ≈ 1/4; binomial SE ≈ 0.03 with 200 samples), λ=1 the conditional (Bayes accuracy of
    these well-separated blobs ≈ 1)."""
    g = torch.Generator().manual_seed(5)

    def sample_fn(scale, y, generator):
        x_T = path.prior_sample((y.shape[0], 2), generator=generator, dtype=torch.float64)
        return sample_ddim(exact_cfg(mix2d, path, scale), x_T, steps=20, generator=generator, y=y).x

    bayes = BedClassifier(mix2d, path)

    def classifier_fn(x):  # the exact classifier at t = 0: log p(y | x0)
        return bayes(x, torch.zeros(x.shape[0], dtype=torch.long))

    rows = sweep_guidance_scale(sample_fn, classifier_fn, [0.0, 1.0, 3.0], num_classes=4, samples_per_class=50,
                                quality_fn=lambda x: _sw2(x, mix2d.sample(200, g, dtype=torch.float64)), generator=g)
    assert [r["scale"] for r in rows] == [0.0, 1.0, 3.0]
    assert abs(rows[0]["accuracy"] - 0.25) < 0.1
    assert rows[1]["accuracy"] > 0.97 and rows[1]["confidence"] > 0.95
    assert rows[1]["diversity"] < rows[0]["diversity"]  # one blob (mean distance ≈ 0.53) vs four (≈ 2.5)
    assert all("quality" in r for r in rows)
    plot_sweep(rows, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_guidance_interval_follows_discrete_time_into_the_continuous_samplers():
    """A guidance interval given in DDPM steps (0..T) keeps its meaning when a continuous sampler views the model
    on the exact continuation t = k/T (SPEC §6–§7): the interval is rescaled by 1/T, exactly."""
    from difflab.pipeline import continuous_view

    bed = mixture_bed_2d()
    path = DiscretePath.from_schedule("linear", T=1000)
    guided = exact_cfg(bed, path, 3.0, interval=(200, 600))
    view = continuous_view(guided)
    assert view.interval == (0.2, 0.6)
    t = torch.tensor([0.1, 0.3, 0.7], dtype=torch.float64)
    assert view.in_interval(t).tolist() == [False, True, False]
