"""The streaming evaluation engine: shards of items are reconstructed by every model, scored, and
dropped; only sufficient statistics (evals/stats.py), the first K sample items and items.csv rows remain.
This module runs the shards; the parts are their own modules: :mod:`evals.accumulator` (the
statistics), :mod:`evals.scorer` (models, baselines, metrics), :mod:`evals.checkpoint` (resume), and
the library's :class:`~tokenizers_svc.progress.Progress`.

One process: a DataLoader with workers decodes and crops; the main process runs models, bicubic baselines,
metrics and Inception on ``device``. With Ray (``--ray``): actors (a ``ray.util.ActorPool``) score whole
shards and return their statistics, which the driver sums (local Ray by default, the cluster named by
``RAY_ADDRESS`` otherwise).
Both write the same checkpoint after every finished shard (statistics, done shard ids, items.csv size),
so an interrupted run resumes without recomputing done shards.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from evals import image_metrics, sources, stats
from evals.accumulator import REFERENCE, Accumulator, EvalConfig
from evals.checkpoint import Checkpoint
from evals.scorer import Scorer
from tokenizers_svc.progress import Progress

log = logging.getLogger("evals")

PROGRESS_INTERVAL_S = 30.0  # a log line at most this often when stderr is not a terminal


def evaluate(
    config: EvalConfig,
    shards: list[sources.Shard],
    out: Path,
    run_key: str,
    reference: stats.StreamStats | None,
    resume: bool = False,
    workers: int = 2,
    ray_actors: int | None = None,
    entries_per_chunk: int = 1,
) -> tuple[Accumulator, list[str]]:
    """Score every shard not yet done; -> (statistics of all shards, items.csv columns).

    ``reference``: cached reference statistics (then the originals' Inception pass is skipped).
    ``ray_actors``: score shards with that many Ray actors instead of in this process.
    """
    scorer = Scorer(config) if ray_actors is None else None
    columns = scorer.columns() if scorer else _columns(config)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(out, run_key, columns)
    device = torch.device(config.device) if scorer else torch.device("cpu")
    loaded = checkpoint.load(config, device) if resume else None
    if loaded is None:
        checkpoint.start()
        totals, done = Accumulator(config, device), set()
    else:
        totals, done = loaded
        log.info("eval: resuming with %d of %d shards done", len(done), len(shards))
    pending = [shard for shard in shards if shard.index not in done]
    progress = Progress(
        "eval",
        sum(len(s.entries) for s in shards),
        "file",
        interval_s=PROGRESS_INTERVAL_S,
        initial=sum(len(s.entries) for s in shards if s.index in done),
        also="item",
    )
    with_reference = reference is None
    if ray_actors is None:
        _run_local(
            scorer, pending, totals, done, checkpoint, progress, with_reference, workers, entries_per_chunk
        )
    else:
        _run_ray(
            config, pending, totals, done, checkpoint, progress, with_reference, ray_actors, entries_per_chunk
        )
    progress.close()
    if reference is not None:
        totals.streams[REFERENCE] = reference
    return totals, columns


def _columns(config: EvalConfig) -> list[str]:
    names = ["psnr", "ssim"] + ["lpips"] * image_metrics.Lpips.load().available
    return sorted(names + ["temporal_diff_psnr"] * (config.spec.kind == "video"))


def _run_local(
    scorer, pending, totals, done, checkpoint, progress, with_reference, workers, per_chunk
) -> None:
    stream = sources.ItemStream(pending, scorer.config.spec, per_chunk)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    rows: list[list[str]] = []
    position = 0  # items of the current shard so far (chunks arrive in order)
    for chunk in loader:
        rows += scorer.score_chunk(chunk, totals, with_reference, position)
        position += len(chunk["names"])
        progress.update(chunk["entries"], also=len(chunk["names"]))
        if chunk["last"]:
            done.add(chunk["shard"])
            checkpoint.save(totals, done, rows)
            rows, position = [], 0


class ShardWorker:
    """A Ray actor: one Scorer, whole shards in, their statistics and items.csv rows out."""

    def __init__(self, config: EvalConfig, torch_threads: int) -> None:
        logging.basicConfig(level=logging.WARNING)
        # the driver's thread count, not Ray's one per CPU: float results of the model and the
        # metrics depend on it, and a sharded run must equal the single-process one
        torch.set_num_threads(torch_threads)
        self.scorer = Scorer(config)

    def score_shard(self, shard: sources.Shard, with_reference: bool, per_chunk: int):
        acc = self.scorer.new_accumulator()
        rows: list[list[str]] = []
        position = 0
        for chunk in sources.ItemStream([shard], self.scorer.config.spec, per_chunk):
            rows += self.scorer.score_chunk(chunk, acc, with_reference, position)
            position += len(chunk["names"])
        return shard.index, acc.state(), rows, len(shard.entries), position


def _run_ray(config, pending, totals, done, checkpoint, progress, with_reference, actors, per_chunk) -> None:
    """Shards to Ray actors (one in flight per actor); the driver sums their statistics as they finish."""
    import ray
    from ray.util import ActorPool

    from tokenizers_svc.ray_cluster import init_ray

    address = os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        init_ray(address=address, **({} if address else {"num_cpus": actors}), log_to_driver=False)
    gpus = 1 if torch.device(config.device).type == "cuda" else 0
    worker_class = ray.remote(num_cpus=1, num_gpus=gpus)(ShardWorker)
    threads = torch.get_num_threads()
    workers = [worker_class.remote(config, threads) for _ in range(min(actors, max(len(pending), 1)))]
    pool = ActorPool(workers)  # one shard in flight per actor, results as they finish

    def submit(worker, shard: sources.Shard):
        return worker.score_shard.remote(shard, with_reference, per_chunk)

    for index, state, rows, entries, items in pool.map_unordered(submit, pending):
        totals.merge(Accumulator.from_state(state, config, totals.device))
        done.add(index)
        checkpoint.save(totals, done, rows)
        progress.update(entries, also=items)
    for worker in workers:
        ray.kill(worker)
    if started_here:
        ray.shutdown()
