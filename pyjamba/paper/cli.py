"""`pyjamba paper CLAIM [OPTIONS]`: maps each claim to the module that measures it."""

from __future__ import annotations

import importlib
import sys

from .output import MissingExtra, pyplot

CLAIMS: dict[str, str] = {
    "throughput": "prefill and decode speed against context: the 1:7 hybrid beside two Transformers",
    "memory": "KV cache and Mamba state of the released configs, contexts a budget holds, measured prefill memory",
    "recall": "train pure Mamba, the hybrid and pure attention on associative recall and a needle in a haystack",
}


def _usage() -> str:
    lines = ["usage: pyjamba paper CLAIM [OPTIONS]", "", "claims:"]
    lines += [f"  {name:<11} {help_}" for name, help_ in CLAIMS.items()]
    lines += ["", "`pyjamba paper CLAIM --help` for its options; results and plots: docs/papers.md."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Dispatch to the claim's main(); 2 on an unknown claim or a missing optional dependency."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    claim, rest = argv[0], argv[1:]
    if claim not in CLAIMS:
        print(f"pyjamba paper: unknown claim {claim!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        if not {"-h", "--help"} & set(rest):
            pyplot()  # every claim ends in a plot: say before measuring, not after, that it cannot
        return int(importlib.import_module(f"pyjamba.paper.{claim}").main(rest) or 0)
    except MissingExtra as exc:
        print(f"pyjamba paper {claim}: error: {exc}", file=sys.stderr)
        return 2
