"""mlx_gpt checkpoints under EleutherAI's lm-evaluation-harness: an ``lm_eval`` model named ``mlx_gpt``.

    python -m mlx_gpt.harness run --model mlx_gpt --model_args pretrained=checkpoints/run --tasks lambada_openai

is lm_eval's own command line with this model registered (``pip install lm-eval``; the package
never imports it elsewhere). From Python, ``import mlx_gpt.harness`` registers it, and
``lm_eval.simple_evaluate(model="mlx_gpt", model_args={"pretrained": CKPT}, tasks=[...])`` runs.

The three requests the harness makes:

- ``loglikelihood(context, continuation)``: the continuation's log-probability and whether greedy
  decoding would have written it; the row is context + continuation cut to the model's block
  from the left, scored as ``eval``'s multiple-choice endings are (same loss, same rows).
- ``loglikelihood_rolling(text)``: the whole text's log-probability, in windows of the block as
  ``eval``'s perplexity does (``perplexity.total_nll``), after end-of-text (a tokenizer without
  one leaves the first token unscored).
- ``generate_until(context, {"until", "max_gen_toks", "temperature"})``: ``generate``'s text,
  greedy unless a temperature is given, cut at the first stop string.
"""

from __future__ import annotations

import sys

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from . import checkpoint
from .eval import continuation_scores
from .generate import generate
from .models.base import eval_mode
from .perplexity import total_nll


def score_continuations(model, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(log-probability, greedy) of each continuation given its context, as one padded batch."""
    return [(-float(np.sum(losses, dtype=np.float64)), bool(greedy.all()))
            for losses, greedy in continuation_scores(model, pairs)]


@register_model("mlx_gpt")
class MLXGPT(TemplateLM):
    """A checkpoint (``pretrained=DIR``) as lm_eval's model; ``batch_size`` rows are scored at once."""

    def __init__(self, pretrained: str, batch_size: int | str = 8, max_gen_toks: int = 256, **_: object) -> None:
        super().__init__()
        self.model, self.tokenizer = checkpoint.load(pretrained)
        self.batch = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        """End-of-text, which starts a text with no context; a tokenizer without one starts from a newline."""
        eot = self.tokenizer.eot_id
        return eot if eot is not None else self.tokenizer.encode("\n")[0]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        out = []
        with eval_mode(self.model):
            for i in range(0, len(pairs), self.batch):
                out += score_continuations(self.model, pairs[i : i + self.batch])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = self.tokenizer.encode(req.args[0])
            if self.tokenizer.eot_id is not None:
                ids = [self.tokenizer.eot_id] + ids
            out.append(-total_nll(self.model, np.asarray(ids))[0])  # eval's windows and batches: its very sums
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:  # generate decodes in eval mode
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", True) else 0.0
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            out.append(generate(self.model, self.tokenizer, context, max_new, temperature=temperature, stop=until,
                                seed=0))
        return out


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line, with ``--model mlx_gpt`` known to it."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["python -m mlx_gpt.harness", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
