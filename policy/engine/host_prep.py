"""Host-side preparation of a request, once, on the engine's worker pool (never the device thread).

Each camera is resized once and each prompt tokenized once; the result is a typed `Row` that the
device thread only stacks and sends. The one exception is the action prompt of a two-stage
request: it carries the decoded subtask, so it is tokenized when the subtask is known. Real-time
chunking's leftover is normalized and its prefix weights computed here too, so the device only
sees fixed-shape columns.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from configs.model_config import ModelConfig
from policy.engine.images import Resizer
from policy.engine.scheduler import Row, Ticket
from policy.model import rtc
from policy.normalize import Normalizer
from policy.prompts import Prompts
from policy.request import ChunkGuidance
from policy.tokenizer import Tokenizer


class HostPrep:
    """Images to the model's resolution, prompts to tokens, state normalized: `Row`s."""

    def __init__(
        self,
        cfg: ModelConfig,
        prompts: Prompts,
        normalizer: Normalizer,
        resizer: Resizer,
        camera_aliases: Mapping[str, str] | None = None,
    ):
        self.cfg = cfg
        self.prompts = prompts
        self.normalizer = normalizer
        self.resizer = resizer
        self.camera_aliases = dict(camera_aliases or {})

    @property
    def tokenizer(self) -> Tokenizer:
        return self.prompts.tokenizer

    def images(self, images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each camera at the model's input resolution (an image already there passes unchanged),
        under the model's own name for it (a camera named by an alias goes to its model key)."""
        return {self.camera_aliases.get(name, name): self.resizer(image, name) for name, image in images.items()}

    def prepare(self, ticket: Ticket) -> None:
        """Fills the ticket's state and its first phase's `Row` (raises `ValueError` on bad input)."""
        request = ticket.request
        options = request.options
        state = request.observation.state
        if state is not None:
            ticket.state = np.asarray(state, np.float32)
            ticket.normalized_state = self.normalizer.normalize_state(ticket.state)
        if ticket.decodes:
            text = self.prompts.subtask_text(request.prompt, ticket.normalized_state)
        else:
            if options.low_level_prompt is not None:
                ticket.subtask = options.low_level_prompt
                ticket.subtask_tokens = tuple(self.tokenizer.encode(options.low_level_prompt))
            text = self.prompts.action_text(request.prompt, ticket.normalized_state, ticket.subtask)
        images, mask = self._cameras(self.images(request.observation.images))
        tokens, token_mask = self.prompts.tokenize(text)
        guide, weights, beta = self.guide(request.guidance)
        ticket.row = Row(
            images=images,
            image_mask=mask,
            tokens=tokens,
            token_mask=token_mask,
            seed=np.uint32(ticket.seed),
            limit=np.int32(options.max_decoding_steps),
            temperature=np.float32(options.temperature),
            guide=guide,
            guide_weights=weights,
            guide_beta=beta,
        )

    def guide(self, guidance: ChunkGuidance | None) -> tuple[np.ndarray, np.ndarray, np.float32]:
        """RTC's columns of a row: the leftover in model space padded to (A, E), its prefix weights
        (A,) and beta; zeros without guidance.

        The weights are 1 for the first d steps, decay by the schedule to 0 at
        end = min(A - s, n) (the robot will not execute past A - s of the new chunk before the next
        one, and there is nothing to continue past the n leftover steps) and are 0 from there on.
        Guidance whose weights are all zero (d = 0 with "zeros", or beta = 0) gets beta 0: the row
        samples exactly as an unguided one."""
        horizon, dim = self.cfg.action_horizon, self.cfg.action_dim
        guide = np.zeros((horizon, dim), np.float32)
        weights = np.zeros(horizon, np.float32)
        if guidance is None:
            return guide, weights, np.float32(0)
        leftover = np.asarray(guidance.prev_actions, np.float64)
        n = leftover.shape[0]
        guide[:n] = self.normalizer.normalize_actions(leftover, dim)
        end = min(horizon - guidance.execute_horizon, n)
        weights = rtc.prefix_weights(guidance.inference_delay, end, horizon, guidance.schedule)
        beta = np.float32(guidance.max_guidance_weight if weights.any() else 0.0)
        return guide, weights, beta

    def action_tokens(self, ticket: Ticket) -> tuple[np.ndarray, np.ndarray]:
        """The action prompt of a two-stage request, with its decoded subtask."""
        text = self.prompts.action_text(ticket.request.prompt, ticket.normalized_state, ticket.subtask)
        return self.prompts.tokenize(text)

    def _cameras(self, images: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(C, S, S, 3) uint8 in config order and the (C,) mask, from `images`' output; a missing
        camera is black and masked."""
        size = self.cfg.siglip.image_size
        keys = self.cfg.image_keys
        out = np.zeros((len(keys), size, size, 3), np.uint8)
        mask = np.zeros(len(keys), bool)
        for i, key in enumerate(keys):
            if key in images:
                out[i] = images[key]
                mask[i] = True
        return out, mask
