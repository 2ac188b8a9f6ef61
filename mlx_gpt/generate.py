"""Generate text from a checkpoint: ``python -m mlx_gpt.generate --checkpoint DIR --prompt TEXT``.

The tokens come from a ``decoding.Decoder``; here they become text, streamed as it becomes
decodable (``detokenizer.StreamingDetokenizer``), cut before any stop string, and ended at the
tokenizer's end-of-text token or after ``max_new_tokens``.

In Python::

    model, tokenizer = mlx_gpt.load("checkpoints/run")
    text = generate(model, tokenizer, "Once upon a time", 100, temperature=0.8, seed=0)
    for piece in stream(model, tokenizer, "Once upon a time", 100, seed=0):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

from .decoding import Decoder, Timing
from .detokenizer import StreamingDetokenizer
from .errors import UserError, run_cli
from .flags import DefaultsShown
from .limits import check_bytes, check_seed, check_text
from .sampling import SamplingConfig
from .sources import read_text
from .tokenizer import Tokenizer


class StopStrings:
    """Cuts a text stream just before the first stop string, holding back text that may start one."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of text that is safe to show now (all of it that precedes a stop string)."""
        if self.stopped:
            return ""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """Text held back for a stop string that never came."""
        text, self._held = self._held, ""
        return "" if self.stopped else text


class Continuation:
    """One sample's text: detokenized as it streams, ended by end-of-text or a stop string (or by
    ``close``); ``ids`` are the tokens it holds, end-of-text not included."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self.eot_id = tokenizer.eot_id
        self.ids: list[int] = []
        self.done = False
        self._detok = StreamingDetokenizer(tokenizer, context=prompt_ids)
        self._stops = StopStrings(stop)

    def add(self, token: int) -> str:
        if self.done:
            return ""
        if token == self.eot_id:
            return self.close()
        self.ids.append(token)
        text = self._stops.feed(self._detok.add(token))
        self.done = self._stops.stopped
        return text

    def close(self) -> str:
        """The text still held back: the sequence has ended."""
        if self.done:
            return ""
        self.done = True
        return self._stops.feed(self._detok.flush()) + self._stops.flush()


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from the end-of-text token (a document start)."""
    ids = tokenizer.encode(prompt) if prompt else []
    if ids:
        return ids
    if tokenizer.eot_id is None:
        raise UserError(f"the prompt is empty and the {tokenizer.kind} tokenizer has no end-of-text token "
                        "to start from; give a prompt")
    return [tokenizer.eot_id]


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def stream_batch(decoder: Decoder, tokenizer: Tokenizer, prompt: str | list[int], max_new_tokens: int, *, seed: int,
                 num_samples: int = 1, stop: Sequence[str] = (), timing: Timing | None = None
                 ) -> Iterator[list[str]]:
    """Yield, step by step, the new text of each of num_samples continuations ("" where none).

    ``prompt``: text, or its ids already encoded (a chat's). Stops when every continuation has
    ended: max_new_tokens, end-of-text or a stop string (which is not part of the text).
    """
    # errors now, not at the first next()
    prompt_ids = list(prompt) if not isinstance(prompt, str) and len(prompt) else encode_prompt(tokenizer, prompt or "")
    steps = decoder.tokens(prompt_ids, max_new_tokens, seed=seed, num_samples=num_samples, timing=timing)
    return _stream_rows(steps, [Continuation(tokenizer, prompt_ids, stop) for _ in range(num_samples)])


def _stream_rows(steps: Iterator[list[int]], rows: list[Continuation]) -> Iterator[list[str]]:
    with contextlib.closing(steps):
        for ids in steps:
            yield [row.add(t) for row, t in zip(rows, ids)]
            if all(row.done for row in rows):
                break
    tail = [row.close() for row in rows]
    if any(tail):
        yield tail


def stream(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200, *, seed: int | None = None,
           stop: Sequence[str] = (), timing: Timing | None = None, keep: int | None = None,
           **sampling) -> Iterator[str]:
    """Yield the continuation of prompt piece by piece, each piece whole characters.

    sampling: the fields of ``SamplingConfig`` (temperature, top_k, top_p, min_p,
    repetition_penalty). seed None draws a fresh one.
    """
    decoder = Decoder(model, SamplingConfig(**sampling), keep=keep)
    seed = random_seed() if seed is None else seed
    steps = stream_batch(decoder, tokenizer, prompt, max_new_tokens, seed=seed, stop=stop, timing=timing)
    yield from (pieces[0] for pieces in steps if pieces[0])


def generate_batch(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200, *, num_samples: int = 1,
                   seed: int | None = None, stop: Sequence[str] = (), timing: Timing | None = None,
                   keep: int | None = None, **sampling) -> list[str]:
    """num_samples continuations of prompt, drawn as one batch."""
    decoder = Decoder(model, SamplingConfig(**sampling), keep=keep)
    seed = random_seed() if seed is None else seed
    steps = stream_batch(decoder, tokenizer, prompt, max_new_tokens, seed=seed, num_samples=num_samples, stop=stop,
                         timing=timing)
    return ["".join(pieces) for pieces in zip(*steps)] or [""] * num_samples  # no steps: no new tokens


def generate(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             seed: int | None = None, stop: Sequence[str] = (), keep: int | None = None) -> str:
    """The continuation of prompt (prompt not included); the global MLX random state is untouched."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens, seed=seed, stop=stop, keep=keep,
                          temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty))


# ---------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.generate", description="Generate text from a checkpoint.",
                                formatter_class=DefaultsShown)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (trained, fine-tuned or converted)")
    p.add_argument("--prompt", help="text to continue ('-' reads it from stdin); required unless --interactive")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is more random")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the most likely tokens up to this mass")
    p.add_argument("--min-p", type=float, default=0.0, help="keep tokens at least this fraction as likely as the top")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalize tokens in the context (1: off)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed, 0 .. 2**63-1; None draws a fresh one, printed at the end")
    p.add_argument("--num-samples", type=int, default=1, help="continuations to draw, as one batch")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a continuation where this text appears, without printing it (repeatable)")
    p.add_argument("--prompt-file", metavar="PATH", help="read the prompt from this UTF-8 file")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one a line, until EOF")
    p.add_argument("--chat", action="store_true",
                   help="a conversation: each line from stdin is your turn, rendered with the checkpoint's chat "
                        "template (or the default, see docs/finetuning.md); the reply ends with the assistant's turn. "
                        "--prompt or --prompt-file is the first turn")
    p.add_argument("--system", metavar="TEXT", help="with --chat: the system message the conversation starts with")
    p.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                   help="print the prompt before its continuation")
    return p


def _run_prompt(decoder: Decoder, tokenizer: Tokenizer, prompt: str, args: argparse.Namespace, seed: int) -> None:
    """Print the continuation(s) of one prompt to stdout and the speed to stderr."""
    timing = Timing()
    out = sys.stdout
    pieces = stream_batch(decoder, tokenizer, prompt, args.max_new_tokens, seed=seed, num_samples=args.num_samples,
                          stop=args.stop, timing=timing)
    if args.num_samples == 1:
        out.write(prompt if args.echo else "")
        for piece in pieces:
            out.write(piece[0])
            out.flush()
        out.write("\n")
    else:
        texts = ["".join(row) for row in zip(*pieces)] or [""] * args.num_samples
        out.write("\n---\n".join((prompt if args.echo else "") + t for t in texts) + "\n")
    out.flush()
    print(f"{timing.summary()} | seed {seed}", file=sys.stderr)


def _check_fits(model, num_samples: int) -> None:
    """Refuse a batch whose caches and logits alone exceed the machine's memory."""
    c = model.config
    per_row = c.block_size * (2 * getattr(c, "n_layer", 1) * getattr(c, "n_embd", 1) + c.vocab_size)
    check_bytes(4 * num_samples * per_row, f"--num-samples {num_samples}")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte is one prompt's error, not a crash
    if args.seed is not None:
        check_seed(args.seed)
    for text, what in ((args.prompt or "", "--prompt"), *((s, "--stop") for s in args.stop)):
        check_text(text, what)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty)
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    prompt = _prompt(args)
    if prompt is not None:
        check_text(prompt, "the prompt")

    from . import checkpoint

    model, tokenizer = checkpoint.load(args.checkpoint)
    _check_fits(model, args.num_samples)
    decoder = Decoder(model, sampling)
    seed = random_seed() if args.seed is None else args.seed
    try:
        if args.chat:
            return _chat(decoder, tokenizer, args, prompt, seed)
        if prompt is not None:
            _run_prompt(decoder, tokenizer, prompt, args, seed)
        if args.interactive:  # the next seed after the --prompt's, or the first one
            _interact(decoder, tokenizer, args, seed + 1 if prompt is not None else seed)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _prompt(args: argparse.Namespace) -> str | None:
    """The prompt --prompt, --prompt - (stdin) or --prompt-file gives (None: none given)."""
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if args.system is not None and not args.chat:
        raise UserError("--system is the system message of a --chat conversation")
    if args.prompt_file is not None:
        return read_text(Path(args.prompt_file))
    if args.prompt is None and not (args.interactive or args.chat):
        raise UserError("give --prompt TEXT, --prompt-file PATH, --interactive or --chat")
    if args.prompt == "-" and args.chat:
        raise UserError("with --chat, stdin holds the conversation: give the first turn as --prompt TEXT")
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def chat_reply(decoder: Decoder, tokenizer: Tokenizer, messages: Sequence[dict], max_new_tokens: int, *, seed: int,
               stop: Sequence[str] = ()) -> Iterator[str]:
    """Yield the assistant's reply to ``messages`` piece by piece: the conversation rendered with the
    tokenizer's chat template (``chat.py``), continued until the assistant's turn ends."""
    from . import chat

    template, tokens = chat.template_of(tokenizer), chat.special_tokens(tokenizer)
    ids = chat.encode(tokenizer, chat.render(template, messages, add_generation_prompt=True, **tokens))
    stops = [*stop, chat.end_of_turn(template, **tokens)]
    steps = stream_batch(decoder, tokenizer, ids, max_new_tokens, seed=seed, stop=stops)
    yield from (pieces[0] for pieces in steps if pieces[0])


def _chat(decoder: Decoder, tokenizer: Tokenizer, args: argparse.Namespace, first: str | None, seed: int) -> None:
    """A conversation at the terminal: your turns from stdin, one a line, the replies on stdout."""
    from . import chat

    chat.end_of_turn(chat.template_of(tokenizer), **chat.special_tokens(tokenizer))  # a broken template: now, once
    messages = [{"role": "system", "content": args.system}] if args.system else []
    for turn, seed in _turns(first, seed):
        reply = ""
        try:
            check_text(turn, "this turn")
            for piece in chat_reply(decoder, tokenizer, [*messages, {"role": "user", "content": turn}],
                                    args.max_new_tokens, seed=seed, stop=args.stop):
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
            messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": reply.strip()}]
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()


def _turns(first: str | None, seed: int) -> Iterator[tuple[str, int]]:
    """first (if given), then each line from stdin after a "> " on stderr, without its newline, until
    end of input; blank lines are skipped, and each line comes with its seed, one more each time."""
    while True:
        if first is None:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                sys.stderr.write("\n")
                return
            first = line.rstrip("\n")
        if first.strip():
            yield first, seed
            seed += 1
        first = None


def _interact(decoder: Decoder, tokenizer: Tokenizer, args: argparse.Namespace, seed: int) -> None:
    """Prompts from stdin until EOF; Ctrl-C ends the current continuation, not the session."""
    for prompt, seed in _turns(None, seed):
        try:
            check_text(prompt, "this prompt")
            _run_prompt(decoder, tokenizer, prompt, args, seed)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
