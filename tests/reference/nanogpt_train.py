"""nanoGPT's train.py on its character-level Shakespeare example, in PyTorch, for the end-to-end race.

    python tests/reference/nanogpt_train.py prepare --input tinyshakespeare.txt --out DIR
    python tests/reference/nanogpt_train.py train --data DIR --out RUN_DIR

``prepare`` writes what nanoGPT's data/shakespeare_char/prepare.py writes: the sorted set of
characters as the vocabulary, the first 90% of the text as train.bin and the rest as val.bin
(uint16 ids), and the vocabulary (meta.json here). ``train`` follows nanoGPT's train.py on
the CPU with the defaults of its README's CPU command (config/train_shakespeare_char.py with
``--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``):
nanoGPT's model (no biases, exact GELU, tied head, its initialisation), AdamW over 2-D weights
with decay (fused, PyTorch's fastest on the CPU), linear warm-up then cosine decay, random
windows drawn with ``torch.randint``, the next batch fetched while the step's backward is
pending, the loss read every ``log_interval`` steps, an evaluation of ``eval_iters`` batches of
each split every ``eval_interval`` steps (the checkpoint saved when val improves), and
``max_iters + 1`` steps, as its ``while`` loop runs. It prints one line per step, as nanoGPT
does, then one JSON object: the final train and val loss, and the loop's seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_gpt import TorchGPT, TorchGPTConfig, init_weights, make_optimizer  # noqa: E402


def prepare(text_path: Path, out: Path) -> dict:
    text = text_path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    out.mkdir(parents=True, exist_ok=True)
    np.array([stoi[c] for c in text[: int(n * 0.9)]], np.uint16).tofile(out / "train.bin")
    np.array([stoi[c] for c in text[int(n * 0.9):]], np.uint16).tofile(out / "val.bin")
    meta = {"vocab_size": len(chars), "itos": chars}
    (out / "meta.json").write_text(json.dumps(meta) + "\n")
    return {"vocab_size": len(chars), "train_tokens": int(n * 0.9), "val_tokens": n - int(n * 0.9)}


def lr_at(it: int, a: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters (nanoGPT's get_lr)."""
    if it < a.warmup_iters:
        return a.learning_rate * it / a.warmup_iters
    if it > a.lr_decay_iters:
        return a.min_lr
    ratio = (it - a.warmup_iters) / (a.lr_decay_iters - a.warmup_iters)
    return a.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (a.learning_rate - a.min_lr)


def train(a: argparse.Namespace) -> dict:
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    data = Path(a.data)
    splits = {s: np.memmap(data / f"{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val")}
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = splits[split]
        ix = torch.randint(len(d) - a.block_size, (a.batch_size,))
        x = torch.stack([torch.from_numpy(d[i:i + a.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + a.block_size].astype(np.int64)) for i in ix])
        return x, y

    cfg = TorchGPTConfig(vocab, a.block_size, a.n_layer, a.n_head, a.n_embd, bias=a.bias, gelu="none")
    model = init_weights(TorchGPT(cfg), a.seed)
    optimizer = make_optimizer(model, a.learning_rate, (a.beta1, a.beta2), a.weight_decay)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {}
        for split in ("train", "val"):
            out[split] = float(np.mean([loss_of(*get_batch(split)).item() for _ in range(a.eval_iters)]))
        model.train()
        return out

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x, y = get_batch("train")
    t0 = time.perf_counter()
    it, best_val, evals = 0, 1e9, []
    while True:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, a)
        if it % a.eval_interval == 0:
            losses = estimate_loss()
            evals.append({"step": it, **losses})
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            if losses["val"] < best_val:
                best_val = losses["val"]
                if it > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": it,
                                "best_val_loss": best_val}, out_dir / "ckpt.pt")
        loss = loss_of(x, y)
        x, y = get_batch("train")  # the next batch while the backward pass is still to come
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        dt, t0 = t1 - t0, t1
        if it % a.log_interval == 0:
            print(f"iter {it}: loss {loss.item():.4f}, time {dt * 1000:.2f}ms", flush=True)
        it += 1
        if it > a.max_iters:
            break
    return {"impl": "nanogpt-torch", "loop_s": time.perf_counter() - start, "steps": it,
            "train_loss": evals[-1]["train"], "val_loss": evals[-1]["val"], "evals": evals,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python tests/reference/nanogpt_train.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="character-level train.bin / val.bin from a text file")
    pp.add_argument("--input", required=True)
    pp.add_argument("--out", required=True)
    t = sub.add_parser("train", help="train; print one JSON object at the end")
    t.add_argument("--data", required=True, help="a folder written by prepare")
    t.add_argument("--out", required=True, help="where the checkpoint goes")
    t.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's own choice)")
    for name, default in (("batch-size", 12), ("block-size", 64), ("n-layer", 4), ("n-head", 4), ("n-embd", 128),
                          ("max-iters", 2000), ("lr-decay-iters", 2000), ("warmup-iters", 100),
                          ("eval-interval", 250), ("eval-iters", 20), ("log-interval", 1), ("seed", 1337)):
        t.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("learning-rate", 1e-3), ("min-lr", 1e-4), ("beta1", 0.9), ("beta2", 0.99),
                          ("weight-decay", 0.1), ("grad-clip", 1.0)):
        t.add_argument(f"--{name}", type=float, default=default)
    t.add_argument("--bias", action="store_true", help="biases in Linear and LayerNorm (nanoGPT's default: none)")
    a = p.parse_args(argv)
    if a.command == "prepare":
        print(json.dumps(prepare(Path(a.input), Path(a.out))))
    else:
        print(json.dumps(train(a)))


if __name__ == "__main__":
    main()
