"""Data-parallel dense and sparse encoding on a Ray cluster: a pool of actors, one model load each.

The stage decides which rows to compute (reuse of unchanged chunks happens before this module is
called), then hands them to `RayShardedEncoder`, which looks like a local encoder (`dim`, `heads`, `encode`
yielding `Encoded` batches, `stats`, `close`) so the stage writes its results into the same writer as on the
in-process path. Workers tokenize their shards themselves (the source's texts; no token cache on Ray).

- Rows are ordered by text length (longest first) and cut into shards of `shard_rows`: a shard holds
  texts of similar length (little padding), and the longest shards start first, so no long shard is
  left running alone at the end.
- Each worker actor loads the model once, through the public factory (`load_dense_encoder` /
  `load_sparse_encoder`), and encodes whole shards with the encoder's own `encode`: token-budget
  batches and the OOM backoff run inside the actor exactly as they do locally. `close()` releases the
  model on every worker; the worker processes stay warm for the next model of the ensemble.
- The driver keeps IN_FLIGHT_PER_ACTOR shards queued on each worker (one running, one waiting, so a
  worker never idles on a round trip) and yields each shard's rows as it completes, in any order.
  Memory on the driver and in the object store is bounded by workers x IN_FLIGHT_PER_ACTOR shards.
- Failures: a worker whose process dies is restarted by Ray (MAX_RESTARTS) and the shard it was
  running is retried on it (MAX_TASK_RETRIES), reloading the model first. A worker lost for good
  (restarts spent, node gone, killed) leaves the pool and its shards go to the others. An exception
  raised by the encoder itself is not retried (it would fail again): it reaches the stage, as locally.

Why plain actors, not ActorPool, Ray Data or dagster-ray: the unit of work is "rows of one model",
batched by the encoder's own token budget; Ray Data's `map_batches` re-batches rows by count in its own
block format, and maps failures to blocks, not to our row indices. `ray.util.ActorPool` keeps one task
per actor (the actor waits on every round trip) and does not move a dead actor's work elsewhere.
dagster-ray is community-maintained and would tie the engine (`rag_clean/`, Dagster-free) to Dagster.
Ray core actors keep the engine Dagster-free, use only Ray's stable core API, and make the retry
unit (a shard of row indices) explicit, so every row is written exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rag_clean.encoders.base import Encoded
from rag_clean.encoders.tokens import TokenSource

import numpy as np

from rag_clean.config.plan import RayPlan
from rag_clean.config.registry import ModelSpec

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'rag-clean[ray]'"
MAX_RESTARTS = 3           # times Ray restarts an actor whose process died (the model is loaded again)
MAX_TASK_RETRIES = 3       # times Ray re-runs the shard that was running on it
MAX_SHARD_RESUBMITS = 3    # times the driver moves a shard to another actor once its actor is gone for good
IN_FLIGHT_PER_ACTOR = 2    # shards queued per actor: one running, one waiting
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # models are never fetched at run time, on workers too


class RayUnavailableError(ImportError):
    """ray_address is set but Ray is not installed."""


class RayEncodeError(RuntimeError):
    """The Ray cluster could not run the shards (no room for an actor, every actor lost, model failed to load)."""


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(
            f"ray_address is set, so the dense/sparse stages encode on Ray, but Ray is not installed: "
            f"install the `ray` extra ({INSTALL_HINT}) or set ray_address='' (EMBEDDER_RAY_ADDRESS) to encode in-process"
        ) from exc
    return ray


def connect(plan: RayPlan):
    """The `ray` module, connected: an existing connection is reused (the caller then owns the job's
    runtime env: pass it `job_runtime_env()`); otherwise 'local' starts a local cluster and anything
    else joins `address`, with this checkout of rag_clean shipped to the workers."""
    ray = import_ray()
    if not ray.is_initialized():
        address = None if plan.address == "local" else plan.address
        log.info("connecting to Ray at %s", plan.address)
        kwargs = {"include_dashboard": False} if address is None else {}
        ray.init(address=address, runtime_env=job_runtime_env(), logging_level=logging.WARNING, **kwargs)
    return ray


def job_runtime_env() -> dict:
    """Workers import this checkout of rag_clean (uploaded by Ray; Ray allows uploads only per job, in
    ray.init), not whatever a node has installed: driver and actors run the same code."""
    import rag_clean

    env: dict = {"py_modules": [str(Path(rag_clean.__file__).resolve().parent)]}
    forwarded = _forwarded_env()
    if forwarded:
        env["env_vars"] = forwarded
    return env


def _forwarded_env() -> dict:
    return {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}


class _Worker:
    """Body of one Ray actor: a warm process (torch and the model libraries imported once) that holds
    one model at a time. Every call names the model it is for; a worker that does not hold it loads
    it first, so a worker Ray restarted after a crash reloads the model on the shard it retries."""

    def __init__(self):
        import ray

        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU, so it is always cuda:0 in here.
        self.device = "cuda:0" if ray.get_gpu_ids() else "cpu"
        self.key, self.kind, self.encoder = None, None, None

    def load(self, key: str, job: tuple) -> dict:
        if self.key != key:
            self.release(self.key)
            kind, spec, loader, loader_kwargs = job
            if loader is None:
                from rag_clean.encoders import factory

                loader = factory.load_dense_encoder if kind == "dense" else factory.load_sparse_encoder
            self.encoder = loader(spec, self.device, **loader_kwargs)
            self.key, self.kind = key, kind
        return {"dim": getattr(self.encoder, "dim", None), "device": self.device, "pid": os.getpid()}

    def encode(self, key: str, job: tuple, shard_no: int, texts: list[str]) -> tuple:
        """(shard_no, local row indices, vectors | sparse rows, new batch records, new OOM events, pid)."""
        self.load(key, job)
        before = self._marks()
        idx_parts, payload = [], []
        for batch in self.encoder.encode(texts):
            idx_parts.append(np.asarray(batch.rows, dtype=np.int64))
            if self.kind == "dense":
                payload.append(np.asarray(batch.dense, dtype=np.float32))
            else:
                payload.extend(batch.lexical)
        idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, dtype=np.int64)
        if self.kind == "dense":
            payload = np.concatenate(payload) if payload else np.zeros((0, self.encoder.dim), dtype=np.float32)
        # Only this shard's batch records travel back: a restarted worker has lost the earlier ones.
        batches, ooms = self._since(before)
        return shard_no, idx, payload, batches, ooms, os.getpid()

    def stats(self, key: str):
        return getattr(self.encoder, "stats", None) if self.key == key else None

    def release(self, key: str | None) -> None:
        """Close the model (frees its device memory) if this worker holds it; the process stays warm."""
        if key is not None and self.key == key and self.encoder is not None:
            try:
                self.encoder.close()
            finally:
                self.key, self.kind, self.encoder = None, None, None

    def _marks(self) -> tuple[int, int]:
        stats = getattr(self.encoder, "stats", None)
        return len(getattr(stats, "batches", None) or ()), len(getattr(stats, "oom_mitigations", None) or ())

    def _since(self, marks: tuple[int, int]) -> tuple[list, list]:
        stats = getattr(self.encoder, "stats", None)
        return (list((getattr(stats, "batches", None) or [])[marks[0]:]),
                list((getattr(stats, "oom_mitigations", None) or [])[marks[1]:]))


# Warm workers of this driver, per (Ray job, GPU or not, restart policy): starting a worker costs
# seconds to tens of seconds (imports, CUDA context), so the models of an ensemble reuse the same ones.
_POOLS: dict[tuple, list] = {}


def worker_pool(ray, n: int, use_gpu: bool) -> list:
    """At least `n` live workers (started as needed); the first `n` are returned."""
    key = (ray.get_runtime_context().get_job_id(), use_gpu, MAX_RESTARTS, MAX_TASK_RETRIES)
    for stale in [k for k in _POOLS if k[0] != key[0]]:   # handles of an earlier connection are dead
        del _POOLS[stale]
    pool = _POOLS.setdefault(key, [])
    if len(pool) < n:
        remote_cls = ray.remote(_Worker).options(
            num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
            runtime_env={"env_vars": _forwarded_env()} if _forwarded_env() else None)
        pool += [remote_cls.remote() for _ in range(n - len(pool))]
    return pool[:n]


def _forget_worker(actor) -> None:
    for pool in _POOLS.values():
        if actor in pool:
            pool.remove(actor)


def shutdown_workers() -> None:
    """End every warm worker of this driver (they also end with the driver or ray.shutdown())."""
    ray = import_ray()
    if ray.is_initialized():  # after ray.shutdown() the handles are dead already: just forget them
        for pool in _POOLS.values():
            for actor in pool:
                ray.kill(actor, no_restart=True)
    _POOLS.clear()


def length_sorted_shards(texts: Sequence[str], shard_rows: int) -> list[np.ndarray]:
    """Positions of `texts`, longest first, cut into shards of at most `shard_rows` (see module doc)."""
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + shard_rows] for i in range(0, len(order), max(1, int(shard_rows)))]


class RayShardedEncoder:
    """A dense or sparse encoder whose `encode` runs on Ray workers (the same interface as a local one).

    `loader(spec, device, **loader_kwargs)` builds each worker's encoder; default: the public factory.
    """

    def __init__(self, kind: str, spec: ModelSpec, plan: RayPlan, *, loader: Callable | None = None,
                 **loader_kwargs: Any):
        if kind not in ("dense", "sparse"):
            raise ValueError(f"kind must be 'dense' or 'sparse', got {kind!r}")
        self.kind, self.spec, self.plan = kind, spec, plan
        self.heads = ("dense",) if kind == "dense" else ("lexical",)
        self._ray = ray = connect(plan)
        self._key = f"{spec.name}/{uuid.uuid4().hex}"
        self._job = ray.put((kind, spec, loader, loader_kwargs))   # shipped once, named by every shard
        self._batches: list = []
        self._ooms: list = []
        self._wall = 0.0
        self.shard_workers: list[tuple[int, int]] = []   # (shard_no, pid of the worker process that encoded it)
        self._actors = list(worker_pool(ray, self._room(), self._use_gpu))
        try:
            # Every worker loads the model now, in parallel: load errors surface here, and `dim` is known.
            infos = ray.get([a.load.remote(self._key, self._job) for a in self._actors])
        except ray.exceptions.RayActorError as exc:
            self.close()
            raise RayEncodeError(f"model {spec.name}: Ray workers could not start: {exc}") from exc
        except Exception:
            self.close()
            raise
        self.devices = [i["device"] for i in infos]
        self.actor_pids = [i["pid"] for i in infos]
        self.dim = infos[0]["dim"]
        log.info("model %s: %d Ray workers on %s", spec.name, len(self._actors), ",".join(self.devices))

    def _room(self) -> int:
        resources = self._ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        self._use_gpu = gpus >= 1
        # Never ask for more workers than the cluster can place: an unplaceable actor would wait forever.
        room = min(gpus, cpus) if self._use_gpu else cpus
        n = min(self.plan.actors, room)
        if n < 1:
            raise RayEncodeError(f"model {self.spec.name}: the Ray cluster at {self.plan.address} has no room for a "
                                 f"worker (resources {resources}); each needs 1 CPU{' and 1 GPU' if self._use_gpu else ''}")
        if n < self.plan.actors:
            log.warning("ray_actors=%d but the cluster has room for %d (CPU=%d, GPU=%d): using %d",
                        self.plan.actors, room, cpus, gpus, n)
        return n

    def encode(self, rows: TokenSource | Sequence[str]) -> Iterator[Encoded]:
        """One Encoded per shard (rows: indices into `rows`; the dense or the lexical head), as shards finish."""
        ray = self._ray
        texts = list(TokenSource.of(rows).texts)
        shards = length_sorted_shards(texts, self.plan.shard_rows)
        queue = deque(range(len(shards)))
        pending: dict = {}                      # object ref -> (shard_no, actor)
        load = {id(a): 0 for a in self._actors}
        resubmits = [0] * len(shards)
        t0 = time.perf_counter()
        try:
            while queue or pending:
                for actor in self._actors:
                    while queue and load[id(actor)] < IN_FLIGHT_PER_ACTOR:
                        shard_no = queue.popleft()
                        texts_of = [texts[i] for i in shards[shard_no]]
                        pending[actor.encode.remote(self._key, self._job, shard_no, texts_of)] = (shard_no, actor)
                        load[id(actor)] += 1
                [ref], _ = ray.wait(list(pending), num_returns=1)
                shard_no, actor = pending.pop(ref)
                load[id(actor)] -= 1
                try:
                    _, idx, payload, batches, ooms, pid = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    self._resubmit(actor, shard_no, resubmits, exc)
                    queue.appendleft(shard_no)
                    continue
                self._batches += batches
                self._ooms += ooms
                self.shard_workers.append((shard_no, pid))
                yield Encoded(shards[shard_no][idx], **{self.heads[0]: payload})
        finally:
            self._wall += time.perf_counter() - t0
            for ref in pending:  # the consumer stopped early (an error downstream): drop queued work
                ray.cancel(ref)

    def _resubmit(self, actor, shard_no: int, resubmits: list[int], exc: Exception) -> None:
        """A shard's worker failed past Ray's own retries: the shard goes to a worker still alive.
        A worker that died for good (restarts spent, or killed) leaves the pool; an unavailable one stays."""
        resubmits[shard_no] += 1
        if not isinstance(exc, self._ray.exceptions.ActorUnavailableError) and actor in self._actors:
            self._actors.remove(actor)
            _forget_worker(actor)
        log.warning("model %s: shard %d resubmitted after %s; %d workers left",
                    self.spec.name, shard_no, type(exc).__name__, len(self._actors))
        if not self._actors or resubmits[shard_no] > MAX_SHARD_RESUBMITS:
            raise RayEncodeError(f"model {self.spec.name}: shard {shard_no} could not be encoded on Ray "
                                 f"({len(self._actors)} workers left, {resubmits[shard_no]} resubmits): {exc}") from exc

    @property
    def stats(self):
        """One worker's stats (load time, dtype, token budget) with every shard's batches and OOM events,
        the driver's wall time and a device naming the pool."""
        if not self._actors:
            return None
        template = self._ray.get(self._actors[0].stats.remote(self._key))
        device = f"ray[{len(self._actors)} actors]:{','.join(sorted(set(self.devices)))}"
        try:
            return dataclasses.replace(template, batches=list(self._batches), oom_mitigations=list(self._ooms),
                                       wall_seconds=self._wall, device=device)
        except (TypeError, ValueError):  # stats of another shape: report them as the worker has them
            return template

    def close(self) -> None:
        """Release the model on every worker (encoder.close: frees device memory); the workers stay warm."""
        ray, actors, self._actors = self._ray, list(getattr(self, "_actors", [])), []
        if actors:
            try:
                ray.get([a.release.remote(self._key) for a in actors], timeout=120)
            except Exception as exc:  # a dead or stuck worker: end it, that frees its memory all the same
                log.warning("model %s: releasing the model on Ray workers failed (%s); ending them", self.spec.name, exc)
                for actor in actors:
                    _forget_worker(actor)
                    ray.kill(actor, no_restart=True)


def ray_dense_encoder(spec: ModelSpec, plan: RayPlan, **kwargs) -> RayShardedEncoder:
    """Like load_dense_encoder, on Ray. kwargs: budget_store, token_budget, loader."""
    return RayShardedEncoder("dense", spec, plan, **kwargs)


def ray_sparse_encoder(spec: ModelSpec, plan: RayPlan, **kwargs) -> RayShardedEncoder:
    """Like load_sparse_encoder, on Ray. kwargs: budget_store, token_budget, loader."""
    return RayShardedEncoder("sparse", spec, plan, **kwargs)


def _encode_sharded(kind: str, spec: ModelSpec, texts: Sequence[str], plan: RayPlan, **kwargs) -> Iterator:
    encoder = RayShardedEncoder(kind, spec, plan, **kwargs)
    try:
        yield from encoder.encode(texts)
    finally:
        encoder.close()


def encode_dense_sharded(spec: ModelSpec, texts: Sequence[str], plan: RayPlan, **kwargs) -> Iterator[Encoded]:
    """Encoded batches (the dense head) of `texts`, encoded on Ray; the actors end when the iterator does."""
    return _encode_sharded("dense", spec, texts, plan, **kwargs)


def encode_sparse_sharded(spec: ModelSpec, texts: Sequence[str], plan: RayPlan, **kwargs) -> Iterator[Encoded]:
    """Encoded batches (the lexical head) of `texts`, encoded on Ray."""
    return _encode_sharded("sparse", spec, texts, plan, **kwargs)
