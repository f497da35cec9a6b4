"""Weight-only int8 quantization: ExpertsInt8 (the Jamba 1.5 paper's) and int8 for every projection.

Both are symmetric, per output channel, with no calibration, as the paper and vLLM's ExpertsInt8
define it: a weight row w (its input dimension) becomes round(w / s) in int8 with s = max|w| / 127,
kept in float32. The activations stay in the model's dtype; the kernels dequantize in registers
(`ops.linear` with a `scale` is the reference: dequantize, then F.linear).

    experts-int8  the MoE experts and the dense MLPs (over 85% of a Jamba's parameters)
    int8          those, and every other projection: attention q/k/v/o, Mamba in/x/dt/out. The
                  router (a few rows that decide the routing), the embeddings and the head stay
                  as loaded.
    int8-head     int8 and the language-model head, as llama.cpp's Q8_0 has it: a small model's
                  head is much of what each decoded token reads (jamba-small's tied 65536 x 512
                  table: 43% of its parameters). A head tied to the embeddings gets an int8 copy of
                  its own; the embeddings, of which a token reads one row, stay as loaded.

A quantized module holds an int8 `weight` (an nn.Linear's, or an Experts stack) and its scales
beside it: `weight_scale` (out,) on a Linear, `<stack>_scale` (E, out) on Experts (model.py).
On disk a quantized checkpoint is compressed-tensors' "int-quantized" layout (llm-compressor's
W8A16, which vLLM also reads): `<module>.weight` I8 (out, in) and `<module>.weight_scale` F32
(out, 1), with config.json's `quantization_config` saying so (`quantization_config`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "METHODS",
    "is_quantized",
    "method_of",
    "prepare",
    "quantization_config",
    "quantize_model",
    "quantize_rows",
    "quantized_names",
    "scale_name",
]

METHODS = ("experts-int8", "int8", "int8-head")
HEAD = "lm_head.weight"
_FEED_FORWARD = re.compile(r"model\.layers\.\d+\.feed_forward\.(experts\.)?(gate|up|down)_proj(\.weight)?$")
_PROJECTIONS = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mamba\.(in|x|dt|out)_proj)\.weight$")


def check_method(method: str | None) -> str | None:
    """`method` if it is one of METHODS or None; else a ValueError naming the choices."""
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    return method


def quantize_rows(weight: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of `weight` (..., out, in): (int8 of its shape, float32 scales (..., out)).

    scale = max|w| / 127 over the row (0 for an all-zero row, whose int8 are 0), q = round(w / scale).
    Computed in float32 a block of `rows` rows at a time, so that a large bfloat16 weight does not
    take a float32 copy of itself.
    """
    flat = weight.reshape(-1, weight.shape[-1])
    q = torch.empty(flat.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(flat.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, flat.shape[0], rows):
        block = flat[start : start + rows].to(torch.float32)
        s = block.abs().amax(dim=-1) / 127.0
        scale[start : start + rows] = s
        inverse = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q[start : start + rows] = torch.round(block * inverse[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(weight.shape), scale.view(weight.shape[:-1])


def quantized_names(names: list[str] | Iterator[str], method: str) -> list[str]:
    """Of the model's parameter names (model.py's), those `method` quantizes."""
    check_method(method)
    out = []
    for name in names:
        if (
            _FEED_FORWARD.match(name)
            or (method != "experts-int8" and _PROJECTIONS.match(name))
            or (method == "int8-head" and name == HEAD)
        ):
            out.append(name)
    return out


def scale_name(name: str) -> str:
    """The buffer holding the scales of quantized parameter `name` (model.py's names)."""
    return name + "_scale"


@torch.no_grad()
def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantize `model` (a JambaForCausalLM) in place with `method`; returns it.

    Each chosen weight is replaced by its int8 rows (a Parameter without gradient) and its scales
    are set beside it. Weights already int8 are left as they are. A head tied to the embeddings is
    replaced in the head alone: the embeddings keep the float Parameter.
    """
    for name in quantized_names([n for n, _ in model.named_parameters(remove_duplicate=False)], method):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        weight = owner._parameters[leaf]
        if weight.dtype == torch.int8:
            continue
        q, scale = quantize_rows(weight)
        owner._parameters[leaf] = nn.Parameter(q, requires_grad=False)
        setattr(owner, scale_name(leaf), scale)
    return model


def prepare(model: nn.Module, names: list[str]) -> None:
    """Make the parameters `names` of a model on the meta device int8, with meta scale buffers beside
    them, so that its state_dict is what a checkpoint with those weights in int8 loads into."""
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        weight = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(
            torch.empty(weight.shape, dtype=torch.int8, device="meta"), requires_grad=False
        )
        setattr(owner, scale_name(leaf), torch.empty(weight.shape[:-1], dtype=torch.float32, device="meta"))


def is_quantized(model: nn.Module) -> bool:
    """Whether any of the model's weights is int8."""
    return any(p.dtype == torch.int8 for p in model.parameters())


def method_of(model: nn.Module) -> str | None:
    """The method a model's int8 weights follow: "int8-head" with an int8 head, "int8" with int8
    attention or Mamba projections, "experts-int8" with only int8 feed-forward weights, None if none
    is int8."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.dtype == torch.int8]
    if not names:
        return None
    if HEAD in names:
        return "int8-head"
    return "int8" if any(_PROJECTIONS.match(n) for n in names) else "experts-int8"


def quantization_config(method: str) -> dict:
    """config.json's `quantization_config` for a checkpoint quantized with `method`: compressed-tensors'
    int-quantized, int8 symmetric per channel weights, unquantized activations (W8A16)."""
    targets = ["re:.*feed_forward.*_proj$"]
    if method != "experts-int8":
        targets += ["re:.*self_attn\\.[qkvo]_proj$", "re:.*mamba\\.(in|x|dt|out)_proj$"]
    if method == "int8-head":
        targets.append("lm_head")
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": targets,
                "weights": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "channel",
                    "dynamic": False,
                },
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ["re:.*router$"] if method == "int8-head" else ["lm_head", "re:.*router$"],
        "kv_cache_scheme": None,
        "pyjamba_method": method,
    }


def main(argv: list[str] | None = None) -> int:
    """`pyjamba quantize SRC DST --method experts-int8|int8`: write a quantized copy of a model folder."""
    import argparse
    import sys
    import time

    from .checkpoint import CheckpointError, load_model
    from .config import ConfigError

    parser = argparse.ArgumentParser(
        prog="pyjamba quantize",
        description="Write an int8 copy of a Jamba model folder (int8 safetensors with float32 scales, "
        "compressed-tensors' int-quantized layout); the tokenizer and other files come along.",
    )
    parser.add_argument("source", help="model folder to quantize")
    parser.add_argument("destination", help="folder to write (replaced atomically if it exists)")
    parser.add_argument("--method", choices=METHODS, default="experts-int8", help="default: experts-int8")
    parser.add_argument("--max-shard-size", default="5GB", help="default 5GB")
    args = parser.parse_args(argv)
    from .model import JambaForCausalLM

    try:
        start = time.perf_counter()
        model = load_model(
            JambaForCausalLM,
            args.source,
            dtype="stored",
            kernels="torch",
            quantize=args.method,
            progress=True,
        )
        model.save_pretrained(
            args.destination, max_shard_size=args.max_shard_size, copy_files_from=args.source
        )
    except (CheckpointError, ConfigError, ValueError, OSError) as exc:
        print(f"pyjamba quantize: error: {exc}", file=sys.stderr)
        return 2
    int8 = sum(p.numel() for p in model.parameters() if p.dtype == torch.int8)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"pyjamba quantize: wrote {args.destination} ({args.method}: {int8 / total:.0%} of the parameters in "
        f"int8) in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 0
