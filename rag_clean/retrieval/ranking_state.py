"""What the `reranked` stage chose for a collection, stored so that search ranks the same way.

One JSON file per collection (`StorageLayout.ranking_state_file`), written atomically at the end of each
`reranked` run: the dense models and their fusion, the (tuned or default) hybrid weights per candidate system,
the candidate pool size, the normalization, the reranker and how many candidates it reorders, and each
model's fingerprint, so a searcher notices when the registry or the weights changed since. No query text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from rag_clean.storage.atomic import write_json

STATE_VERSION = 1


class RankingStateError(ValueError):
    """No usable ranking state: the message names the file and what to do."""


@dataclass(frozen=True)
class RankingState:
    dense_models: tuple[str, ...]          # fused in this order
    fusion_method: str                     # "concat" | "mean"
    fusion_weights: dict[str, float]       # registry weights the fused vectors were built with
    ensemble_weights: dict[str, float] | None  # tuned per-model weights of the dense score; None: fused cosine
    systems: tuple[str, ...]               # "dense", then "sparse:<model>" for each sparse model that ran
    weights: dict[str, float]              # hybrid weight per system (tuned, or the documented default)
    tuned: bool
    method: str                            # "dense" | "weighted" | "rrf" (ranking.hybrid_method)
    normalization: str                     # per-query score normalization of the weighted sum
    top_k_candidates: int                  # each system's top-k that forms a query's pool
    rrf_k: int
    rerank_enabled: bool
    rerank_top_k: int
    rerank_model: str | None               # registry name of the cross-encoder; None: the registry has none
    rerank_source: str | None              # the source that loaded; None: none loaded (retrieval order kept)
    fingerprints: dict[str, str]           # model name -> fingerprint when reranked ran
    version: int = STATE_VERSION

    @property
    def sparse_models(self) -> list[str]:
        return [s.split(":", 1)[1] for s in self.systems if s.startswith("sparse:")]

    def system_weights(self) -> list[float]:
        return [float(self.weights[s]) for s in self.systems]

    def to_dict(self) -> dict:
        out = asdict(self)
        return out | {"dense_models": list(self.dense_models), "systems": list(self.systems)}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "RankingState":
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            found = data.get("version") if isinstance(data, dict) else type(data).__name__
            raise RankingStateError(f"{where}: ranking state version {found!r}, expected {STATE_VERSION}: "
                                    "rematerialize `reranked` for this collection")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise RankingStateError(f"{where}: ranking state lacks {missing}: rematerialize `reranked`")
        values = {k: data[k] for k in names}
        values["dense_models"], values["systems"] = tuple(values["dense_models"]), tuple(values["systems"])
        return cls(**values)


def write_ranking_state(path: Path, state: RankingState) -> None:
    write_json(Path(path), state.to_dict())


def read_ranking_state(path: Path, collection: str) -> RankingState:
    path = Path(path)
    if not path.exists():
        raise RankingStateError(f"collection {collection!r}: no ranking state at {path}: materialize `reranked` "
                                "for it first (search ranks with the weights it tuned)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RankingStateError(f"{path}: unreadable ranking state ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}): rematerialize `reranked`") from None
    return RankingState.from_dict(data, str(path))
