"""Structured output's cost: the grammar libraries side by side, and the engine with and without a mask.

Part `library` (why pyjamba uses llguidance): for each tokenizer (the shipped model's 4,096-token
byte-level BPE, the real Jamba2 65,536-token byte-fallback one) and each library installed
(llguidance; xgrammar if importable), the tokenizer set-up, the compile time of a typical JSON
schema (fresh, no cache; median of --repeats), and per token along a valid document's tokens: the
time to fill the next-token bitmask and to apply it to a row of logits (median and p90, in µs).
llguidance's mask is applied as the engine applies it (constrain.py: unpack to bools, masked_fill);
xgrammar's with its own CPU `apply_token_bitmask_inplace`.

Part `decode`: the serving engine's decode speed, with and without a json_schema constraint, on the
shipped model and on a random jamba-small (the Jamba2 tokenizer), --batch sequences at a time, each
running to --tokens (the schema needs a long array, so it never completes first), plain and
constrained runs alternating for --rounds (medians); `mask_us_per_token` is the time inside
`constrain.allowed_tokens` (fill + unpack + stop tokens) per generated token.

    python benchmarks/bench_structured.py --threads 2
    python benchmarks/bench_structured.py --parts library --repeats 20

One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
JAMBA2 = ROOT / "tests" / "fixtures" / "real" / "jamba2-tokenizer" / "tokenizer.json.gz"

# A typical response schema: nested object, enum, bounded integers, an array of objects, optional fields.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "priority": {"enum": ["low", "medium", "high"]},
        "attendees": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer", "minimum": 0, "maximum": 130},
                    "email": {"type": "string"},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            },
        },
        "confirmed": {"type": "boolean"},
        "notes": {"type": "string"},
    },
    "required": ["title", "date", "priority", "attendees", "confirmed"],
    "additionalProperties": False,
}
DOCUMENT = {
    "title": "Ball at Netherfield",
    "date": "1811-11-26",
    "priority": "high",
    "attendees": [
        {"name": "Elizabeth Bennet", "age": 20, "email": "lizzy@longbourn.example"},
        {"name": "Fitzwilliam Darcy", "age": 28},
        {"name": "Charles Bingley", "age": 22, "email": "charles@netherfield.example"},
    ],
    "confirmed": True,
    "notes": "Mr Collins will ask for the first two dances; Wickham does not come.",
}
# For decoding: an array that must be long, so a sequence never completes before --tokens.
LONG_SCHEMA = {
    "type": "object",
    "properties": {"lines": {"type": "array", "items": {"type": "string"}, "minItems": 10000}},
    "required": ["lines"],
}


def _stats(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "median": round(statistics.median(values), 2),
        "p90": round(values[int(0.9 * (len(values) - 1))], 2),
    }


def _tokenizer_files(folder: Path) -> dict[str, Path]:
    from pyjamba.runtime import SHIPPED_MODEL

    files = {"shipped-4096": SHIPPED_MODEL / "tokenizer.json"}
    if JAMBA2.is_file():
        path = folder / "jamba2" / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.decompress(JAMBA2.read_bytes()))
        files["jamba2-65536"] = path
    return files


def _apply_ours(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    from pyjamba.serve.constrain import _unpack

    logits.masked_fill_(~_unpack(bitmask, logits.shape[1]), float("-inf"))


def bench_llguidance(name: str, path: Path, repeats: int) -> dict:
    import llguidance
    import llguidance.torch

    start = time.perf_counter()
    tokenizer = llguidance.LLTokenizer(path.read_text(), eos_token=2)
    setup = time.perf_counter() - start
    layout = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
    compiles = []
    for _ in range(repeats):
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, overrides=layout)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        compiles.append(time.perf_counter() - start)
    assert not matcher.is_error(), matcher.get_error()
    ids = tokenizer.tokenize_str(json.dumps(DOCUMENT))
    bitmask = torch.zeros(1, (tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
    fills, applies = [], []
    for token in ids:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        filled = time.perf_counter()
        logits = torch.randn(1, tokenizer.vocab_size)
        applied = time.perf_counter()
        _apply_ours(logits, bitmask)
        done = time.perf_counter()
        fills.append((filled - start) * 1e6)
        applies.append((done - applied) * 1e6)
        assert logits[0, token] > float("-inf") and matcher.consume_token(token)
    assert matcher.is_stopped()
    return _library_line("llguidance", version("llguidance"), name, setup, compiles, fills, applies, len(ids))


def bench_xgrammar(name: str, path: Path, repeats: int) -> dict:
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf), stop_token_ids=[2])
    setup = time.perf_counter() - start
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiles = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        compiles.append(time.perf_counter() - start)
    matcher = xgrammar.GrammarMatcher(compiled)
    ids = hf.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    fills, applies = [], []
    for token in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        filled = time.perf_counter()
        logits = torch.randn(1, info.vocab_size)
        applied = time.perf_counter()
        xgrammar.apply_token_bitmask_inplace(logits, bitmask)
        done = time.perf_counter()
        fills.append((filled - start) * 1e6)
        applies.append((done - applied) * 1e6)
        assert logits[0, token] > float("-inf") and matcher.accept_token(token)
    return _library_line("xgrammar", version("xgrammar"), name, setup, compiles, fills, applies, len(ids))


def _library_line(library, version, name, setup, compiles, fills, applies, tokens) -> dict:
    return {
        "bench": "structured-library",
        "library": library,
        "version": version,
        "tokenizer": name,
        "tokenizer_setup_ms": round(setup * 1e3, 1),
        "compile_ms": round(statistics.median(compiles) * 1e3, 2),
        "tokens": tokens,
        "fill_us": _stats(fills),
        "apply_us": _stats(applies),
    }


def library(repeats: int) -> None:
    try:
        import xgrammar
    except ImportError:
        xgrammar = None
        print(json.dumps({"bench": "structured-library", "library": "xgrammar", "skipped": "not installed"}))
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _tokenizer_files(Path(tmp)).items():
            print(json.dumps(bench_llguidance(name, path, repeats)), flush=True)
            if xgrammar is not None:
                print(json.dumps(bench_xgrammar(name, path, repeats)), flush=True)


# ---- the engine -----------------------------------------------------------------------------


def _models(folder: Path):
    from pyjamba.config import JambaConfig
    from pyjamba.model import JambaForCausalLM
    from pyjamba.runtime import SHIPPED_MODEL
    from pyjamba.tokenizer import Tokenizer

    yield "shipped", JambaForCausalLM.from_pretrained(SHIPPED_MODEL), Tokenizer.from_pretrained(SHIPPED_MODEL)
    files = _tokenizer_files(folder)
    if "jamba2-65536" in files:
        torch.manual_seed(0)
        model = JambaForCausalLM(JambaConfig.from_preset("jamba-small").replace(max_position_embeddings=4096))
        model.init_weights()
        yield "jamba-small-random", model.eval(), Tokenizer.from_pretrained(files["jamba2-65536"].parent)


def _decode_run(model, tokenizer, batch: int, tokens: int, constrained: bool) -> dict:
    from pyjamba.serve import constrain
    from pyjamba.serve import engine as engine_module
    from pyjamba.serve.engine import Engine, Finished, Sequence, Token
    from pyjamba.serve.sampling import SamplingParams

    masks = {"seconds": 0.0, "rows": 0}
    fill = constrain.allowed_tokens

    def timed(rows, vocab_size):  # the engine's own function, timed
        start = time.perf_counter()
        out = fill(rows, vocab_size)
        masks["seconds"] += time.perf_counter() - start
        masks["rows"] += len(rows)
        return out

    engine_module.allowed_tokens = timed
    compiler = constrain.Compiler(tokenizer, model.config.vocab_size)
    constraint = compiler.compile(constrain.Spec("json", json.dumps(LONG_SCHEMA))) if constrained else None
    prompt = tokenizer.encode("Write the list as JSON.")
    stamps: list[float] = []
    done: list[bool] = []

    def emit(event) -> None:
        if isinstance(event, Token):
            stamps.append(time.perf_counter())
        elif isinstance(event, Finished):
            done.append(True)

    params = SamplingParams(temperature=1.0, seed=1)
    seqs = [
        Sequence(prompt, tokens, params, emit, constraint=constraint.matcher() if constraint else None)
        for _ in range(batch)
    ]
    engine = Engine(model, slots=batch, prefill_chunk=256, max_queue=batch)
    engine.start()
    try:
        engine.submit(seqs)
        while len(done) < batch:
            time.sleep(0.005)
    finally:
        engine.stop(10)
        engine_module.allowed_tokens = fill
    # Decode only: from the batch's first token to its last (prefill and first tokens excluded).
    stamps = sorted(stamps)[batch - 1 :]
    seconds = stamps[-1] - stamps[0]
    generated = len(stamps) - 1
    line = {"tok_s": round(generated / seconds, 1), "tokens": generated}
    if constrained:
        line["mask_us_per_token"] = round(masks["seconds"] / max(masks["rows"], 1) * 1e6, 1)
    return line


def decode(batches: list[int], tokens: int, rounds: int, threads: int | None) -> None:
    """Plain and constrained runs alternate for `rounds` rounds; each speed is the median."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, tokenizer in _models(Path(tmp)):
            if threads:  # loading a model may have set torch's threads (the numba kernels' set-up)
                torch.set_num_threads(threads)
            for batch in batches:
                runs = {False: [], True: []}
                for _ in range(rounds):
                    for constrained in (False, True):
                        runs[constrained].append(_decode_run(model, tokenizer, batch, tokens, constrained))
                plain = {"tok_s": statistics.median(r["tok_s"] for r in runs[False])}
                schema = {
                    key: statistics.median(r[key] for r in runs[True])
                    for key in ("tok_s", "mask_us_per_token")
                }
                line = {
                    "bench": "structured-decode",
                    "model": name,
                    "vocab": model.config.vocab_size,
                    "batch": batch,
                    "tokens": tokens,
                    "rounds": rounds,
                    "threads": torch.get_num_threads(),
                    "plain_tok_s": plain["tok_s"],
                    "json_schema_tok_s": schema["tok_s"],
                    "ratio": round(schema["tok_s"] / plain["tok_s"], 3),
                    "mask_us_per_token": schema["mask_us_per_token"],
                }
                print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", default=["library", "decode"], choices=["library", "decode"])
    parser.add_argument("--repeats", type=int, default=10, help="compiles timed per library and tokenizer")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="decode batch sizes")
    parser.add_argument("--tokens", type=int, default=64, help="tokens each sequence decodes")
    parser.add_argument("--rounds", type=int, default=3, help="decode runs of each kind, alternating")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "library" in args.parts:
        library(args.repeats)
    if "decode" in args.parts:
        with torch.no_grad():
            decode(args.batch, args.tokens, args.rounds, args.threads)


if __name__ == "__main__":
    main()
