"""`pyjamba train RECIPE.toml [section.key=value ...]`, alone or under torchrun.

Exit status: 0 done (or stopped with a checkpoint), 2 a bad recipe, missing data or unreadable
checkpoints, 3 the run diverged (the checkpoints on disk are the last finite ones), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch.distributed as dist

from ..config import ConfigError
from .checkpoints import CheckpointCorrupt
from .config import RecipeError, TrainingDiverged, TrainRecipe

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyjamba train",
        description="Train or fine-tune a Jamba model from a TOML recipe; resumes from its last checkpoint. "
        "Under `torchrun --nproc_per_node N -m pyjamba train ...` it runs data parallel (FSDP2).",
    )
    parser.add_argument("recipe", help="a TOML recipe (see recipes/ in the repository)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="override recipe fields, e.g. optim.lr=1e-3"
    )
    parser.add_argument(
        "--print-recipe", action="store_true", help="print the resolved recipe as JSON and exit"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a recipe; a bad recipe, missing data, unreadable checkpoints or divergence is a one-line error."""
    args = _parser().parse_intermixed_args(argv)
    try:
        recipe = TrainRecipe.from_toml(args.recipe, args.overrides)
        if args.print_recipe:
            print(json.dumps(recipe.to_dict(), indent=2))
            return 0
        from .trainer import Trainer

        if int(os.environ.get("RANK", "0")) == 0:  # one process reports
            logging.getLogger("pyjamba").setLevel(logging.INFO)
        try:
            result = Trainer(recipe).run()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except (RecipeError, ConfigError, CheckpointCorrupt, FileNotFoundError) as e:
        print(f"pyjamba train: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"pyjamba train: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("pyjamba train: interrupted", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0
