"""The PyTorch reference mlx_gpt is checked and timed against: the same GPT-2, the same train step.

The model is ``mlx_gpt.models.gpt``'s (learned positions, pre-LayerNorm blocks, tanh-GELU MLP,
head tied to ``wte``, the same parameter names and Linear layout) and the step is
``mlx_gpt.train``'s (mean cross-entropy, global-norm clipping, AdamW that decays only 2-D
weights), written the way a PyTorch user would: eager mode, ``F.scaled_dot_product_attention``,
``torch.optim.AdamW`` with its fused CPU implementation.

tests/test_bench.py imports it beside MLX to check that both compute the same logits, loss,
gradient norm and greedy tokens. ``tools/bench.py`` runs it as a script of its own, so that
PyTorch is timed as its users run it, in a process without MLX or a preloaded OpenBLAS::

    python tests/reference/torch_gpt.py train --weights HF_DIR --batch BATCH.npz --steps 10

prints one JSON object: the first loss and the seconds of every step after the warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class TorchGPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    bias: bool = True
    layer_norm_eps: float = 1e-5
    gelu: str = "tanh"  # "tanh" (GPT-2, mlx_gpt) or "none" (the exact erf GELU, nanoGPT's nn.GELU())


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        if T > 1 and k.shape[2] == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T > 1:  # a prefill after cached positions: align the causal mask to the last query
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.approximate = cfg.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, cfg: TorchGPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)

    def forward(self, idx: torch.Tensor, cache: list[list] | None = None) -> torch.Tensor:
        """Logits (B, T, vocab); with ``cache`` (one list per layer) positions continue after it."""
        offset = cache[0][0].shape[2] if cache and cache[0] else 0
        pos = torch.arange(offset, offset + idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for i, block in enumerate(self.h):
            x = block(x, cache[i] if cache is not None else None)
        return F.linear(self.ln_f(x), self.wte.weight)

    def make_cache(self) -> list[list]:
        return [[] for _ in self.h]


def init_weights(model: TorchGPT, seed: int) -> TorchGPT:
    """GPT-2's initialisation as nanoGPT does it: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, 0.0, 0.02 / (2 * model.config.n_layer) ** 0.5, generator=g)
        elif p.dim() == 2:
            nn.init.normal_(p, 0.0, 0.02, generator=g)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    return model


def from_mlx(model, device: str = "cpu") -> TorchGPT:
    """A TorchGPT on ``device`` holding exactly the weights of an ``mlx_gpt.models.gpt.GPT`` (same names and layout)."""
    from mlx.utils import tree_flatten

    c = model.config
    tmodel = TorchGPT(TorchGPTConfig(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd, c.bias,
                                     c.layer_norm_eps))
    weights = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tree_flatten(model.parameters())}
    tmodel.load_state_dict(weights, strict=True)
    return tmodel.to(device)


def from_hf_dir(path: str | os.PathLike, device: str = "cpu") -> TorchGPT:
    """A TorchGPT from a Hugging Face GPT-2 directory (what ``mlx_gpt.convert --to hf`` writes)."""
    from safetensors.torch import load_file

    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    tmodel = TorchGPT(TorchGPTConfig(c["vocab_size"], c["n_positions"], c["n_layer"], c["n_head"], c["n_embd"],
                                     True, c.get("layer_norm_epsilon", 1e-5)))
    weights = {}
    for name, t in load_file(path / "model.safetensors").items():
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" or ".attn.bias" in name or ".attn.masked_bias" in name:
            continue
        weights[name] = t.T.contiguous() if name.endswith(CONV1D) else t
    tmodel.load_state_dict(weights, strict=True)
    return tmodel.to(device)


def make_optimizer(model: nn.Module, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.99),
                   weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW decaying 2-D weights only (as nanoGPT and mlx_gpt do), fused when this PyTorch can."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, foreach=True)


def make_train_step(model: TorchGPT, optimizer: torch.optim.Optimizer, grad_clip: float = 1.0
                    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """step(x, y) -> (loss, grad_norm): forward, mean cross-entropy, backward, clip, AdamW."""

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), norm

    return step


@torch.inference_mode()
def decode(model: TorchGPT, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy decoding with a key/value cache: one prefill, then one cached step per token.

    Returns (tokens, seconds to the first token, seconds for the rest).
    """
    device = model.wte.weight.device
    t0 = time.perf_counter()
    cache = model.make_cache()
    tok = model(torch.tensor([prompt], device=device), cache)[:, -1].argmax(-1, keepdim=True)
    out = [int(tok)]
    t1 = time.perf_counter()
    toks = [tok]
    for _ in range(max_new_tokens - 1):  # the next token stays on the device, as mlx_gpt's does
        tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    out += [int(t) for t in toks[1:]]
    return out, t1 - t0, time.perf_counter() - t1


def time_train(model: TorchGPT, x: np.ndarray, y: np.ndarray, steps: int, warmup: int, device: str = "cpu") -> dict:
    """The first loss, the first step's seconds and the seconds of each of ``steps`` steps after ``warmup``."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    model.train()
    step = make_train_step(model, make_optimizer(model), grad_clip=1.0)
    tx, ty = (torch.from_numpy(a.astype(np.int64)).to(device) for a in (x, y))
    t0 = time.perf_counter()
    loss, _ = step(tx, ty)
    first_loss = float(loss)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        step(tx, ty)
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, _ = step(tx, ty)
        float(loss)
        times.append(time.perf_counter() - t0)
    return {"first_loss": first_loss, "first_step_s": first_s, "step_s": times}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python tests/reference/torch_gpt.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="time the train step; print JSON")
    t.add_argument("--weights", required=True, help="a Hugging Face GPT-2 directory")
    t.add_argument("--batch", required=True, help=".npz with x and y, (B, T) token ids")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's own choice)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--tf32", action="store_true", help="float32 matmuls on a GPU's TF32 tensor cores")
    t.add_argument("--flush-denormal", action="store_true", help="treat denormal floats as zero")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = a.tf32
    if a.flush_denormal:
        torch.set_flush_denormal(True)
    batch = np.load(a.batch)
    model = from_hf_dir(a.weights, a.device)
    result = time_train(model, batch["x"], batch["y"], a.steps, a.warmup, a.device)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.update(impl="torch", torch=torch.__version__, threads=torch.get_num_threads(), device=a.device,
                  mlx_loaded="mlx.core" in sys.modules, user_s=usage.ru_utime, system_s=usage.ru_stime,
                  minor_faults=usage.ru_minflt, involuntary_switches=usage.ru_nivcsw)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
