"""Every setting of rag_clean, declared once: key, type, default, environment variable, doc.

Two scopes, because two kinds of knob exist:

- RUN (`EMBEDDER_<KEY>`): what a run computes. Resolved through defaults < config file < .env <
  environment < run config / rag-clean flags (rag_clean.config.settings.resolve_settings), carried by
  the run plan, recorded with its source in every stage record.
- PROCESS (`RAG_CLEAN_<KEY>`): where things live and how this process runs (roots, registry, executor,
  GPU lease, engine switches). Read from the environment by every process Dagster starts (webserver,
  daemon, step pods), so they are environment only; a resource field or CLI flag that names one wins
  over it (rag_clean.config.settings.process_setting).

Everything else derives from this table: the EmbedderSettings dataclass, the Dagster settings resource,
the strict parser's rules, the .env check and the README's settings table
(`python -m rag_clean.config.settings --markdown`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

RUN = "run"
PROCESS = "process"
KINDS = ("bool", "int", "float", "str", "choice", "list", "int_list")


@dataclass(frozen=True)
class Setting:
    key: str
    kind: str                          # one of KINDS
    default: Any
    doc: str
    scope: str = RUN
    choices: tuple[str, ...] = ()      # kind "choice": the accepted values
    low: float | None = None           # numbers: the accepted range
    high: float | None = None
    open_low: bool = False             # the range excludes `low` (it includes it by default)
    open_high: bool = False
    optional: bool = False             # "" / unset means None ("not given"), not the default
    check: Callable[[Any], str | None] | None = None  # extra rule: returns what is wrong, or None
    env_name: str = ""                 # only when the variable is not <PREFIX><KEY>
    retired: str = ""                  # accepted and ignored: the note every run reports
    secret: bool = False               # never printed (provenance lines show "<set>")
    shown_default: str = ""            # README text when the default is computed at run time

    @property
    def env(self) -> str:
        return self.env_name or ("EMBEDDER_" if self.scope == RUN else "RAG_CLEAN_") + self.key.upper()


def _ray_address(value: str) -> str | None:
    if value in ("", "local", "auto") or value.startswith("ray://") or ":" in value:
        return None
    return "must be '' (off), 'local', 'auto', 'ray://host:port' or 'host:port'"


_POSITIVE = dict(low=0, open_low=True)
_SHARE = dict(low=0.0, high=1.0)

SETTINGS: tuple[Setting, ...] = (
    # ---------------------------------------------------------------- run settings (EMBEDDER_*)
    Setting("enable_sparse", "bool", True, "run the sparse stage; off: nothing written, the previous file "
            "stays, candidates are dense only"),
    Setting("enable_rerank", "bool", True, "cross-encoder rerank of the top `rerank_top_k`; off: `reranked` "
            "keeps retrieval order"),
    Setting("sparse_models", "list", (), "comma list of registry sparse models to run", shown_default="all sparse models"),
    Setting("ensemble_models", "list", (), "comma list of registry dense models fused, in this order",
            shown_default="all dense models"),
    Setting("fusion_method", "choice", "", "`concat` or `mean` (the old embedder's weighted mean)",
            choices=("", "concat", "mean"), shown_default="the registry's (`concat`)"),
    Setting("top_k_candidates", "int", 100, "candidates per query", **_POSITIVE),
    Setting("rerank_top_k", "int", 20, "how many candidates the cross-encoder reranks", **_POSITIVE),
    Setting("rerank_batch_size", "int", 0, "most (query, passage) pairs per cross-encoder batch; `0`: no cap, "
            "batches are filled across queries up to the token budget (a cap of 32 pairs, ~10k tokens, left a GPU "
            "mostly idle)", low=0),
    Setting("rrf_k", "int", 60, "the reciprocal-rank-fusion constant", **_POSITIVE),
    Setting("query_text_mode", "choice", "hash", "what the `queries` asset keeps of each query: `hash` (keyed "
            "HMAC-SHA256, see `query_key` and [docs/telemetry.md](docs/telemetry.md#privacy)) or `truncate` (the "
            "first 100 chars); raw text is never stored",
            choices=("hash", "truncate")),
    Setting("enable_exports", "bool", False, "write the old embedder's export files"),
    Setting("export_dir", "str", "", "where exports go", shown_default="`<storage root>/exports`"),
    Setting("reuse_unchanged", "bool", True, "reuse stored dense, sparse and fused rows of chunks whose content "
            "hash and model fingerprint (weights digest, pooling, max_length, dtype, truncate_dim, encoder code "
            "version) are unchanged"),
    Setting("hybrid_fusion", "choice", "weighted", "candidates: weighted sum of per-query normalized dense and "
            "sparse scores, or `rrf` (reciprocal rank)", choices=("weighted", "rrf")),
    Setting("score_normalization", "choice", "minmax", "per-query score normalization before the weighted sum",
            choices=("minmax", "zscore")),
    Setting("hybrid_dense_weight", "float", 0.3, "dense weight when a collection has too few queries to tune "
            "([docs/retrieval.md](docs/retrieval.md))",
            **_SHARE),
    Setting("tune_min_queries", "int", 30, "queries with gold chunks needed to tune the hybrid weights", **_POSITIVE),
    Setting("tune_fraction", "float", 0.5, "share of queries in the tuning split; the rest is held out",
            low=0.0, high=1.0, open_low=True, open_high=True),
    Setting("tune_ensemble_weights", "bool", False, "also tune the dense models' weights at query time "
            "(the stored fused vectors keep the registry's)"),
    Setting("quality_margin", "float", 0.02, "allowed drop of held-out recall@10 / MRR@10 before the quality "
            "check fails", **_SHARE),
    Setting("quality_severity", "choice", "warn", "`warn` or `error` when the quality check fails",
            choices=("warn", "error")),
    Setting("ray_address", "str", "", "encode dense and sparse data-parallel on Ray: `local` starts a cluster, "
            "`auto` / `ray://host:port` / `host:port` joins one; needs the `ray` extra "
            "([docs/scaling.md](docs/scaling.md#one-huge-collection-on-ray))", check=_ray_address,
            shown_default="`\"\"` (off)"),
    Setting("ray_shard_rows", "int", 4096, "rows per Ray shard (the unit of work and of retry)", **_POSITIVE),
    Setting("ray_actors", "int", 2, "Ray workers, each loading the model once", **_POSITIVE),
    Setting("index_sink", "choice", "qdrant-edge", "where `vector_index` syncs each collection: `qdrant-edge` "
            "(embedded Qdrant, under the storage root), `qdrant` (a server at `qdrant_url`) or `off` (skipped)",
            choices=("qdrant-edge", "qdrant", "off")),
    Setting("index_shards", "int", 0, "Edge shards of a new collection index, each written by its own process "
            "(`0`: one per 12,500 chunks, at most 8 and half the cores; kept for the index's life, another explicit "
            "value rebuilds it)", low=0, high=64),
    Setting("qdrant_url", "str", "", "the Qdrant server's URL when `index_sink = qdrant`", shown_default='`""`'),
    Setting("qdrant_api_key_env", "str", "QDRANT_API_KEY", "the environment variable holding the Qdrant "
            "server's API key (the key itself is never a setting, so it never lands in telemetry)"),
    Setting("exclusive_ensemble", "bool", None, "retired: accepted from every source, ignored, reported once",
            shown_default="-",
            retired="exclusive_ensemble is retired and ignored: every run keeps one dense model resident per "
                    "device at a time (one asset per model, GPU steps in the `gpu` pool)"),
    # ---------------------------------------------------------------- process settings (RAG_CLEAN_*)
    Setting("config_file", "str", "config/embedder.json", "the config file of the run settings (JSON or TOML)",
            scope=PROCESS, env_name="EMBEDDER_CONFIG_FILE"),
    Setting("data_root", "str", "", "folder whose sub-folders are collections", scope=PROCESS,
            shown_default="the bundled `data/collections`"),
    Setting("storage_root", "str", "", "asset files, state, telemetry (never inside the data root)", scope=PROCESS,
            shown_default="`$DAGSTER_HOME/rag_clean`, else `.rag_clean/storage`"),
    Setting("model_registry", "str", "", "the model registry TOML", scope=PROCESS,
            shown_default="`rag_clean/models.toml`"),
    Setting("executor", "choice", "in_process", "Dagster executor: `in_process`, `multiprocess` (CPU steps side "
            "by side) or `k8s` (one pod per step)", scope=PROCESS, choices=("in_process", "multiprocess", "k8s")),
    Setting("automation", "bool", True, "with the daemon, rematerialize a collection whose files changed or an "
            "asset whose code version changed (a registry entry), with what depends on it, in one run per "
            "collection; `0` turns it off; read when the code location loads", scope=PROCESS),
    Setting("log_level", "choice", "INFO", "the run log in the terminal: `DEBUG` adds Dagster's own events (the "
            "main job's `--verbose`)", scope=PROCESS, choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    Setting("owners", "str", "team:rag-clean", "asset owners in the catalog: comma list of emails or `team:name`",
            scope=PROCESS),
    Setting("pod_config", "str", "", "pod requirements per step for the k8s executor", scope=PROCESS,
            shown_default="`deploy/pods.toml`"),
    Setting("gpu_pool_limit", "int", None, "GPU steps at once (the `gpu` pool); 0 = no limit", scope=PROCESS,
            low=0, optional=True, shown_default="one per visible GPU"),
    Setting("gpu_devices", "int_list", None, "CUDA device indices the lease may grant, e.g. `0,1`", scope=PROCESS,
            optional=True, shown_default="all visible"),
    Setting("gpu_memory_fraction", "float", None, "per-device memory ceiling of a lease holder", scope=PROCESS,
            low=0.0, high=1.0, open_low=True, optional=True, shown_default="none"),
    Setting("gpu_memory_ceiling_mib", "int", None, "per-device memory ceiling in MiB (the stricter ceiling wins)",
            scope=PROCESS, optional=True, shown_default="none", **_POSITIVE),
    Setting("gpu_lease_timeout_s", "float", 3600.0, "how long a step waits for a GPU lease", scope=PROCESS, low=0),
    Setting("gpu_lock_dir", "str", "", "lease lock files (machine-wide: every checkout shares the GPUs)",
            scope=PROCESS, shown_default="`<temp dir>/rag_clean-gpu-locks`"),
    Setting("force_cpu", "bool", False, "grant the CPU even where CUDA is present", scope=PROCESS),
    Setting("token_cache", "bool", True, "models sharing a tokenizer tokenize the chunks once (ids stored under "
            "`state/token_ids/`)", scope=PROCESS),
    Setting("rust_tokenizer", "bool", True, "tokenize with the Rust tokenizer directly (off: the transformers "
            "wrapper; for comparison)", scope=PROCESS),
    Setting("jsonl_workers", "int", 0, "worker processes that read a big JSONL file (>= 32 MiB) in byte ranges "
            "for `chunks`; `0` reads in-process (faster where the tokenizer counts on every core: "
            "[docs/performance.md](docs/performance.md))", scope=PROCESS, low=0, high=256),
    Setting("light_load", "bool", True, "load sentence-transformers folders of the shapes the engine runs itself "
            "with transformers alone, without importing sentence-transformers (off: through sentence-transformers; "
            "for comparison)", scope=PROCESS),
    Setting("warmup", "bool", True, "import torch / transformers and make the CUDA context on a background thread "
            "while `chunks` runs (once per process, from the GPU lease resource); the first GPU step waits for it",
            scope=PROCESS),
    Setting("fast_bert", "bool", True, "the unpadded BERT forward for supported models (off: the model's own)",
            scope=PROCESS),
    Setting("compile", "choice", "off", "`static`: FastBert's post-attention and FFN blocks under torch.compile "
            "with static shapes, every batch padded up to one of 6 token buckets (the token budget, its half, ... "
            "its 1/32) so compiled graphs are reused; costs compile time per model and process. `off`: eager",
            scope=PROCESS, choices=("off", "static")),
    Setting("splade_segment_max", "bool", True, "SPLADE pooling by a segment max over unpadded rows (off: the "
            "scatter max; for comparison)", scope=PROCESS),
    Setting("splade_vocab_slice", "int", None, "SPLADE's MLM head over vocabulary slices of this many terms (0: off, "
            "the head runs over token chunks); unset: 1024 on the CPU (2.7x sentence-transformers on SPLADE-tiny), "
            "4096 on CUDA (1.27x the full logits on an H100)", scope=PROCESS, optional=True, low=0,
            shown_default="1024 on CPU, 4096 on CUDA"),
    Setting("gil_switch_ms", "float", 0.5, "interpreter switch interval while a GPU encodes; 0 keeps the "
            "interpreter's", scope=PROCESS, low=0),
    Setting("query_key", "str", "", "the HMAC key of hashed query text", scope=PROCESS, optional=True, secret=True,
            shown_default="read from `query_key_file`"),
    Setting("query_key_file", "str", "", "file holding the HMAC key (never under the storage root)", scope=PROCESS,
            shown_default="`~/.config/rag_clean/query_key`"),
)

BY_KEY = {s.key: s for s in SETTINGS}
BY_ENV = {s.env: s for s in SETTINGS}
assert len(BY_KEY) == len(BY_ENV) == len(SETTINGS), "a key or variable is declared twice"
assert all(s.kind in KINDS for s in SETTINGS)


def run_settings(*, retired: bool = False) -> list[Setting]:
    return [s for s in SETTINGS if s.scope == RUN and (retired or not s.retired)]


def process_settings() -> list[Setting]:
    return [s for s in SETTINGS if s.scope == PROCESS]


def _shown(s: Setting) -> str:
    if s.shown_default:
        return s.shown_default
    if s.kind == "bool":
        return "`1`" if s.default else "`0`"
    return f"`{s.default}`"


def markdown_table() -> str:
    """The README's settings table (a test keeps the README equal to it)."""
    lines = ["| setting | env | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        key = f"`{s.key}`" if s.scope == RUN else "(environment)"
        lines.append(f"| {key} | `{s.env}` | {_shown(s)} | {s.doc} |")
    return "\n".join(lines)
