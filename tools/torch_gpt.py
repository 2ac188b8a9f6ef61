"""The PyTorch reference that ``tools/bench.py --vs-torch`` races against.

The same GPT-2 as ``mlx_gpt.models.gpt`` (learned positions, pre-LayerNorm blocks, tanh-GELU MLP,
head tied to ``wte``, the same parameter names and Linear layout) and the same train step as
``mlx_gpt.train`` (mean cross-entropy, global-norm clipping, AdamW that decays only 2-D
weights), written the way a PyTorch user would: eager mode, ``F.scaled_dot_product_attention``,
``torch.optim.AdamW`` with its fastest CPU implementation. Only the benchmark imports this
module; the package never does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TorchGPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    bias: bool = True
    layer_norm_eps: float = 1e-5


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


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


def from_mlx(model, device: str = "cpu") -> TorchGPT:
    """A TorchGPT on ``device`` holding exactly the weights of an ``mlx_gpt.models.gpt.GPT`` (same names and layout)."""
    import numpy as np
    from mlx.utils import tree_flatten

    c = model.config
    tmodel = TorchGPT(TorchGPTConfig(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd, c.bias,
                                     c.layer_norm_eps))
    weights = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tree_flatten(model.parameters())}
    tmodel.load_state_dict(weights, strict=True)
    return tmodel.to(device)


def make_optimizer(model: TorchGPT, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.99),
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
