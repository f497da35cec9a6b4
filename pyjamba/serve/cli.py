"""`pyjamba serve`: a model folder as a local OpenAI-compatible endpoint.

What a user can get wrong (no model folder, no tokenizer, a bad option) is checked before the server
starts and reported in one line (exit code 2). The weights then load in the background while
/health answers 503 "loading". SIGTERM or Ctrl-C drains: new requests get 503, running and queued
ones finish (up to --shutdown-timeout seconds), then the process exits 0; a second signal exits at once.
If the model cannot be loaded, or the engine gives up (its model step failing again and again), the
process exits 1, so that a supervisor (systemd, Kubernetes) restarts it rather than keeping a server
that answers 503 forever.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from types import FrameType

from .. import runtime
from ..checkpoint import CheckpointError
from ..cli import add_weight_options, print_choices
from ..config import ConfigError
from ..runtime import ModelNotFoundError
from ..tokenizer import TokenizerError
from .app import Backend, ServerState, Settings, create_app
from .constrain import ConstraintError, compiler_for
from .engine import Engine

__all__ = ["main"]

logger = logging.getLogger(__name__)

_SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyjamba serve", description="Serve a Jamba model over an OpenAI-compatible HTTP API."
    )
    p.add_argument("--model", help="model folder or Hugging Face repo id (default: the shipped model)")
    p.add_argument("--served-model-name", help="the name clients ask for (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument(
        "--prefill-chunk", type=int, default=128, help="prompt tokens per prefill step (default 128)"
    )
    p.add_argument(
        "--prefix-block",
        type=int,
        help="prompt tokens per prefix-cache block, a multiple of --prefill-chunk (default: the chunk, "
        "at least 64)",
    )
    p.add_argument(
        "--prefix-cache-mib",
        type=float,
        help="memory for the prefix cache, in MiB; 0 turns it off (default: 1/8 of the memory "
        "available, at most 2048)",
    )
    p.add_argument(
        "--max-queue", type=int, default=64, help="sequences waiting for a slot before 429 (default 64)"
    )
    p.add_argument(
        "--max-context", type=int, help="prompt plus output tokens (default: max_position_embeddings)"
    )
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (all routes but /health)")
    p.add_argument("--cors-origins", help="comma-separated origins allowed by CORS (default: CORS off)")
    p.add_argument("--max-body-mib", type=float, default=8.0, help="largest request body (default 8 MiB)")
    p.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds to drain on SIGTERM (default 30)"
    )
    add_weight_options(p)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("port", "slots", "prefill_chunk", "prefix_block", "max_queue", "max_context", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.max_context is not None and args.max_context < 2:
        raise ValueError(f"--max-context must be at least 2, got {args.max_context}")
    if not args.max_body_mib > 0:
        raise ValueError(f"--max-body-mib must be positive, got {args.max_body_mib}")
    if args.prefix_cache_mib is not None and not args.prefix_cache_mib >= 0:
        raise ValueError(f"--prefix-cache-mib must be 0 (off) or positive, got {args.prefix_cache_mib}")
    if args.prefix_block is not None and args.prefix_block % args.prefill_chunk:
        raise ValueError(
            f"--prefix-block ({args.prefix_block}) must be a multiple of --prefill-chunk "
            f"({args.prefill_chunk}): cached prefixes end where prefill chunks end"
        )


def _backend(folder: Path, args: argparse.Namespace) -> Backend:
    """Load the model (`runtime.load`: weights in huge pages, tokenizer, generation defaults, stop
    tokens) and start nothing yet (the app starts the engine): runs in a background thread."""
    loaded = runtime.load(
        folder, dtype=args.dtype, kernels=args.kernels, threads=args.threads, quantize=args.quantize
    )
    if args.verbose or args.log_level in ("debug", "info"):
        print_choices("pyjamba serve", loaded.choices)
    engine = Engine(
        loaded.model,
        slots=args.slots,
        prefill_chunk=args.prefill_chunk,
        max_queue=args.max_queue,
        max_context=args.max_context,
        prefix_block=args.prefix_block,
        prefix_cache_bytes=None if args.prefix_cache_mib is None else int(args.prefix_cache_mib * 2**20),
    )
    if engine.prefix_cache is not None:
        cache = engine.prefix_cache
        logger.info("prefix cache: blocks of %d tokens, up to %.0f MiB", cache.block, cache.capacity / 2**20)
    # The grammar library's view of the vocabulary (seconds for a 65K one): built while /health still
    # says "loading", not in the first structured-output request. A tokenizer it cannot read costs
    # structured output only (those requests get a 400 saying why), never the server.
    try:
        compiler_for(loaded.tokenizer, engine.vocab_size)
    except ConstraintError as exc:
        logger.warning("%s", exc)
    # A request's sampling settings default to those generation_config.json sets.
    defaults = {k: v for k, v in loaded.defaults.items() if k in _SAMPLING_DEFAULTS}
    name = args.served_model_name or folder.name
    logger.info("serving %s from %s", name, folder)
    return Backend(
        engine, loaded.tokenizer, name, defaults=defaults, stop_tokens=frozenset(loaded.eos_token_ids)
    )


def _server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose first SIGTERM/SIGINT drains the engine instead of closing at once."""

        def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
            super().__init__(config)
            self.state = state
            self.drain_timeout = drain_timeout
            self.drain_deadline: float | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Not uvicorn's handler: it would re-raise the signal after shutdown (exit by signal, not 0).
            if self.state.draining:
                self.should_exit = self.force_exit = True
                return
            self.state.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout

        async def on_tick(self, counter: int) -> bool:
            drained = self.state.draining and (
                self.state.idle() or time.monotonic() > (self.drain_deadline or 0)
            )
            # A dead engine would answer 503 forever: exit (non-zero) so that a supervisor restarts us.
            if drained or self.state.load_error is not None or self.state.engine_error is not None:
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


def main(argv: list[str]) -> int:
    """`pyjamba serve [--model DIR] [--port N] ...`."""
    args = _parser().parse_args(argv)
    try:
        _check(args)
        # config.json, the tokenizer, generation_config.json, the kernels: all but the weights
        folder = runtime.check(args.model, dtype=args.dtype, kernels=args.kernels, threads=args.threads)
    except (ModelNotFoundError, CheckpointError, ConfigError, TokenizerError, ValueError) as exc:
        print(f"pyjamba serve: error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    origins = tuple(o.strip() for o in (args.cors_origins or "").split(",") if o.strip())
    settings = Settings(
        api_key=args.api_key, cors_origins=origins, max_body_bytes=int(args.max_body_mib * 2**20)
    )
    app = create_app(lambda: _backend(folder, args), settings)
    state: ServerState = app.state.server
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level in ("debug", "info"),
        timeout_graceful_shutdown=5,
    )
    server = _server_class()(uv_config, state, args.shutdown_timeout)
    print(
        f"pyjamba serve: {folder} on http://{args.host}:{args.port}/v1 ({args.slots} slots)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind the port
        return int(exc.code or 1)
    if state.load_error is not None:
        print(f"pyjamba serve: error: could not load the model: {state.load_error}", file=sys.stderr)
        return 1
    if state.engine_error is not None:
        print(f"pyjamba serve: error: the engine failed: {state.engine_error}", file=sys.stderr)
        return 1
    return 0
