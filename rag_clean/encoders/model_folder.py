"""Read a model folder's sentence-transformers files and say whether transformers alone can load it.

A sentence-transformers folder is a Hugging Face model plus a few JSON files (modules.json, the
Transformer's sentence_bert_config.json, the pooling module's config.json, config_sentence_transformers.json).
`light_plan` reads only those files (no model is loaded, sentence-transformers is not imported) and returns a `LightPlan`
when the folder is one of the shapes the engine's own forward covers:

- dense: a BERT-family Transformer (feature-extraction) + Pooling of one mode [+ Normalize]
  (a folder without modules.json: Transformer + mean pooling, as SentenceTransformer builds it);
- sparse: a BERT-family masked-LM Transformer (fill-mask) + SpladePooling (max, relu / log1p_relu);
- rerank: a BERT-family sequence classifier (a CrossEncoder folder or a plain Hugging Face one),
  with a torch activation or the default one.

Anything else (a Dense layer, another pooling, a prompt applied by default, model / tokenizer
keyword arguments, a non-BERT architecture) raises `NotLight` with the reason, and the model loads
through sentence-transformers (rag_clean.encoders.model_load decides).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rag_clean.encoders.fast_bert import SUPPORTED_TYPES

# The light loader covers the architectures FastBert runs.
BERT_FAMILY = SUPPORTED_TYPES
# The sentence-transformers class a folder of each role loads as, and its Transformer's task.
MODEL_TYPE = {"dense": "SentenceTransformer", "sparse": "SparseEncoder", "rerank": "CrossEncoder"}
TASK = {"dense": "feature-extraction", "sparse": "fill-mask", "rerank": "sequence-classification"}
# Where sentence-transformers looks for the Transformer module's settings, in its order.
TRANSFORMER_CONFIG_FILES = ("sentence_bert_config.json", "sentence_roberta_config.json",
                            "sentence_distilbert_config.json", "sentence_camembert_config.json",
                            "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
                            "sentence_xlnet_config.json")
# sentence_bert_config.json keys the light loader honours; any other key with a value falls back.
# (unpad_inputs steers only sentence-transformers' own forward, which the engine does not run.)
_HONOURED_KEYS = {"max_seq_length", "do_lower_case", "transformer_task", "modality_config", "module_output_name",
                  "unpad_inputs"}
# What sentence-transformers writes for a text-only Transformer of each task (modality_config).
_TEXT_OUTPUT = {"feature-extraction": "last_hidden_state", "fill-mask": "logits",
                "sequence-classification": "logits"}
# The module output sentence-transformers (6.x) names for each task: a CrossEncoder's Transformer gives "scores".
_MODULE_OUTPUT = {"feature-extraction": "token_embeddings", "fill-mask": "token_embeddings",
                  "sequence-classification": "scores"}
# Pooling modes the engine computes itself (rag_clean.encoders.st_dense / fast_bert.pool_unpadded).
OWN_POOLING = ("cls", "mean", "max", "lasttoken")
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


class NotLight(Exception):
    """The folder needs sentence-transformers to load; str(exc) says why."""


@dataclass(frozen=True)
class LightPlan:
    """What transformers alone needs to load the folder as sentence-transformers would."""

    role: str
    model_dir: Path                 # the Hugging Face model (config, weights, tokenizer files)
    max_seq_length: int | None      # sentence_bert_config.json's, else None (the tokenizer's, capped)
    do_lower_case: bool
    pooling_mode: str | None = None  # dense
    splade_activation: str | None = None  # sparse: "relu" | "log1p_relu" (max pooling)
    activation: str | None = None   # rerank: a torch class path from the folder, None: the default


def _json(path: Path, what: str) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NotLight(f"{what} {path} is unreadable ({type(exc).__name__})") from exc


def _class_name(module: dict) -> str:
    ref = str(module.get("type", ""))
    if not ref.startswith("sentence_transformers."):
        raise NotLight(f"modules.json names a custom module {ref!r}")
    return ref.rsplit(".", 1)[-1]


def _sub(folder: Path, module: dict) -> Path:
    rel = str(module.get("path", ""))
    sub = (folder / rel).resolve()
    if folder.resolve() not in (sub, *sub.parents):
        raise NotLight(f"modules.json path {rel!r} leaves the model folder")
    return sub


def _model_config(model_dir: Path) -> dict:
    config = _json(model_dir / "config.json", "model config")
    model_type = config.get("model_type")
    if model_type not in BERT_FAMILY:
        raise NotLight(f"model_type {model_type!r} is not one of {', '.join(BERT_FAMILY)}")
    return config


def _transformer_settings(model_dir: Path, class_name: str, role: str) -> tuple[int | None, bool]:
    """(max_seq_length, do_lower_case) of the Transformer module; NotLight for anything else it sets."""
    settings: dict = {}
    for name in TRANSFORMER_CONFIG_FILES:
        if (model_dir / name).is_file():
            settings = _json(model_dir / name, "Transformer config")
            break
    task = settings.get("transformer_task", "fill-mask" if class_name == "MLMTransformer" else "feature-extraction")
    if task != TASK[role]:
        raise NotLight(f"transformer_task {task!r} (this role needs {TASK[role]!r})")
    extra = sorted(k for k, v in settings.items() if k not in _HONOURED_KEYS and v not in (None, {}, [], ""))
    if extra:
        raise NotLight(f"the Transformer module sets {', '.join(extra)}")
    modality = settings.get("modality_config")
    expected = {"text": {"method": "forward", "method_output_name": _TEXT_OUTPUT[task]}}
    if modality is not None and modality != expected:
        raise NotLight(f"modality_config {modality!r} is not text-only")
    output = settings.get("module_output_name", _MODULE_OUTPUT[task])
    if output != _MODULE_OUTPUT[task]:
        raise NotLight(f"module_output_name {output!r}")
    max_len = settings.get("max_seq_length")
    return (int(max_len) if max_len is not None else None), bool(settings.get("do_lower_case", False))


def _pooling_mode(config: dict) -> str:
    mode = config.get("pooling_mode")
    if mode is None:
        legacy = [m for key, m in _LEGACY_POOLING.items() if config.get(key)]
        mode = legacy or ["mean"]
    if isinstance(mode, (list, tuple)):
        if len(mode) != 1:
            raise NotLight(f"pooling concatenates {'+'.join(mode)}")
        mode = mode[0]
    if mode not in OWN_POOLING:
        raise NotLight(f"pooling mode {mode!r}")
    if config.get("include_prompt", True) is not True:
        raise NotLight("pooling excludes the prompt (include_prompt false)")
    return mode


def _model_level(folder: Path, role: str) -> dict:
    """config_sentence_transformers.json, checked: the same class, no prompt applied by default."""
    path = folder / "config_sentence_transformers.json"
    settings = _json(path, "model settings") if path.is_file() else {}
    kind = settings.get("model_type", "SentenceTransformer")
    if kind != MODEL_TYPE[role]:
        raise NotLight(f"the folder is a {kind}, not a {MODEL_TYPE[role]}")
    if settings.get("default_prompt_name"):
        raise NotLight(f"default prompt {settings['default_prompt_name']!r}")
    for key in ("requirements", "keep_in_fp32_modules"):
        if settings.get(key):
            raise NotLight(f"config_sentence_transformers.json sets {key}")
    return settings


def _modules(folder: Path) -> list[dict] | None:
    path = folder / "modules.json"
    if not path.is_file():
        return None
    modules = _json(path, "modules.json")
    if not isinstance(modules, list) or not modules:
        raise NotLight("modules.json lists no modules")
    return sorted(modules, key=lambda m: m.get("idx", 0))


def _transformer(folder: Path, modules: list[dict] | None, role: str) -> tuple[Path, int | None, bool]:
    if modules is None:
        return folder, None, False  # sentence-transformers' default: the folder itself, no settings
    name = _class_name(modules[0])
    if name not in ("Transformer", "MLMTransformer"):
        raise NotLight(f"the first module is {name}, not a Transformer")
    model_dir = _sub(folder, modules[0])
    return (model_dir, *_transformer_settings(model_dir, name, role))


def _check_plain(model_dir: Path) -> None:
    if (model_dir / "adapter_config.json").is_file():
        raise NotLight("a PEFT adapter (adapter_config.json)")


def _dense(folder: Path, modules: list[dict] | None, config: dict, model_dir: Path, max_len, lower) -> LightPlan:
    if modules is None:
        if any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
            raise NotLight("a causal LM (last-token pooling by default)")
        return LightPlan("dense", model_dir, max_len, lower, pooling_mode="mean")
    names = [_class_name(m) for m in modules]
    if len(names) < 2 or names[1] != "Pooling" or any(n != "Normalize" for n in names[2:]):
        raise NotLight(f"modules {' -> '.join(names)} (light: Transformer -> Pooling [-> Normalize])")
    pooling = _json(_sub(folder, modules[1]) / "config.json", "pooling config")
    return LightPlan("dense", model_dir, max_len, lower, pooling_mode=_pooling_mode(pooling))


def _sparse(folder: Path, modules: list[dict] | None, config: dict, model_dir: Path, max_len, lower) -> LightPlan:
    if modules is None:
        if not any(a.endswith("ForMaskedLM") for a in config.get("architectures") or []):
            raise NotLight("not a masked-LM architecture (sentence-transformers builds a CSR model)")
        return LightPlan("sparse", model_dir, max_len, lower, splade_activation="relu")
    names = [_class_name(m) for m in modules]
    if names[1:] != ["SpladePooling"]:
        raise NotLight(f"modules {' -> '.join(names)} (light: Transformer -> SpladePooling)")
    pooling = _json(_sub(folder, modules[1]) / "config.json", "SPLADE pooling config")
    strategy, activation = pooling.get("pooling_strategy", "max"), pooling.get("activation_function", "relu")
    if strategy != "max" or activation not in ("relu", "log1p_relu") or pooling.get("chunk_size"):
        raise NotLight(f"SPLADE pooling {strategy!r}/{activation!r}")
    return LightPlan("sparse", model_dir, max_len, lower, splade_activation=activation)


def _rerank(folder: Path, modules: list[dict] | None, config: dict, model_dir: Path, max_len, lower,
            settings: dict) -> LightPlan:
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise NotLight(f"architectures {architectures} hold no sequence classifier")
    if modules is not None and len(modules) != 1:
        raise NotLight(f"modules {' -> '.join(_class_name(m) for m in modules)} (light: one Transformer)")
    # The activation CrossEncoder applies: the folder's (model settings first, then config.json), else its default.
    activation = (settings.get("activation_fn")
                  or (config.get("sentence_transformers") or {}).get("activation_fn")
                  or config.get("sbert_ce_default_activation_function"))
    if activation is not None and not str(activation).startswith("torch."):
        raise NotLight(f"activation {activation!r} is not a torch class")
    return LightPlan("rerank", model_dir, max_len, lower, activation=activation)


def light_plan(folder: str | Path, role: str) -> LightPlan:
    """The light loading plan of a local model folder for `role`, or NotLight with the reason."""
    folder = Path(folder)
    if role not in TASK:
        raise NotLight(f"role {role!r}")
    modules = _modules(folder)
    # CrossEncoder and SentenceTransformer read config_sentence_transformers.json only with modules.json.
    settings = _model_level(folder, role) if modules is not None else {}
    model_dir, max_len, lower = _transformer(folder, modules, role)
    _check_plain(model_dir)
    config = _model_config(model_dir)
    if role == "dense":
        return _dense(folder, modules, config, model_dir, max_len, lower)
    if role == "sparse":
        return _sparse(folder, modules, config, model_dir, max_len, lower)
    return _rerank(folder, modules, config, model_dir, max_len, lower, settings)
