"""Load a model folder for the sentence-transformers backends (dense, sparse, rerank): the one place that
decides between the light loader (transformers alone) and sentence-transformers.

Why: the backends run their own forward (FastBert over the Hugging Face module's weights, their own
tokenizer path) and need from the folder only the Hugging Face model, its tokenizer and a few settings.
`import sentence_transformers` costs ~3.7 s on the CPU box (sklearn / scipy through util.similarity, its
ONNX / OpenVINO backends) on top of torch + transformers; the light loader reads the same files with
transformers alone: the same classes, the same weights, the same tokenizer, so the same vectors.
Folders it does not cover (rag_clean.encoders.model_folder says which) load through sentence-transformers,
imported only then; the reason is logged at debug. `RAG_CLEAN_LIGHT_LOAD=0` sends every folder there.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from rag_clean.config.settings import process_setting
from rag_clean.encoders.model_folder import MODEL_TYPE, OWN_POOLING, LightPlan, NotLight, light_plan

log = logging.getLogger(__name__)

LIGHT = "transformers"
FULL = "sentence-transformers"


@dataclass
class LoadedModel:
    """A model folder, loaded: what the backends read, whichever loader ran."""

    module: torch.nn.Module          # what is placed on the device: the Hugging Face model, or the ST model around it
    hf: torch.nn.Module              # the Hugging Face model
    tokenizer: object                # its Hugging Face tokenizer
    max_seq_length: int | None       # the tokenizer's model_max_length as sentence-transformers sets it
    do_lower_case: bool
    loader: str                      # LIGHT | FULL
    reason: str | None = None        # why FULL ran (None: the light loader did, or it is switched off)
    # dense
    dim: int | None = None
    pooling_mode: str | None = None  # set when Transformer -> Pooling of one mode [-> Normalize] (ours to pool)
    after_transformer: list | None = None  # otherwise the model's own modules after the transformer (FULL only)
    # sparse: (pooling strategy, activation) of SpladePooling, None when the model has none
    splade: tuple[str, str] | None = None
    # rerank
    num_labels: int | None = None
    activation: Callable | None = None


def load_model(path: str, role: str) -> LoadedModel:
    """The folder at `path` loaded for `role` ("dense" | "sparse" | "rerank") on the CPU in float32."""
    if process_setting("light_load"):
        try:
            plan = light_plan(path, role)
        except NotLight as exc:
            reason = str(exc)
            log.debug("%s: loading through sentence-transformers: %s", path, reason)
        else:
            return _light(plan)
    else:
        reason = None
    loaded = _full(path, role)
    loaded.reason = reason
    return loaded


# --- transformers alone ---------------------------------------------------------------------------------

_AUTO_CLASS = {"dense": "AutoModel", "sparse": "AutoModelForMaskedLM", "rerank": "AutoModelForSequenceClassification"}


def _light(plan: LightPlan) -> LoadedModel:
    import transformers

    path = str(plan.model_dir)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    # sentence-transformers switches the generation cache off; kept so the config reads the same.
    if hasattr(config, "use_cache"):
        config.use_cache = False
    hf = getattr(transformers, _AUTO_CLASS[plan.role]).from_pretrained(path, config=config, local_files_only=True)
    tokenizer = _tokenizer(plan, config)
    loaded = LoadedModel(module=hf, hf=hf, tokenizer=tokenizer, max_seq_length=tokenizer.model_max_length,
                         do_lower_case=plan.do_lower_case, loader=LIGHT)
    if plan.role == "dense":
        loaded.dim, loaded.pooling_mode = int(config.hidden_size), plan.pooling_mode
    elif plan.role == "sparse":
        loaded.splade = ("max", plan.splade_activation)
    else:
        loaded.num_labels = int(config.num_labels)
        loaded.activation = _activation(plan.activation, loaded.num_labels)
    return loaded


def _tokenizer(plan: LightPlan, config):
    """The tokenizer as sentence-transformers' Transformer module sets it up."""
    from transformers import AutoTokenizer

    kwargs = {"model_max_length": plan.max_seq_length} if plan.max_seq_length is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(str(plan.model_dir), local_files_only=True, **kwargs)
    positions = getattr(config, "max_position_embeddings", -1)
    if plan.max_seq_length is None and positions not in (None, -1):
        tokenizer.model_max_length = min(tokenizer.model_max_length, positions)
    if plan.do_lower_case and getattr(tokenizer, "is_fast", False):
        _lowercase_first(tokenizer)
    return tokenizer


def _lowercase_first(tokenizer) -> None:
    """Put Lowercase in front of the fast tokenizer's normalizers, as sentence-transformers does for
    do_lower_case, so the Rust tokenizer (and its fingerprint) is the same whichever loader ran."""
    from tokenizers.normalizers import Lowercase, Sequence

    backend = tokenizer.backend_tokenizer
    normalizer = backend.normalizer
    inner = list(normalizer) if isinstance(normalizer, Sequence) else ([normalizer] if normalizer is not None else [])
    if not any(isinstance(n, Lowercase) for n in inner) and not isinstance(normalizer, Lowercase):
        backend.normalizer = Sequence([Lowercase(), *inner])


def _activation(path: str | None, num_labels: int) -> Callable:
    """CrossEncoder's activation: the folder's torch class (model_folder admits only torch.*), else its default."""
    if path is None:
        return torch.nn.Sigmoid() if num_labels == 1 else torch.nn.Identity()
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)()


# --- sentence-transformers --------------------------------------------------------------------------------

def _full(path: str, role: str) -> LoadedModel:
    import sentence_transformers

    st_model = getattr(sentence_transformers, MODEL_TYPE[role])(path, device="cpu", local_files_only=True)
    first = st_model[0]
    hf = getattr(first, "auto_model", None) or getattr(first, "model", None)
    if hf is None:
        from rag_clean.encoders.base import EncoderError

        raise EncoderError(f"{path}: {type(first).__name__} has no Hugging Face model (auto_model)")
    tokenizer = getattr(first, "tokenizer", None)
    loaded = LoadedModel(module=st_model, hf=hf, tokenizer=tokenizer,
                         max_seq_length=getattr(first, "max_seq_length", None),
                         do_lower_case=bool(getattr(first, "do_lower_case", False)), loader=FULL)
    modules = list(st_model)
    names = [type(m).__name__ for m in modules]
    if role == "dense":
        getter = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
        loaded.dim = int(getter())
        mode = _st_pooling_mode(modules[1]) if names[1:2] == ["Pooling"] else None
        simple = (mode in OWN_POOLING and getattr(modules[1], "include_prompt", True)
                  and all(n == "Normalize" for n in names[2:]))
        if simple:
            loaded.pooling_mode = mode
        else:
            loaded.after_transformer = modules[1:]
    elif role == "sparse":
        if names[1:2] == ["SpladePooling"]:
            loaded.splade = (modules[1].pooling_strategy, modules[1].activation_function)
    else:
        loaded.num_labels = int(st_model.num_labels)
        loaded.activation = st_model.activation_fn
    return loaded


def _st_pooling_mode(module) -> str | None:
    mode = getattr(module, "pooling_mode", None)
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if len(mode) == 1 else None
    if mode is None and hasattr(module, "get_pooling_mode_str"):
        mode = module.get_pooling_mode_str()
    return mode
