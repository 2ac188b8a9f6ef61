"""Serve a checkpoint over HTTP: ``python -m mlx_gpt.serve --checkpoint DIR`` (``mlx-gpt serve``).

OpenAI's API (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``), ``/health`` and a
page at ``/`` to try the model, on uvicorn and Starlette (the ``serve`` extra). Requests are
decoded together by continuous batching (``batcher``); ``openai_api`` checks requests and
shapes answers; ``app`` holds the routes. It listens on 127.0.0.1 unless told otherwise: the
server has no authentication, so expose it beyond this machine only behind one.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys
from pathlib import Path
from typing import Sequence

from .. import flags
from ..errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gpt.serve",
                                description="Serve a checkpoint with OpenAI's HTTP API.",
                                formatter_class=flags.DefaultsShown)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (float or quantized)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one, printed)")
    p.add_argument("--name", help="the model id clients name (default: the checkpoint directory's name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together at most")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for room at most; more get 503")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take, queued and running; then it ends")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens fed per step of the batch")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body read, in MB (413 beyond)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs each request)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--prefill-chunk", args.prefill_chunk)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not args.timeout > 0 or not args.max_body_mb > 0:
        raise UserError("--timeout and --max-body-mb must be positive")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0 .. 65535, got {args.port}")
    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("starlette") is None:
        raise UserError("serving needs uvicorn and starlette: pip install -e '.[serve]'")

    from ..quantize import load
    from .app import create_app
    from .batcher import Engine
    from .openai_api import ModelInfo, max_token_chars

    model, tokenizer = load(args.checkpoint)
    if not (getattr(model, "accepts_fixed_cache", False) and hasattr(model, "head")):
        raise UserError(f"{args.checkpoint} holds a {type(model).__name__}; the server runs GPT and modern GPT "
                        "checkpoints")
    name = args.name or Path(args.checkpoint).resolve().name
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue, timeout=args.timeout,
                    prefill_chunk=args.prefill_chunk)
    info = ModelInfo(name, tokenizer, model.block_size, model.config.vocab_size, args.max_batch,
                     max_token_chars(tokenizer, model.config.vocab_size))
    app = create_app(engine, info, max_body=int(args.max_body_mb * 2**20))
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    engine.start()
    try:
        serve(app, sock, engine, args.log_level,
              f"serving {name} at http://{_url_host(host)}:{port}/ (OpenAI API under /v1; Ctrl-C stops)")
    finally:
        engine.stop()
        sock.close()


def serve(app, sock: socket.socket, engine, log_level: str, banner: str) -> None:
    """Run uvicorn on a bound socket until Ctrl-C (then KeyboardInterrupt, for exit status 130).

    Ctrl-C ends the requests in flight at once (each gets an error) rather than waiting for
    them, so the server stops in moments; uvicorn then re-raises the signal.
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.shutdown("the server is shutting down")
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"),
                            timeout_graceful_shutdown=5, lifespan="off")
    print(banner, file=sys.stderr, flush=True)
    Server(config).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear error (the port taken, the address not this machine's)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
