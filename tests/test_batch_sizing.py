"""What the batch job chooses by itself from the cluster's resources and the model's cost, and how
each flag overrides its part (serving/batch/sizing.py). No Ray: the choice is a pure function."""

from __future__ import annotations

import pytest
import torch

from serving.batch.sizing import (
    ModelCost,
    Resources,
    choose,
    driver_takes_every_job,
    in_driver,
    probe_seconds_per_item,
    runs_in_driver,
)
from tokenizers_svc.errors import ConfigError
from tokenizers_svc.loading import load_tokenizer

GB = 1e9
DEFAULT_AT_256 = ModelCost(seconds=0.27, pixels=256 * 341, params=6_747_927)  # tsvc-image-f8c4, measured
LARGE_FULL_SIZE = ModelCost(seconds=20.0, pixels=600_000, params=83_653_863)  # sd-vae-ft-mse on photos
SMALL_AT_64 = ModelCost(seconds=0.017, pixels=64 * 64, params=6_747_927)  # the image default at 64^2


def test_cpus_only_every_core_runs_the_model_and_decodes_its_own_inputs():
    """The issue's 2-CPU machine: was one actor with one thread (0.44x a plain loop)."""
    size = choose(Resources(cpus=2, gpus=0, memory=8 * GB), DEFAULT_AT_256, pending=500)
    assert (size.workers, size.torch_threads, size.cpus_per_worker) == (2, 1, 1.0)
    assert size.decode_tasks == 0 and size.gpus_per_worker == 0
    # a second of model work would be floor(1 / 0.27) = 3 items, but one 256x341 item is already
    # more than CPU_CALL_PIXELS: larger calls cost more per item on CPUs
    assert size.batch_size == 1
    assert "every core runs the model" in size.describe()


def test_cpu_calls_hold_a_second_of_work_and_no_more_pixels_than_one_256_image():
    resources = Resources(cpus=2, gpus=0, memory=8 * GB)
    assert choose(resources, SMALL_AT_64, pending=500).batch_size == 16  # 65536 // 4096, not 58 (1 s)
    slow_small = ModelCost(seconds=0.5, pixels=64 * 64, params=6_747_927)
    assert choose(resources, slow_small, pending=500).batch_size == 2  # floor(1 / 0.5): a second's work
    assert choose(resources, SMALL_AT_64, pending=500, batch_size=64).batch_size == 64  # the flag wins


def test_gpus_get_one_actor_each_and_the_other_cpus_decode():
    size = choose(Resources(cpus=16, gpus=2, memory=100 * GB), DEFAULT_AT_256, pending=10_000)
    assert (size.workers, size.gpus_per_worker, size.cpus_per_worker) == (2, 1.0, 1.0)
    assert (size.decode_tasks, size.cpus_per_decode_task, size.batch_size) == (14, 1.0, 32)
    assert size.workers * size.cpus_per_worker + size.decode_tasks * size.cpus_per_decode_task <= 16


def test_memory_limits_model_copies_and_widens_them():
    """64 cores but memory for 5 copies of a large model on full-size photos: 5 actors, 12 threads."""
    size = choose(Resources(cpus=64, gpus=0, memory=16 * GB), LARGE_FULL_SIZE, pending=1000)
    per_actor = LARGE_FULL_SIZE.actor_bytes(1)
    assert size.batch_size == 1 and size.workers == int(0.7 * 16 * GB // per_actor) == 5
    assert size.torch_threads == 64 // 5 and "memory for 5 model copies" in size.why


def test_no_more_actors_than_work():
    size = choose(Resources(cpus=16, gpus=0, memory=100 * GB), DEFAULT_AT_256, pending=3)
    assert (size.workers, size.batch_size, size.torch_threads) == (3, 1, 5)


def test_flags_override_their_part_and_decode_tasks_keep_cpus():
    """--workers 2 --cpus-per-worker 2 --decode-tasks 1 on 2 CPUs would leave the decode task no
    CPU (the job would wait forever): the actors' Ray CPUs shrink, their torch threads stay."""
    size = choose(
        Resources(cpus=2, gpus=0, memory=8 * GB),
        DEFAULT_AT_256,
        pending=500,
        workers=2,
        cpus_per_worker=2,
        decode_tasks=1,
        batch_size=8,
    )
    assert (size.workers, size.torch_threads, size.batch_size) == (2, 2, 8)
    assert size.cpus_per_worker == 0.5 and (size.decode_tasks, size.cpus_per_decode_task) == (1, 1.0)
    assert "would leave the decode tasks none" in size.why
    gpu = choose(
        Resources(cpus=8, gpus=4, memory=64 * GB), DEFAULT_AT_256, 100, gpus_per_worker=2, decode_tasks=0
    )
    assert (gpu.workers, gpu.gpus_per_worker, gpu.decode_tasks) == (2, 2.0, 0)


def test_jobs_on_this_machine_run_in_the_driver_while_it_has_a_thread_per_core():
    """Up to MAX_DRIVER_THREADS cores the driver takes every job on this machine alone; past
    that, short jobs (below) run in it and long ones on Ray's actors."""
    assert driver_takes_every_job(1) and driver_takes_every_job(2) and driver_takes_every_job(8)
    assert not driver_takes_every_job(9) and not driver_takes_every_job(64)


def test_short_jobs_run_in_the_driver_and_long_ones_on_ray():
    """On more cores than the driver's threads: the pool's ~6 s start against the job's time on
    the driver's threads (end-to-end CPU-s per item, measured by the driver): the pool when its
    start costs under 5% of the job."""
    assert runs_in_driver(0.045, 500, 2)  # batch_bench's decode-bound case: ~11 s, the start ~half
    assert runs_in_driver(0.27, 500, 2)  # model-bound: ~68 s, the start ~9%
    assert not runs_in_driver(0.27, 2000, 2)  # ~4.5 min: the start ~2%
    assert not runs_in_driver(0.045, 10_000, 2) and runs_in_driver(0.045, 10_000, 8)
    size = in_driver(DEFAULT_AT_256, 500, 2, None, "short")
    assert (size.engine, size.workers, size.driver_threads, size.torch_threads) == ("driver", 0, 2, 1)
    assert size.batch_size == 1 and size.describe().startswith("in this process: 2 threads x 1 torch thread")
    assert in_driver(SMALL_AT_64, 500, 2, None, "").batch_size == 16
    assert in_driver(SMALL_AT_64, 3, 2, None, "").batch_size == 2  # ceil(3 / 2): both threads get work
    assert in_driver(DEFAULT_AT_256, 500, 2, 7, "").batch_size == 7  # --batch-size wins


def test_impossible_resources_are_config_errors():
    with pytest.raises(ConfigError, match="has 0 GPUs"):
        choose(Resources(cpus=2, gpus=0, memory=8 * GB), DEFAULT_AT_256, 10, gpus_per_worker=1)
    with pytest.raises(ConfigError, match="no CPUs"):
        choose(Resources(cpus=0, gpus=1, memory=8 * GB), DEFAULT_AT_256, 10)


def test_probe_measures_the_model_at_one_thread_and_restores_threads():
    tokenizer = load_tokenizer("sd-vae-tiny")
    threads = torch.get_num_threads()
    small = probe_seconds_per_item(tokenizer, (1, 3, 64, 64))  # probed at its own size
    large = probe_seconds_per_item(tokenizer, (1, 3, 480, 640))  # probed at ~128^2, scaled up
    assert torch.get_num_threads() == threads
    assert 0 < small < large
