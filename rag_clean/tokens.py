"""Token counting with a model's own tokenizer, for chunk budgets that match what the encoder sees."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable


@lru_cache(maxsize=8)
def tokenizer_length_fn(model_dir: str) -> Callable[[str], int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    return count
