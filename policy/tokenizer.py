"""The SentencePiece tokenizer of a model configuration.

The full models use PaliGemma's tokenizer, which no package ships: its path (or URL) is a setting,
and the serving engine fetches it from its public bucket into the download cache when none is
given. The tiny configurations use a small model shipped in `configs/assets/`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sentencepiece as spm

from configs import SHIPPED_TOKENIZERS
from configs.model_config import ModelConfig
from policy import download

PALIGEMMA_TOKENIZER_URL = "gs://big_vision/paligemma_tokenizer.model"
EOS_ID = 1


class Tokenizer:
    """Text <-> ids with Gemma's special ids (pad 0, eos 1, bos 2)."""

    def __init__(self, path: Path, vocab_size: int):
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        if self._sp.vocab_size() > vocab_size:
            raise ValueError(
                f"tokenizer {path} has {self._sp.vocab_size()} pieces, more than the model's vocabulary of {vocab_size}"
            )
        if (self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id()) != (0, EOS_ID, 2):
            raise ValueError(f"tokenizer {path} does not use Gemma's special ids pad 0, eos 1, bos 2")

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """Text of ids up to the first EOS (excluded)."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._sp.decode(ids)


def tokenizer_location(cfg: ModelConfig, path: str | Path | None = None, *, fetch: bool = False) -> str | Path:
    """Where `cfg`'s tokenizer is: the given file or URL, or the shipped one for configs that have
    one. Without a path, a config whose tokenizer is not shipped fails with where to get it, or with
    `fetch` names PaliGemma's public bucket. Nothing is read: a caller checks local paths first."""
    if path is not None:
        return path
    if cfg.tokenizer in SHIPPED_TOKENIZERS:
        return SHIPPED_TOKENIZERS[cfg.tokenizer]
    if fetch:
        return PALIGEMMA_TOKENIZER_URL
    raise FileNotFoundError(
        f"model config {cfg.name!r} needs the PaliGemma tokenizer, which is not shipped: download "
        f"{PALIGEMMA_TOKENIZER_URL} (https://storage.googleapis.com/big_vision/paligemma_tokenizer.model; "
        "openpi caches it at ~/.cache/openpi/big_vision/paligemma_tokenizer.model) and pass its path or "
        "URL (tokenizer_path=..., or --tokenizer on the command line), or load it with fetch=True"
    )


def load_tokenizer(cfg: ModelConfig, path: str | Path | None = None, *, fetch: bool = False) -> Tokenizer:
    """The tokenizer for `cfg` (`tokenizer_location`), fetched into the download cache if it is a
    URL (the network only the first time)."""
    path = download.maybe_download(tokenizer_location(cfg, path, fetch=fetch), pass_as="--tokenizer")
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path}. For the full models download {PALIGEMMA_TOKENIZER_URL} "
            "(https://storage.googleapis.com/big_vision/paligemma_tokenizer.model)"
        )
    return Tokenizer(path, cfg.vocab_size)
