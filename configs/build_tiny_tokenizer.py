"""Builds `configs/assets/tiny_tokenizer.model`, the SentencePiece model of the tiny configurations.

The real PaliGemma tokenizer (257,152 pieces) cannot ship with the repo, so the tiny models get a
1,024-piece BPE model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and byte fallback, so
any text encodes. It is trained on a generated corpus of robot-task language and the prompt
layouts, with one thread and no sampling, so the same command writes the same bytes:

    python -m configs.build_tiny_tokenizer
"""

from __future__ import annotations

import argparse
import io
import itertools
from pathlib import Path

import sentencepiece as spm

OUTPUT = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer.model"
VOCAB_SIZE = 1024

_VERBS = [
    "pick up",
    "put down",
    "place",
    "move",
    "push",
    "pull",
    "open",
    "close",
    "grasp",
    "release",
    "lift",
    "rotate",
    "fold",
    "unfold",
    "wipe",
    "pour",
    "stack",
    "insert",
    "hand over",
    "go to",
    "reach for",
    "turn",
]
_OBJECTS = [
    "pen",
    "cup",
    "block",
    "towel",
    "drawer",
    "door",
    "bowl",
    "plate",
    "bottle",
    "lid",
    "box",
    "shirt",
    "flashcard",
    "spoon",
    "sponge",
    "marker",
    "cube",
    "can",
    "book",
    "phone",
    "cloth",
    "basket",
]
_COLORS = ["black", "red", "blue", "green", "yellow", "white", "small", "large", "left", "right"]
_PLACES = ["table", "shelf", "sink", "bin", "tray", "counter", "floor", "box", "drawer", "rack"]


def corpus() -> str:
    lines = []
    for verb, obj, color, place in itertools.product(_VERBS, _OBJECTS, _COLORS[:4], _PLACES[:4]):
        task = f"{verb} the {color} {obj}"
        lines.append(f"Task: {task.capitalize()}, State: {' '.join(str((i * 37) % 256) for i in range(8))};")
        lines.append(f"Subtask: move to {place} and then {verb} {color} {obj};")
        lines.append(f"Action: {task} on the {place}")
    lines += [" ".join(str(n) for n in range(start, start + 16)) for start in range(0, 256, 16)]
    return "\n".join(lines)


def build(output: Path = OUTPUT) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus().splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        split_digits=False,
        # Like Gemma's tokenizer: text is kept as written and the newline of the prompt layout is a piece.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        minloglevel=2,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(model.getvalue())
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT)
    print(build(parser.parse_args().out))
