"""`pyjamba generate` and `pyjamba chat`: text from a Jamba model folder (or the shipped model).

Sampling defaults are the ones users know (temperature 0.8, top-p 0.95, top-k 40) unless the
model's `generation_config.json` says otherwise; options on the command line win over both.
The model loads through `runtime.load` (`--dtype`, `--kernels`, `--threads`); `--verbose` says on
stderr which kernels and dtype were chosen, and why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from .checkpoint import CheckpointError
from .config import ConfigError
from .dtypes import DTYPE_CHOICES
from .pipeline import TextGenerator
from .quantize import METHODS
from .runtime import KERNEL_NAMES, Choices, ModelNotFoundError, load
from .sampling import NonFiniteLogits, SamplingError, SamplingParams
from .tokenizer import TokenizerError

__all__ = ["add_weight_options", "chat_main", "generate_main", "print_choices"]

CLI_DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "max_new_tokens": 256}


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", help="model folder or Hugging Face repo id (default: the shipped model)")
    parser.add_argument("--max-new-tokens", type=int, help=f"default {CLI_DEFAULTS['max_new_tokens']}")
    parser.add_argument("--temperature", type=float, help="0 for greedy; default 0.8")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass; default 0.95")
    parser.add_argument(
        "--top-k", type=int, help="sample among the k likeliest tokens; default 40, 0 for all"
    )
    parser.add_argument(
        "--min-p", type=float, help="drop tokens below min-p times the likeliest one's probability"
    )
    parser.add_argument("--repetition-penalty", type=float, help="1 for none")
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    add_weight_options(parser)
    return parser


def add_weight_options(parser: argparse.ArgumentParser) -> None:
    """--dtype, --kernels, --quantize, --threads and --verbose, as every command that loads a model for inference
    takes them (the arguments of `runtime.load`)."""
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights' dtype (auto: the fastest on this machine; stored: as in the checkpoint)",
    )
    parser.add_argument(
        "--kernels",
        choices=KERNEL_NAMES,
        default="auto",
        help="the Mamba scan's kernels (auto: numba on CPU when it is installed, else torch; "
        "reference: the plain loop, slow)",
    )
    parser.add_argument(
        "--quantize",
        choices=METHODS,
        help="int8 weights, quantized while loading: experts-int8 (the MoE experts and MLPs, as AI21 "
        "serves Jamba) or int8 (every projection)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--verbose", action="store_true", help="say on stderr which kernels and dtype were chosen, and why"
    )


def print_choices(prog: str, choices: Choices | None) -> None:
    """What --verbose prints on stderr: 'pyjamba: kernels numba (why), dtype float32 (why), ...'."""
    if choices is not None:
        print(f"{prog}: {choices.summary()}", file=sys.stderr, flush=True)


def _options(args: argparse.Namespace, generator: TextGenerator) -> dict:
    """Generation options: command line over generation_config.json over the CLI's defaults."""
    options = {k: v for k, v in CLI_DEFAULTS.items() if k not in generator.defaults}
    given = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop_strings": args.stop,
    }
    options.update({k: v for k, v in given.items() if v is not None})
    temperature = options.get("temperature", generator.defaults.get("temperature", 1.0))
    options["do_sample"] = temperature > 0
    return options


_SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


def _check_sampling(args: argparse.Namespace) -> None:
    """The sampling options by the rules generate and the server share, before any model loads."""
    given = {name: getattr(args, name) for name in _SAMPLING_OPTIONS if getattr(args, name) is not None}
    try:
        SamplingParams(**given)
    except SamplingError as exc:
        raise ValueError(f"--{exc.param.replace('_', '-')}: {exc}") from exc


def _load(args: argparse.Namespace) -> TextGenerator:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    generator = load(
        args.model, dtype=args.dtype, kernels=args.kernels, threads=args.threads, quantize=args.quantize
    )
    if args.verbose:
        print_choices("pyjamba", generator.choices)
    return generator


def _run(body: Callable[[], int], prog: str) -> int:
    """Run a command, turning the errors a user can cause into one line on stderr and exit code 2
    (a model that produces NaN logits: exit code 1)."""
    try:
        return body()
    except (ModelNotFoundError, CheckpointError, ConfigError, TokenizerError, ValueError, TypeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLogits as exc:  # not the user's doing: the model is broken
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _write_stream(pieces: Iterator[str], out: TextIO) -> str:
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    return "".join(text)


def generate_main(argv: list[str]) -> int:
    """`pyjamba generate [PROMPT] [--model DIR] ...`: continue a prompt (from stdin when absent)."""
    parser = _parser("pyjamba generate", "Continue a prompt with a Jamba model, streaming the text.")
    parser.add_argument("prompt", nargs="?", help="the prompt (default: read from standard input)")
    args = parser.parse_args(argv)

    def body() -> int:
        _check_sampling(args)
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        generator = _load(args)
        options = _options(args, generator)
        sys.stdout.write(prompt)
        _write_stream(generator.stream_ids(generator.encode_prompt(prompt), **options), sys.stdout)
        sys.stdout.write("\n")
        return 0

    return _run(body, "pyjamba generate")


def chat_main(argv: list[str]) -> int:
    """`pyjamba chat [--model DIR] ...`: a multi-turn conversation with the model's chat template."""
    parser = _parser("pyjamba chat", "Chat with a Jamba model (/reset starts over, /exit or Ctrl-D quits).")
    parser.add_argument("--system", help="a system message that opens the conversation")
    args = parser.parse_args(argv)

    def body() -> int:
        _check_sampling(args)
        generator = _load(args)
        if generator.tokenizer.chat_template is None:
            raise TokenizerError(f"{generator.tokenizer.path} has no chat template: `pyjamba chat` needs one")
        options = _options(args, generator)
        opening = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(opening)
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return 0
            text = line.rstrip("\n")
            if text.strip() == "/reset":
                messages = list(opening)
                print("(conversation reset)")
                continue
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            reply = _write_stream(
                generator.stream_ids(generator.encode_chat(messages), **options), sys.stdout
            )
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": reply})

    return _run(body, "pyjamba chat")
