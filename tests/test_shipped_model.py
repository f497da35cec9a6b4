"""The model that ships inside the package: present, small, a Jamba hybrid, and it writes text offline."""

from __future__ import annotations

import json
import subprocess
import sys

from pyjamba.config import JambaConfig
from pyjamba.data import CHATML_TEMPLATE
from pyjamba.runtime import SHIPPED_MODEL, load


def test_it_is_a_small_hybrid_with_its_card_and_tokenizer():
    files = {p.name: p.stat().st_size for p in SHIPPED_MODEL.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert name in files, name
    assert sum(files.values()) < 50e6
    config = JambaConfig.from_pretrained(SHIPPED_MODEL)
    kinds = config.layer_types
    assert 1 <= kinds.count("attention") < kinds.count("mamba")  # mostly Mamba, some attention
    moe = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)]
    assert moe == [i % 2 == 1 for i in range(config.num_hidden_layers)]  # experts on every other layer
    card = (SHIPPED_MODEL / "README.md").read_text()
    assert "val perplexity" in card and "recipes/austen.toml" in card
    assert json.loads((SHIPPED_MODEL / "generation_config.json").read_text())["do_sample"] is True
    # The template the tokenizer trainer writes (data/chatml.jinja) is the one shipped: a model trained
    # again from the recipe keeps function calling.
    assert (
        json.loads((SHIPPED_MODEL / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    )


def test_greedy_continuation_is_english_words():
    generator = load(None)
    text = generator.complete("It is a truth universally acknowledged", max_new_tokens=24, do_sample=False)
    words = text.split()
    assert len(words) >= 8
    # A trained model continues with real words, not byte soup: most are plain lower-case letters.
    plain = [w for w in words if w.strip(".,;:!?'\"").isalpha()]
    assert len(plain) >= 0.7 * len(words), text


def test_the_readme_main_job_runs():
    command = [sys.executable, "-m", "pyjamba", "generate", "It is a truth universally acknowledged"]
    done = subprocess.run(
        [*command, "--max-new-tokens", "16", "--seed", "0"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("It is a truth universally acknowledged")
    assert len(done.stdout.split()) > 8
