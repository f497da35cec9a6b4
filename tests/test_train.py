"""The trainer end to end on a tiny corpus: it learns, resumes exactly, ignores half-written
checkpoints, carries state, fine-tunes on chat lines, and exports a model that loads."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from pyjamba import JambaForCausalLM
from pyjamba.data import tokenize_corpus, train_tokenizer
from pyjamba.train import checkpoints
from pyjamba.train.config import RecipeError, TrainRecipe
from pyjamba.train.trainer import Trainer, rows_per_process

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters."
)

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=4,
    attn_layer_offset=2, mamba_d_state=8, max_position_embeddings=512, router_aux_loss_coef=0.01,
)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def make_corpus(root: Path) -> tuple[Path, Path]:
    """A tokenizer and token arrays from a few dozen short documents."""
    words = TEXT.split()
    docs = [" ".join(words[i % 20 :] + words[: i % 20]) for i in range(40)]
    (root / "text.txt").write_text("\n\n".join(docs) + "\n")
    tokenizer = train_tokenizer([root / "text.txt"], 300, root / "tokenizer")
    tokenize_corpus([root / "text.txt"], tokenizer, root / "tokens", val_fraction=0.1, progress=False)
    return root / "tokenizer", root / "tokens"


def recipe(corpus, out_dir: Path, **sections) -> TrainRecipe:
    tokenizer, tokens = corpus
    data = {
        "model": {"preset": "jamba-tiny", "overrides": dict(TINY), "kernels": "torch"},
        "data": {"tokens": str(tokens), "tokenizer": str(tokenizer), "seq_len": 32, "batch_size": 4},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {"out_dir": str(out_dir), "max_steps": 6, "log_every": 1, "eval_every": 3, "eval_batches": 2,
                  "checkpoint_every": 3, "threads": 1},
    }  # fmt: skip
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return TrainRecipe.from_dict(data)


def losses(out_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_training_lowers_the_loss_and_exports_a_loadable_model(corpus, tmp_path):
    result = Trainer(
        recipe(corpus, tmp_path, train={"max_steps": 30, "eval_every": 30, "checkpoint_every": 30})
    ).run()
    assert result["finished"] and result["step"] == 30
    curve = losses(tmp_path)
    assert curve[30] < curve[1] - 1.0
    assert result["val_ppl"] == pytest.approx(2.718281828 ** result["val_loss"], rel=1e-3)
    model = JambaForCausalLM.from_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    summary = json.loads((tmp_path / "model" / "training.json").read_text())
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 4 * 32
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("state_passing", [False, True])
def test_resume_gives_exactly_the_uninterrupted_losses(corpus, tmp_path, state_passing):
    data = {"state_passing": state_passing}
    Trainer(recipe(corpus, tmp_path / "straight", data=data)).run()
    # The same run stopped at step 3 (with a checkpoint), then resumed in a new Trainer.
    Trainer(
        recipe(corpus, tmp_path / "resumed", data=data, train={"stop_at": 3, "checkpoint_every": 100})
    ).run()
    assert checkpoints.latest_checkpoint(tmp_path / "resumed").name == "step-00000003"
    Trainer(recipe(corpus, tmp_path / "resumed", data=data, train={"checkpoint_every": 100})).run()
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert list(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == straight  # bit for bit: model, optimizer, data position, carried state restored
    a = JambaForCausalLM.from_pretrained(tmp_path / "straight" / "model").state_dict()
    b = JambaForCausalLM.from_pretrained(tmp_path / "resumed" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_half_written_and_corrupt_checkpoints_are_ignored(corpus, tmp_path):
    Trainer(recipe(corpus, tmp_path / "straight")).run()
    out = tmp_path / "run"
    Trainer(recipe(corpus, out, train={"stop_at": 3, "keep_last": 3})).run()
    ckpts = out / "checkpoints"
    # A crash while writing step 6 leaves its .tmp folder; a complete-looking step 5 is unreadable.
    shutil.copytree(ckpts / "step-00000003", ckpts / "step-00000006.tmp")
    (ckpts / "step-00000006.tmp" / "trainer.json").write_text('{"step": 6}')
    shutil.copytree(ckpts / "step-00000003", ckpts / "step-00000005")
    for f in (ckpts / "step-00000005").glob("*.distcp"):
        f.write_bytes(b"garbage")
    (ckpts / "step-00000005" / "trainer.json").write_text(
        (ckpts / "step-00000003" / "trainer.json").read_text().replace('"step": 3', '"step": 5')
    )
    Trainer(recipe(corpus, out, train={"keep_last": 3})).run()
    assert not (ckpts / "step-00000006.tmp").exists()
    assert losses(out) == losses(tmp_path / "straight")  # resumed from step 3, the last good one


def test_time_limit_stops_with_a_checkpoint(corpus, tmp_path):
    result = Trainer(recipe(corpus, tmp_path, train={"max_minutes": 1e-9, "max_steps": 50})).run()
    assert result["step"] == 1 and not result["finished"]
    assert checkpoints.latest_checkpoint(tmp_path).name == "step-00000001"
    assert not (tmp_path / "model").exists()


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    dense = {
        "model": {"preset": "jamba-tiny", "overrides": {**TINY, "num_experts": 1, "num_experts_per_tok": 1}}
    }
    one = Trainer(recipe(corpus, tmp_path / "one", **dense, train={"export": False}))
    one.run()
    accum = Trainer(
        recipe(corpus, tmp_path / "accum", **dense, optim={"grad_accum": 4}, train={"export": False})
    )
    accum.run()
    a, b = losses(tmp_path / "one"), losses(tmp_path / "accum")
    assert a.keys() == b.keys()
    assert all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_activation_checkpointing_gives_the_same_losses(corpus, tmp_path):
    Trainer(recipe(corpus, tmp_path / "plain", train={"export": False})).run()
    Trainer(
        recipe(corpus, tmp_path / "ckpt", train={"export": False, "activation_checkpointing": True})
    ).run()
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    assert all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_bad_data_and_model_fields_are_named(corpus, tmp_path):
    with pytest.raises(RecipeError, match=r"data\.tokens"):
        Trainer(recipe(corpus, tmp_path, data={"tokens": str(tmp_path / "nowhere")}))
    with pytest.raises(RecipeError, match="hidden_size"):
        Trainer(recipe(corpus, tmp_path, model={"overrides": {**TINY, "hidden_size": 30}}))
    with pytest.raises(RecipeError, match="does not split over 2 processes"):
        rows_per_process(
            TrainRecipe.from_dict(
                {**BASE, "data": {"tokens": "t", "batch_size": 6}, "optim": {"grad_accum": 2}}
            ),
            2,
        )
    assert (
        rows_per_process(
            TrainRecipe.from_dict(
                {**BASE, "data": {"tokens": "t", "batch_size": 8}, "optim": {"grad_accum": 2}}
            ),
            2,
        )
        == 2
    )


BASE = {"model": {"preset": "jamba-tiny"}}


def test_sft_learns_only_the_assistant_tokens(corpus, tmp_path):
    """Fine-tuning a pretrained model on chat lines: the loss counts the assistant's tokens alone."""
    Trainer(recipe(corpus, tmp_path / "base", train={"max_steps": 3, "checkpoint_every": 3})).run()
    tokenizer, _ = corpus
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"Say {w}"},
                {"role": "assistant", "content": f"{w} indeed"},
            ]
        }
        for w in ("truth", "fortune", "wife", "man", "neighbourhood", "families", "daughters", "minds")
    ]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(line) + "\n" for line in lines))
    sft = TrainRecipe.from_dict(
        {
            "model": {"init_from": str(tmp_path / "base" / "model"), "kernels": "torch"},
            "data": {"sft": str(chat), "tokenizer": str(tokenizer), "seq_len": 64, "batch_size": 2},
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            "train": {"out_dir": str(tmp_path / "sft"), "max_steps": 3, "log_every": 1, "eval_every": 3,
                      "checkpoint_every": 3, "threads": 1},
        }
    )  # fmt: skip
    trainer = Trainer(sft)
    # The first step's loss, computed by hand over the assistant's tokens of the same batch.
    probe = Trainer(sft)
    batch = probe.source.next_batch(probe.loader)
    assistant = batch.labels != -100
    assert 0 < int(assistant.sum()) < int(batch.attention_mask.sum())  # prompts are not targets
    with torch.no_grad():
        logits = probe.model(batch.input_ids, attention_mask=batch.attention_mask).logits
    expected = torch.nn.functional.cross_entropy(logits[assistant], batch.labels[assistant]).item()
    result = trainer.run()
    assert losses(tmp_path / "sft")[1] == pytest.approx(expected, abs=1e-4)
    assert result["finished"] and math.isfinite(result["val_loss"])


def test_cli_reports_bad_recipes_in_one_line(tmp_path, capsys):
    from pyjamba.train.cli import main

    assert main([str(tmp_path / "missing.toml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    path = tmp_path / "r.toml"
    path.write_text('[model]\npreset = "jamba-tiny"\n[data]\ntokens = "t"\n')
    assert main([str(path), "optim.lr=-1"]) == 2
    assert "optim.lr must be a finite number >= 0" in capsys.readouterr().err
    assert main([str(path), "--print-recipe", "train.max_steps=7"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["max_steps"] == 7


def test_a_quantized_checkpoint_is_refused_as_a_starting_point(corpus, tmp_path):
    from pyjamba.checkpoint import from_pretrained
    from pyjamba.train.config import RecipeError

    Trainer(recipe(corpus, tmp_path / "base", train={"max_steps": 1, "checkpoint_every": 1})).run()
    from_pretrained(tmp_path / "base" / "model", quantize="experts-int8").save_pretrained(tmp_path / "int8")
    quantized = recipe(corpus, tmp_path / "again")
    quantized.model.init_from, quantized.model.preset, quantized.model.overrides = (
        str(tmp_path / "int8"),
        None,
        {},
    )
    with pytest.raises(RecipeError, match=r"holds experts-int8 weights, which do not train"):
        Trainer(quantized)
