"""Checkpoints in Hugging Face's layout: the name maps, loading (meta + mmap + assign), atomic saving.

pyjamba's tensor names are the checkpoint's except for the experts of a MoE layer, which pyjamba keeps
stacked and the checkpoint stores one per expert:

    pyjamba                                        Hugging Face checkpoint
    model.layers.{i}.feed_forward.experts.gate_proj  (E, I, D)   ...experts.{j}.gate_proj.weight  (I, D)
    model.layers.{i}.feed_forward.experts.up_proj    (E, I, D)   ...experts.{j}.up_proj.weight    (I, D)
    model.layers.{i}.feed_forward.experts.down_proj  (E, D, I)   ...experts.{j}.down_proj.weight  (D, I)

and a tied head (`tie_word_embeddings`), which transformers leaves out of the file: `lm_head.weight`
is the embedding. `from_hf` and `to_hf` are that map as pure functions over dicts. A tied config whose
files hold an `lm_head.weight` anyway loads tied if it equals the embedding, else untied, as
transformers 5 does (`_untie_distinct_head`).

`load_model` (and `from_pretrained`, the same for JambaForCausalLM) builds the model on the meta
device, checks every name, shape and dtype in the files against it, then hands
`load_state_dict(assign=True)` tensors that cost no copy where none is needed: a tensor in the wanted
dtype is a view of the memory-mapped file (pages come in when first touched), and each expert stack
is read with plain file reads straight into the stacked parameter, so that the per-expert tensors
never sit in memory next to their stack. checkpoint.py never imports model.py at its top (model.py
imports it): `load_model` is given the class to build.

`save_pretrained` writes into a temporary sibling folder that then replaces the old one
(folders.py: in one step where Linux's renameat2 can exchange them, else by two renames), so that a
save that fails, or is killed, leaves the previous checkpoint or the new one, never neither. A kill
between the two renames leaves the old folder aside; `recover_folder` (called by `from_pretrained`
and the next save) puts it back if it is a complete model folder. The next save deletes what an
interrupted one left. Only safetensors are read or written: a pickle checkpoint
(`pytorch_model.bin`) can run arbitrary code when loaded.

A config.json with a `quantization_config` is read through fp8.py: FP8 checkpoints (AI21's `-FP8`
releases) are dequantized tensor by tensor while loading, any other quantization is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from . import folders, fp8
from . import quantize as quantization
from .config import JambaConfig
from .dtypes import auto_dtype, cpu_has_native_bf16, parse_dtype, resolve_dtype
from .folders import replace_folder
from .kernels import Kernels, resolve_kernels

if TYPE_CHECKING:
    from .model import JambaForCausalLM

__all__ = [
    "CheckpointError",
    "auto_dtype",
    "cpu_has_native_bf16",
    "from_hf",
    "from_pretrained",
    "load_model",
    "parse_size",
    "recover_folder",
    "replace_folder",
    "save_pretrained",
    "to_hf",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_FILE = re.compile(r"pytorch_model(-\d{5}-of-\d{5})?\.bin(\.index\.json)?")
# Files a save replaces; anything else in the folder (tokenizer, generation config, README) is kept.
_MODEL_FILE = re.compile(
    r"config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
    + _PICKLE_FILE.pattern
)

_HF_EXPERT = re.compile(
    r"(?P<stack>.+\.experts)\.(?P<j>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight(?P<scale>_scale)?"
)
# An expert stack, or the per-row scales of an int8 one (quantize.py): (E, out) here, (out, 1) each on disk.
_STACKED_EXPERT = re.compile(
    r"(?P<stack>.+\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)(?P<scale>_scale)?"
)
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"

# safetensors' dtype codes for the floating-point dtypes a Jamba checkpoint may hold.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded: the message names the file and, where one is at fault, a tensor."""


# ---- the name map --------------------------------------------------------------------------------
def expert_names(name: str, num_experts: int) -> list[str] | None:
    """The checkpoint names of the E per-expert tensors stacked into pyjamba tensor `name` (else None)."""
    match = _STACKED_EXPERT.fullmatch(name)
    if match is None:
        return None
    leaf = "weight_scale" if match["scale"] else "weight"
    return [f"{match['stack']}.{j}.{match['proj']}.{leaf}" for j in range(num_experts)]


def from_hf(state: Mapping[str, torch.Tensor], config: JambaConfig) -> dict[str, torch.Tensor]:
    """Checkpoint names -> pyjamba names: per-expert weights stacked (E, out, in), every other tensor as is.

    Each value of `state` is read once (a lazy Mapping works). With tie_word_embeddings, `lm_head.weight`
    is the embedding, whether or not `state` has one. Raises CheckpointError if a stack lacks an expert.
    """
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, str]] = {}
    for key in state:
        match = _HF_EXPERT.fullmatch(key)
        if match is None:
            # An int8 weight's scales are (out, 1) on disk (compressed-tensors), (out,) here.
            out[key] = state[key].flatten() if key.endswith(".weight_scale") else state[key]
        else:
            stacks.setdefault(f"{match['stack']}.{match['proj']}{match['scale'] or ''}", {})[
                int(match["j"])
            ] = key
    for name, members in stacks.items():
        missing = [j for j in range(config.num_experts) if j not in members]
        extra = sorted(j for j in members if j >= config.num_experts)
        if missing or extra:
            raise CheckpointError(_expert_set_message(name, config.num_experts, missing, extra))
        stack = torch.stack([state[members[j]] for j in range(config.num_experts)])  # (E, out, in)
        out[name] = stack.flatten(1) if name.endswith("_scale") else stack  # scales (E, out)
    if config.tie_word_embeddings and _EMBED in out:
        out[_HEAD] = out[_EMBED]
    return out


def to_hf(state: Mapping[str, torch.Tensor], config: JambaConfig) -> dict[str, torch.Tensor]:
    """pyjamba names -> checkpoint names: expert stacks (E, out, in) split into E views (out, in).

    The scales of int8 weights (out,) or stacked (E, out) become (out, 1) each, as compressed-tensors
    stores them.
    With tie_word_embeddings, `lm_head.weight` is left out, as transformers saves a tied head. The
    values are views of `state`'s tensors: clone them for anything that refuses shared memory.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in (_HEAD, _HEAD + "_scale") and config.tie_word_embeddings:  # an int8 head: made on load
            continue
        names = expert_names(name, config.num_experts)
        if names is None:
            out[name] = tensor[:, None] if name.endswith(".weight_scale") else tensor
            continue
        scales = name.endswith("_scale")
        if tensor.dim() != 3 - scales or tensor.shape[0] != config.num_experts:
            raise ValueError(
                f"{name} must be stacked (E={config.num_experts}, out{'' if scales else ', in'}), "
                f"got shape {tuple(tensor.shape)}"
            )
        for j, key in enumerate(names):
            out[key] = tensor[j, :, None] if scales else tensor[j]  # (out, 1) or (out, in)
    return out


def _expert_set_message(stack: str, num_experts: int, missing: list[int], extra: list[int]) -> str:
    parts = []
    if missing:
        example = stack.replace(".experts.", f".experts.{missing[0]}.") + ".weight"
        parts.append(f"expert(s) {missing} missing (no {example})")
    if extra:
        parts.append(f"expert(s) {extra} beyond num_experts={num_experts}")
    return f"the per-expert set of {stack} is incomplete: " + "; ".join(parts)


# ---- loading -----------------------------------------------------------------------------------
class _Files:
    """A checkpoint folder's safetensors files, opened (memory-mapped) and indexed by tensor name."""

    def __init__(self, folder: Path) -> None:
        single, index = folder / SINGLE_FILE, folder / INDEX_FILE
        if single.is_file():
            self.listing = single  # the file that says which tensors the checkpoint has
            shard_of = None
        elif index.is_file():
            self.listing = index
            shard_of = _read_index(index)
        else:
            pickles = sorted(p.name for p in folder.iterdir() if _PICKLE_FILE.fullmatch(p.name))
            if pickles:
                raise CheckpointError(
                    f"{folder} holds only a pickle checkpoint ({', '.join(pickles)}), which is never read "
                    "here: unpickling can run arbitrary code. Convert it to safetensors once, in a place "
                    "you trust (e.g. transformers' save_pretrained, or safetensors.torch.save_file on "
                    f"torch.load(..., weights_only=True)), to get {SINGLE_FILE}."
                )
            raise CheckpointError(f"{folder} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}")

        files = [single] if shard_of is None else sorted({folder / name for name in shard_of.values()})
        self.handles = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index}: names shard {file.name}, which is not in {folder}")
            try:
                self.handles[file] = safe_open(file, framework="pt", device="cpu")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(
                    f"{file}: not a readable safetensors file (truncated or corrupted?): {exc}"
                ) from exc
        if shard_of is None:
            self.file_of = dict.fromkeys(self.handles[single].keys(), single)
        else:
            self.file_of = {key: folder / name for key, name in shard_of.items()}
            for file, handle in self.handles.items():
                present = set(handle.keys())
                absent = [key for key, f in self.file_of.items() if f == file and key not in present]
                if absent:
                    raise CheckpointError(
                        f"{index}: places tensor {absent[0]} in {file.name}, which does not hold it "
                        f"({len(absent)} such tensor(s))"
                    )
        self._ranges: dict[Path, dict[str, tuple[int, int]]] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.file_of[key]].get_slice(key).get_shape())

    def code(self, key: str) -> str:
        """The tensor's safetensors dtype code ("BF16", "F8_E4M3", ...)."""
        return self.handles[self.file_of[key]].get_slice(key).get_dtype()

    def dtype(self, key: str) -> torch.dtype:
        code = self.code(key)
        if code not in _DTYPES:
            raise CheckpointError(
                f"{self.file_of[key]}: tensor {key} has dtype {code}, not a floating-point dtype "
                f"({', '.join(_DTYPES)})"
            )
        return _DTYPES[code]

    def mapped(self, key: str) -> torch.Tensor:
        """The tensor as a view of the memory-mapped file: no copy, its pages read when touched."""
        return self.handles[self.file_of[key]].get_tensor(key)

    def staged(self, key: str) -> torch.Tensor:
        """The tensor read into a scratch buffer that the next call reuses: convert or copy it at once.

        One buffer for all reads, so that converting dtypes holds one tensor in the checkpoint's
        dtype at a time and leaves no trail of freed buffers behind in the allocator.
        """
        shape, dtype = self.shape(key), self.dtype(key)
        nbytes = math.prod(shape) * dtype.itemsize
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(0, dtype=torch.uint8)  # let the smaller one go first
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        view = self._scratch[:nbytes].view(dtype).view(shape)
        self.read_into(key, view)
        return view

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read the tensor's bytes into `out` (contiguous, the checkpoint's dtype and shape) with file reads.

        Unlike a view of the mapping, this leaves no file page in the process's memory.
        """
        file = self.file_of[key]
        if file not in self._ranges:
            self._ranges[file] = _data_ranges(file)
        start, end = self._ranges[file][key]
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        if len(view) != end - start:
            raise CheckpointError(f"{file}: tensor {key} holds {end - start} bytes, expected {len(view)}")
        with open(file, "rb", buffering=0) as fh:
            fh.seek(start)
            done = 0
            while done < len(view):  # one read returns at most ~2 GiB on Linux
                got = fh.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{file}: file ends inside tensor {key}")
                done += got


def _read_index(index: Path) -> dict[str, str]:
    """An index's weight_map (tensor name -> shard file name), checked for shape."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot be read: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # also an int of over 4300 digits, deep nesting
        raise CheckpointError(f"{index}: not valid JSON: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f'{index}: no "weight_map" object mapping tensor names to shard files')
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{index}: tensor {key} maps to {name!r}, not a file name in this folder")
    return weight_map


def _data_ranges(file: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte ranges of a safetensors file's tensors (the header was validated by safe_open)."""
    with open(file, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    base = 8 + length
    return {
        key: (base + meta["data_offsets"][0], base + meta["data_offsets"][1])
        for key, meta in header.items()
        if key != "__metadata__"
    }


def _read_config(folder: Path) -> tuple[JambaConfig, str | None]:
    """The folder's JambaConfig (ConfigError names the file) and the dtype config.json declares."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (a model folder holds {CONFIG_FILE} and weights)")
    try:
        config = JambaConfig.from_json_file(file)
        raw = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read: {exc}") from exc
    return config, raw.get("dtype", raw.get("torch_dtype"))


def _check(
    files: _Files, expected: dict[str, torch.Tensor], config: JambaConfig, quant: fp8.FP8Format | None = None
) -> None:
    """Every name, shape and dtype of the checkpoint against the model's, before anything is read.

    With `quant` (an FP8 checkpoint), a weight may be stored in FP8 with its scale (checked against
    the weight's shape), and the scales and other auxiliary tensors of FP8 weights are expected too.
    """
    found = files.file_of
    listing = files.listing
    aux = quant.auxiliary(found) if quant is not None else {}
    # An expert stack with some experts present but not all: say which expert is missing.
    for name in expected:
        names = expert_names(name, config.num_experts)
        if names is not None and any(k in found for k in names) and not all(k in found for k in names):
            missing = [j for j, k in enumerate(names) if k not in found]
            raise CheckpointError(f"{listing}: " + _expert_set_message(name, config.num_experts, missing, []))
    hf_expected = to_hf(expected, config)
    tied_head = {_HEAD} if config.tie_word_embeddings else set()
    missing = [k for k in hf_expected if k not in found]
    unexpected = [k for k in found if k not in hf_expected and k not in tied_head and k not in aux]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} tensor(s) missing: {', '.join(missing[:5])}" + (", ..." * (len(missing) > 5))
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:5])}"
                + (", ..." * (len(unexpected) > 5))
            )
        raise CheckpointError(f"{listing}: does not match {CONFIG_FILE}: " + "; ".join(parts))
    shapes = {k: tuple(t.shape) for k, t in hf_expected.items()}
    if config.tie_word_embeddings and _HEAD in found:
        shapes[_HEAD] = shapes[_EMBED]
    for key, shape in shapes.items():
        actual = files.shape(key)
        if actual != shape:
            raise CheckpointError(
                f"{found[key]}: tensor {key} has shape {actual}, expected {shape} from {CONFIG_FILE}"
            )
        if quant is not None and files.code(key) == quant.weight_code:
            scale = quant.scale_key(key)
            try:
                quant.check_weight(key, actual, files.shape(scale) if scale in found else None)
            except fp8.FP8FormatError as exc:
                raise CheckpointError(f"{found[key]}: {exc}") from None
            if (code := files.code(scale)) not in ("F32", "BF16", "F16"):
                raise CheckpointError(
                    f"{found[scale]}: tensor {scale} has dtype {code}, not F32, BF16 or F16"
                )
        else:
            files.dtype(key)  # raises for a non-floating dtype
    for key, weight in aux.items():
        if weight not in found or files.code(weight) != quant.weight_code:
            raise CheckpointError(
                f"{found[key]}: tensor {key} belongs to no {quant.kind} weight (no {quant.kind} {weight})"
            )
        if (code := files.code(key)) not in ("F32", "BF16", "F16", "F8_E4M3", "I8"):
            raise CheckpointError(f"{found[key]}: tensor {key} has dtype {code}, not a floating-point dtype")


def load_model(
    model_class: type[JambaForCausalLM],
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    kernels: str | Kernels = "auto",
    quantize: str | None = None,
    progress: bool | None = None,
) -> JambaForCausalLM:
    """A `model_class(config, kernels=kernels)` with its weights read from a Hugging Face model folder
    (config.json + safetensors, one file or sharded): what `JambaForCausalLM.from_pretrained` runs.

    dtype: None or "stored" keeps each tensor's checkpoint dtype; "auto" is `dtypes.auto_dtype(config,
    device)`, the fastest for this machine; else every tensor is converted to it while read
    (`dtypes.parse_dtype` reads names).
    quantize: "experts-int8" or "int8" (quantize.py) quantizes those weights as they are read, one
    tensor at a time (a progress bar on stderr when `progress`, by default when stderr is a
    terminal), so that memory peaks near the quantized size.
    A quantized checkpoint (config.json's `quantization_config`, see fp8.py): FP8 weights are
    dequantized while read, one tensor at a time, to that dtype ("stored", None, means bfloat16 for
    them), or requantized to int8 where `quantize` asks; int8 weights (compressed-tensors'
    int-quantized, as `pyjamba quantize` writes) stay int8 with their scales, except any that no
    int8 kernel reads (a head, a router), which are dequantized. Any other quantization_config is a
    CheckpointError naming what is not supported. The model's config never keeps the
    quantization_config: `save_pretrained` writes the one its weights call for.
    On the CPU in the checkpoint's dtype, parameters other than the experts are views of the
    memory-mapped files (copy-on-write: the files never change); expert stacks are read into place.
    Raises CheckpointError naming the file (and the tensor) for anything that does not fit the config,
    ConfigError for a config.json that is not a valid Jamba config (before anything is built). A folder
    missing because a save was killed midway is first put back (`recover_folder`).
    """
    from tqdm.auto import tqdm  # ~30 ms to import; most loads quantize nothing

    asked = parse_dtype(dtype)  # a bad name fails before anything is read
    quantization.check_method(quantize)
    folder = Path(path)
    if not folder.is_dir():
        recover_folder(folder)  # or waits for a save that is between its two renames
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {folder}")
    config, declared_dtype = _read_config(folder)
    quant = _read_quantization(folder, config)
    target, why = resolve_dtype(asked, config, device)
    if quant is not None and target is None and quant.weight_code == fp8.FP8_CODE:
        target, why = torch.bfloat16, "stored: FP8 weights are dequantized to bfloat16"
    if asked == "auto":
        logger.info("dtype auto: %s on %s (%s)", target, torch.device(device), why)
    device = torch.device(device)
    kernels = resolve_kernels(kernels, device)  # "auto": the fastest for the device the weights go to
    files = _Files(folder)
    config = _untie_distinct_head(files, config, quant)
    with torch.device("meta"):
        model = model_class(config, kernels=kernels)
    _check(files, model.state_dict(), config, quant)

    def is_quantized(key: str) -> bool:  # stored in FP8 or int8, with a scale
        return quant is not None and files.code(key) == quant.weight_code

    def is_int8(key: str) -> bool:
        return quant is not None and quant.weight_code == "I8" and key in found and files.code(key) == "I8"

    found = files.file_of
    tied = config.tie_word_embeddings

    # The int8 weights of the loaded model: those `quantize` asks for, and those stored in int8 that an
    # int8 kernel reads.
    readable = set(quantization.quantized_names(model.state_dict(), "int8-head"))
    int8 = set(quantization.quantized_names(model.state_dict(), quantize)) if quantize else set()
    for name in readable:
        keys = expert_names(name, config.num_experts) or [name]
        if all(is_int8(k) for k in keys):
            int8.add(name)
    if tied and quant is not None and quant.weight_code == "I8" and "lm_head" in quant.targets:
        int8.add(_HEAD)  # an int8 copy of the tied embeddings, which the checkpoint does not hold
    quantization.prepare(model, sorted(int8))  # int8 meta parameters and their scale buffers
    expected = model.state_dict()

    # The tensors read with a quantized weight besides its scale (zero points: must be zero); the rest
    # (input scales, for activations that run unquantized here) are consumed unread.
    zero_points: dict[str, list[str]] = {}
    for aux, weight in (quant.auxiliary(files.file_of) if quant is not None else {}).items():
        if aux.endswith("zero_point"):
            zero_points.setdefault(weight, []).append(aux)

    def check_zero_points(key: str) -> None:
        assert quant is not None
        try:
            for aux in zero_points.get(key, ()):
                quant.check_aux(aux, files.mapped(aux))
        except fp8.FP8FormatError as exc:
            raise CheckpointError(f"{files.file_of[key]}: {exc}") from None

    def dequantize_into(key: str, out: torch.Tensor) -> torch.Tensor:
        assert quant is not None
        check_zero_points(key)
        try:
            return quant.dequantize_into(out, files.mapped(key), files.mapped(quant.scale_key(key)))
        except fp8.FP8FormatError as exc:
            raise CheckpointError(f"{files.file_of[key]}: {exc}") from None

    def float_dtype(key: str) -> torch.dtype:
        return target or (torch.bfloat16 if is_quantized(key) else files.dtype(key))

    def read(key: str) -> torch.Tensor:
        if is_quantized(key):
            return dequantize_into(key, torch.empty(files.shape(key), dtype=float_dtype(key), device=device))
        if device.type == "cpu" and target in (None, files.dtype(key)):
            return files.mapped(key)
        return files.staged(key).to(device=device, dtype=target, copy=True)

    def read_stack(names: list[str]) -> torch.Tensor:
        stack = torch.empty((len(names), *files.shape(names[0])), dtype=float_dtype(names[0]), device=device)
        for j, key in enumerate(names):  # (E, out, in), filled one expert at a time
            if is_quantized(key):
                dequantize_into(key, stack[j])
            elif device.type == "cpu" and stack.dtype == files.dtype(key):
                files.read_into(key, stack[j])
            else:
                stack[j].copy_(files.staged(key))
        return stack

    def read_int8(name: str, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """An int8 weight and its scales: as stored, or quantized now from what is stored."""
        if name == _HEAD and tied and not is_int8(_HEAD):  # the head quantized from the embeddings
            return read_int8(_EMBED, [_EMBED])
        if not all(is_int8(k) for k in keys):  # float or FP8 on disk: quantized here
            q, scale = quantization.quantize_rows(read(name) if len(keys) == 1 else read_stack(keys))
            return q.to(device), scale.to(device)
        for key in keys:
            check_zero_points(key)
        scales = [
            files.mapped(quant.scale_key(k)).to(device=device, dtype=torch.float32).flatten() for k in keys
        ]
        if len(keys) == 1:
            weight = files.mapped(keys[0]) if device.type == "cpu" else files.mapped(keys[0]).to(device)
            return weight, scales[0]
        stack = torch.empty((len(keys), *files.shape(keys[0])), dtype=torch.int8, device=device)
        for j, key in enumerate(keys):
            if device.type == "cpu":
                files.read_into(key, stack[j])
            else:
                stack[j].copy_(files.mapped(key))
        return stack, torch.stack(scales)

    names = [
        n for n in expected if not n.endswith("_scale") and not (n == _HEAD and tied and _HEAD not in int8)
    ]
    quantizing = [n for n in int8 if not all(is_int8(k) for k in expert_names(n, config.num_experts) or [n])]
    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(
        total=len(names),
        desc=f"quantizing to {quantize}",
        unit="tensor",
        disable=not (progress and quantizing),
    )
    state: dict[str, torch.Tensor] = {}
    for name in names:
        keys = expert_names(name, config.num_experts)
        if name in int8:
            state[name], state[quantization.scale_name(name)] = read_int8(name, keys or [name])
        else:
            state[name] = read(name) if keys is None else read_stack(keys)
        bar.update()
    bar.close()
    if tied and _HEAD not in int8:
        state[_HEAD] = state[_EMBED]
    model.load_state_dict(state, strict=True, assign=True)
    if tied and _HEAD not in int8:
        model.lm_head.weight = model.model.embed_tokens.weight  # one Parameter, not two sharing storage
    for p in model.parameters():
        if p.dtype == torch.int8:
            p.requires_grad_(False)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    logger.info(
        "loaded %s: %d tensors from %d file(s), dtype %s (config.json declares %s), device %s%s",
        folder, len(files.file_of), len(files.handles), "/".join(dtypes), declared_dtype, device,
        f", {len(int8)} weights in int8" if int8 else "",
    )  # fmt: skip
    return model.eval()


def _untie_distinct_head(files: _Files, config: JambaConfig, quant: fp8.FP8Format | None) -> JambaConfig:
    """The config to build: untied where config.json ties the head but the files hold a different one.

    transformers leaves a tied head out of the files, but some checkpoints carry it anyway (Jamba
    Reasoning 3B's `lm_head.weight`, with tie_word_embeddings set). Equal to the embedding, it is the
    tie written out: the head stays tied and the copy is not read. Different, it is a head of its
    own: the model is loaded untied (tie_word_embeddings false) with both tensors, as transformers 5
    does ("both are present in the checkpoints with different values, so we will NOT tie them"),
    rather than silently replacing a trained head by the embedding; a warning says so.
    """
    if not (config.tie_word_embeddings and _HEAD in files.file_of and _EMBED in files.file_of):
        return config
    if files.shape(_HEAD) != files.shape(_EMBED):
        return config  # _check names the misshapen head

    quantized = [k for k in (_EMBED, _HEAD) if quant is not None and files.code(k) == quant.weight_code]
    if any(quant.scale_key(k) not in files.file_of for k in quantized):
        return config  # _check names the missing scale

    def value(key: str) -> torch.Tensor:
        if key not in quantized:
            return files.mapped(key)
        out = torch.empty(files.shape(key), dtype=torch.float32)
        try:
            return quant.dequantize_into(out, files.mapped(key), files.mapped(quant.scale_key(key)))
        except fp8.FP8FormatError as exc:
            raise CheckpointError(f"{files.file_of[key]}: {exc}") from None

    embed, head = value(_EMBED), value(_HEAD)
    if torch.equal(embed, head.to(embed.dtype)):
        return config
    logger.warning(
        "%s: %s differs from %s although %s sets tie_word_embeddings: loading the head untied",
        files.file_of[_HEAD], _HEAD, _EMBED, CONFIG_FILE,
    )  # fmt: skip
    return config.replace(tie_word_embeddings=False)


def _read_quantization(folder: Path, config: JambaConfig) -> fp8.FP8Format | None:
    """config.json's quantization_config as an FP8Format (None if it has none), taken out of the config.

    Raises CheckpointError, naming config.json, for a quantization pyjamba cannot dequantize.
    """
    if "quantization_config" not in config.extra:
        return None
    raw = config.extra.pop("quantization_config")  # the loaded model is not quantized
    try:
        return fp8.read_quantization_config(raw)
    except fp8.FP8FormatError as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {exc}") from None


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    kernels: str | Kernels = "auto",
    quantize: str | None = None,
) -> JambaForCausalLM:
    """A JambaForCausalLM from a Hugging Face model folder: `load_model(JambaForCausalLM, path, ...)`."""
    from .model import JambaForCausalLM  # not at the top: model.py imports this module

    return load_model(JambaForCausalLM, path, dtype=dtype, device=device, kernels=kernels, quantize=quantize)


# ---- saving --------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "500MB", "2GB" (powers of 10) or "1GiB" (powers of 2)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (match := re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", size)):
        unit = match[2].lower()
        if unit not in _UNITS:
            raise ValueError(
                f"unknown unit {match[2]!r} in size {size!r}; use B, KB, MB, GB, KiB, MiB or GiB"
            )
        value = int(float(match[1]) * _UNITS[unit])
    else:
        raise ValueError(f"a size is an int of bytes or a string like '500MB' or '1GiB', got {size!r}")
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def _shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Consecutive groups of names of at most `limit` bytes each (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    total = 0
    for key, size in sizes.items():
        if shards[-1] and total + size > limit:
            shards.append([])
            total = 0
        shards[-1].append(key)
        total += size
    return shards


def _standalone(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A contiguous CPU tensor owning its whole storage (safetensors refuses views and shared memory)."""
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    tensor = tensor.cpu()
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _link_or_copy(src: Path, dst: Path) -> None:
    """Carry a non-model file or folder over into the new checkpoint folder (hard links where possible)."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # a file system without hard links
            shutil.copy2(a, b)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(str(src), str(dst))


def save_pretrained(
    model: JambaForCausalLM,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    copy_files_from: str | os.PathLike | None = None,
) -> None:
    """Write a Hugging Face model folder (config.json + safetensors) that transformers loads as is.

    One `model.safetensors` if the tensors fit in max_shard_size, else `model-0000k-of-0000n.safetensors`
    shards and `model.safetensors.index.json`. dtype converts the floating-point tensors (None keeps
    theirs). Atomic: everything is written into a temporary sibling folder, which then replaces `path`
    (`folders.replacement`); other files already in `path` (tokenizer, generation config, ...) are kept, old
    model files are not; `copy_files_from` (a model folder) brings its other files along too (over the
    kept ones). The folder gets ordinary permissions (0o777 less the umask). A model with int8 weights
    (quantize.py) is written with its scales and the `quantization_config` that says so.
    """
    limit = parse_size(max_shard_size)
    target = parse_dtype(dtype, allow_auto=False)
    config = model.config
    state = model.state_dict()
    tied_copy = state[_HEAD].dtype == torch.int8  # an int8 copy of tied embeddings (quantize.py's int8-head)
    if config.tie_word_embeddings and not tied_copy and state[_HEAD].data_ptr() != state[_EMBED].data_ptr():
        raise ValueError(f"config ties {_HEAD} to {_EMBED}, but the model holds two different tensors")
    hf = to_hf(state, config)

    def converted(key: str) -> torch.dtype | None:  # an int8 weight's scales stay float32
        return None if key.endswith(".weight_scale") else target

    def nbytes(key: str) -> int:
        t = hf[key]
        dtype = converted(key)
        return t.numel() * (
            dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
        )

    shards = _shards({key: nbytes(key) for key in hf}, limit)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    saved_dtype = target or hf[_EMBED].dtype

    folder = Path(path).resolve()
    recover_folder(folder)  # after a save killed midway: the previous version's other files carry over
    with folders.replacement(folder) as tmp:
        file_mode = tmp.stat().st_mode & 0o666  # 0o666 less the umask, read without changing it
        data = dict(config.to_dict(), dtype=str(saved_dtype).removeprefix("torch."))
        if (method := quantization.method_of(model)) is not None:
            data["quantization_config"] = quantization.quantization_config(method)
        (tmp / CONFIG_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name, keys in zip(names, shards, strict=True):
            tensors = {key: _standalone(hf[key], converted(key)) for key in keys}  # one shard's copies
            safetensors.torch.save_file(tensors, tmp / name, metadata={"format": "pt"})
            del tensors
            os.chmod(tmp / name, file_mode)  # safetensors creates its files 0o600
            folders.fsync(tmp / name)
        if n > 1:
            index = {
                "metadata": {"total_size": sum(nbytes(key) for key in hf)},
                "weight_map": {
                    key: name for name, keys in zip(names, shards, strict=True) for key in sorted(keys)
                },
            }
            (tmp / INDEX_FILE).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        for source in (Path(copy_files_from).resolve() if copy_files_from else None, folder):
            if source is not None and source.is_dir():
                for entry in source.iterdir():
                    if not _MODEL_FILE.fullmatch(entry.name) and not (tmp / entry.name).exists():
                        _link_or_copy(entry, tmp / entry.name)
    logger.info("saved %s: %d tensors in %d file(s), %s", folder, len(hf), n, saved_dtype)


# ---- recovering a folder -------------------------------------------------------------------------
def _is_model_folder(folder: Path) -> bool:
    """Whether `folder` holds config.json and every weight file its listing names."""
    if not (folder / CONFIG_FILE).is_file():
        return False
    if (folder / SINGLE_FILE).is_file():
        return True
    try:
        return all((folder / name).is_file() for name in set(_read_index(folder / INDEX_FILE).values()))
    except CheckpointError:
        return False


def recover_folder(path: str | os.PathLike) -> bool:
    """Put back the previous version of a model folder that a save killed between two renames left missing.

    `folders.recover_folder` with "complete" meaning config.json and every weight file its listing
    names: the newest such `.NAME.old-*` sibling is renamed back, with a warning; a save still between
    its renames is waited for instead. Returns whether a folder was put back.
    """
    return folders.recover_folder(path, _is_model_folder)
