"""The token counter Markdown / text chunks are packed by: the real tokenizer of the strictest model.

An estimate let 40 of 747 and 1,366 of 14,639 packed chunks of two collections run past the default models'
256 tokens: their tails were never embedded. So the chunker counts with the tokenizer of the registry's dense
or sparse model (the models that encode chunks; the reranker encodes query + passage pairs) whose max length
is the smallest, special tokens included, and the budget is at most that max length. A chunk then exceeds
it only where one word-free run of characters does (the packer splits down to characters).

All registry models count, enabled or not: a toggle (sparse off, a smaller ensemble) must not move chunk ids.
The tokenizer's identity (`PackingTokenizer.identity`) is part of the chunks asset's code version and of the
chunks manifest key, so a registry change that changes the strictest tokenizer re-chunks every document, and
one that does not (another model's max length, pooling, weight) leaves chunks in sync. Reading it opens each
model folder's tokenizer and config files only, never the weights. Folders come from the resolved models
(rag_clean.config.models), fallbacks included.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from rag_clean.chunking.tokens import TokenCounter
from rag_clean.config.models import ModelResolver, ResolvedModel
from rag_clean.config.registry import ModelSpec, Registry


@dataclass(frozen=True)
class PackingTokenizer:
    model: str          # the registry model whose tokenizer and max length these are
    max_length: int     # tokens per input the model encodes, special tokens included
    fingerprint: str    # encoders.token_cache.tokenizer_fingerprint of the tokenizer
    rust: Any = field(compare=False, repr=False)
    lowercase: bool = False

    @property
    def identity(self) -> str:
        """What decides chunk boundaries (the model name does not: two models with one tokenizer agree)."""
        return f"tokenizer:{self.fingerprint[:16]}@{self.max_length}"

    def counter(self) -> "TokenCounter":
        return TokenCounter(self.rust, self.lowercase, self.identity)


def _json(folder: Path, name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_packing_tokenizer(spec: ModelSpec, folder: str | Path) -> PackingTokenizer:
    """The tokenizer and effective max length of one registry model, from its local folder (no weights
    loaded): the same tokenizer and the same max-length rule as its encoder (encoders.device)."""
    from tokenizers import Tokenizer as RustTokenizer

    from rag_clean.encoders.limits import effective_max_length
    from rag_clean.encoders.tokenize import tokenizer_fingerprint

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():  # what the encoder's fast tokenizer is built from; no transformers import
        rust = RustTokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder))
        core = getattr(hf, "_tokenizer", None) if getattr(hf, "is_fast", False) else None
        if core is None:
            raise ValueError(f"model {spec.name}: {folder} has no fast (Rust) tokenizer to pack chunks with")
        rust = RustTokenizer.from_str(core.to_str())
    rust.no_truncation()
    rust.no_padding()
    st = _json(folder, "sentence_bert_config.json")
    config = SimpleNamespace(**_json(folder, "config.json"))
    lowercase = bool(st.get("do_lower_case", False))
    max_length = effective_max_length(spec, config, st.get("max_seq_length"))
    return PackingTokenizer(spec.name, max_length, tokenizer_fingerprint(rust, lowercase), rust, lowercase)


def packing_specs(registry: Registry) -> list[ModelSpec]:
    """The models that encode chunk texts: every dense and sparse entry of the registry."""
    return [*registry.dense, *registry.sparse]


def strictest_tokenizer(specs: Sequence[ModelSpec], models: ModelResolver | None = None,
                        ) -> tuple[PackingTokenizer | None, list[str]]:
    """(the tokenizer of the model with the smallest max length, ties to registry order; notes on models
    whose tokenizer could not be read). None when none could: the chunker then falls back to its estimate.
    `models`: the run plan's resolver (RunPlan.models); without one each spec is resolved now."""
    found, notes = [], []
    for spec in specs:
        try:
            model = models.get(spec) if models is not None else ResolvedModel.resolve(spec)
            found.append(_cached(spec, model.require_folder()))
        except Exception as exc:  # a hub id not in the local cache, a folder without a fast tokenizer
            notes.append(f"{spec.name}: its tokenizer cannot be read to pack chunks ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})")
    best = min(found, key=lambda t: t.max_length) if found else None
    return best, notes


@functools.lru_cache(maxsize=32)
def _cached(spec: ModelSpec, folder: str) -> PackingTokenizer:
    # Each run's chunks step asks for the same models: read each folder once per process.
    return load_packing_tokenizer(spec, folder)


def packing_identity(registry: Registry) -> str:
    """The chunks asset's code-version input: which tokenizer and max length pack the chunks."""
    tokenizer, _ = strictest_tokenizer(packing_specs(registry))
    return tokenizer.identity if tokenizer is not None else "estimate"
