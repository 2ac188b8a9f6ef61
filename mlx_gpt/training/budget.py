"""``--max-seconds``: a budget for the whole run, turned into steps before its optimizer exists.

The learning-rate schedule must know the run's length before the first step, so a few steps
are timed first, on the run's own batches with a throwaway optimizer, and a few evaluation
batches too; the weights and the sampler are put back afterwards. The steps that fit are what
is left of the budget once the setup so far, compiling, and every evaluation the run will make
are paid for. With several processes, every rank takes the mean of their timings, so all fit the
same steps. What no timing foresees (a machine that gets busier) the loop catches: it ends a run
that passes its budget by more than OVERRUN (``training.loop``).
"""

from __future__ import annotations

import statistics
import time

OVERRUN = 1.1  # a run ends once it passes its budget by this factor (plus SLACK seconds)
SLACK = 2.0

import mlx.core as mx

from .. import distributed
from ..models.base import eval_mode
from ..sampler import BatchSampler
from ..optim import make_optimizer
from .config import TrainConfig
from .step import make_eval_loss, make_train_step


def over_steps(cfg: TrainConfig, steps: int) -> TrainConfig:
    """``cfg`` for a run of ``steps`` steps: the cosine ends there, and warmup takes at most a tenth of it."""
    return cfg.replace(max_seconds=None, max_iters=steps, lr_decay_iters=None,
                       warmup_iters=min(cfg.optim.warmup_iters, steps // 10))


def fit_to_seconds(cfg: TrainConfig, model, sampler: BatchSampler, group: mx.distributed.Group,
                   spent: float) -> TrainConfig:
    """``cfg`` with ``max_iters`` set so that the whole run takes about ``max_seconds``, of which
    ``spent`` are gone already (data, model)."""
    weights, sampler_state = model.parameters(), sampler.state()  # arrays are immutable: a snapshot
    optimizer = make_optimizer(cfg.optim)
    optimizer.init(model.trainable_parameters())
    step_fn = make_train_step(model, optimizer, cfg, group)
    times: list[float] = []  # the first one includes compiling the step
    budget = cfg.optim.max_seconds
    # every rank times as many steps (each holds collectives), as long as any rank needs more
    while distributed.any_rank(len(times) < 4 or (sum(times[1:]) < min(2.0, budget / 50) and len(times) < 20), group):
        batch = [mx.array(a) for a in sampler.next()]  # x, y, and packed rows' positions
        start = time.perf_counter()
        loss, _ = step_fn(*batch)
        mx.eval(loss, model.parameters(), optimizer.state)
        times.append(time.perf_counter() - start)
    model.update(weights)
    per_batch, eval_compiling = _time_evaluation(cfg, model, sampler)
    sampler.set_state(sampler_state)
    per_step = statistics.median(times[1:])
    compiling = max(times[0] - per_step, 0.0)  # the run compiles its own step: part of its seconds
    timing = distributed.all_mean({"t": mx.array([per_step, compiling, per_batch, eval_compiling])}, group)["t"]
    per_step, compiling, per_batch, eval_compiling = timing.tolist()
    per_eval = 2 * cfg.run.eval_iters * per_batch  # train and val batches
    left = budget - spent - sum(times) - compiling - eval_compiling - per_eval  # the last step's evaluation
    return over_steps(cfg, max(1, int(left / (per_step + per_eval / cfg.run.eval_interval))))


def _time_evaluation(cfg: TrainConfig, model, sampler: BatchSampler) -> tuple[float, float]:
    """(seconds per evaluation batch, seconds to compile the evaluation) on the run's batches."""
    eval_loss = make_eval_loss(model, cfg)
    times = []
    with eval_mode(model):
        for _ in range(3):
            batch = [mx.array(a[0]) for a in sampler.next()]
            start = time.perf_counter()
            mx.eval(eval_loss(*batch))
            times.append(time.perf_counter() - start)
    per_batch = statistics.median(times[1:])
    return per_batch, max(times[0] - per_batch, 0.0)
