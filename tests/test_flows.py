"""SPEC §6: flow matching, minibatch-OT couplings, rectified flow, reflow, straightness, distillation.

Oracle tests (float64, exact test-bed quantities or closed forms) come first; the training tests then
fit small MLPs (``networks.build_network("mlp")``) on two moons (``data.toy2d``), whose fresh draws give the
real-vs-real floor of the sliced W2 distance. Every run is seeded; the numbers quoted in docstrings were
observed with torch 2.13 on CPU.
"""

import itertools
import math

import pytest
import torch
from scipy.integrate import quad

from difflab import GaussianMixtureBed, LinearPath, NetworkDenoiser, TrigPath, VPPath
from difflab.data import toy2d
from difflab.flows import (couple, few_step_sw2, flow_matching_loss, marginal_velocity_exact,
                           ot_assignment, pair_batches, sample_flow)
from difflab.losses import diffusion_loss
from difflab.metrics import sliced_wasserstein2
from difflab.networks import build_network, network_time_fn
from difflab.objectives.distillation import fit_velocity
from difflab.reflow import distill_one_step, rectified_flow_denoiser, reflow, reflow_pairs, straightness
from difflab.samplers.ode import sample_heun


# --- minibatch OT coupling ------------------------------------------------------------------------
def _pairing_cost(x0, eps, perm):
    return float(((x0 - eps[perm]) ** 2).sum())


@pytest.mark.parametrize("seed", range(5))
def test_ot_assignment_is_the_minimum_cost_permutation(seed):
    """On n=6 the exact assignment must match a brute-force search over all 720 pairings."""
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    perm = ot_assignment(x0, eps)
    assert sorted(perm.tolist()) == list(range(6))
    best = min(_pairing_cost(x0, eps, torch.tensor(p)) for p in itertools.permutations(range(6)))
    assert _pairing_cost(x0, eps, perm) == pytest.approx(best, rel=1e-12)
    assert _pairing_cost(x0, eps, perm) <= _pairing_cost(x0, eps, torch.arange(6)) + 1e-12


def test_ot_assignment_on_image_shaped_batches_beats_independent_pairing(gen):
    x0 = torch.randn(64, 1, 4, 4, generator=gen) + 2.0
    eps = torch.randn(64, 1, 4, 4, generator=gen)
    perm = ot_assignment(x0, eps)
    assert sorted(perm.tolist()) == list(range(64))
    assert _pairing_cost(x0, eps, perm) < _pairing_cost(x0, eps, torch.arange(64))
    torch.testing.assert_close(couple(x0, eps, "ot"), eps[perm])
    assert couple(x0, eps, None) is eps


class _Spy:
    """A "network" predicting zero velocity that records what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y=None):
        self.calls.append((x.clone(), y))
        return torch.zeros_like(x)


def test_ot_coupling_moves_the_noise_and_keeps_labels_with_their_data(gen):
    spy = _Spy()
    den = NetworkDenoiser(spy, LinearPath(), target="velocity")
    x0 = torch.randn(16, 2, generator=gen, dtype=torch.float64) * 3
    y = torch.arange(16)
    eps = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    perm = ot_assignment(x0, eps)
    # at t = 0 the network sees the data rows, in order, with their own labels
    flow_matching_loss(den, x0, "ot", eps=eps, t=0.0, y=y)
    torch.testing.assert_close(spy.calls[-1][0], x0)
    assert torch.equal(spy.calls[-1][1], y)
    # at t = 1 it sees the noise, re-paired by the assignment
    loss = flow_matching_loss(den, x0, "ot", eps=eps, t=1.0, y=y)
    torch.testing.assert_close(spy.calls[-1][0], eps[perm])
    # zero prediction: the per-example loss is mean‖u‖² with u = ε_π(i) − x0_i, equal to the core loss on that noise
    torch.testing.assert_close(loss, ((eps[perm] - x0) ** 2).mean(-1))
    torch.testing.assert_close(loss, diffusion_loss(den, x0, t=torch.ones(16, dtype=torch.float64), eps=eps[perm], y=y))


def test_bad_inputs_raise_value_errors(gen):
    x0 = torch.randn(4, 2, generator=gen)
    with pytest.raises(ValueError, match="velocity"):
        flow_matching_loss(NetworkDenoiser(_Spy(), LinearPath(), target="eps"), x0)
    with pytest.raises(ValueError, match="coupling"):
        flow_matching_loss(NetworkDenoiser(_Spy(), LinearPath(), target="velocity"), x0, coupling="sinkhorn")
    with pytest.raises(ValueError, match="same shape"):
        ot_assignment(x0, torch.randn(5, 2))
    den = rectified_flow_denoiser(build_network("mlp", (2,), hidden=8, depth=1, time_dim=8))
    with pytest.raises(ValueError, match="coupling"):
        fit_velocity(den, pair_batches(x0, x0), 1, batch_size=4, coupling="ot")
    with pytest.raises(ValueError, match="LinearPath"):
        distill_one_step(NetworkDenoiser(den.net, TrigPath(), "velocity"), x0, x0, 1)


# --- the marginal velocity and the FM objective's minimiser --------------------------------------
PATHS = {"linear": LinearPath(), "trig": TrigPath(), "vp": VPPath()}


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_marginal_velocity_solves_the_continuity_equation(name, t, mix2d, gen):
    """``∂_t log p_t + ∇·v* + v*·∇log p_t = 0`` with exact ``p_t`` of the bed (SPEC §6), float64.

    ``∂_t`` by a central difference with h = 1e-5 (truncation ~h² ≈ 1e-10, rounding ~1e-16/h ≈ 1e-11),
    ``∇·v*`` by autograd; the residual must vanish to 1e-6 of the terms' scale.
    """
    path, h = PATHS[name], 1e-5
    x = 2.5 * torch.randn(64, 2, generator=gen, dtype=torch.float64)

    def log_p(tt):
        tt = torch.tensor(tt, dtype=torch.float64)
        return mix2d.marginal_log_prob(x, path.a(tt), path.s(tt))

    dlogp_dt = (log_p(t + h) - log_p(t - h)) / (2 * h)
    xg = x.clone().requires_grad_(True)
    v = marginal_velocity_exact(mix2d, path, xg, t)
    div = sum(torch.autograd.grad(v[:, i].sum(), xg, retain_graph=True)[0][:, i] for i in range(2))
    tt = torch.tensor(t, dtype=torch.float64)
    score = mix2d.posterior_means(x, path.a(tt), path.s(tt))[2]
    residual = dlogp_dt + div + (v.detach() * score).sum(-1)
    scale = dlogp_dt.abs() + div.abs() + (v.detach() * score).sum(-1).abs()
    assert (residual.abs() <= 1e-6 * (1.0 + scale)).all(), residual.abs().max()


def test_flow_matching_minimiser_is_the_marginal_velocity(mix2d):
    """``L(v) − L(v*) = E‖v − v*‖²`` (per dim) for any field v: the cross term ``2E[(v − v*)·(v* − u)]``
    vanishes because ``v* = E[u | x_t]``. Checked by Monte Carlo with common (t, x0, ε) on 200k draws,
    tolerance 5 standard errors; a shifted candidate ``v* + δ`` fails the same check (the test has power).
    """
    path, n = TrigPath(), 200_000
    g = torch.Generator().manual_seed(7)
    x0 = mix2d.sample(n, g, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01

    def delta(x, tt):  # a smooth, time-dependent perturbation field
        return torch.stack([torch.sin(x[:, 1]) * tt, 0.5 * torch.cos(x[:, 0]) - 0.3], -1)

    def loss_of(field):
        # the raw network sees float32 time; evaluate the fields at the time the target uses
        den = NetworkDenoiser(lambda x, tt: field(x, t), path, target="velocity")
        return flow_matching_loss(den, x0, eps=eps, t=t)

    def v_star(x, tt):
        return marginal_velocity_exact(mix2d, path, x, tt)

    x_t = path.sample(x0, t, eps)[0]
    d2 = (delta(x_t, t) ** 2).mean(-1)
    base = loss_of(v_star)
    for candidate, expect_zero in ((v_star, True), (lambda x, tt: v_star(x, tt) + delta(x, tt), False)):
        cand = loss_of(candidate)
        perturbed = loss_of(lambda x, tt: candidate(x, tt) + delta(x, tt))
        cross = perturbed - cand - d2  # = 2 δ·(candidate − u)/D, mean zero iff candidate = v*
        se = float(cross.std()) / math.sqrt(n)
        if expect_zero:
            assert abs(float(cross.mean())) < 5 * se
            assert float(perturbed.mean()) > float(cand.mean())
        else:
            torch.testing.assert_close(cross.mean(), 2 * d2.mean(), rtol=0, atol=5 * se)
            assert float(cand.mean()) > float(base.mean())


# --- straightness ---------------------------------------------------------------------------------
def test_straightness_matches_the_closed_form_for_a_gaussian():
    """Data ``N(μ, σ²I)`` on the linear path: the exact flow is ``x_t = (1−t)μ + r(t) z`` with
    ``r = √((1−t)²σ² + t²)``, so ``S = D (∫₀¹ r'² dt − (1−σ)²)``. The solver's Euler polyline converges
    at first order, so Richardson extrapolation of 200 and 400 steps must agree to 1e-3 (observed 4e-5).
    """
    mu, sigma, D = torch.tensor([[1.0, -0.5]], dtype=torch.float64), 0.5, 2
    den = GaussianMixtureBed(mu, torch.full((1, D), sigma**2)).denoiser(LinearPath())

    def r(t):
        return math.sqrt((1 - t) ** 2 * sigma**2 + t**2)

    exact = D * (quad(lambda t: ((t - (1 - t) * sigma**2) / r(t)) ** 2, 0, 1)[0] - (1 - sigma) ** 2)
    eps = torch.randn(2000, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    per_unit = float((eps**2).sum(-1).mean()) / D  # S is ∝ E‖z‖²: normalise out the sample's own norm
    s200, s400 = straightness(den, eps, 200) / per_unit, straightness(den, eps, 400) / per_unit
    assert 2 * s400 - s200 == pytest.approx(exact, rel=1e-3)
    point_mass = GaussianMixtureBed(mu, torch.full((1, D), 1e-8)).denoiser(LinearPath())
    assert straightness(point_mass, eps, 20) < 1e-6  # straight lines to a point: S = 0


def test_reflow_pairs_are_the_ode_solution_with_per_pair_labels(mix2d):
    den = mix2d.denoiser(LinearPath())
    y = torch.arange(300) % 4
    eps, x0_hat = reflow_pairs(den, 300, (2,), steps=20, generator=torch.Generator().manual_seed(3), batch_size=128, y=y)
    again = sample_flow(den, eps, 20, sample_heun, y=y).x  # one batch: slicing y per chunk must not change anything
    torch.testing.assert_close(x0_hat, again, rtol=1e-6, atol=1e-6)
    # the exact conditional flow lands each point on its own class's blob (radius-2 circle, std 0.3)
    means = mix2d.means[mix2d.labels.argsort()].float()
    assert ((x0_hat - means[y]).norm(dim=-1) < 1.5).float().mean() > 0.99


# --- trained models on 2-D data --------------------------------------------------------------------
N_EVAL = 4000


def _data(n, generator):
    return toy2d.two_moons(n, generator)  # standardised: mean 0, per-coordinate RMS 1, noise 0.05


@pytest.fixture(scope="module")
def eval_data():
    """Held-out data, evaluation noise, and the sampling floor of the sliced W2 distance: the root-mean-square
    real-vs-real distance over 8 pairs of independent ``N_EVAL``-point data sets (≈ 0.031), steadier than
    any single pair."""
    g = torch.Generator().manual_seed(100)
    reference, eps = _data(N_EVAL, g), torch.randn(N_EVAL, 2, generator=g)
    pairs = [sliced_wasserstein2(_data(N_EVAL, g), _data(N_EVAL, g), 256, torch.Generator().manual_seed(0))
             for _ in range(8)]
    floor = math.sqrt(sum(d**2 for d in pairs) / len(pairs))
    return reference, eps, floor


def _train(path, coupling, batch_size, steps=800, seed=0):
    torch.manual_seed(seed)
    net = build_network("mlp", (2,), hidden=64, depth=2, time_dim=32)
    den = NetworkDenoiser(net, path, target="velocity", time_fn=network_time_fn(path))
    fit_velocity(den, lambda b, g: _data(b, g), steps, lr=5e-3, batch_size=batch_size,
                 generator=torch.Generator().manual_seed(seed), coupling=coupling)
    return den


@pytest.fixture(scope="module")
def models():
    # OT-CFM uses minibatches of 128: the exact assignment costs O(B³) per step
    return {"rectified flow": _train(LinearPath(), None, 256), "fm trig path": _train(TrigPath(), None, 256),
            "ot-cfm": _train(LinearPath(), "ot", 128)}


@pytest.mark.parametrize("name", ["rectified flow", "fm trig path", "ot-cfm"])
def test_trained_flows_sample_at_the_noise_floor(name, models, eval_data):
    """100 Euler steps sample near the noise floor: sliced W2 to held-out data < 2.5× the floor (observed
    1.4×, 1.6× and 1.8×), where the untrained model (zero velocity: its samples are the noise) is at ≈ 11×."""
    reference, eps, floor = eval_data
    assert few_step_sw2(models[name], eps, reference, (100,))[100] < 2.5 * floor
    assert sliced_wasserstein2(eps, reference, 256, torch.Generator().manual_seed(0)) > 8 * floor


def test_ot_coupling_makes_straighter_paths(models, eval_data):
    """Minibatch OT pairs nearby noise and data, so OT-CFM paths are far straighter than independent
    rectified flow's (observed S ≈ 0.006 vs 0.88) and its 2-step samples far better (1.9× vs 15.5× the
    floor). Asserted: S at least 10× smaller, the 2-step distance at least halved."""
    reference, eps, _ = eval_data
    ot, rf = models["ot-cfm"], models["rectified flow"]
    assert straightness(ot, eps, 100) < 0.1 * straightness(rf, eps, 100)
    assert few_step_sw2(ot, eps, reference, (2,))[2] < 0.5 * few_step_sw2(rf, eps, reference, (2,))[2]


@pytest.fixture(scope="module")
def reflowed(models, eval_data):
    reference, _, _ = eval_data
    rf = models["rectified flow"]
    return reflow(rf.net, rf, (2,), num_pairs=4000, train_steps=400, pair_steps=50, lr=2.5e-3, reference=reference,
                  eval_num=N_EVAL, generator=torch.Generator().manual_seed(1))


def test_reflow_straightens_paths_and_improves_few_step_samples(reflowed, models, eval_data):
    """1-RF → 2-RF on two moons (pairs by 50 Heun steps). Observed: S 0.86 → 0.0036; sliced W2 at 1 Euler
    step 30× → 1.9× the floor, at 2 steps 15.6× → 1.6×. Asserted: S falls ≥ 20×, the 1-step distance
    falls ≥ 4× and the 2-step distance ≥ 2×, and 2-RF's 1-step samples are within 2.5× the floor."""
    _, _, floor = eval_data
    before, after = reflowed.measurements["before"], reflowed.measurements["after"]
    assert after["straightness"] < 0.05 * before["straightness"]
    assert after["sw2"][1] < 0.25 * before["sw2"][1]
    assert after["sw2"][2] < 0.5 * before["sw2"][2]
    assert after["sw2"][1] < 2.5 * floor
    # the teacher's network is untouched (the student is a copy) and the pairs are kept
    assert reflowed.net is not models["rectified flow"].net
    assert reflowed.eps.shape == reflowed.x0_hat.shape == (4000, 2)


def test_one_step_distillation_reproduces_the_pairs(reflowed, eval_data):
    """Distilling 2-RF at t = 1: one Euler step ``ε − v(ε, 1)`` should land on the pair (the coupling is a
    deterministic function of ε, so the regression has no irreducible error; observed squared error 1.5e-3 of
    the data's spread, asserted < 1e-2) and sample in one step at least as well as 2-RF (observed 1.55× vs
    1.86× the floor; asserted < 2× the floor and ≤ 1.2× 2-RF's)."""
    reference, eps, floor = eval_data
    one_step = distill_one_step(reflowed.denoiser, reflowed.eps, reflowed.x0_hat, train_steps=200, lr=2.5e-3,
                                generator=torch.Generator().manual_seed(2))
    x1 = sample_flow(one_step, reflowed.eps[:1000], 1).x
    err = (x1 - reflowed.x0_hat[:1000]).pow(2).sum(-1).mean()
    spread = (reflowed.x0_hat - reflowed.x0_hat.mean(0)).pow(2).sum(-1).mean()
    assert err < 0.01 * spread
    sw2_distilled = few_step_sw2(one_step, eps, reference, (1,))[1]
    assert sw2_distilled < 2.0 * floor
    assert sw2_distilled < 1.2 * reflowed.measurements["after"]["sw2"][1]
