"""The von Mises-Fisher distribution on the unit sphere S^(d-1): density C_d(kappa) exp(kappa mu.z).

C-SimCLR and C-BYOL (compressive representations, Lee et al. 2021) use vMF encoders: a sample
z ~ vMF(mu, kappa) must carry gradients to the mean direction mu (the network's output), as the
reference's TensorFlow Probability sampler does. Wood (1994): the component w = mu.z has a density that
depends on (kappa, d) only and is drawn by rejection with a Beta proposal; a uniform direction v
orthogonal to e1 completes x = (w, sqrt(1 - w^2) v) around e1, and the Householder reflection that takes
e1 to mu moves it to mu. Only the reflection depends on mu, so gradients reach mu through it.

No host sync: instead of looping until every row accepts (a device-to-host read per round), each row
draws PROPOSALS candidates at once and keeps its first accepted one. Wood's acceptance rate is above 0.5
for every (kappa, d) used here (tests/test_vmf.py measures it), so a row with no acceptance among 64 has
probability < 2^-64; such a row keeps its last candidate.
"""

from __future__ import annotations

import functools
import math

import torch

PROPOSALS = 64


def _wood_constants(kappa: float, d: int) -> tuple[float, float, float]:
    """(b, x0, c) of Wood's sampler, in the cancellation-free form of b."""
    m = d - 1.0
    b = m / (2.0 * kappa + math.sqrt(4.0 * kappa * kappa + m * m))
    x0 = (1.0 - b) / (1.0 + b)
    c = kappa * x0 + m * math.log(1.0 - x0 * x0)
    return b, x0, c


def sample_w(kappa: float, d: int, n: int, *, device=None, dtype=torch.float32,
             generator: torch.Generator | None = None, proposals: int = PROPOSALS) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, accepted): n draws of w = mu.z for z ~ vMF(mu, kappa) on S^(d-1) (float64 inside), and
    whether the row accepted one of its `proposals` candidates."""
    if d < 2:
        raise ValueError(f"vMF needs d >= 2, got {d}")
    if not kappa > 0:
        raise ValueError(f"vMF concentration must be > 0, got {kappa}")
    b, x0, c = _wood_constants(float(kappa), d)
    m = (d - 1.0) / 2.0
    # Beta(m, m) from two Gammas, so the draw takes a generator (torch.distributions.Beta does not).
    shape = (n, proposals)
    ga = torch._standard_gamma(torch.full(shape, m, dtype=torch.float64, device=device), generator=generator)
    gb = torch._standard_gamma(torch.full(shape, m, dtype=torch.float64, device=device), generator=generator)
    z = ga / (ga + gb)
    w = (1.0 - (1.0 + b) * z) / (1.0 - (1.0 - b) * z)
    u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
    ok = kappa * w + (d - 1.0) * torch.log1p(-x0 * w) - c >= torch.log(u)
    first = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full((n,), proposals - 1, device=device))
    return w.gather(1, first[:, None])[:, 0].to(dtype), ok.any(1)


def sample(mu: torch.Tensor, kappa: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ vMF(mu_i, kappa) for each row of mu (N, d), unit rows; differentiable w.r.t. mu."""
    n, d = mu.shape
    w, _ = sample_w(kappa, d, n, device=mu.device, dtype=mu.dtype, generator=generator)
    v = torch.randn(n, d, device=mu.device, dtype=mu.dtype, generator=generator)
    v[:, 0] = 0
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    x = torch.cat([w[:, None], (1 - w * w).clamp_min(0).sqrt()[:, None] * v[:, 1:]], 1)
    # Householder H = I - 2 u u^T with u = (e1 - mu) / |e1 - mu| maps e1 to mu (mu unit).
    e1 = torch.zeros_like(mu)
    e1[:, 0] = 1
    u = e1 - mu
    un = u.norm(dim=1, keepdim=True)
    u = torch.where(un > 1e-12, u / un.clamp_min(1e-12), torch.zeros_like(u))  # mu == e1: H = I
    return x - 2 * (x * u).sum(1, keepdim=True) * u


@functools.lru_cache(maxsize=64)
def log_norm(kappa: float, d: int) -> float:
    """log C_d(kappa) = (d/2 - 1) log kappa - (d/2) log 2 pi - log I_{d/2-1}(kappa) (mpmath: the Bessel
    function overflows float64 at the kappas the method uses, e.g. 16384)."""
    import mpmath
    v = d / 2.0 - 1.0
    return float((v * mpmath.log(kappa) - (d / 2.0) * mpmath.log(2 * mpmath.pi)
                  - mpmath.log(mpmath.besseli(v, kappa))))


def log_prob(z: torch.Tensor, mu: torch.Tensor, kappa: float) -> torch.Tensor:
    """log vMF(z | mu, kappa) per row of z, mu (N, d)."""
    return kappa * (z * mu).sum(-1) + log_norm(float(kappa), int(z.shape[-1]))
