"""Moving weights into transparent huge pages changes where they live, never what they are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pyjamba import hugepages
from pyjamba.hugepages import huge_pages_unavailable, move_to_huge_pages
from pyjamba.model import JambaForCausalLM
from pyjamba.testing import PARITY_CONFIGS, random_model

needs_thp = pytest.mark.skipif(huge_pages_unavailable() is not None, reason=str(huge_pages_unavailable()))


@needs_thp
@pytest.mark.parametrize("name", ["dense-mha-tied-projbias", "moe-gqa-untied"])
def test_moved_weights_are_the_same_weights(name: str, tmp_path: Path) -> None:
    model = random_model(PARITY_CONFIGS[name])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
    moved = move_to_huge_pages(model)
    assert moved >= sum(p.numel() * p.element_size() for p in model.parameters())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    first = next(model.parameters())
    assert first.data_ptr() % (2 << 20) == 0  # the arena starts on a huge page
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    # Still trainable and savable.
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path / "saved")
    again = JambaForCausalLM.from_pretrained(tmp_path / "saved")
    for k, v in again.state_dict().items():
        assert torch.equal(v, before[k]), k


@needs_thp
def test_decoding_after_the_move_reads_the_moved_weights() -> None:
    """The fused decode kernels cache numpy views of the weights: a move must not leave them stale."""
    config = PARITY_CONFIGS["jamba-pattern-8"]
    model = random_model(config)
    ids = torch.randint(0, config["vocab_size"], (1, 5))
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=6)
        move_to_huge_pages(model)
        assert torch.equal(model.generate(ids, max_new_tokens=6), first)
        model.model.layers[0].mamba.out_proj.weight.mul_(3.0)  # seen only if the new storage is read
        changed = model.generate(ids, max_new_tokens=6)
    reference = random_model(config)
    with torch.no_grad():
        reference.model.layers[0].mamba.out_proj.weight.mul_(3.0)
        assert torch.equal(reference.generate(ids, max_new_tokens=6), changed)


@pytest.mark.parametrize("setting", ["always madvise [never]", None])
def test_without_huge_pages_nothing_moves(
    setting: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "enabled"
    if setting is not None:
        path.write_text(setting + "\n")
    monkeypatch.setattr(hugepages, "_THP_SETTING", path)
    assert huge_pages_unavailable() is not None
    model = random_model(PARITY_CONFIGS["moe-gqa-untied"])
    pointers = [p.data_ptr() for p in model.parameters()]
    assert move_to_huge_pages(model) == 0
    assert [p.data_ptr() for p in model.parameters()] == pointers
