"""`pyjamba data SUBCOMMAND`: clean the Austen texts, train a BPE tokenizer, tokenize a corpus.

    pyjamba data clean-austen SRC_DIR OUT_DIR
    pyjamba data tokenizer FILES_OR_DIRS... --vocab-size N --out DIR
    pyjamba data tokenize FILES_OR_DIRS... --tokenizer DIR --out DIR [--val-fraction 0.05]

Errors are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from pyjamba.data.bpe import train_tokenizer
from pyjamba.data.clean import clean_austen
from pyjamba.data.files import DataError
from pyjamba.data.tokenize import DOC_SPLITS, tokenize_corpus
from pyjamba.tokenizer import TokenizerError

__all__ = ["main"]

PROG = "pyjamba data"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Prepare training data.")
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    c = sub.add_parser(
        "clean-austen",
        help="Gutenberg-style Austen novels to one chapter per document, one paragraph per line",
        description="Clean every *.txt novel in SRC_DIR into OUT_DIR (same names) and copy COPYRIGHT.debian.",
    )
    c.add_argument("src", metavar="SRC_DIR")
    c.add_argument("out", metavar="OUT_DIR")

    t = sub.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer, saved as a Hugging Face tokenizer folder",
        description="Train a byte-level BPE on text files (folders: their *.txt files).",
    )
    t.add_argument("files", nargs="+", metavar="FILES_OR_DIRS")
    t.add_argument("--vocab-size", type=int, required=True, help="ids in all, special tokens included")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often")
    t.add_argument("--model-max-length", type=int, default=2048)

    k = sub.add_parser(
        "tokenize",
        help="tokenize text into memory-mapped train/val token arrays with document boundaries",
        description="Tokenize text files (folders: their *.txt files) into train.bin/val.bin, "
        "train.docs.npy/val.docs.npy and meta.json.",
    )
    k.add_argument("files", nargs="+", metavar="FILES_OR_DIRS")
    k.add_argument("--tokenizer", required=True, metavar="DIR")
    k.add_argument("--out", required=True, metavar="DIR")
    k.add_argument("--val-fraction", type=float, default=0.05, help="of the documents (default 0.05)")
    k.add_argument("--seed", type=int, default=0, help="chooses the validation documents")
    k.add_argument(
        "--doc-split",
        choices=DOC_SPLITS,
        default="blank",
        help="documents are blank-line separated blocks (default), lines, or whole files",
    )
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand: 0 on success, 2 on a usage error or input that cannot be used."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage or help
        return int(exc.code or 0)
    try:
        if args.command == "clean-austen":
            report = clean_austen(args.src, args.out)
            documents = sum(r["documents"] for r in report.values())
            print(f"cleaned {len(report)} novels into {args.out}: {documents} documents (chapters)")
        elif args.command == "tokenizer":
            out = train_tokenizer(
                args.files,
                args.vocab_size,
                args.out,
                min_frequency=args.min_frequency,
                model_max_length=args.model_max_length,
                progress=sys.stderr.isatty(),
            )
            print(f"wrote the tokenizer to {out}")
        else:
            meta = tokenize_corpus(
                args.files,
                args.tokenizer,
                args.out,
                val_fraction=args.val_fraction,
                seed=args.seed,
                doc_split=args.doc_split,
                progress=not args.no_progress,
            )
            train, val = meta["splits"]["train"], meta["splits"]["val"]
            print(
                f"wrote {args.out}: train {train['tokens']:,} tokens in {train['documents']} documents, "
                f"val {val['tokens']:,} tokens in {val['documents']} documents ({meta['dtype']})"
            )
    except (DataError, TokenizerError, OSError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0
