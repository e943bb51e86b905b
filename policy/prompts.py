"""Prompt text and token layouts of the two stages, in openpi's pi05 format.

The action stage is openpi's `Task: {task}, State: {256-bin state};\\nAction: ` (BOS, no EOS, padded
with id 0 to max_token_len). The subtask stage ends its prefix in `Subtask:` and the action stage
then carries the generated subtask. All layouts come from the config's `PromptFormat`.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from configs.model_config import ModelConfig
from policy.tokenizer import Tokenizer


def clean_text(text: str) -> str:
    """openpi's cleaning: strip, underscores and newlines to spaces, no lowercasing."""
    return text.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """256 bins over [-1, 1] exactly as openpi (`np.digitize` on 257 edges, minus one).

    A value below -1 gives -1, as in openpi; values at or above 1 give 255.
    """
    return np.digitize(np.asarray(state, np.float64), bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


def state_text(state: np.ndarray) -> str:
    return " ".join(str(int(v)) for v in discretize_state(state))


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Builds and tokenizes the prompts of one model configuration.

    `tokenize` remembers its recent texts: the engine's validation tokenizes a prompt to check its
    token budget and the host preparation then gets the same arrays without tokenizing again."""

    cfg: ModelConfig
    tokenizer: Tokenizer
    _cache: dict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_cache", functools.lru_cache(maxsize=512)(self._tokenize))

    def _fill(self, with_state: str, without_state: str, task: str, state, subtask: str | None = None) -> str:
        task = clean_text(task)
        if not task:
            raise ValueError("the prompt is empty: high_level_prompt must contain text")
        use_state = state is not None and self.cfg.discrete_state_input
        template = with_state if use_state else without_state
        return template.format(
            task=task, state=state_text(state) if use_state else "", subtask=clean_text(subtask or "")
        )

    def action_text(self, task: str, state: np.ndarray | None, subtask: str | None = None) -> str:
        f = self.cfg.prompt_format
        if subtask is None:
            return self._fill(f.action, f.action_no_state, task, state)
        return self._fill(f.action_with_subtask, f.action_with_subtask_no_state, task, state, subtask)

    def subtask_text(self, task: str, state: np.ndarray | None) -> str:
        f = self.cfg.prompt_format
        return self._fill(f.subtask, f.subtask_no_state, task, state)

    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), each (max_token_len,), read-only: BOS + text, no EOS, right-padded with 0."""
        return self._cache(text)

    def _tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer.encode(text, add_bos=True)
        limit = self.cfg.max_token_len
        if len(ids) > limit:
            raise ValueError(
                f"the prompt is {len(ids)} tokens, more than max_token_len {limit} of config {self.cfg.name!r}: "
                f"shorten the task text or the state ({text[:80]!r}...)"
            )
        tokens = np.zeros(limit, np.int32)
        tokens[: len(ids)] = ids
        mask = np.arange(limit) < len(ids)
        tokens.flags.writeable = mask.flags.writeable = False
        return tokens, mask
