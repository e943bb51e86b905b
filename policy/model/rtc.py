"""Real-time chunking (Black, Galliker & Levine 2025): the flow loop guided toward the previous chunk.

The robot keeps executing its old chunk while the new one is sampled, so the new chunk's first
steps must continue the old chunk's unexecuted actions. RTC treats that as inpainting: at each
Euler step the velocity is corrected so that the denoised estimate moves toward the leftover,
with full weight on the steps the robot executes before the new chunk arrives and a decaying
weight after them.

The paper's flow runs from noise at t = 0 to data at t = 1; here it runs in openpi's direction
(tau = 1 is noise, v approximates noise - action, x <- x + dt * v with dt < 0). Per step at tau:

    A_hat = x - tau * v(x, tau)                      the denoised estimate
    c     = J^T [W * (Y - A_hat)],  J = dA_hat / dx  (exact: a VJP through the action expert with
                                                    the prefix K/V constant; "identity": J = I)
    w     = min(beta, tau / (1 - tau) * ((1 - tau)^2 + tau^2) / tau^2)   (the paper's weight at
                                                    t = 1 - tau; infinite at tau = 1, so beta)
    x    <- x + dt * (v - w * c)

Y (the leftover in model space, padded to the horizon), W (per-step weights) and beta are data,
one row each, so rows with and without guidance share one compiled batch; a row with beta = 0 is
the unguided sampler, and a batch with no guided row runs exactly `pi05.denoise` (a `lax.cond`:
it pays for no VJP).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from configs.model_config import ModelConfig
from policy.model import pi05

# How the correction reaches x: the exact vector-Jacobian product, or the identity approximation
# (no backward pass; the paper's cheaper variant). An engine-level, compile-time choice.
Method = Literal["vjp", "identity"]
METHODS: tuple[str, ...] = ("vjp", "identity")


def prefix_weights(start: int, end: int, total: int, schedule: str) -> np.ndarray:
    """The paper's `get_prefix_weights`: (total,) float32, 1 below `start`, decaying by `schedule`
    to 0 at `end` and 0 from `end` on (`end` wins when it is below `start`).

    `start` is the inference delay d (steps the robot executes from the old chunk before the new
    one lands: they must match); the decay lets the new chunk drift smoothly away from the old.
    With start=2, end=6, total=10 and "linear": 1 1 .8 .6 .4 .2 0 0 0 0. "zeros" keeps only the
    first `start`, "ones" weights every step below `end`, "exp" bends the linear ramp by
    w * expm1(w) / (e - 1).
    """
    start = min(start, end)
    i = np.arange(total)
    if schedule == "ones":
        w = np.ones(total)
    elif schedule == "zeros":
        w = (i < start).astype(np.float64)
    elif schedule in ("linear", "exp"):
        w = np.clip((start - 1 - i) / (end - start + 1) + 1, 0.0, 1.0)
        if schedule == "exp":
            w = w * np.expm1(w) / (math.e - 1)
    else:
        raise ValueError(f"unknown prefix-weight schedule {schedule!r}")
    return np.where(i >= end, 0.0, w).astype(np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Guide:
    """Per-row guidance. target: (B, A, E) the leftover in model space, zero-padded; weights: (B, A)
    W; beta: (B,) the clip on the guidance weight, 0 for a row without guidance."""

    target: jax.Array
    weights: jax.Array
    beta: jax.Array


def guidance_weight(tau: jax.Array, beta: jax.Array) -> jax.Array:
    """The paper's guidance weight at t = 1 - tau, clipped to beta (per row): (B,)."""
    tau = jnp.asarray(tau, jnp.float32)
    unclipped = tau / (1 - tau) * ((1 - tau) ** 2 + tau**2) / tau**2  # inf at tau = 1
    return jnp.minimum(beta, unclipped)


def denoise(
    params: dict,
    prefix: pi05.Prefix,
    noise: jax.Array,
    num_steps: int | jax.Array,
    cfg: ModelConfig,
    guide: Guide,
    method: Method,
) -> jax.Array:
    """`pi05.denoise` with each step's velocity guided toward `guide.target`; (B, A, E) float32."""
    if method not in METHODS:
        raise ValueError(f"rtc method must be one of {METHODS}, got {method!r}")
    dt = jnp.float32(-1.0) / jnp.asarray(num_steps, jnp.float32)
    weights = guide.weights.astype(jnp.float32)[..., None]
    target = guide.target.astype(jnp.float32)

    def step(carry):
        x_t, t = carry

        def denoised(x):
            v = pi05.velocity(params, prefix, x, t, cfg).astype(jnp.float32)
            return x - t * v, v

        if method == "vjp":
            a_hat, pullback, v = jax.vjp(denoised, x_t, has_aux=True)
            (correction,) = pullback(weights * (target - a_hat))
        else:
            a_hat, v = denoised(x_t)
            correction = weights * (target - a_hat)
        w = guidance_weight(t, guide.beta)[:, None, None]
        return x_t + dt * (v - w * correction), t + dt

    def guided(x):
        x_0, _ = jax.lax.while_loop(lambda c: c[1] >= -dt / 2, step, (x, jnp.float32(1.0)))
        return x_0

    def plain(x):
        return pi05.denoise(params, prefix, x, num_steps, cfg)

    return jax.lax.cond(jnp.any(guide.beta > 0), guided, plain, noise.astype(jnp.float32))
