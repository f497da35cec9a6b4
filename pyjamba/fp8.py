"""FP8 checkpoints (AI21's `-FP8` releases and the like): read `quantization_config`, dequantize on load.

AI21 publishes FP8 Jambas (`ai21labs/AI21-Jamba-Mini-1.7-FP8`, `ai21labs/AI21-Jamba-Large-1.7-FP8`)
for vLLM. pyjamba has no FP8 kernels: it multiplies each FP8 weight by its scale once, while reading,
into bfloat16 (or the dtype asked for), so that the rest of the project sees an ordinary model.
Two layouts are read, both with E4M3 weights (safetensors `F8_E4M3`, torch.float8_e4m3fn):

compressed-tensors (llm-compressor's output; what vLLM's compressed-tensors loader reads)::

    "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": true, "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "dynamic": true, ...}}},
        "ignore": ["lm_head", "re:.*router", ...], "kv_cache_scheme": null, ...}

    <module>.weight        F8_E4M3 (out, in)
    <module>.weight_scale  F32/BF16/F16: () or (1,) per tensor; (out, 1) or (out,) per channel;
                           (ceil(out/b0), ceil(in/b1)) per block ("block_structure": [b0, b1])
    <module>.input_scale   (static activations only) consumed and dropped
    <module>.weight_zero_point  (some versions, symmetric: zeros) consumed, must be zero

  "format" may also be "naive-quantized" (the same tensors, an older name). The weight is
  `weight.float() * weight_scale` (compressed-tensors' FloatQuantizationCompressor.decompress_weight).

transformers' FineGrainedFP8 / DeepSeek-V3 ("fp8")::

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128], "modules_to_not_convert": [...]}

    <module>.weight            F8_E4M3 (out, in)
    <module>.weight_scale_inv  F32 (ceil(out/128), ceil(in/128)), multiplied in despite its name
    (without weight_block_size, vLLM's per-tensor layout: <module>.weight_scale () or (1,))

Which tensors are FP8 is read from the files, not from `targets`: a `.weight` stored in F8_E4M3 must
come with its scale, and a scale with its FP8 weight; the ignore list (`ignore`, or
`modules_to_not_convert`) is checked against the files (an ignored module stored in FP8 is an
error) and otherwise needs no action, as its tensors are ordinary ones. Activation quantization
(static or dynamic) is not emulated: activations run in the load dtype, so logits are those of the
dequantized weights, not of vLLM's FP8 x FP8 products. The scale layouts were confirmed from
compressed-tensors' sources and transformers' docs (docs/architecture.md, "Checkpoints: quantized
formats"); the exact config of AI21's FP8 repos was not, so both per-tensor and per-channel (and
block) scales are accepted, each checked against its weight's shape.

Refused, with a FP8FormatError naming the method or field: any other `quant_method` (gptq, awq,
bitsandbytes, ...), another compressed-tensors `format` (pack-quantized, int-quantized, ...),
weights not 8-bit float, asymmetric, group or token strategies, sparsity, transforms, a
kv_cache_scheme, output activations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FP8", "FP8Format", "read_quantization_config"]

FP8 = torch.float8_e4m3fn
FP8_CODE = "F8_E4M3"  # safetensors' dtype code
_SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_CT_FORMATS = ("float-quantized", "naive-quantized")
_CT_INT_FORMAT = "int-quantized"  # int8 weights (W8A16); read by quantize.py's int8 kernels, not dequantized
_ROWS_BYTES = 64 * 2**20  # dequantize in row chunks of about this many float32 bytes


class FP8FormatError(ValueError):
    """A quantization config or an FP8 tensor that cannot be read; checkpoint.py names the file."""


def _fail(message: str) -> FP8FormatError:
    return FP8FormatError(f"quantization_config: {message}")


def _block(value: Any, field: str) -> tuple[int, int]:
    if isinstance(value, str) and re.fullmatch(r"\d+x\d+", value):
        value = [int(v) for v in value.split("x")]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise _fail(f"{field} must be two positive ints [rows, columns], got {value!r}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class FP8Format:
    """What a checkpoint's quantization_config allows: the scale's name, its layouts, the ignore list."""

    method: str  # "compressed-tensors" or "fp8"
    scale_suffix: str  # "weight_scale" or "weight_scale_inv"
    strategies: frozenset[str]  # among "tensor", "channel", "block"
    blocks: frozenset[tuple[int, int]]  # block shapes, for "block"
    ignore: tuple[str, ...]
    aux_suffixes: tuple[str, ...]  # tensors consumed with the weight (input_scale, zero points)
    weight_code: str = FP8_CODE  # the quantized weights' safetensors dtype: F8_E4M3, or I8 (int8)
    targets: tuple[str, ...] = ()  # config_groups' targets (int8: "lm_head" there means a head in int8)

    @property
    def kind(self) -> str:
        """The quantized weights' type in words: "FP8" or "int8"."""
        return "int8" if self.weight_code == "I8" else "FP8"

    # ---- names -----------------------------------------------------------------------------------
    def auxiliary(self, found: Iterable[str]) -> dict[str, str]:
        """{scale or auxiliary tensor name: the `.weight` it belongs to} among the checkpoint's names."""
        out = {}
        for key in found:
            module, _, leaf = key.rpartition(".")
            if leaf == self.scale_suffix or leaf in self.aux_suffixes:
                out[key] = f"{module}.weight"
        return out

    def ignored(self, weight_key: str) -> bool:
        """Whether the module of `weight_key` is on the ignore list (names, or `re:` patterns)."""
        module = weight_key.removesuffix(".weight")
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.match(entry[3:], module):
                    return True
            elif module == entry or module.endswith("." + entry) or module.split(".")[-1] == entry:
                return True
        return False

    # ---- checks ----------------------------------------------------------------------------------
    def check_weight(self, key: str, shape: tuple[int, ...], scale_shape: tuple[int, ...] | None) -> str:
        """The strategy of FP8 weight `key` (out, in) given its scale's shape; FP8FormatError if none fits."""
        if scale_shape is None:
            raise FP8FormatError(
                f"tensor {key} is stored in {self.kind} but the checkpoint has no {self._scale(key)}"
            )
        if self.ignored(key):
            raise FP8FormatError(
                f"tensor {key} is stored in {self.kind}, but quantization_config's ignore list names its module"
            )
        if len(shape) != 2:
            raise FP8FormatError(
                f"tensor {key} is stored in {self.kind} with shape {shape}: only matrices are read"
            )
        fit = self._fit(shape, scale_shape)
        if fit is None:
            out, inp = shape
            layouts = {
                "tensor": "() or (1,)",
                "channel": f"({out}, 1) or ({out},)",
                "block": " or ".join(f"({-(-out // b0)}, {-(-inp // b1)})" for b0, b1 in sorted(self.blocks)),
            }
            wanted = "; ".join(f"{s}: {layouts[s]}" for s in sorted(self.strategies))
            raise FP8FormatError(
                f"tensor {self._scale(key)} has shape {scale_shape}, which fits no strategy of "
                f"quantization_config for a weight of shape {shape} ({wanted})"
            )
        return fit[0]

    def _fit(
        self, shape: tuple[int, ...], scale_shape: tuple[int, ...]
    ) -> tuple[str, tuple[int, int] | None] | None:
        """(strategy, block) that a scale of `scale_shape` has for a weight of `shape` (out, in), or None."""
        out, inp = shape
        if "tensor" in self.strategies and math.prod(scale_shape) == 1 and len(scale_shape) <= 2:
            return "tensor", None
        if "channel" in self.strategies and scale_shape in ((out, 1), (out,)):
            return "channel", None
        for b0, b1 in sorted(self.blocks):
            if scale_shape == (-(-out // b0), -(-inp // b1)):
                return "block", (b0, b1)
        return None

    def _scale(self, weight_key: str) -> str:
        return weight_key.removesuffix("weight") + self.scale_suffix

    def scale_key(self, weight_key: str) -> str:
        """The name of the scale of FP8 weight `weight_key`."""
        return self._scale(weight_key)

    def check_aux(self, key: str, tensor: torch.Tensor) -> None:
        """An auxiliary tensor read at load: zero points must be zero (symmetric quantization)."""
        if key.endswith("zero_point") and bool(tensor.float().ne(0).any()):
            raise FP8FormatError(f"tensor {key} is not zero: asymmetric FP8 quantization is not supported")

    # ---- dequantization --------------------------------------------------------------------------
    def dequantize_into(self, out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`out[...] = weight.float() * scale` (scale broadcast per tensor, row or block), in row chunks.

        `weight` (out, in) is FP8 on the CPU (a view of the mapped file is fine); at most ~64 MB of
        float32 is alive at a time, so a large head or expert never exists whole in float32.
        """
        rows, cols = weight.shape
        fit = self._fit((rows, cols), tuple(scale.shape))
        if fit is None:  # _check refuses such a checkpoint before anything is read
            raise FP8FormatError(
                f"a scale of shape {tuple(scale.shape)} fits no weight of shape {(rows, cols)}"
            )
        strategy, block = fit
        scale = scale.to(torch.float32)
        if strategy == "channel":
            scale = scale.reshape(rows, 1)
        elif strategy == "block":
            b0, b1 = block
            scale = scale.repeat_interleave(b1, dim=1)[:, :cols]  # (ceil(rows / b0), cols)
        step = max(1, _ROWS_BYTES // max(1, 4 * cols))
        if strategy == "block":
            step = max(b0, step // b0 * b0)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            chunk = weight[r0:r1].to(torch.float32)
            if strategy == "tensor":
                chunk.mul_(scale.reshape(()))
            elif strategy == "channel":
                chunk.mul_(scale[r0:r1])
            else:
                # r0 is a multiple of b0 (so is step): block rows r0 // b0 up to the one holding r1 - 1
                chunk.mul_(scale[r0 // b0 : -(-r1 // b0)].repeat_interleave(b0, dim=0)[: r1 - r0])
            out[r0:r1].copy_(chunk)
        return out


# ---- reading quantization_config ---------------------------------------------------------------
def read_quantization_config(qc: Any) -> FP8Format | None:
    """The FP8 layout that config.json's `quantization_config` declares (None: no quantization_config).

    Raises FP8FormatError naming the method, format or field that pyjamba cannot dequantize.
    """
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise _fail(f"must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "fp8":
        return _fp8(qc)
    raise _fail(
        f"quant_method {method!r} is not supported: pyjamba reads FP8 checkpoints only "
        "(quant_method 'compressed-tensors' with format 'float-quantized', or 'fp8'); "
        "load an unquantized (bfloat16) checkpoint instead"
    )


def _ignore_list(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(f"{field} must be a list of module names, got {value!r}")
    return tuple(value)


def _config_groups(qc: Mapping[str, Any]) -> Mapping[str, Any]:
    """compressed-tensors' config_groups, after refusing the fields no format here supports."""
    for field in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if qc.get(field):
            raise _fail(f"{field} is not supported (got {qc[field]!r})")
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise _fail("config_groups must be a non-empty object of quantization schemes")
    return groups


def _compressed_tensors(qc: Mapping[str, Any]) -> FP8Format:
    fmt = qc.get("format")
    if fmt == _CT_INT_FORMAT:
        return _compressed_int8(qc)
    if fmt not in _CT_FORMATS:
        raise _fail(
            f"compressed-tensors format {fmt!r} is not supported (only {' or '.join(map(repr, _CT_FORMATS))}: "
            f"FP8 weights, or {_CT_INT_FORMAT!r} with int8 per-channel weights)"
        )
    groups = _config_groups(qc)
    strategies: set[str] = set()
    blocks: set[tuple[int, int]] = set()
    for name, group in groups.items():
        where = f"config_groups.{name}"
        if not isinstance(group, Mapping):
            raise _fail(f"{where} must be an object")
        if group.get("format") not in (None, *_CT_FORMATS):
            raise _fail(f"{where}.format {group['format']!r} is not supported")
        if group.get("output_activations"):
            raise _fail(f"{where}.output_activations is not supported")
        weights = group.get("weights")
        if not isinstance(weights, Mapping):
            raise _fail(f"{where}.weights must be an object (weight quantization), got {weights!r}")
        if weights.get("num_bits") != 8 or weights.get("type") != "float":
            raise _fail(
                f"{where}.weights: num_bits {weights.get('num_bits')!r}, type {weights.get('type')!r} is not "
                "supported (only num_bits 8, type 'float': FP8 E4M3)"
            )
        if weights.get("symmetric", True) is not True:
            raise _fail(f"{where}.weights.symmetric must be true (asymmetric FP8 is not supported)")
        if weights.get("dynamic", False):
            raise _fail(f"{where}.weights.dynamic must be false (weights carry stored scales)")
        if weights.get("actorder"):
            raise _fail(f"{where}.weights.actorder {weights['actorder']!r} is not supported")
        strategy = weights.get("strategy", "tensor")
        if strategy not in ("tensor", "channel", "block"):
            raise _fail(f"{where}.weights.strategy {strategy!r} is not supported (tensor, channel or block)")
        strategies.add(strategy)
        if strategy == "block":
            blocks.add(_block(weights.get("block_structure"), f"{where}.weights.block_structure"))
        acts = group.get("input_activations")
        if acts is not None and (not isinstance(acts, Mapping) or acts.get("type", "float") != "float"):
            raise _fail(f"{where}.input_activations {acts!r} is not supported (FP8 activations or none)")
    return FP8Format(
        method="compressed-tensors",
        scale_suffix="weight_scale",
        strategies=frozenset(strategies),
        blocks=frozenset(blocks),
        ignore=_ignore_list(qc.get("ignore"), "ignore"),
        aux_suffixes=("input_scale", "weight_zero_point", "input_zero_point"),
    )


def _compressed_int8(qc: Mapping[str, Any]) -> FP8Format:
    """compressed-tensors' int-quantized layout as pyjamba writes it (quantize.py) and llm-compressor's
    W8A16: int8 weights, symmetric, one float scale per output channel, activations unquantized."""
    groups = _config_groups(qc)
    for name, group in groups.items():
        where = f"config_groups.{name}"
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if not isinstance(weights, Mapping):
            raise _fail(f"{where}.weights must be an object (weight quantization), got {weights!r}")
        wanted = {"num_bits": 8, "type": "int", "strategy": "channel"}
        for key, value in wanted.items():
            if weights.get(key) != value:
                raise _fail(
                    f"{where}.weights.{key} {weights.get(key)!r} is not supported with format "
                    f"{_CT_INT_FORMAT!r} (only int8 weights, symmetric, per channel)"
                )
        if (
            weights.get("symmetric", True) is not True
            or weights.get("dynamic", False)
            or weights.get("actorder")
        ):
            raise _fail(
                f"{where}.weights: only symmetric, static int8 weights without actorder are supported"
            )
        for acts in ("input_activations", "output_activations"):
            if group.get(acts):
                raise _fail(
                    f"{where}.{acts} is not supported: int8 weights with unquantized activations only"
                )
    return FP8Format(
        method="compressed-tensors",
        scale_suffix="weight_scale",
        strategies=frozenset({"channel"}),
        blocks=frozenset(),
        ignore=_ignore_list(qc.get("ignore"), "ignore"),
        aux_suffixes=("weight_zero_point",),
        weight_code="I8",
        targets=tuple(
            t for group in groups.values() for t in group.get("targets") or () if isinstance(t, str)
        ),
    )


def _fp8(qc: Mapping[str, Any]) -> FP8Format:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _fail(f"fp8 fmt {fmt!r} is not supported (only 'e4m3')")
    if qc.get("activation_scheme", "dynamic") not in ("dynamic", "static"):
        raise _fail(f"activation_scheme {qc['activation_scheme']!r} is not supported")
    ignore = _ignore_list(qc.get("modules_to_not_convert"), "modules_to_not_convert")
    ignore += _ignore_list(qc.get("ignored_layers"), "ignored_layers")
    if qc.get("weight_block_size") is not None:
        block = _block(qc["weight_block_size"], "weight_block_size")
        return FP8Format(
            "fp8", "weight_scale_inv", frozenset({"block"}), frozenset({block}), ignore, ("input_scale",)
        )
    return FP8Format("fp8", "weight_scale", frozenset({"tensor"}), frozenset(), ignore, ("input_scale",))
