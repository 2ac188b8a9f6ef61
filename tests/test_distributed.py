"""Data parallelism: the bucketed mean, the samplers' stripes, and real runs of two processes on
loopback (MLX's ring backend, started by mlx.launch) against one process with twice the batch.

Run as a script, this file is what each launched rank executes: it trains as
``python -m mlx_gpt.train`` does, optionally dying or hanging at a step on rank 1, then saves its
own weights beside the run so a test can compare the ranks.
"""

import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import mlx_gpt  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gpt import checkpoint, distributed
from mlx_gpt.data import prepare
from mlx_gpt.sampler import BatchSampler, SequentialSampler
from mlx_gpt.errors import UserError
from mlx_gpt.train import parse_args, train
from mlx_gpt.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(sysconfig.get_path("scripts")) / "mlx.launch"
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=1, log_interval=1,
            sample_tokens=4, warmup_iters=2)


# ---------------------------------------------------------------------------- in one process


def test_buckets_keep_order_and_dtype_and_never_split_an_array():
    sizes = [10, 5, 3, 20, 1, 7]
    flat = [(str(i), mx.zeros((n,), dtype=mx.bfloat16 if i == 2 else mx.float32)) for i, n in enumerate(sizes)]
    groups = distributed.buckets(flat, bucket_bytes=60)  # 15 float32s a bucket
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for g in groups:
        assert len({flat[i][1].dtype for i in g}) == 1
        assert g == sorted(g)
        assert sum(flat[i][1].nbytes for i in g[:-1]) < 60  # closes once full
    assert [0, 1] in groups and [3] in groups and [2] in groups


def test_a_group_of_one_adds_no_collective():
    group = distributed.init()
    assert group.size() == 1
    tree = (mx.array(1.5), {"w": mx.ones((2, 3))})
    assert distributed.all_mean(tree, group) is tree
    assert distributed.AnyRank(group)(True) is True


def test_the_gpt2_small_gradients_cross_in_a_few_buckets():
    from mlx_gpt.models.gpt import PRESETS, GPTConfig

    config = GPTConfig(**{**PRESETS["gpt2"], "vocab_size": 50257})
    shapes = [(config.vocab_size, config.n_embd), (config.block_size, config.n_embd)]
    for _ in range(config.n_layer):
        d = config.n_embd
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(config.n_embd,), (config.n_embd,)]
    flat = [(str(i), mx.zeros(s)) for i, s in enumerate(shapes)]
    assert len(flat) == 148
    groups = distributed.buckets(flat)
    assert len(groups) <= 40, len(groups)


@pytest.mark.parametrize("kind", ["random", "sequential"])
def test_the_ranks_rows_together_are_the_batch_of_one_process(tmp_path, shakespeare, kind):
    data = prepare(str(shakespeare), "byte", data_dir=tmp_path)
    B, T, A = 3, 8, 2

    def sampler(batch, rank=0, world=1):
        if kind == "random":
            return BatchSampler(data.train_file, batch, T, seed=7, accum=A, rank=rank, world=world)
        return SequentialSampler(data.train_file, batch, T, accum=A, rank=rank, world=world)

    one, ranks = sampler(2 * B), [sampler(B, r, 2) for r in range(2)]
    for _ in range(3):
        x, y = one.next()
        parts = [s.next() for s in ranks]
        np.testing.assert_array_equal(x, np.concatenate([p[0] for p in parts], axis=1))
        np.testing.assert_array_equal(y, np.concatenate([p[1] for p in parts], axis=1))
        assert not np.array_equal(parts[0][0], parts[1][0])
    assert ranks[0].state() == ranks[1].state() == one.state()


def test_resuming_on_another_number_of_processes_is_refused(tmp_path, shakespeare):
    cfg = TrainConfig.of(data=str(shakespeare), data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"),
                      max_iters=1, eval_interval=1, **TINY)
    train(cfg, progress=False)
    state_file = tmp_path / "run" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(UserError, match=r"trained on 2 processes, not 1; resume it with mlx.launch -n 2"):
        train(cfg.replace(max_iters=2, resume=True), progress=False)


# ---------------------------------------------------------------------------- two processes on loopback


def free_port(n: int = 2) -> int:
    """A port p with p .. p + n - 1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n < 65536 and all(_free(p + i) for i in range(n)):
            return p
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launch(cwd: Path, *args: str, action: str = "none", at: int = 0, timeout: float = 180) -> subprocess.CompletedProcess:
    """``mlx.launch -n 2 --backend ring`` of this file's rank entry, as a user would launch training."""
    if not LAUNCHER.exists():
        pytest.skip(f"{LAUNCHER} not found")
    cmd = [sys.executable, str(LAUNCHER), "--python", sys.executable, "-n", "2", "--backend", "ring",
           "--starting-port", str(free_port()), "--", __file__, action, str(at), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def cli_args(cfg: dict) -> list[str]:
    flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    return [flag(k) if v is True else f"--no-{k.replace('_', '-')}" if v is False else f"{flag(k)}={v}"
            for k, v in cfg.items()]


def losses_of(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def weights(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shakespeare) -> Path:
    d = tmp_path_factory.mktemp("data")
    prepare(str(shakespeare), "byte", data_dir=d)
    return d


@pytest.mark.parametrize("streams", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_two_processes_train_as_one_with_twice_the_batch(tmp_path, shakespeare, prepared, streams):
    common = dict(data=str(shakespeare), data_dir=str(prepared), sampler="sequential", max_iters=6, eval_interval=3,
                  streams=streams, **TINY)
    proc = launch(tmp_path, *cli_args({**common, "out": tmp_path / "two"}))
    assert "done: checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert "WARN" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("model:") == 1  # rank 1 stays quiet
    one = train(TrainConfig.of(**{**common, "batch_size": 2 * TINY["batch_size"], "out": str(tmp_path / "one")}),
                progress=False)

    a, b = losses_of(tmp_path / "two"), losses_of(tmp_path / "one")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], rtol=1e-5)
    evals = [[json.loads(r) for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("two", "one")]
    evals = [[r["val_loss"] for r in rows if "val_loss" in r] for rows in evals]
    np.testing.assert_allclose(evals[0], evals[1], rtol=1e-5)

    ranks = [weights(tmp_path / f"two-rank{r}.safetensors") for r in range(2)]
    for k in ranks[0]:
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k])  # every rank applied the same update
    saved = {k: np.array(v) for k, v in tree_flatten(checkpoint.load_model(tmp_path / "two").parameters())}
    alone = {k: np.array(v) for k, v in tree_flatten(one.model.parameters())}
    for k in alone:
        np.testing.assert_array_equal(saved[k], ranks[0][k])
        # Adam's m / sqrt(v) turns float32 reordering of a near-zero gradient into a visible
        # difference: bound it by a small fraction of one step's update (lr 2e-3)
        np.testing.assert_allclose(saved[k], alone[k], rtol=1e-4, atol=1e-5)


def test_two_processes_train_packed_examples_as_one_with_twice_the_batch(tmp_path):
    """--pack --mask-prompt on an example set: each rank builds every packed row and takes its own,
    and the step weights each rank by its answer tokens, so two ranks train as one process with
    twice the batch: the same losses and evaluations."""
    from mlx_gpt.examples import prepare_examples
    from test_examples import pairs, products, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", pairs(60) + products(60, seed=1) + pairs(60, seed=2))
    prepare_examples(str(data), "byte", data_dir=tmp_path / "data")  # once, before the ranks read it
    common = dict(data=str(data), data_dir=str(tmp_path / "data"), mask_prompt=True, pack=True, max_iters=4,
                  eval_interval=2, **{**TINY, "block_size": 48, "batch_size": 2, "sample_tokens": 0})
    proc = launch(tmp_path, *cli_args({**common, "out": tmp_path / "two"}))
    assert "done: checkpoint" in proc.stderr, proc.stderr[-3000:]
    train(TrainConfig.of(**{**common, "batch_size": 4, "out": str(tmp_path / "one")}), progress=False)

    a, b = losses_of(tmp_path / "two"), losses_of(tmp_path / "one")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], rtol=1e-5)
    evals = [[json.loads(r) for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("two", "one")]
    evals = [[r["val_loss"] for r in rows if "val_loss" in r] for rows in evals]
    np.testing.assert_allclose(evals[0], evals[1], rtol=1e-5)


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_and_resume_is_exact(tmp_path, shakespeare, prepared):
    common = dict(data=str(shakespeare), data_dir=str(prepared), max_iters=6, eval_interval=3, checkpoint_interval=3,
                  dropout=0.1, **TINY)
    whole = launch(tmp_path, *cli_args({**common, "out": tmp_path / "whole"}))
    assert "done: checkpoint" in whole.stderr, whole.stderr[-3000:]

    start = time.monotonic()
    killed = launch(tmp_path, *cli_args({**common, "out": tmp_path / "split"}), action="kill", at=5, timeout=120)
    assert time.monotonic() - start < 90
    assert "done: checkpoint" not in killed.stderr
    assert "Node with rank 1 was killed" in killed.stderr or "rank 1 exited" in killed.stderr, killed.stderr[-3000:]
    state = checkpoint.load_state(tmp_path / "split")
    assert state["step"] == 3 and state["world_size"] == 2  # the last checkpoint, whole

    resumed = launch(tmp_path, *cli_args({"out": tmp_path / "split", "resume": True, "max_iters": 6,
                                          "data_dir": prepared}))
    assert "done: checkpoint" in resumed.stderr, resumed.stderr[-3000:]
    a, b = losses_of(tmp_path / "whole"), losses_of(tmp_path / "split")
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # bit for bit
    wa, wb = weights(tmp_path / "whole" / "model.safetensors"), weights(tmp_path / "split" / "model.safetensors")
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])


def test_a_hung_rank_times_out_with_the_checkpoint_intact(tmp_path, shakespeare, prepared):
    cfg = dict(data=str(shakespeare), data_dir=str(prepared), max_iters=50, eval_interval=50, checkpoint_interval=2,
               rank_timeout=3, compile=False, out=tmp_path / "run", **TINY)
    start = time.monotonic()
    proc = launch(tmp_path, *cli_args(cfg), action="hang", at=3, timeout=120)
    assert time.monotonic() - start < 100, proc.stderr[-3000:]
    assert "no step finished for 3 s" in proc.stderr, proc.stderr[-3000:]
    assert checkpoint.load_state(tmp_path / "run")["step"] == 2
    checkpoint.load_model(tmp_path / "run")


def test_float16_ranks_skip_together_when_one_rank_overflows(tmp_path, shakespeare, prepared):
    """Rank 1's gradients overflow float16 at step 3, rank 0's do not: the finite check reads the
    averaged gradients, so both skip the step, halve the scale, and keep the same weights."""
    cfg = dict(data=str(shakespeare), data_dir=str(prepared), max_iters=5, eval_interval=5, dtype="float16",
               streams=1, compile=False, out=tmp_path / "run", **TINY)
    proc = launch(tmp_path, *cli_args(cfg), action="overflow", at=3)
    assert "done: checkpoint" in proc.stderr, proc.stderr[-3000:]
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
    assert [rows[s]["skipped"] for s in range(1, 6)] == [0, 0, 1, 1, 1]  # then it trains on
    assert rows[3]["loss_scale"] == rows[2]["loss_scale"] / 2 and rows[3]["norm"] is None
    assert "| scale 32768 | skipped 1 |" in proc.stderr
    ranks = [weights(tmp_path / f"run-rank{r}.safetensors") for r in range(2)]
    for k in ranks[0]:
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k])


# ---------------------------------------------------------------------------- a launched rank


def _rank_main(argv: list[str]) -> None:
    """Train as ``python -m mlx_gpt.train argv[2:]``; rank 1 dies (``kill``) or hangs (``hang``) after
    step ``argv[1]``, or its loss is multiplied by 2**100 in that step, which overflows float16
    gradients (``overflow``, with ``--no-compile``); then every rank saves its weights to
    ``<out>-rank<r>.safetensors``."""
    import signal

    from mlx_gpt.training import step as train_module
    from mlx_gpt.errors import run_cli

    action, at, rank = argv[0], int(argv[1]), distributed.init().rank()
    if action == "overflow" and rank == 1:
        real, steps = train_module.loss_fn, [0]

        def overflowing(model, x, y, **kw):
            loss = real(model, x, y, **kw)
            if model.training:  # a train step, not an evaluation
                steps[0] += 1
                if steps[0] == at:
                    return loss * 2.0**100
            return loss

        train_module.loss_fn = overflowing

    def on_step(step: int, loss: float) -> None:
        if rank == 1 and step == at and action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 1 and step == at and action == "hang":
            time.sleep(3600)

    def main(args):
        run = train(parse_args(args), progress=False, on_step=on_step)
        mx.save_safetensors(f"{run.out}-rank{run.rank}.safetensors", dict(tree_flatten(run.model.parameters())))

    run_cli(main, argv[2:])


if __name__ == "__main__":
    _rank_main(sys.argv[1:])
