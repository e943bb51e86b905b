"""Host-side preparation of a request, once, on the engine's worker pool (never the device thread).

Each camera is resized once and each prompt tokenized once; the result is a typed `Row` that the
device thread only stacks and sends. The one exception is the action prompt of a two-stage
request: it carries the decoded subtask, so it is tokenized when the subtask is known.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from configs.model_config import ModelConfig
from policy.images import Resizer
from policy.normalize import Normalizer
from policy.prompts import Prompts
from policy.scheduler import Row, Ticket
from policy.tokenizer import Tokenizer


class HostPrep:
    """Images to the model's resolution, prompts to tokens, state normalized: `Row`s."""

    def __init__(self, cfg: ModelConfig, prompts: Prompts, normalizer: Normalizer, resizer: Resizer):
        self.cfg = cfg
        self.prompts = prompts
        self.normalizer = normalizer
        self.resizer = resizer

    @property
    def tokenizer(self) -> Tokenizer:
        return self.prompts.tokenizer

    def images(self, images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each camera at the model's input resolution (an image already there passes unchanged)."""
        return {name: self.resizer(image) for name, image in images.items()}

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
        ticket.row = Row(
            images=images,
            image_mask=mask,
            tokens=tokens,
            token_mask=token_mask,
            seed=np.uint32(ticket.seed),
            limit=np.int32(options.max_decoding_steps),
            temperature=np.float32(options.temperature),
        )

    def action_tokens(self, ticket: Ticket) -> tuple[np.ndarray, np.ndarray]:
        """The action prompt of a two-stage request, with its decoded subtask."""
        text = self.prompts.action_text(ticket.request.prompt, ticket.normalized_state, ticket.subtask)
        return self.prompts.tokenize(text)

    def _cameras(self, images: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(C, S, S, 3) uint8 in config order and the (C,) mask; a missing camera is black and masked."""
        size = self.cfg.siglip.image_size
        keys = self.cfg.image_keys
        out = np.zeros((len(keys), size, size, 3), np.uint8)
        mask = np.zeros(len(keys), bool)
        for i, key in enumerate(keys):
            if key in images:
                out[i] = images[key]
                mask[i] = True
        return out, mask
