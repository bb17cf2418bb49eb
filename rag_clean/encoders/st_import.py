"""Import sentence-transformers without importing scikit-learn.

Why: `sentence_transformers.util.similarity` does `from sklearn.metrics import pairwise_distances` at import
time, and importing sklearn (with scipy) costs seconds per process (9 s of 32 s on the loaded 2-core box,
~2.4 s on the H200 host) in every first encoding step, though no encode path here calls it. While
sentence-transformers imports, `sklearn` and `sklearn.metrics` are placeholders whose
`pairwise_distances` imports the real function on its first call; the placeholders are removed right after,
so any later `import sklearn` gets the real package.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import threading
import types

_LOCK = threading.Lock()


def _pairwise_distances(*args, **kwargs):
    return importlib.import_module("sklearn.metrics").pairwise_distances(*args, **kwargs)


def sentence_transformers():
    """The sentence_transformers module, imported with sklearn deferred (a no-op once it is imported)."""
    with _LOCK:
        if "sentence_transformers" in sys.modules or "sklearn" in sys.modules:
            return importlib.import_module("sentence_transformers")
        placeholders = {}
        for name in ("sklearn", "sklearn.metrics"):
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            module.__path__ = []
            placeholders[name] = module
        placeholders["sklearn"].metrics = placeholders["sklearn.metrics"]
        placeholders["sklearn.metrics"].pairwise_distances = _pairwise_distances
        sys.modules.update(placeholders)
        try:
            return importlib.import_module("sentence_transformers")
        finally:
            for name, module in placeholders.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]
