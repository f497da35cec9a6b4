"""Two CPU processes under torchrun (gloo, FSDP2) against one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyjamba import JambaForCausalLM
from pyjamba.data import tokenize_corpus, train_tokenizer

RECIPE = """
[model]
preset = "jamba-tiny"
kernels = "torch"
[model.overrides]
hidden_size = 32
intermediate_size = 64
router_aux_loss_coef = 0.01
[data]
tokens = "{tokens}"
tokenizer = "{tokenizer}"
seq_len = 32
batch_size = 4
[optim]
lr = 3e-3
warmup_steps = 1
[train]
max_steps = 6
log_every = 1
eval_every = 3
checkpoint_every = 3
threads = 1
"""


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    sentence = "It is a truth universally acknowledged that a single man in possession of a good fortune"
    words = sentence.split()
    docs = [" ".join(words[i % 15 :] + words[: i % 15]) for i in range(40)]
    (root / "text.txt").write_text("\n\n".join(docs) + "\n")
    tokenizer = train_tokenizer([root / "text.txt"], 300, root / "tokenizer")
    tokenize_corpus([root / "text.txt"], tokenizer, root / "tokens", val_fraction=0.1, progress=False)
    path = root / "recipe.toml"
    path.write_text(RECIPE.format(tokens=root / "tokens", tokenizer=tokenizer))
    return path


def train(recipe: Path, out_dir: Path, processes: int, *overrides: str) -> dict[int, dict]:
    """Run `pyjamba train` in `processes` processes; the metrics by step."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--standalone",
    ]
    command = (launcher if processes > 1 else [sys.executable]) + ["-m", "pyjamba", "train", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, f"train.out_dir={out_dir}", *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps: dict[int, dict] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["step"], {}).update(record)
    return steps


def test_two_processes_match_one_on_the_same_global_batch(recipe_file, tmp_path):
    one = train(recipe_file, tmp_path / "one", 1)
    two = train(recipe_file, tmp_path / "two", 2)
    assert one.keys() == two.keys() == set(range(1, 7))
    for step in one:
        # The cross-entropy of a step is the same sum over the same tokens; only the load-balancing
        # loss, computed per process on its half of the batch, nudges the gradients apart.
        assert abs(one[step]["loss"] - two[step]["loss"]) < 2e-3, (step, one[step], two[step])
    assert abs(one[6]["val_loss"] - two[6]["val_loss"]) < 2e-3
    assert one[6]["loss"] < one[1]["loss"]
    JambaForCausalLM.from_pretrained(tmp_path / "two" / "model")  # the export gathers the shards


def test_a_two_process_checkpoint_resumes_in_one_process(recipe_file, tmp_path):
    dense = ["model.overrides.num_experts=1", "model.overrides.num_experts_per_tok=1"]
    straight = train(recipe_file, tmp_path / "straight", 1, *dense)
    train(recipe_file, tmp_path / "mixed", 2, *dense, "train.stop_at=3")
    mixed = train(recipe_file, tmp_path / "mixed", 1, *dense)
    assert mixed.keys() == straight.keys()
    for step in straight:  # a dense model: the sharded steps are the single-process steps
        assert abs(straight[step]["loss"] - mixed[step]["loss"]) < 1e-4, (step, straight[step], mixed[step])
