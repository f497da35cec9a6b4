"""Package a trained run as the model shipped inside pyjamba, with its model card.

    python scripts/ship_model.py runs/austen --compare runs/austen-transformer runs/austen-mamba

copies `RUN/model` (config, weights, tokenizer) to `pyjamba/assets/model`, adds the generation
defaults, and writes README.md: the recipe command, parameters, tokens seen, validation perplexity,
time and hardware, and the validation perplexity of the comparison runs (same recipe and budget,
another layer pattern). The folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pyjamba.accounting import active_params, total_params
from pyjamba.config import JambaConfig
from pyjamba.data.files import atomic_folder

ROOT = Path(__file__).resolve().parent.parent
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
GENERATION = {
    "do_sample": True,
    "temperature": 0.8,
    "top_p": 0.95,
    "top_k": 40,
    "repetition_penalty": 1.1,
    "max_new_tokens": 200,
}


def describe(run: Path) -> dict[str, Any]:
    """A run's figures, from its exported model's training.json and config."""
    model = run / "model"
    summary = json.loads((model / "training.json").read_text())
    config = JambaConfig.from_pretrained(model)
    kinds = config.layer_types
    return {
        "run": run.name,
        "recipe": f"recipes/{run.name}.toml",
        "pattern": f"{kinds.count('attention')} attention + {kinds.count('mamba')} Mamba layers",
        "moe": f"{config.num_experts} experts, top-{config.num_experts_per_tok}, every {config.expert_layer_period} layers"
        if config.num_experts > 1
        else "dense",
        "total": total_params(config),
        "active": active_params(config),
        "steps": summary["steps"],
        "tokens": summary["tokens_seen"],
        "hours": summary["train_seconds"] / 3600,
        "val_loss": summary["val_loss"],
        "val_ppl": summary["val_ppl"],
        "hardware": summary["hardware"],
        "config": config,
    }


def card(main: dict[str, Any], others: list[dict[str, Any]]) -> str:
    """The model card, in Markdown."""
    c = main["config"]
    rows = "\n".join(
        f"| {r['run']} | {r['pattern']} | {r['moe']} | {r['total'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M "
        f"| {r['tokens'] / 1e6:.2f}M | {r['val_loss']:.3f} | **{r['val_ppl']:.1f}** |"
        for r in [main, *others]
    )
    return f"""# pyjamba-austen

A small Jamba (the hybrid of Mamba layers, attention and Mixture of Experts) trained by pyjamba on
Jane Austen's six novels, shipped inside the package so that `pyjamba generate` works offline:

```bash
pyjamba generate "It is a truth universally acknowledged"
```

It writes Austen-like sentences, not sense: it is {main["total"] / 1e6:.1f}M parameters that saw
{main["tokens"] / 1e6:.2f}M tokens. Licence of the weights: Apache-2.0, as pyjamba; the training text
is public domain (see data/austen/README.md in the repository).

## Architecture

{c.num_hidden_layers} layers, hidden size {c.hidden_size}: {main["pattern"]} (attention at layer
{c.attn_layer_offset}, one in {c.attn_layer_period}), a Mixture of Experts ({main["moe"]}) on every
other layer and a SwiGLU MLP (intermediate {c.intermediate_size}) on the others; Mamba inner width
{c.mamba_inner}, state {c.mamba_d_state}, conv {c.mamba_d_conv}; {c.num_attention_heads} query and
{c.num_key_value_heads} key/value heads; tied embeddings; byte-level BPE vocabulary of
{c.vocab_size}. {main["total"]:,} parameters, {main["active"]:,} active per token.

## Recipe

From the repository root, offline (the cleaned text and tokenizer are committed under data/):

```bash
pyjamba data tokenize data/austen --tokenizer data/austen-tokenizer --out build/austen-tokens --val-fraction 0.05
pyjamba train {main["recipe"]} train.threads=1
python scripts/ship_model.py runs/austen --compare {" ".join("runs/" + r["run"] for r in others)}
```

{main["steps"]} steps of 16 sequences of 256 tokens ({main["tokens"]:,} tokens, about
{main["tokens"] / 921107:.2f} epochs of the 921,107 training tokens), AdamW (lr 3e-3, warmup 100
steps, cosine to 3e-4, weight decay 0.1, clipping at 1.0), float32, load-balancing loss
coefficient 0.01. Training took {main["hours"]:.2f} hours of wall time on {main["hardware"]}
(one thread, sharing the machine's 2 cores with the two comparison runs and other jobs).

## Validation

Perplexity per BPE token on the held-out 5% of chapters (14 chapters, 51,455 tokens), every
target scored once, in order, in windows of 256 tokens. The comparison models were trained with
the same recipe, data order and budget (steps and tokens), only their layer pattern differs:

| model | layers | feed-forward | parameters | active | tokens | val loss | val perplexity |
|---|---|---|---|---|---|---|---|
{rows}

Perplexity over 256-token windows measures short-range language modelling after a small budget (under
one epoch here); it does not test the recall over long contexts that Jamba's attention layers are
there for. Attention has no positional encoding, as in Jamba: a pure Transformer then infers
order from the causal mask alone, the likely reason it learns slowest at this budget.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--compare", type=Path, nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "pyjamba" / "assets" / "model")
    args = parser.parse_args(argv)
    for run in [args.run, *args.compare]:
        if not (run / "model" / "training.json").is_file():
            print(
                f"ship_model: {run} has no finished, exported model (run/model/training.json)",
                file=sys.stderr,
            )
            return 2
    main_run = describe(args.run)
    others = [describe(r) for r in args.compare]
    with atomic_folder(args.out) as tmp:
        _write(tmp, args.run, main_run, others)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(json.dumps({"out": str(args.out), "bytes": size, "val_ppl": main_run["val_ppl"]}))
    return 0


def _write(tmp: Path, run: Path, main_run: dict[str, Any], others: list[dict[str, Any]]) -> None:
    """The shipped folder's files: the run's model and tokenizer, generation defaults, the card."""
    for name in FILES:
        shutil.copyfile(run / "model" / name, tmp / name)
    c = main_run["config"]
    generation = {
        **GENERATION,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
    }
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (tmp / "README.md").write_text(card(main_run, others))


if __name__ == "__main__":
    sys.exit(main())
