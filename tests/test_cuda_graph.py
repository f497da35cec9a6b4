"""Graph-captured decoding (cuda_graph.py): the static one-token step, run eagerly on the CPU, against
the model's own step; bucket choice; and, on a GPU, the captured graphs against eager decoding."""

from __future__ import annotations

import pytest
import torch

from pyjamba.cuda_graph import GraphedDecoder, bucket_for
from pyjamba.testing import PARITY_CONFIGS, random_model, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")  # other processes share this CPU


def test_bucket_for() -> None:
    assert [bucket_for(b, 64) for b in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert bucket_for(5, 6) == 6  # never past max_batch
    with pytest.raises(ValueError, match="outside"):
        bucket_for(0, 4)


def _greedy_logits(model, ids, mask, steps, decoder=None) -> torch.Tensor:
    """Logits of each step of greedy decoding (B, steps, V): the model's own step, or the decoder's."""
    cache = model.make_cache(ids.shape[0], max_length=ids.shape[1] + steps)
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1].float()
    full_mask = mask
    if decoder is not None:
        decoder.start(cache, mask)
    out = [logits]
    for _ in range(steps - 1):
        tokens = logits.argmax(-1)
        if decoder is None:
            if full_mask is not None:
                full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
            logits = model(tokens[:, None], attention_mask=full_mask, cache=cache).logits[:, -1].float()
        else:
            logits = decoder.step(tokens)
        out.append(logits)
    return torch.stack(out, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("config", ["moe-gqa-untied", "jamba-pattern-8"])
def test_static_step_matches_the_models_step(config: str) -> None:
    """Three left-padded prompts in a bucket of 4 (one padding row), on the static buffers."""
    model = random_model(PARITY_CONFIGS[config], kernels="torch")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    expected = _greedy_logits(model, ids, mask, steps=6)
    decoder = GraphedDecoder(model, max_batch=4, max_length=12, capture=False)
    actual = _greedy_logits(model, ids, mask, steps=6, decoder=decoder)
    assert relative_error(actual, expected) < 1e-5
    # the decoder starts again from another prefilled cache, of another batch size
    expected = _greedy_logits(model, ids[:1], None, steps=4)
    assert relative_error(_greedy_logits(model, ids[:1], None, steps=4, decoder=decoder), expected) < 1e-5


def test_graphs_need_cuda() -> None:
    model = random_model(PARITY_CONFIGS["moe-gqa-untied"], kernels="torch")
    with pytest.raises(ValueError, match="CUDA device, not on cpu"):
        GraphedDecoder(model, max_batch=2, max_length=8, capture=True)
    with pytest.raises(ValueError, match="CUDA device, not on cpu"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_captured_graphs_match_eager_decoding_on_gpu() -> None:
    source = random_model(PARITY_CONFIGS["jamba-pattern-8"], kernels="torch")
    model = type(source)(source.config, kernels="triton", device="cuda").to("cuda").eval()
    model.load_state_dict(source.state_dict())
    ids = torch.randint(1, model.config.vocab_size, (5, 7), device="cuda")
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, cuda_graphs=True), expected)
