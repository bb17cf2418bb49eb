"""Encoder backends behind the contracts of `base`; `factory` picks one from a ModelSpec.

Kept import-light (lazy exports) so `from rag_clean.encoders.base import ...` does not pull in
the backends.
"""

_EXPORTS = {
    "load_dense_encoder": "rag_clean.encoders.factory",
    "load_sparse_encoder": "rag_clean.encoders.factory",
    "load_reranker": "rag_clean.encoders.factory",
    "ModelLoadError": "rag_clean.encoders.factory",
    "BudgetStore": "rag_clean.encoders.budget",
    "BudgetController": "rag_clean.encoders.budget",
    "EncoderError": "rag_clean.encoders.base",
    "Encoded": "rag_clean.encoders.base",
    "TokenSource": "rag_clean.encoders.tokens",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
