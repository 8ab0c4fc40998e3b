"""An exact flow-matching "model" for Gaussian-mixture data: the ground truth of the toy tests.

Data ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)`` in ``D`` dimensions, path ``x_t = (1 - t) x0 + t eps``
(``t = 1`` is noise), velocity target ``eps - x0``. For this data the posterior mean and so the
optimal velocity are closed-form (docs/recipe.md, "toy oracles")::

    V_k(t)    = (1 - t)^2 s_k^2 + t^2
    w_k(x, t) ∝ pi_k N(x; (1 - t) mu_k, V_k(t) I)
    E[x0|x_t] = sum_k w_k [mu_k + (1 - t) s_k^2 / V_k(t) (x_t - (1 - t) mu_k)]
    v*(x_t,t) = (x_t - E[x0|x_t]) / t

A class-conditional mixture conditions on one component (the "prompt"); the unconditional
velocity is the whole mixture's, so classifier-free guidance ``v_u + w (v_c - v_u)`` is exact too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class GaussianMixture:
    """``weights [K]``, ``means [K, D]``, ``stds [K]`` (isotropic per component)."""

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    @classmethod
    def ring(cls, modes: int = 8, radius: float = 2.0, std: float = 0.15, weights=None) -> "GaussianMixture":
        angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        w = torch.full((modes,), 1.0 / modes, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
        return cls(w / w.sum(), means, torch.full((modes,), std, dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator, component: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, D]`` float64 draws; ``component [n]`` fixes each draw's mode (else drawn by weight)."""
        if component is None:
            component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[component] + self.stds[component, None] * eps

    def restricted(self, component: int) -> "GaussianMixture":
        """The mixture conditioned on one mode."""
        return GaussianMixture(self.weights.new_ones(1), self.means[component : component + 1], self.stds[component : component + 1])

    def posterior_mean(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``E[x0 | x_t]`` for ``x_t [B, D]``, ``t [B]`` in (0, 1]."""
        x_t, t = x_t.double(), t.double().reshape(-1, 1)
        one_minus = 1 - t
        variance = one_minus**2 * self.stds[None] ** 2 + t**2  # [B, K]
        centred = x_t[:, None, :] - one_minus[:, :, None] * self.means[None]  # [B, K, D]
        log_density = (
            self.weights.log()[None]
            - 0.5 * (centred**2).sum(-1) / variance
            - 0.5 * self.dim * variance.log()
        )
        responsibility = torch.softmax(log_density, dim=1)  # [B, K]
        per_mode = self.means[None] + (one_minus * self.stds[None] ** 2 / variance)[:, :, None] * centred
        return (responsibility[:, :, None] * per_mode).sum(1)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact flow-matching velocity ``v*(x_t, t)`` ``[B, D]`` (float64)."""
        t_col = t.double().reshape(-1, 1).clamp_min(1e-6)
        return (x_t.double() - self.posterior_mean(x_t, t)) / t_col


def conditional_velocity(mixture: GaussianMixture, x_t: torch.Tensor, t: torch.Tensor, component: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
    """The velocity of mode ``component [B]`` with CFG ``v_u + guidance (v_c - v_u)`` (guidance 1: none)."""
    conditional = torch.stack(
        [mixture.restricted(int(k)).velocity(x_t[i : i + 1], t[i : i + 1])[0] for i, k in enumerate(component.tolist())]
    )
    if guidance == 1.0:
        return conditional
    unconditional = mixture.velocity(x_t, t)
    return unconditional + guidance * (conditional - unconditional)


def euler_sample(velocity, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``t = 1`` to 0 with uniform Euler steps."""
    x = noise.double()
    times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * velocity(x, t.expand(x.shape[0]))
    return x


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The energy distance between two samples ``[n, D]`` and ``[m, D]`` (0 iff equal in law)."""
    a, b = a.double(), b.double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())
