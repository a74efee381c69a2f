"""Guidance: classifier-free and classifier guidance, and their exact versions on a test bed (SPEC §7, §8).

Both guides are *denoiser wrappers*: callables ``guided(x, t, y=…, **cond) -> Prediction`` with a
``path`` attribute, so they compose with every sampler and solver (DDPM, DDIM, ODE, SDE) without the
sampler knowing. With ``x_t = a x0 + s ε`` and ``score = −ε/s`` (SPEC §4):

- Classifier-free guidance (Ho & Salimans 2022), with the null label ``∅``::

      ε̂ = ε(x, ∅) + λ (ε(x, y) − ε(x, ∅)),      x̂0 = x0(x, ∅) + λ (x0(x, y) − x0(x, ∅)).

  Both predictions satisfy ``x = a x0 + s ε`` and the weights ``(1 − λ, λ)`` sum to one, so the
  guided pair satisfies it too (the map is affine). In score form ``∇log p(x) + λ ∇log p(y|x)``.
- Classifier guidance (Dhariwal & Nichol 2021) with a noise-conditional classifier ``p_φ(y | x_t, t)``::

      ε̂ = ε − w s ∇_x log p_φ(y | x_t, t),      x̂0 = x0 + w (s²/a) ∇_x log p_φ(y | x_t, t).

On a labelled :class:`~difflab.testbeds.GaussianMixtureBed` both are exact: the bed's denoiser with or
without ``y`` gives ``ε(x, y)`` and ``ε(x, ∅)`` (:class:`NullLabelDenoiser` maps the null label to "no
y"), and :class:`BedClassifier` is the exact ``log p(y | x_t)``. Since ``∇log p_t(x|y) = ∇log p_t(x) +
∇log p_t(y|x)`` holds exactly, λ = 1 and w = 1 both reproduce the conditional model (and CFG with λ equals
classifier guidance with w = λ pointwise). For λ > 1 nothing makes the guided chain sample the tilted
target ``p_λ(x | y) ∝ p(x) p(y|x)^λ`` (SPEC §7): the guided field is not the score of the tilt's noisy
marginals, nor of any family of marginals, so different samplers of it (the deterministic PF-ODE/DDIM,
the ancestral DDPM chain) even disagree with each other. :func:`tilted_target_importance` and
:func:`tilted_target_langevin` sample the target so the difference can be measured
(:func:`difflab.guidance_experiment.compare_guidance_to_tilted`).

Notation map: ``scale`` is CFG's λ and classifier guidance's ``w``; ``a``, ``s`` as in :mod:`difflab.paths`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from difflab.losses import sample_time
from difflab.networks.embeddings import NULL_LABEL  # the label value meaning ∅ (the networks' learned null row)
from difflab.parameterization import Prediction, from_x0_eps, to_x0_eps
from difflab.paths import GaussianPath
from difflab.samplers.chain import denoiser_cost
from difflab.testbeds import GaussianMixtureBed
from difflab.utils import bcast, per_sample_time, randn, sum_except_batch


# --- helpers ---------------------------------------------------------------------------------
def _labels(y, batch: int, device) -> torch.Tensor:
    """Class labels as a ``long [B]`` tensor (a single label is repeated for the batch)."""
    if y is None:
        raise ValueError("guidance needs the class to guide towards: pass y=")
    y = torch.as_tensor(y, device=device).long()
    if y.ndim == 0:
        y = y.expand(batch)
    if y.shape != (batch,):
        raise ValueError(f"y must be one label or one per sample ({batch}), got shape {tuple(y.shape)}")
    return y


def _time(t, batch: int, device) -> torch.Tensor:
    """The time as a ``[B]`` tensor; a Python float becomes float64 (continuous path time keeps its precision)."""
    if isinstance(t, float):
        t = torch.tensor(t, dtype=torch.float64)
    return per_sample_time(t, batch, device)


def _map_batched(cond: dict, batch: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Apply ``fn`` to every conditioning tensor with a leading batch dimension; pass the rest unchanged."""
    return {k: fn(v) if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == batch else v for k, v in cond.items()}


def _take_rows(pred: Prediction, rows: torch.Tensor) -> Prediction:
    """The rows ``rows`` (bool mask or index) of every field of a Prediction."""
    return Prediction(pred.x0[rows], pred.eps[rows], None if pred.var_interp is None else pred.var_interp[rows])


def _merge_rows(mask: torch.Tensor, p_true: Prediction, p_false: Prediction, like: torch.Tensor) -> Prediction:
    """A Prediction of ``like``'s shape filled with ``p_true``'s rows where ``mask`` holds, ``p_false``'s elsewhere
    (each holds only its own rows)."""
    def merge(u, v):
        if u is None or v is None:
            return None
        out = torch.empty(like.shape, dtype=u.dtype, device=u.device)
        out[mask], out[~mask] = u, v
        return out
    return Prediction(merge(p_true.x0, p_false.x0), merge(p_true.eps, p_false.eps),
                      merge(p_true.var_interp, p_false.var_interp))


def _std_except_batch(v: torch.Tensor) -> torch.Tensor:
    """Per-sample standard deviation over all non-batch dims, ``[B]``."""
    return v.reshape(v.shape[0], -1).std(dim=-1, correction=0)


# --- classifier-free guidance ---------------------------------------------------------------
class ClassifierFreeGuidance:
    """Classifier-free guidance with scale λ as a denoiser (SPEC §7).

    ``ε̂ = ε(x, ∅) + λ (ε(x, y) − ε(x, ∅))`` and the same affine combination of ``x̂0`` (so
    ``x = a x̂0 + s ε̂`` still holds). The conditional and unconditional halves are evaluated in one
    batched call of ``denoiser`` on ``(2B, …)`` inputs: ``y`` for the first half, ``null_label`` for the
    second; other conditioning tensors with a batch dimension are repeated for both halves.

    Args:
        denoiser: a conditional denoiser ``denoiser(x, t, y=labels, **cond)`` trained with condition dropout,
            to which ``y = null_label`` means ∅ (wrap a test-bed denoiser in :class:`NullLabelDenoiser`).
        scale: λ. 0 is the unconditional model, 1 the conditional one, > 1 sharpens.
        null_label: the label value of ∅.
        interval: ``(t_lo, t_hi)`` in the path's time units: guidance is applied only for
            ``t_lo ≤ t ≤ t_hi`` (Kynkäänniemi et al. 2024); outside it the conditional prediction is
            returned from a single (conditional-only) evaluation. ``None``: every t.
        rescale: φ ∈ [0, 1] of the rescaled guidance of Lin et al. (2024, §3.4), applied to the
            ``v = a ε − s x0`` prediction (the target their model predicts)::

                v_φ = φ · v_cfg · std(v_c)/std(v_cfg) + (1 − φ) · v_cfg      (std per sample)

            and mapped back to ``(x̂0, ε̂)`` exactly (SPEC §4), so the pair stays consistent. 0 is plain CFG.

    After each call ``last_nfe`` is the number of network evaluations made: 2 for a guided call (the
    batched pass evaluates the network on both halves), 1 outside the interval (times the wrapped
    denoiser's own ``last_nfe`` if it has one).
    """

    def __init__(self, denoiser, scale: float, null_label: int = NULL_LABEL,
                 interval: Optional[Tuple[float, float]] = None, rescale: float = 0.0):
        if interval is not None and (len(interval) != 2 or interval[0] > interval[1]):
            raise ValueError(f"interval must be (t_lo, t_hi) with t_lo <= t_hi, got {interval!r}")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale must lie in [0, 1], got {rescale}")
        self.denoiser, self.path = denoiser, denoiser.path
        self.scale, self.null_label, self.interval, self.rescale = float(scale), int(null_label), interval, float(rescale)
        self.last_nfe = 1

    def in_interval(self, t: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: where guidance applies."""
        if self.interval is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        t_lo, t_hi = self.interval
        return (t >= t_lo) & (t <= t_hi)

    def __call__(self, x: torch.Tensor, t, y=None, **cond) -> Prediction:
        B = x.shape[0]
        t = _time(t, B, x.device)
        y = _labels(y, B, x.device)
        inside = self.in_interval(t)
        if not inside.any():
            pred = self.denoiser(x, t, y=y, **cond)
            self.last_nfe = denoiser_cost(self.denoiser)
            return pred
        both = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, self.null_label)]),
                             **_map_batched(cond, B, lambda v: torch.cat([v, v])))
        self.last_nfe = 2 * denoiser_cost(self.denoiser)
        cond_pred, uncond_pred = _take_rows(both, slice(0, B)), _take_rows(both, slice(B, 2 * B))
        guided = self.combine(cond_pred, uncond_pred, x, t)
        if inside.all():
            return guided
        return _merge_rows(inside, _take_rows(guided, inside), _take_rows(cond_pred, ~inside), x)

    def combine(self, cond: Prediction, uncond: Prediction, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        """The guided prediction from the two halves (CFG, then the optional φ-rescale); keeps ``cond``'s variance."""
        lam = self.scale
        x0 = uncond.x0 + lam * (cond.x0 - uncond.x0)
        eps = uncond.eps + lam * (cond.eps - uncond.eps)
        if self.rescale > 0:
            v_cfg = from_x0_eps(x0, eps, x, t, self.path, "v")
            v_c = from_x0_eps(cond.x0, cond.eps, x, t, self.path, "v")
            std_cfg, std_c = _std_except_batch(v_cfg), _std_except_batch(v_c)
            ratio = torch.where(std_cfg > 0, std_c / std_cfg.clamp(min=torch.finfo(std_cfg.dtype).tiny), torch.ones_like(std_c))
            v = self.rescale * bcast(ratio, v_cfg) * v_cfg + (1.0 - self.rescale) * v_cfg
            x0, eps = to_x0_eps(v, x, t, self.path, "v")
        return Prediction(x0, eps, cond.var_interp)


class NullLabelDenoiser:
    """Adapter: a denoiser that takes ``y=None`` for "unconditional" (e.g. a test bed's exact denoiser) made to
    read the null label as ∅, so :class:`ClassifierFreeGuidance` can drive it.

    Rows with ``y == null_label`` get ``denoiser(x, t)``, the others ``denoiser(x, t, y=y)``; it counts as
    one evaluation (the wrapped model is the "network" being measured).
    """

    def __init__(self, denoiser, null_label: int = NULL_LABEL):
        self.denoiser, self.path, self.null_label = denoiser, denoiser.path, int(null_label)

    def __call__(self, x: torch.Tensor, t, y=None, **cond) -> Prediction:
        if y is None:
            return self.denoiser(x, t, **cond)
        B = x.shape[0]
        t = _time(t, B, x.device)
        y = _labels(y, B, x.device)
        null = y == self.null_label
        if not null.any():
            return self.denoiser(x, t, y=y, **cond)
        if null.all():
            return self.denoiser(x, t, **cond)
        keep = ~null
        p_cond = self.denoiser(x[keep], t[keep], y=y[keep], **_map_batched(cond, B, lambda v: v[keep]))
        p_null = self.denoiser(x[null], t[null], **_map_batched(cond, B, lambda v: v[null]))
        return _merge_rows(keep, p_cond, p_null, x)


# --- classifier guidance --------------------------------------------------------------------
def class_log_prob_grad(classifier: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    """``log p_φ(y | x_t, t)`` ``[B]`` and its gradient ``∇_x`` (shape of ``x``), by autograd.

    ``classifier(x, t)`` returns logits or log-probabilities ``(B, num_classes)`` (``log_softmax`` maps
    both to log-probabilities). Gradients are enabled locally, so this works inside samplers' ``no_grad``.
    The classifier must treat samples independently (no batch statistics), as the gradient of the
    batch sum is taken.
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_p = torch.log_softmax(classifier(x_in, t), dim=-1)  # (B, C)
        log_p_y = log_p.gather(1, y.reshape(-1, 1)).squeeze(1)  # (B,)
        (grad,) = torch.autograd.grad(log_p_y.sum(), x_in)
    return log_p_y.detach(), grad


class ClassifierGuidance:
    """Classifier guidance with weight ``w`` as a denoiser (SPEC §7; Dhariwal & Nichol 2021).

    ``ε̂ = ε − w s_t ∇_x log p_φ(y | x_t, t)`` and ``x̂0 = x0 + w (s_t²/a_t) ∇_x log p_φ(y | x_t, t)``, so
    ``x = a x̂0 + s ε̂`` still holds. In score form: ``∇log p_t(x) + w ∇log p_φ(y | x_t)``.

    Args:
        denoiser: the diffusion model (unconditional by default).
        classifier: ``classifier(x_t, t) -> logits or log-probs (B, num_classes)``, ``t`` in the path's units
            (e.g. :class:`~difflab.networks.classifier.NoisyClassifier` or :class:`BedClassifier`).
        scale: ``w``.
        condition_denoiser: also pass ``y`` to the denoiser (a conditional model plus a classifier, as
            Dhariwal & Nichol's best ImageNet results); by default ``y`` only drives the classifier.

    ``y`` comes from the sampler's ``**cond``. ``last_nfe`` is the wrapped denoiser's; the classifier's
    forward and backward pass per step are extra cost, not counted as network evaluations of the model.
    """

    def __init__(self, denoiser, classifier: Callable, scale: float, condition_denoiser: bool = False):
        self.denoiser, self.path, self.classifier = denoiser, denoiser.path, classifier
        self.scale, self.condition_denoiser = float(scale), condition_denoiser
        self.last_nfe = 1

    def __call__(self, x: torch.Tensor, t, y=None, **cond) -> Prediction:
        B = x.shape[0]
        t = _time(t, B, x.device)
        y = _labels(y, B, x.device)
        pred = self.denoiser(x, t, y=y, **cond) if self.condition_denoiser else self.denoiser(x, t, **cond)
        self.last_nfe = denoiser_cost(self.denoiser)
        if self.scale == 0:
            return pred
        _, grad = class_log_prob_grad(self.classifier, x, t, y)
        a, s = bcast(self.path.a(t), x), bcast(self.path.s(t), x)
        w_grad = self.scale * grad.to(x.dtype)
        eps = pred.eps - s * w_grad
        # x0 shift = (s²/a) w ∇log p; at a = 0 (zero terminal SNR) x carries no signal and x0 is left as is.
        x0 = pred.x0 + torch.where(a > 0, s**2 / a.clamp(min=torch.finfo(a.dtype).tiny), torch.zeros_like(a)) * w_grad
        return Prediction(x0, eps, pred.var_interp)


def classifier_loss(classifier: Callable, path: GaussianPath, x0: torch.Tensor, y: torch.Tensor,
                    t: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Cross-entropy ``−log p_φ(y | x_t, t)`` on ``x_t = a_t x0 + s_t ε`` with ``t`` uniform on the path, ``[B]``.

    The objective of the noise-conditional classifier of classifier guidance (Dhariwal & Nichol 2021, SPEC §7).
    """
    if t is None:
        t = sample_time(path, x0.shape[0], generator, x0.device)
    x_t, _ = path.sample(x0, t, generator=generator)
    return F.cross_entropy(classifier(x_t, t), y.long(), reduction="none")


# --- exact guidance on a labelled test bed (SPEC §8) -------------------------------------------
def bed_log_joint(bed: GaussianMixtureBed, x: torch.Tensor, a, s) -> torch.Tensor:
    """Exact ``log p_t(x, y) = log p_t(x | y) + log p(y)`` for every class, ``(B, num_classes)`` float64.

    From the bed's closed-form marginals, differentiable in ``x``; ``logsumexp`` over classes is ``log p_t(x)``.
    """
    if bed.labels is None:
        raise ValueError("this bed has no class labels")
    prior = torch.zeros(bed.num_classes, dtype=torch.float64).index_add_(0, bed.labels, bed.weights)
    xd = x.double()
    return torch.stack([bed.marginal_log_prob(xd, a, s, y=c) + torch.log(prior[c])
                        for c in range(bed.num_classes)], dim=-1)  # (B, C)


def bed_log_class_posterior(bed: GaussianMixtureBed, x: torch.Tensor, a, s) -> torch.Tensor:
    """Exact ``log p(y | x_t) = log p_t(x, y) − log Σ_c p_t(x, c)`` for every class, ``(B, num_classes)`` float64.

    Computed in log space (no underflow far from a class, unlike ``log`` of
    :meth:`~difflab.testbeds.GaussianMixtureBed.class_posterior`).
    """
    log_joint = bed_log_joint(bed, x, a, s)
    return log_joint - torch.logsumexp(log_joint, dim=-1, keepdim=True)


class BedClassifier:
    """The exact noise-conditional classifier of a labelled bed on a path: ``(x_t, t) -> log p(y | x_t)`` ``(B, C)``."""

    def __init__(self, bed: GaussianMixtureBed, path: GaussianPath):
        if bed.labels is None:
            raise ValueError("BedClassifier needs a bed with class labels")
        self.bed, self.path = bed, path

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        t = _time(t, x.shape[0], x.device)
        return bed_log_class_posterior(self.bed, x, self.path.a(t), self.path.s(t))


def exact_cfg(bed: GaussianMixtureBed, path: GaussianPath, scale: float, **options) -> ClassifierFreeGuidance:
    """CFG with scale λ on the bed's exact conditional and unconditional denoisers (``options``: interval, rescale)."""
    return ClassifierFreeGuidance(NullLabelDenoiser(bed.denoiser(path)), scale, **options)


def exact_classifier_guidance(bed: GaussianMixtureBed, path: GaussianPath, scale: float) -> ClassifierGuidance:
    """Classifier guidance with weight ``w`` on the bed's exact unconditional denoiser and exact classifier."""
    return ClassifierGuidance(bed.denoiser(path), BedClassifier(bed, path), scale)


@dataclass
class WeightedSamples:
    """Self-normalised importance samples: ``x (N, …)``, normalised ``weights [N]`` and the effective sample size."""

    x: torch.Tensor
    weights: torch.Tensor
    ess: float

    def resample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` unweighted draws by multinomial resampling (with replacement) from the weighted set."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.x[idx]


def tilted_log_density(bed: GaussianMixtureBed, x: torch.Tensor, y: int, scale: float) -> torch.Tensor:
    """Unnormalised ``log p_λ(x | y) = log p(x) + λ log p(y | x)`` on clean data, ``[B]`` float64."""
    log_joint = bed_log_joint(bed, x, 1.0, 0.0)  # (B, C)
    log_p = torch.logsumexp(log_joint, dim=-1)
    return log_p + scale * (log_joint[:, y] - log_p)


def tilted_target_importance(bed: GaussianMixtureBed, y: int, scale: float, n: int,
                             generator: Optional[torch.Generator] = None) -> WeightedSamples:
    """Self-normalised importance sampling of the tilted target ``p_λ(x | y) ∝ p(x) p(y|x)^λ`` (SPEC §7).

    Since ``p(x) p(y|x)^λ = p(y) · p(x|y) · p(y|x)^{λ−1}``:

    - λ ≥ 1: proposal ``p(x | y)``, weights ``w_i ∝ p(y | x_i)^{λ−1}`` (bounded by 1, so the estimator
      is well behaved);
    - λ < 1: proposal ``p(x)``, weights ``w_i ∝ p(y | x_i)^λ`` (``p(x|y)`` would need unbounded weights,
      and at λ = 0 the target ``p(x)`` has mass outside class ``y``).

    The estimate of ``E_{p_λ}[f]`` is ``Σ_i w̄_i f(x_i)`` with ``w̄ = w / Σ w``; the effective sample
    size is ``ESS = 1 / Σ_i w̄_i²`` (Kish), ``n`` for uniform weights.
    """
    if bed.labels is None:
        raise ValueError("the tilted target needs a bed with class labels")
    x = bed.sample(n, generator=generator, y=y if scale >= 1 else None, dtype=torch.float64)
    log_p_y = bed_log_class_posterior(bed, x, 1.0, 0.0)[:, y]
    log_w = (scale - 1.0 if scale >= 1 else scale) * log_p_y
    weights = torch.softmax(log_w, dim=0)
    return WeightedSamples(x, weights, float(1.0 / (weights**2).sum()))


def tilted_target_langevin(bed: GaussianMixtureBed, y: int, scale: float, x: torch.Tensor, steps: int = 500,
                           step_size: float = 0.01, generator: Optional[torch.Generator] = None):
    """Metropolis-adjusted Langevin (MALA) on the tilted target's exact log-density, from initial states ``x``.

    Proposal ``x' = x + h ∇log p_λ(x) + √(2h) z``, accepted with probability
    ``min(1, p_λ(x') q(x | x') / (p_λ(x) q(x' | x)))``, ``log q(x' | x) = −||x' − x − h ∇log p_λ(x)||² / (4h)``;
    the score ``∇log p_λ = λ ∇log p(x|y) + (1 − λ) ∇log p(x)`` is taken by autograd. A cross-check of
    :func:`tilted_target_importance` (it mixes within a mode; start it from a draw near the target).
    Returns ``(x, acceptance_rate)``.
    """
    def log_density_and_grad(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            logp = tilted_log_density(bed, z, y, scale)
            (grad,) = torch.autograd.grad(logp.sum(), z)
        return logp.detach(), grad

    h = step_size
    x = x.double()
    logp, grad = log_density_and_grad(x)
    accepted = 0.0
    for _ in range(steps):
        mean_fwd = x + h * grad
        x_new = mean_fwd + (2 * h) ** 0.5 * randn(x.shape, generator, x.device, x.dtype)
        logp_new, grad_new = log_density_and_grad(x_new)
        log_q_fwd = -sum_except_batch((x_new - mean_fwd) ** 2) / (4 * h)
        log_q_bwd = -sum_except_batch((x - x_new - h * grad_new) ** 2) / (4 * h)
        log_alpha = logp_new - logp + log_q_bwd - log_q_fwd
        u = torch.rand(x.shape[0], generator=generator, dtype=torch.float64)
        accept = torch.log(u) < log_alpha
        mask = bcast(accept, x).bool()
        x, grad = torch.where(mask, x_new, x), torch.where(mask, grad_new, grad)
        logp = torch.where(accept, logp_new, logp)
        accepted += float(accept.double().mean())
    return x, accepted / steps


def class_mode(bed: GaussianMixtureBed, y: int, iters: int = 500) -> torch.Tensor:
    """The mode of ``p(x | y)`` (shape ``bed.shape``): gradient ascent on ``log p(x | y)`` from every component
    mean of class ``y``, keeping the highest. The step is the smallest covariance eigenvalue of the class's
    components, which makes the ascent a contraction near each Gaussian's mean."""
    if bed.labels is None:
        raise ValueError("class_mode needs a bed with class labels")
    members = bed.labels == y
    if not members.any():
        raise ValueError(f"no component of the bed has class {y}")
    step = float(bed.eigvals[members].min())
    x = bed.means[members].clone()  # (K_y, D)
    for _ in range(iters):
        x = x + step * bed.posterior_means(x, 1.0, 0.0, y=y)[2]
    best = bed.log_prob(x, y=y).argmax()
    return x[best].reshape(bed.shape)


def bayes_labels(bed: GaussianMixtureBed, x: torch.Tensor) -> torch.Tensor:
    """The exact Bayes classifier on clean data: ``argmax_y p(y | x)``, ``long [B]``."""
    return bed_log_class_posterior(bed, x, 1.0, 0.0).argmax(-1)
