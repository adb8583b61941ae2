"""Offline text and tokenizers for examples and tests: nothing here touches the network.

`python_stdlib_text` reads the Python standard library's own source files (present on every machine with
Python), `train_bpe_tokenizer` trains a byte-level BPE tokenizer on them, and `causal_lm_blocks` cuts the token
stream into fixed-length training examples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_STDLIB_FILES = ("textwrap.py", "string.py", "this.py", "fractions.py", "statistics.py", "heapq.py", "bisect.py",
                 "difflib.py", "calendar.py", "shlex.py", "glob.py", "fnmatch.py", "colorsys.py", "random.py")


def python_stdlib_text(max_chars: int = 200_000) -> str:
    """Up to `max_chars` characters of Python standard-library source, in a fixed file order."""
    folder = Path(sys.modules["os"].__file__).parent
    parts, total = [], 0
    for name in _STDLIB_FILES:
        path = folder / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not parts:
        raise FileNotFoundError(f"no standard-library source files found in {folder}")
    return "\n".join(parts)[:max_chars]


def train_bpe_tokenizer(text: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `text`, with `<|endoftext|>` as eos, bos and pad (id 0).

    Padding is on the left, as batched generation with a causal LM needs."""
    special = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=special, bos_token=special,
                                   pad_token=special, padding_side="left")


def causal_lm_blocks(tokenizer: PreTrainedTokenizerFast, text: str, block_size: int) -> list[dict]:
    """The token stream of `text` cut into consecutive blocks of `block_size`, as Trainer examples with labels."""
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"text of {len(ids)} tokens is shorter than one block of {block_size}")
    blocks = ids[: n_blocks * block_size].view(n_blocks, block_size)
    return [{"input_ids": row, "labels": row.clone()} for row in blocks]
