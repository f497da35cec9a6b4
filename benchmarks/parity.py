"""Parity report: pyjamba against transformers' JambaForCausalLM on every tiny parity config.

Prints one JSON line per config: the relative error (||ours - theirs|| / ||theirs||, float32) of the
full forward, of prefill + 8 decoding steps, of a left-padded batch (against each sequence alone,
and against transformers where it pads the same way), and the aux-loss difference.

    python benchmarks/parity.py
"""

from __future__ import annotations

import json
import warnings

import torch

from pyjamba.testing import PARITY_CONFIGS, random_model, relative_error, to_transformers


@torch.no_grad()
def report(name: str) -> dict:
    model = random_model(PARITY_CONFIGS[name])
    hf = to_transformers(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (2, 24), generator=g)
    theirs = hf(ids, output_router_logits=any(layer.is_moe for layer in model.model.layers))
    ours = model(ids, output_router_logits=True)
    row = {"config": name, "full_forward": relative_error(ours.logits, theirs.logits)}

    cache = model.make_cache(batch_size=2)
    steps = [model(ids[:, :16], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(16, 24)]
    row["prefill_plus_8_decode"] = relative_error(torch.cat(steps, dim=1), theirs.logits)

    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    padded = model(ids, attention_mask=mask).logits
    alone = model(ids[1:, 9:]).logits[0]
    row["left_padded_vs_alone"] = relative_error(padded[1, 9:], alone)
    if not model.config.mamba_proj_bias:  # transformers leaks the projection bias through padding
        hf_padded = hf(ids, attention_mask=mask).logits
        row["left_padded_vs_transformers"] = relative_error(padded[:, 9:], hf_padded[:, 9:])
    if ours.aux_loss is not None:
        row["aux_loss_abs_diff"] = abs(ours.aux_loss.item() - theirs.aux_loss.item())
    return row


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    for name in sorted(PARITY_CONFIGS):
        row = report(name)
        print(json.dumps({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()}))


if __name__ == "__main__":
    main()
