"""How big the job's stages are, chosen from the cluster's resources and the model's measured cost.

With no tuning flags the job sizes itself (docs/batch.md, "What the job chooses by itself"):

- **On this machine alone, jobs run in the driver** (:func:`driver_takes_every_job`): with a
  thread for every core (up to :data:`MAX_DRIVER_THREADS` cores), the driver, which already holds
  the model, encodes with one thread per core at one torch thread each (:func:`in_driver`), and Ray
  is not started. An actor pool there costs its start (:data:`POOL_START_S`: each actor is a fresh
  process that imports torch, diffusers and Ray Data and loads the model) and is slower once it
  runs: Ray Data's executor and Ray's own processes take cores the model would use, and each actor
  traces its own graphs. On more cores than that, a job runs in the driver only while the pool's
  start would cost more than MAX_START_SHARE of it (:func:`runs_in_driver`). Only on CPUs, for
  images; any actor flag asks for the pool.
- **CPUs only**: every core runs the model. One encoder actor per CPU, each with one torch thread,
  decoding its own inputs (``decode_tasks = 0``): a core that decodes and then encodes is never
  idle, pixels never leave the process, and several single-threaded model copies scale better
  than one copy with many threads (intra-op threading loses to data parallelism on small inputs).
  Fewer, wider actors only when memory cannot hold one model copy per core.
- **GPUs**: one encoder actor per GPU (one CPU each, to feed it), and every other CPU decodes in
  Ray Data tasks ahead of the actors, since a GPU encodes faster than one core decodes.
- **Batch size**: on CPUs, about :data:`TARGET_BATCH_S` of model work per encoder call, from the
  model's cost measured on the driver (:func:`probe_seconds_per_item`), and no more than
  :data:`CPU_CALL_PIXELS` pixels: the first rows come within seconds, the per-call overhead stays
  small, and no call is so large that each of its items costs more; on GPUs :data:`GPU_BATCH_SIZE`.

Each flag (``--workers``, ``--cpus-per-worker``, ``--num-gpus-per-worker``, ``--decode-tasks``,
``--batch-size``) overrides its part; the rest is still derived. Whatever is chosen, the actors'
Ray CPUs leave room for the decode tasks, else no task could run and the job would wait forever.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from tokenizers_svc.errors import ConfigError

TARGET_BATCH_S = 1.0  # CPU-seconds of model work per encoder call, at one torch thread
MAX_CPU_BATCH = 32
# Pixels per encoder call on CPUs at most (summed over the call's items and frames): one 256² image.
# On CPUs a conv VAE's cost per item grows with the batch once a call's activations outgrow the
# caches and the C heap's reuse (a thread's arena maps and unmaps heaps of 64 MiB at most). Measured
# on the 2-core machine, the image default on 256² photo crops, two threads side by side at one torch
# thread each (the driver engine there): 20.3 / 17.7 / 14.8 items/s in calls of 1 / 2 / 5 images
# with the job's heap settings (20.3 / 20.0 / 19.0 / 12.1 at 1 / 2 / 3 / 5 with the earlier ones);
# a 200-photo job at --crop center 256, 16.3 items/s at batch 1 against 12.6 at 5
# (docs/benchmarks.md, "Batch", session 22). The server caps its CPU batches of this model at the
# same 65536 pixels (serving/config.yaml).
CPU_CALL_PIXELS = 256 * 256
GPU_BATCH_SIZE = 32
PROBE_PIXELS = 128 * 128  # the probe encodes the planned item shrunk to about this many pixels
ACTOR_BASE_BYTES = 1.0e9  # a Ray worker with torch and the library imported, before any model
ACTIVATION_BYTES_PER_PIXEL = 1024  # a conv VAE's peak activations per input pixel, float32
MEMORY_SHARE = 0.7  # of Ray's memory resource the encoder actors may plan to use
# Seconds from the pipeline's start to the encoder actors' first rows: each actor is a fresh
# process that imports torch (~1 CPU-s), Ray Data (~0.5) and diffusers (~2) and loads the model,
# beside Ray Data's own helper actors; 6-8 s measured on the 2-core machine (docs/benchmarks.md).
POOL_START_S = 6.0
# Past MAX_DRIVER_THREADS cores the driver's threads leave cores idle, and a job runs in the driver
# only while the pool's start would cost more than this share of it, i.e. while the pool could not
# reach 0.95x the driver, the bar this project sets its engine (jobs of up to POOL_START_S /
# MAX_START_SHARE seconds in the driver); longer ones go to Ray Data, where the start is amortized.
MAX_START_SHARE = 0.05
# Threads the driver encodes with, at most: every batch also runs some Python (rows, Arrow,
# serialization, the eager model calls between ops) under one interpreter lock, which more threads
# would queue on; past this many cores Ray's processes scale where threads would not. Measured on
# the 2-core machine (py-spy --gil over driver jobs, docs/benchmarks.md, "Batch", sessions 23, 26
# and 27): each thread held the lock ~3% of its time with the default model at 256, so eight would
# hold it ~25%, but ~15% on a decode-bound job (a tiny model on full-size photos), more than all of
# it for eight: there the cap is likely too high, unmeasured for want of a machine with 3-8 cores
# (docs/batch.md).
MAX_DRIVER_THREADS = 8


@dataclass(frozen=True)
class Resources:
    """What the Ray cluster offers the job (``ray.cluster_resources()``)."""

    cpus: float
    gpus: float
    memory: float  # bytes: Ray's "memory" resource (what tasks and actors may use)

    @classmethod
    def of_cluster(cls) -> Resources:
        import ray

        total = ray.cluster_resources()
        return cls(cpus=total.get("CPU", 0.0), gpus=total.get("GPU", 0.0), memory=total.get("memory", 0.0))


@dataclass(frozen=True)
class ModelCost:
    """One item's model work, as the sizing sees it."""

    seconds: float  # CPU-seconds per item at one torch thread (measured on the driver)
    pixels: int  # pixels per item after the resize or crop (all frames of a clip)
    params: int  # parameters of the model

    def actor_bytes(self, batch_size: int) -> float:
        """A rough upper estimate of one encoder actor's memory: worker, float32 weights, activations."""
        return ACTOR_BASE_BYTES + 4 * self.params + ACTIVATION_BYTES_PER_PIXEL * self.pixels * batch_size


@dataclass(frozen=True)
class JobSize:
    """The job's stages: encoder actors, their Ray CPUs/GPUs and torch threads, decode tasks (0:
    each actor decodes its own inputs), rows per encoder call, and why. ``engine`` "driver": no
    actors, ``driver_threads`` threads of this process decode and encode (:func:`in_driver`)."""

    workers: int
    torch_threads: int
    cpus_per_worker: float
    gpus_per_worker: float
    decode_tasks: int
    cpus_per_decode_task: float
    batch_size: int
    why: str
    engine: str = "ray"  # or "driver"
    driver_threads: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.engine == "driver":
            return (
                f"in this process: {self.driver_threads} threads x {self.torch_threads} torch thread, "
                f"batch {self.batch_size}: {self.why}"
            )
        decode = (
            "decoding in the actors"
            if self.decode_tasks == 0
            else f"{self.decode_tasks} decode tasks x {self.cpus_per_decode_task:.3g} CPU"
        )
        gpus = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return (
            f"{self.workers} encoder actors x {self.torch_threads} torch threads ({self.cpus_per_worker:.3g} "
            f"CPU{gpus} each), {decode}, batch {self.batch_size}: {self.why}"
        )


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block at ``count`` torch threads, then restore the process's count (measuring at one
    thread, or encoding beside other threads)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cpu_batch_size(cost: ModelCost, threads: int, pending: int, callers: int) -> int:
    """Rows per encoder call on CPUs: about TARGET_BATCH_S of model work at ``threads`` torch
    threads, no more than CPU_CALL_PIXELS pixels (at least one row) and MAX_CPU_BATCH rows, and no
    more than each of ``callers`` gets of ``pending``."""
    per_call = math.floor(TARGET_BATCH_S * threads / cost.seconds)
    by_pixels = CPU_CALL_PIXELS // max(1, cost.pixels)
    return max(1, min(per_call, by_pixels, MAX_CPU_BATCH, math.ceil(pending / callers)))


def probe_seconds_per_item(tokenizer, item_shape: tuple[int, ...]) -> float:
    """CPU-seconds one item of ``item_shape`` (1, 3, [T,] H, W) costs the model at one torch thread,
    measured on this machine: the item shrunk to about PROBE_PIXELS per frame, encoded twice (the
    first call pays one-time set-up), and scaled up by the pixel count (conv work grows linearly)."""
    *lead, height, width = item_shape
    scale = min(1.0, math.sqrt(PROBE_PIXELS / (height * width)))
    multiple = tokenizer.spec.multiple
    probe = [max(multiple, round(side * scale / multiple) * multiple) for side in (height, width)]
    pixels = torch.zeros(*lead, *probe)  # float [-1, 1]: mid grey
    with torch_threads(1):
        tokenizer.encode(pixels)
        started = time.thread_time()
        tokenizer.encode(pixels)
        seconds = time.thread_time() - started
    return seconds * (height * width) / (probe[0] * probe[1])


def driver_takes_every_job(cores: int) -> bool:
    """Whether a job on a machine of ``cores`` cores, alone in its cluster, runs in the driver
    whatever its length: while the driver has a thread for every core. There the actor pool is
    slower even once it runs. Measured on the 2-core machine, the image default at 256, 700 photos,
    the two engines alternated, rows per second once both ran (docs/benchmarks.md, "Batch", session
    23): the driver's two threads 11.2 / 10.4, two encoder actors 8.8 / 8.7. The actors used 1.80
    of the 2 cores and ~15% more CPU per row; Ray Data's executor in the driver and Ray's own
    processes took ~0.15 of a core."""
    return cores <= MAX_DRIVER_THREADS


def runs_in_driver(item_seconds: float, pending: int, threads: int) -> bool:
    """Whether ``pending`` items of ``item_seconds`` CPU-seconds each (decode and model, one torch
    thread) on the driver's ``threads`` make a job short enough that an actor pool's start
    (POOL_START_S) would cost more than MAX_START_SHARE of it."""
    return MAX_START_SHARE * pending * item_seconds / max(1, threads) < POOL_START_S


def in_driver(cost: ModelCost, pending: int, threads: int, batch_size: int | None, why: str) -> JobSize:
    """The job run in the driver: ``threads`` threads, each encoding a batch at one torch thread
    (they share the model; torch and the image decoders release the GIL), about TARGET_BATCH_S of
    model work per call and no more than each thread's share, so that all of them work."""
    return JobSize(
        workers=0,
        torch_threads=1,
        cpus_per_worker=0.0,
        gpus_per_worker=0.0,
        decode_tasks=0,
        cpus_per_decode_task=0.0,
        batch_size=batch_size or _cpu_batch_size(cost, 1, pending, threads),
        why=why,
        engine="driver",
        driver_threads=threads,
    )


def choose(
    resources: Resources,
    cost: ModelCost,
    pending: int,
    *,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    decode_tasks: int | None = None,
    batch_size: int | None = None,
) -> JobSize:
    """The job's size for ``pending`` inputs on ``resources``; each argument given (a flag) wins."""
    if resources.cpus <= 0:
        raise ConfigError("the Ray cluster has no CPUs; the job's decoding needs some", param="workers")
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if resources.gpus >= 1 else 0.0
    if gpus_per_worker < 0 or gpus_per_worker > resources.gpus:
        raise ConfigError(
            f"--num-gpus-per-worker {gpus_per_worker:g} but the Ray cluster has {resources.gpus:g} GPUs",
            param="num_gpus_per_worker",
        )
    if gpus_per_worker > 0:
        return _on_gpus(resources, workers, cpus_per_worker, gpus_per_worker, decode_tasks, batch_size)
    return _on_cpus(resources, cost, pending, workers, cpus_per_worker, decode_tasks, batch_size)


def _on_gpus(
    resources: Resources,
    workers: int | None,
    cpus_per_worker: float | None,
    gpus_per_worker: float,
    decode_tasks: int | None,
    batch_size: int | None,
) -> JobSize:
    workers = workers or max(1, math.floor(resources.gpus / gpus_per_worker + 1e-9))
    cpus_per_worker = cpus_per_worker or min(1.0, resources.cpus / (2 * workers))
    left = resources.cpus - workers * cpus_per_worker
    if decode_tasks is None:
        decode_tasks = max(1, math.floor(left))
    batch_size = batch_size or GPU_BATCH_SIZE
    why = (
        f"{resources.gpus:g} GPUs: one actor per {gpus_per_worker:g} GPU, the other "
        f"{max(left, 0):g} CPUs decode ahead of them"
    )
    return _fitted(resources, workers, cpus_per_worker, gpus_per_worker, decode_tasks, batch_size, why, None)


def _on_cpus(
    resources: Resources,
    cost: ModelCost,
    pending: int,
    workers: int | None,
    cpus_per_worker: float | None,
    decode_tasks: int | None,
    batch_size: int | None,
) -> JobSize:
    cores = max(1, math.floor(resources.cpus))
    threads = max(1, round(cpus_per_worker)) if cpus_per_worker else None
    reasons = [f"{resources.cpus:g} CPUs, model {cost.seconds:.3g} CPU-s per item"]
    automatic = workers is None
    if automatic:
        workers = max(1, min(cores // (threads or 1), pending))
    if batch_size is None:
        batch_size = _cpu_batch_size(cost, threads or 1, pending, workers)
    if automatic:
        by_memory = max(1, math.floor(MEMORY_SHARE * resources.memory / cost.actor_bytes(batch_size)))
        if by_memory < workers:
            workers = by_memory
            reasons.append(f"memory for {by_memory} model copies")
    if decode_tasks is None:
        decode_tasks = 0
        reasons.append("each actor decodes its own inputs, so every core runs the model")
    threads = threads or max(1, cores // workers)
    cpus_per_worker = cpus_per_worker or resources.cpus / workers
    return _fitted(
        resources, workers, cpus_per_worker, 0.0, decode_tasks, batch_size, "; ".join(reasons), threads
    )


def _fitted(
    resources: Resources,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    decode_tasks: int,
    batch_size: int,
    why: str,
    threads: int | None,
) -> JobSize:
    """The size with the actors' Ray CPUs scaled down, if need be, so that the decode tasks (when
    any) keep CPUs to run on: one CPU each at most, and half the cluster for all of them at most."""
    decode_cpus = min(float(decode_tasks), resources.cpus / 2) if decode_tasks else 0.0
    budget = resources.cpus - decode_cpus
    fitted = min(cpus_per_worker, budget / workers)
    if fitted < cpus_per_worker:
        why += (
            f"; {workers} actors x {cpus_per_worker:g} CPUs would leave the decode tasks none: "
            f"{fitted:.3g} Ray CPUs each (torch threads unchanged)"
        )
    left = resources.cpus - workers * fitted
    per_task = min(1.0, left / decode_tasks) if decode_tasks else 0.0
    return JobSize(
        workers=workers,
        torch_threads=threads or max(1, round(cpus_per_worker)),
        cpus_per_worker=fitted,
        gpus_per_worker=gpus_per_worker,
        decode_tasks=decode_tasks,
        cpus_per_decode_task=per_task,
        batch_size=batch_size,
        why=why,
    )
