"""The noise-conditional classifier p_φ(y | x_t, t) of classifier guidance (SPEC §7)."""

import pytest
import torch

from difflab import DiscretePath, NetworkDenoiser, mixture_bed_2d, sample_ddim
from difflab.guidance import ClassifierGuidance, bed_log_class_posterior, classifier_loss
from difflab.networks.classifier import NoisyClassifier
from difflab.utils import bcast


@pytest.mark.parametrize("data_shape", [(2,), (16,), (3, 16, 16), (1, 8, 8)])
def test_shapes_for_points_and_images(data_shape):
    B, C = 5, 7
    net = NoisyClassifier(data_shape, C, width=32, depth=2, time_dim=16)
    x = torch.randn(B, *data_shape, dtype=torch.float64)  # sampler state may be float64; the net casts
    assert net(x, torch.arange(B) * 100).shape == (B, C)
    assert net(x, 250).shape == (B, C)  # one time for the whole batch
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x, torch.full((B,), 3)).logsumexp(-1).sum(), x)
    assert grad.shape == x.shape and grad.dtype == torch.float64


def test_samples_are_classified_independently():
    """Guidance takes the gradient of a batch sum, so row i's logits must not depend on row j."""
    net = NoisyClassifier((1, 8, 8), 3, width=16, depth=2, time_dim=16)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 100, 500])
    torch.testing.assert_close(net(x, t)[:2], net(x[:2], t[:2]))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="data_shape"):
        NoisyClassifier((4, 4), 3)
    with pytest.raises(ValueError, match="expected inputs"):
        NoisyClassifier((2,), 3)(torch.zeros(4, 3), 1)
    with pytest.raises(ValueError, match="num_classes"):
        NoisyClassifier((2,), 1)


def test_classifier_guidance_with_a_network_on_images():
    """Under the samplers' no_grad, classifier guidance still differentiates the classifier; the guided pair is
    consistent (x = a x̂0 + s ε̂) and ε̂ − ε = −w s ∇log p_φ(y | x_t)."""
    path = DiscretePath.from_schedule("linear", T=100)
    base = NetworkDenoiser(lambda x, t: torch.zeros_like(x), path, target="eps")
    clf = NoisyClassifier((1, 8, 8), 3, width=16, depth=2, time_dim=16)
    guided = ClassifierGuidance(base, clf, scale=2.0)
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 50), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        pred = guided(x, t, y=y)
        out = sample_ddim(guided, torch.randn(4, 1, 8, 8), steps=5, y=y)
    assert out.x.shape == (4, 1, 8, 8) and torch.isfinite(out.x).all() and out.nfe == 5
    x_in = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.log_softmax(clf(x_in, t), -1)[torch.arange(4), y].sum(), x_in)
    a, s = bcast(path.a(t), x), bcast(path.s(t), x)
    torch.testing.assert_close(pred.eps, -2.0 * s * grad)
    torch.testing.assert_close(a * pred.x0 + s * pred.eps, x, rtol=1e-5, atol=1e-5)


def test_point_classifier_learns_the_bayes_classifier_on_noisy_mixture_data():
    """Trained on fresh noisy draws of a labelled 2-D mixture with overlapping classes, the classifier's accuracy on
    fixed noisy test points approaches the exact Bayes classifier's (argmax p(y | x_t), the best possible) on
    the same points. Margin 0.03: both are scored on the same 4000 points, so the gap measures the learned
    decision boundary, not sampling noise (measured gap ≤ 0.01 after this short training)."""
    torch.manual_seed(0)
    bed = mixture_bed_2d(4, std=1.0)  # Bayes accuracy ≈ 0.84 on clean data: the boundary is not trivial
    path = DiscretePath.from_schedule("linear", T=1000)
    g = torch.Generator().manual_seed(0)
    net = NoisyClassifier((2,), 4, width=64, depth=2, time_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(400):  # 400 Adam steps of 256 fresh draws: measured gap ≤ 0.006 at t = 10, 100, 300
        x0, y = bed.sample(256, g, return_labels=True)
        loss = classifier_loss(net, path, x0, y, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for t_eval in [10, 100, 300]:
        x0, y = bed.sample(4000, g, return_labels=True)
        t = torch.full((4000,), t_eval)
        x_t, _ = path.sample(x0, t, generator=g)
        with torch.no_grad():
            learned = (net(x_t, t).argmax(-1) == y).float().mean().item()
        bayes = (bed_log_class_posterior(bed, x_t, path.a(t), path.s(t)).argmax(-1) == y).float().mean().item()
        assert learned > bayes - 0.03, (t_eval, learned, bayes)
