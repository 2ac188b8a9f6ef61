"""``--max-seconds``: a budget in seconds turned into steps before the run's optimizer exists.

The learning-rate schedule must know the run's length before the first step, so a few steps
are timed first, on the run's own batches with a throwaway optimizer; the weights and the
sampler are put back afterwards. The seconds include compiling the step. With several
processes, every rank takes the mean of their timings, so all fit the same steps.
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

from .. import distributed
from ..sampler import BatchSampler
from ..optim import make_optimizer
from .config import TrainConfig
from .step import make_train_step


def over_steps(cfg: TrainConfig, steps: int) -> TrainConfig:
    """``cfg`` for a run of ``steps`` steps: the cosine ends there, and warmup takes at most a tenth of it."""
    return cfg.replace(max_seconds=None, max_iters=steps, lr_decay_iters=None,
                       warmup_iters=min(cfg.optim.warmup_iters, steps // 10))


def fit_to_seconds(cfg: TrainConfig, model, sampler: BatchSampler, group: mx.distributed.Group) -> TrainConfig:
    """``cfg`` with ``max_iters`` set so that stepping takes about ``max_seconds``."""
    weights, sampler_state = model.parameters(), sampler.state()  # arrays are immutable: a snapshot
    optimizer = make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    step_fn = make_train_step(model, optimizer, cfg, group)
    times: list[float] = []  # the first one includes compiling the step
    budget = cfg.optim.max_seconds
    # every rank times as many steps (each holds collectives), as long as any rank needs more
    while distributed.any_rank(len(times) < 4 or (sum(times[1:]) < min(2.0, budget / 50) and len(times) < 20), group):
        x, y = sampler.next()
        start = time.perf_counter()
        loss, _ = step_fn(mx.array(x), mx.array(y))
        mx.eval(loss, model.parameters(), optimizer.state)
        times.append(time.perf_counter() - start)
    model.update(weights)
    sampler.set_state(sampler_state)
    per_step = statistics.median(times[1:])
    compiling = max(times[0] - per_step, 0.0)  # the run compiles its own step: part of its seconds
    timing = distributed.all_mean({"t": mx.array([per_step, compiling])}, group)["t"]
    per_step, compiling = timing.tolist()
    return over_steps(cfg, max(1, int((budget - compiling) / per_step)))
