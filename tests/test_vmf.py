"""The von Mises-Fisher sampler and density of train/models/vmf.py against closed forms (mpmath Bessel
ratios, the 3-d normaliser), and Wood's acceptance rate that the fixed-proposal design relies on."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from train.models import vmf

# (kappa, d): the methods' defaults (C-SimCLR 1024 / 10, C-BYOL 16384 / 10 at 128-256 dims) and small cases
CASES = [(1024.0, 128), (10.0, 128), (16384.0, 256), (10.0, 256), (1.0, 3), (50.0, 3), (0.5, 16)]


def mean_resultant(kappa: float, d: int) -> float:
    """E[mu.z] = A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa)."""
    return float(mpmath.besseli(d / 2, kappa) / mpmath.besseli(d / 2 - 1, kappa))


def var_w(kappa: float, d: int) -> float:
    """Var[mu.z] = 1 - A^2 - (d-1) A / kappa (the derivative of A)."""
    a = mean_resultant(kappa, d)
    return 1 - a * a - (d - 1) * a / kappa


@pytest.mark.parametrize("kappa, d", CASES)
def test_w_has_the_vmf_mean_and_variance(kappa, d):
    n = 40000
    w, ok = vmf.sample_w(kappa, d, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert ok.all()
    se = math.sqrt(var_w(kappa, d) / n)
    assert abs(w.mean().item() - mean_resultant(kappa, d)) <= 5 * se + 1e-12
    assert w.var().item() == pytest.approx(var_w(kappa, d), rel=0.05)
    assert (w <= 1).all() and (w >= -1).all()


@pytest.mark.parametrize("kappa, d", CASES)
def test_single_proposal_acceptance_is_above_one_half(kappa, d):
    """The sampler keeps the first accepted of 64 proposals; with a per-proposal rate >= 0.5 a row
    without one has probability < 2^-64."""
    _, ok = vmf.sample_w(kappa, d, 20000, generator=torch.Generator().manual_seed(1), proposals=1)
    assert ok.double().mean().item() >= 0.5


@pytest.mark.parametrize("kappa, d", [(30.0, 3), (200.0, 16), (1024.0, 64)])
def test_samples_are_unit_around_mu_and_uniform_around_it(kappa, d):
    g = torch.Generator().manual_seed(5)
    mu = torch.nn.functional.normalize(torch.randn(1, d, dtype=torch.float64, generator=g), dim=1)
    n = 20000
    z = vmf.sample(mu.expand(n, d), kappa, generator=g)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    a = mean_resultant(kappa, d)
    # E[z] = A mu: the component orthogonal to mu averages to zero (a uniform direction)
    mean = z.mean(0)
    se = math.sqrt((1 - a * a) / n)
    assert abs((mean * mu[0]).sum().item() - a) <= 6 * math.sqrt(var_w(kappa, d) / n)
    assert (mean - a * mu[0]).norm().item() <= 6 * se * math.sqrt(1.0) + 1e-3


def test_gradient_reaches_the_mean_direction():
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(8, 32, dtype=torch.float64, generator=g, requires_grad=True)
    mu = torch.nn.functional.normalize(raw, dim=1)
    target = torch.randn(8, 32, dtype=torch.float64, generator=g)
    z = vmf.sample(mu, 500.0, generator=g)
    (z * target).sum().backward()
    assert torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0
    # mu exactly e1: the reflection is the identity
    e1 = torch.zeros(4, 8, dtype=torch.float64)
    e1[:, 0] = 1
    z = vmf.sample(e1, 1e4, generator=g)
    assert (z[:, 0] > 0.99).all()


@pytest.mark.parametrize("kappa", [0.5, 3.0, 40.0, 600.0])
def test_log_norm_matches_the_three_dimensional_closed_form(kappa):
    """C_3(kappa) = kappa / (4 pi sinh kappa)."""
    want = math.log(kappa) - math.log(4 * math.pi) - float(mpmath.log(mpmath.sinh(kappa)))
    assert vmf.log_norm(kappa, 3) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_log_prob_integrates_to_one_on_the_circle():
    """d = 2: integrate exp(log_prob) over the unit circle numerically."""
    t = torch.linspace(0, 2 * math.pi, 200001, dtype=torch.float64)[:-1]
    z = torch.stack([torch.cos(t), torch.sin(t)], 1)
    mu = torch.tensor([[0.6, 0.8]], dtype=torch.float64).expand_as(z)
    dens = vmf.log_prob(z, mu, 7.0).exp()
    assert (dens.sum() * (2 * math.pi / len(t))).item() == pytest.approx(1.0, rel=1e-9)


def test_bad_arguments_fail():
    with pytest.raises(ValueError, match="d >= 2"):
        vmf.sample_w(10.0, 1, 4)
    with pytest.raises(ValueError, match="> 0"):
        vmf.sample_w(0.0, 8, 4)
