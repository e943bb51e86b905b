"""Pi0.5's training objective and one optimizer step, as openpi's `compute_loss` plus pi05's text loss.

Axes: B batch, C cameras, L prompt tokens, A action horizon, E action dim.

Flow matching on the action chunk (openpi's convention: t = 1 is noise): t ~ Beta(1.5, 1) * 0.999 +
0.001, x_t = t * noise + (1 - t) * actions, target u = noise - actions, mean squared error of
`pi05.velocity_joint` (the joint pass over [prefix, action tokens]) against u. The action prompt is
the one the server builds in the action stage, so what the expert learns is what it is asked.

Next-token cross-entropy on the subtask text: the prompt up to `Subtask:` is the bidirectional prefix
(images and text), the subtask tokens and EOS follow causally, exactly as the server decodes them
(`policy.model.decoding`): the first token from the hidden state at the prefix's last token, each next one
from the token before it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from configs.model_config import ModelConfig
from policy.model import gemma, pi05
from policy.model.layers import make_attn_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """One training batch, prepared on the host.

    images: (B, C, S, S, 3) uint8; image_mask: (B, C) bool;
    action_tokens, action_mask: (B, L) the action-stage prompt (with its subtask), left-aligned;
    text_tokens, text_mask: (T, L) the subtask-stage prompt followed by the subtask tokens and EOS,
    for the first T <= B rows (the text is learnt faster than the actions, so fewer rows pay for it);
    text_ar: (T, L) True from the first subtask token on (causal), False on the prompt;
    text_loss: (T, L) float32, the weight of the next token's cross-entropy: > 0 where it is a subtask
    token or EOS (the positions scored), 0 elsewhere; the loss is the weighted mean;
    actions: (B, A, E) float32, normalized and padded to the model's action dim.
    """

    images: jax.Array
    image_mask: jax.Array
    action_tokens: jax.Array
    action_mask: jax.Array
    text_tokens: jax.Array
    text_mask: jax.Array
    text_ar: jax.Array
    text_loss: jax.Array
    actions: jax.Array


def sample_time(key: jax.Array, batch: int) -> jax.Array:
    """openpi's flow time: Beta(1.5, 1) (more weight near the noise end), kept off exactly 0."""
    return jax.random.beta(key, 1.5, 1.0, (batch,)) * 0.999 + 0.001


def flow_loss(params: dict, batch: Batch, key: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Mean over batch, horizon and action dims of |v(x_t, t) - (noise - actions)|^2."""
    noise_key, time_key = jax.random.split(key)
    actions = batch.actions
    noise = jax.random.normal(noise_key, actions.shape, jnp.float32)
    t = sample_time(time_key, actions.shape[0])
    x_t = t[:, None, None] * noise + (1.0 - t[:, None, None]) * actions
    obs = pi05.Observation(batch.images, batch.image_mask, batch.action_tokens, batch.action_mask)
    v = pi05.velocity_joint(params, obs, x_t, t, cfg)
    return jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - actions)))


def text_loss(params: dict, batch: Batch, cfg: ModelConfig) -> jax.Array:
    """Cross-entropy of each subtask token (and the final EOS) given everything before it, the
    weighted mean by `batch.text_loss`."""
    llm = params["PaliGemma"]["llm"]
    rows = batch.text_tokens.shape[0]
    obs = pi05.Observation(batch.images[:rows], batch.image_mask[:rows], batch.text_tokens, batch.text_mask)
    tokens, mask = pi05.embed_prefix(params, obs, cfg)
    n_img = tokens.shape[1] - batch.text_tokens.shape[1]
    ar = jnp.concatenate([jnp.zeros((mask.shape[0], n_img), bool), batch.text_ar], axis=1)
    positions = jnp.cumsum(mask, axis=1) - 1
    hidden, _ = gemma.forward(llm, tokens, positions, make_attn_mask(mask, ar), cfg.vlm, suffix="")
    logits = gemma.logits(llm, hidden[:, n_img:-1])
    targets = batch.text_tokens[:, 1:]
    weights = batch.text_loss[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def loss_fn(
    params: dict, batch: Batch, key: jax.Array, cfg: ModelConfig, text_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    flow = flow_loss(params, batch, key, cfg)
    text = text_loss(params, batch, cfg)
    return flow + text_weight * text, {"flow": flow, "text": text}


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """openpi's recipe (global-norm clipping, AdamW with b2 0.95, warmup then cosine decay to a tenth of
    the peak), with a learning rate for training from scratch rather than fine-tuning. Hashable: the
    step is compiled once per setting, not once per optimizer object."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float = 1e-4
    clip_norm: float = 1.0

    def build(self) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=self.peak_lr / max(self.warmup_steps, 1),
            peak_value=self.peak_lr,
            warmup_steps=self.warmup_steps,
            decay_steps=max(self.total_steps, self.warmup_steps + 1),
            end_value=self.peak_lr / 10,
        )
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=self.weight_decay),
        )


@functools.partial(jax.jit, static_argnames=("cfg", "opt", "text_weight"), donate_argnums=(0, 1))
def train_step(
    params: dict,
    opt_state: optax.OptState,
    batch: Batch,
    key: jax.Array,
    cfg: ModelConfig,
    opt: OptimizerSettings,
    text_weight: float = 1.0,
) -> tuple[dict, optax.OptState, dict[str, jax.Array]]:
    """One AdamW step on the sum of both losses; returns the new params and state and the losses."""
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key, cfg, text_weight)
    updates, opt_state = opt.build().update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}
