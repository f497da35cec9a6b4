"""`pyjamba VERB ...` and `python -m pyjamba VERB ...`: maps each verb to the function that runs it."""

from __future__ import annotations

import importlib
import logging
import sys

# verb -> ("module" or "module:function", one-line help); the function (default main) takes argv
# (list[str]) and returns the exit code.
VERBS: dict[str, tuple[str, str]] = {
    "info": ("pyjamba.info", "parameters, attention-cache and Mamba-state memory of a preset or folder"),
    "generate": ("pyjamba.cli:generate_main", "continue a prompt with a model, streaming the text"),
    "chat": ("pyjamba.cli:chat_main", "a multi-turn conversation with a model's chat template"),
    "quantize": ("pyjamba.quantize", "write an int8 copy of a model folder (experts-int8 or int8)"),
    "bench": ("pyjamba.bench", "prefill and decode speed on the CPU, pyjamba against transformers"),
    "serve": ("pyjamba.serve.cli", "an OpenAI-compatible HTTP server with continuous batching"),
    "train": (
        "pyjamba.train.cli",
        "train or fine-tune a model from a TOML recipe (torchrun for many processes)",
    ),
    "data": (
        "pyjamba.data.cli",
        "clean text, train a BPE tokenizer, tokenize a corpus into memory-mapped arrays",
    ),
    "paper": (
        "pyjamba.paper.cli",
        "the papers' claims measured in miniature: throughput, memory, recall (docs/papers.md)",
    ),
}


def _usage() -> str:
    lines = ["usage: pyjamba VERB [ARGS...]", "", "verbs:"]
    lines += [f"  {verb:<10} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "`pyjamba VERB --help` for a verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a verb's main()."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"pyjamba: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    module_name, _, function = VERBS[verb][0].partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, function or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
