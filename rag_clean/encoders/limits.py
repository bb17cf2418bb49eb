"""How many tokens a model takes per input: its position limit and the registry's max_length (no torch here,
so the chunker can read it without loading torch)."""

from __future__ import annotations

from rag_clean.config.registry import ModelSpec

ROBERTA_FAMILY = ("roberta", "xlm-roberta", "camembert")


def position_offset(config) -> int:
    """First position id of a row: RoBERTa-family models count positions after the padding index."""
    if getattr(config, "model_type", "") in ROBERTA_FAMILY:
        return (getattr(config, "pad_token_id", None) or 0) + 1
    return 0


def usable_positions(config) -> int | None:
    positions = getattr(config, "max_position_embeddings", None)
    return None if not positions else int(positions) - position_offset(config)


def effective_max_length(spec: ModelSpec, config, module_limit: int | None = None) -> int:
    """Tokens per row: the registry's max_length, clamped to the module's and the model's limits."""
    limits = [spec.max_length, module_limit, usable_positions(config)]
    return max(1, min(int(x) for x in limits if x))
