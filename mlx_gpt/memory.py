"""The peak memory of a training run, known before its first step.

A step holds, at its fullest: the parameters, their gradients and AdamW's two moments (each the
size of the parameters, in float32, with a cast copy of the parameters in bfloat16 runs; a LoRA
run's frozen weights are held alone, in the compute dtype); the activations the backward pass needs, per
layer and per token of a micro-batch (a few widths' worth of layer norms, projections and MLP
hidden states, and the attention weights, nh x T per token, unless the backward pass recomputes
them, as the CPU's attention kernel does); the logits, B x T x V, in float32
for the loss together with their gradient; with gradient accumulation one more gradient tree
(the micro-batch's, before it is added), and with a batch split over CPU streams one gradient
tree per extra stream.

With gradient accumulation the train step evaluates each micro-batch's gradients before it
starts the next, so one micro-batch's activations and logits are alive at a time, however many
there are. The per-token factors were fitted to ``mx.get_peak_memory()`` of real
steps and round up; docs/memory.md gives measured ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .errors import UserError
from .limits import machine_bytes

GB = 1e9
# bytes per element of each dtype a model trains in
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# values kept per token: per layer, ACT_PER_WIDTH x n_embd plus ATTN_PER_SCORE x n_head x T
# (attention weights); outside the layers, OUTSIDE_PER_WIDTH x n_embd (embeddings, final norm,
# backward buffers) and LOGITS_PER_TOKEN x vocab in float32 (logits and their gradient)
ACT_PER_WIDTH, ATTN_PER_SCORE, OUTSIDE_PER_WIDTH, LOGITS_PER_TOKEN = 20, 1.5, 40, 2
CHUNKS_AHEAD = 8


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a train step holds at its peak, by what holds them."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.logits

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GB:.2f}" for name in
                          ("parameters", "gradients", "optimizer", "activations", "logits"))
        return f"{self.total / GB:.2f} GB ({parts})"


def estimate_train_peak(config, n_params: int, batch_size: int, *, dtype: str = "float32", grad_accum: int = 1,
                        streams: int = 1, grad_checkpoint: bool = False, loss_chunk: int = 0,
                        trainable: int | None = None, attention_weights: bool = True) -> MemoryEstimate:
    """The peak of one train step of a model shaped by ``config`` (n_layer, n_embd, n_head,
    vocab_size, block_size; a model without attention has no n_head) with ``n_params`` parameters,
    micro-batches of ``batch_size`` x block_size tokens, split over ``streams`` CPU streams.

    ``dtype`` is the compute dtype: parameters, gradients and moments stay float32 (master
    weights), plus the step's cast copy of the parameters. ``loss_chunk`` positions of logits at
    a time: MLX schedules ahead, so up to CHUNKS_AHEAD chunks' logits are allocated at once.
    ``trainable`` (LoRA: the adapters, of the ``n_params``): only those have gradients, moments
    and float32 master copies; the frozen rest is held in ``dtype`` (``lora.cast_frozen``). The
    activations are a full fine-tune's: the backward pass still runs through every layer.
    ``attention_weights``: whether each layer's attention weights are kept for the backward pass
    (``backend.attention_weights_kept``)."""
    s = DTYPE_BYTES[dtype]
    trained = n_params if trainable is None else trainable
    frozen = n_params - trained
    copy = trained * s if s != 4 else 0
    L, C, V, T = config.n_layer, config.n_embd, config.vocab_size, config.block_size
    nh = getattr(config, "n_head", 0)
    tokens = batch_size * T
    per_layer = ACT_PER_WIDTH * C + (ATTN_PER_SCORE * nh * T if attention_weights else nh)
    # recomputed blocks keep only each block's input, and one block's activations at a time
    layers = L * C + per_layer if grad_checkpoint else L * per_layer
    activations = int(tokens * (layers + OUTSIDE_PER_WIDTH * C) * s)
    extra_grads = (grad_accum > 1) + max(streams - 1, 0)
    logit_rows = min(tokens, CHUNKS_AHEAD * loss_chunk) if loss_chunk else tokens
    return MemoryEstimate(parameters=trained * 4 + copy + frozen * s, gradients=trained * 4 * (1 + extra_grads),
                          optimizer=2 * trained * 4, activations=activations,
                          logits=int(logit_rows * V * 4 * LOGITS_PER_TOKEN))


def available_memory() -> int:
    """What MLX may use here: Metal's recommended working set on a Mac, else MLX's memory limit
    (a share of the physical memory on the CPU backend: ``limits.machine_bytes``)."""
    if mx.metal.is_available():
        return int(mx.metal.device_info()["max_recommended_working_set_size"])
    return machine_bytes()


def check_fits(config, n_params: int, batch_size: int, available: int, **kw) -> MemoryEstimate:
    """The run's estimate (``estimate_train_peak``'s arguments); refuses, before anything is
    allocated, a run that cannot fit, saying which smaller micro-batch would."""
    estimate = estimate_train_peak(config, n_params, batch_size, **kw)
    if estimate.total <= available:
        return estimate
    accum = kw.get("grad_accum", 1)
    smaller = next((b for b in range(batch_size - 1, 0, -1) if batch_size % b == 0
                    and estimate_train_peak(config, n_params, b, **kw).total <= available), None)
    if smaller is not None:
        hint = (f"--batch-size {smaller} --grad-accum {accum * batch_size // smaller} trains on the same tokens "
                "per step and fits")
    else:
        hint = f"even --batch-size 1 does not fit: try --grad-checkpoint or a shorter --block-size than {config.block_size}"
    raise UserError(f"this run needs about {estimate.describe()} at its peak, more than the "
                    f"{available / GB:.1f} GB this machine gives MLX; {hint}")
