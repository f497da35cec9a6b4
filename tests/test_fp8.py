"""FP8 checkpoints (fp8.py through checkpoint.load_model): dequantized on load, everything else refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pyjamba.checkpoint import CheckpointError, from_pretrained, save_pretrained
from pyjamba.dtypes import auto_dtype
from pyjamba.fp8 import FP8FormatError, read_quantization_config
from pyjamba.testing import PARITY_CONFIGS, random_model

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# AI21-like: attention, MLPs and experts in FP8; head, routers and the Mamba mixers left in bfloat16.
IGNORE = ["lm_head", "re:.*router$", "re:.*mamba\\..*"]
LINEAR = re.compile(r".*(proj|router)\.weight|lm_head\.weight")


def _ct_config(strategy: str = "channel", ignore=IGNORE, **weights) -> dict:
    """A quantization_config as llm-compressor writes it (compressed-tensors, float-quantized)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": dict(
                    num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=False, **weights
                ),
                "input_activations": {
                    "num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
                },
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }  # fmt: skip


def _block_kw(strategy: str) -> dict:
    return {"block_structure": [16, 16]} if strategy == "block" else {}


def _quantize(w: torch.Tensor, strategy: str, block=(16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 scale) of a (out, in) weight, as llm-compressor's minmax observer would."""
    w = w.float()
    if strategy == "tensor":
        scale = (w.abs().amax() / FP8_MAX).reshape(1)
        full = scale
    elif strategy == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX  # (out, 1)
        full = scale
    else:
        b0, b1 = block
        rows, cols = -(-w.shape[0] // b0), -(-w.shape[1] // b1)
        padded = torch.zeros(rows * b0, cols * b1)
        padded[: w.shape[0], : w.shape[1]] = w.abs()
        scale = padded.reshape(rows, b0, cols, b1).amax(dim=(1, 3)) / FP8_MAX
        full = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[: w.shape[0], : w.shape[1]]
    return (w / full).to(torch.float8_e4m3fn), scale


def _write(folder: Path, tensors: dict, config: dict) -> None:
    (folder / "model.safetensors").unlink()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def make_fp8(
    tmp_path: Path,
    arch: str = "moe-gqa-untied",
    strategy: str = "channel",
    scale_dtype=torch.float32,
    qc: dict | None = None,
    scale_name: str = "weight_scale",
    extra=None,
) -> tuple[Path, Path]:
    """(an FP8 checkpoint folder, the same dequantized weights as a plain bfloat16 checkpoint)."""
    model = random_model(PARITY_CONFIGS[arch])
    fp8_dir, ref_dir = tmp_path / f"fp8-{strategy}", tmp_path / f"ref-{strategy}"
    save_pretrained(model, fp8_dir, dtype=torch.bfloat16)
    save_pretrained(model, ref_dir, dtype=torch.bfloat16)
    qc = qc if qc is not None else _ct_config(strategy, **_block_kw(strategy))
    ignore = qc.get("ignore", qc.get("modules_to_not_convert", []))
    plain = load_file(fp8_dir / "model.safetensors")
    quantized, reference = {}, {}
    for key, w in plain.items():
        module = key.removesuffix(".weight")
        skip = any(
            re.match(e[3:], module) if e.startswith("re:") else module == e for e in ignore
        )  # fmt: skip
        if LINEAR.fullmatch(key) and not skip:
            q, scale = _quantize(w, strategy)
            quantized[key] = q
            quantized[f"{module}.{scale_name}"] = scale.to(scale_dtype)
            for name, tensor in (extra or {}).items():
                quantized[f"{module}.{name}"] = tensor.clone()
            full = scale.to(scale_dtype).float()
            if strategy == "block":
                full = full.repeat_interleave(16, 0).repeat_interleave(16, 1)[: w.shape[0], : w.shape[1]]
            reference[key] = (q.float() * full).to(torch.bfloat16)
        else:
            quantized[key] = reference[key] = w
    config = json.loads((fp8_dir / "config.json").read_text())
    _write(fp8_dir, quantized, dict(config, quantization_config=qc))
    _write(ref_dir, reference, config)
    return fp8_dir, ref_dir


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids(model.config.vocab_size)).logits


# ---- loading -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, strategy, scale_dtype",
    [
        ("moe-gqa-untied", "channel", torch.float32),
        ("moe-gqa-untied", "tensor", torch.bfloat16),
        ("dense-mha-tied-projbias", "channel", torch.bfloat16),
        ("pure-attention-moe", "block", torch.float32),
    ],
)
def test_fp8_checkpoint_loads_as_its_dequantized_weights(tmp_path, arch, strategy, scale_dtype):
    fp8_dir, ref_dir = make_fp8(tmp_path, arch, strategy, scale_dtype)
    with safe_open(fp8_dir / "model.safetensors", "pt") as f:
        names = f.keys()
        codes = {k: f.get_slice(k).get_dtype() for k in names}
    ffn = [k for k in codes if ("experts." if "moe" in arch else "feed_forward.") in k]
    assert ffn and all(codes[k] in ("F8_E4M3", "F32", "BF16") for k in ffn)
    assert any(codes[k] == "F8_E4M3" for k in ffn)  # experts (or the dense MLPs) in FP8
    assert all(codes[k] == "BF16" for k in codes if "mamba" in k or "router" in k or k == "lm_head.weight")
    model = from_pretrained(fp8_dir)  # "stored" means bfloat16 for FP8
    reference = from_pretrained(ref_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state[name], expected[name]), name
    assert torch.equal(_logits(model), _logits(reference))
    assert "quantization_config" not in model.config.extra


def test_float32_asked_for_dequantizes_into_float32(tmp_path):
    fp8_dir, ref_dir = make_fp8(tmp_path)
    model = from_pretrained(fp8_dir, dtype="float32")
    reference = from_pretrained(ref_dir, dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    expert = "model.layers.1.feed_forward.experts.gate_proj"
    # float32 keeps the exact product of the FP8 value and the scale (the reference went through bfloat16)
    assert torch.allclose(model.state_dict()[expert], reference.state_dict()[expert], rtol=2**-8, atol=0)
    assert torch.allclose(_logits(model), _logits(reference), rtol=0.05, atol=0.05)


def test_auto_follows_resolve_dtype(tmp_path):
    fp8_dir, _ = make_fp8(tmp_path)
    model = from_pretrained(fp8_dir, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {auto_dtype(model.config)}


def test_input_scales_and_zero_points_are_consumed(tmp_path):
    extra = {"input_scale": torch.tensor([0.5]), "weight_zero_point": torch.zeros(1)}
    qc = _ct_config("channel")
    qc["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
    }  # fmt: skip
    fp8_dir, ref_dir = make_fp8(tmp_path, qc=qc, extra=extra)
    assert torch.equal(_logits(from_pretrained(fp8_dir)), _logits(from_pretrained(ref_dir)))


def test_nonzero_zero_point_is_refused(tmp_path):
    fp8_dir, _ = make_fp8(tmp_path, extra={"weight_zero_point": torch.ones(1)})
    with pytest.raises(CheckpointError, match="weight_zero_point is not zero: asymmetric"):
        from_pretrained(fp8_dir)


def test_deepseek_style_block_scales(tmp_path):
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16],
          "modules_to_not_convert": IGNORE}  # fmt: skip
    fp8_dir, ref_dir = make_fp8(tmp_path, strategy="block", qc=qc, scale_name="weight_scale_inv")
    assert torch.equal(_logits(from_pretrained(fp8_dir)), _logits(from_pretrained(ref_dir)))


def test_save_pretrained_writes_an_ordinary_checkpoint(tmp_path):
    fp8_dir, ref_dir = make_fp8(tmp_path)
    model = from_pretrained(fp8_dir)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
        assert not [k for k in names if "scale" in k]
    assert torch.equal(_logits(from_pretrained(out)), _logits(from_pretrained(ref_dir)))


def test_dequantizing_in_row_chunks_matches_one_shot(monkeypatch):
    import pyjamba.fp8 as fp8

    monkeypatch.setattr(fp8, "_ROWS_BYTES", 64)  # a few rows per chunk
    w = torch.randn(70, 40)
    for strategy in ("tensor", "channel", "block"):
        q, scale = _quantize(w, strategy)
        full = (
            scale
            if strategy != "block"
            else scale.repeat_interleave(16, 0).repeat_interleave(16, 1)[:70, :40]
        )
        layout = read_quantization_config(_ct_config(strategy, **_block_kw(strategy)))
        out = layout.dequantize_into(torch.empty(70, 40), q, scale)
        assert torch.equal(out, q.float() * full), strategy


# ---- what is refused -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", None])
def test_other_quant_methods_are_refused(tmp_path, method):
    fp8_dir, _ = make_fp8(tmp_path)
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=rf"config.json: quantization_config: quant_method {method!r} is not"
    ):
        from_pretrained(fp8_dir)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda qc: qc.update(format="pack-quantized"), "format 'pack-quantized' is not supported"),
        (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4), "num_bits 4, type 'float'"),
        (lambda qc: qc["config_groups"]["group_0"]["weights"].update(type="int"), "num_bits 8, type 'int'"),
        (
            lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric=False),
            "symmetric must be true",
        ),
        (lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="group"), "strategy 'group'"),
        (lambda qc: qc.update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme is not supported"),
        (lambda qc: qc.update(sparsity_config={"format": "sparse-24"}), "sparsity_config is not supported"),
        (
            lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(type="int"),
            "input_activations",
        ),
        (lambda qc: qc.update(ignore="lm_head"), "ignore must be a list"),
    ],
)
def test_unsupported_fields_are_named(tmp_path, change, message):
    qc = _ct_config()
    change(qc)
    with pytest.raises(FP8FormatError, match=re.escape(message)):
        read_quantization_config(qc)


def test_fp8_weight_without_scale_or_with_a_wrong_one(tmp_path):
    fp8_dir, _ = make_fp8(tmp_path)
    tensors = load_file(fp8_dir / "model.safetensors")
    config = json.loads((fp8_dir / "config.json").read_text())
    scale = "model.layers.1.self_attn.q_proj.weight_scale"

    del tensors[scale]
    _write(fp8_dir, tensors, config)
    with pytest.raises(
        CheckpointError, match=r"q_proj.weight is stored in FP8 but the checkpoint has no .*q_proj"
    ):
        from_pretrained(fp8_dir)

    tensors[scale] = torch.ones(5, 1)
    _write(fp8_dir, tensors, config)
    with pytest.raises(
        CheckpointError, match=r"q_proj.weight_scale has shape \(5, 1\), which fits no strategy"
    ):
        from_pretrained(fp8_dir)


def test_ignored_module_stored_in_fp8_and_stray_scales_are_refused(tmp_path):
    fp8_dir, _ = make_fp8(tmp_path)
    tensors = load_file(fp8_dir / "model.safetensors")
    config = json.loads((fp8_dir / "config.json").read_text())

    stray = dict(tensors, **{"model.layers.0.mamba.in_proj.weight_scale": torch.ones(1)})
    _write(fp8_dir, stray, config)
    with pytest.raises(CheckpointError, match=r"in_proj.weight_scale belongs to no FP8 weight"):
        from_pretrained(fp8_dir)

    q, scale = _quantize(tensors["lm_head.weight"], "channel")
    head = dict(tensors, **{"lm_head.weight": q, "lm_head.weight_scale": scale})
    _write(fp8_dir, head, config)
    with pytest.raises(CheckpointError, match=r"lm_head.weight is stored in FP8, but .*ignore list"):
        from_pretrained(fp8_dir)


def test_fp8_tensors_without_quantization_config_are_refused(tmp_path):
    fp8_dir, _ = make_fp8(tmp_path)
    config = json.loads((fp8_dir / "config.json").read_text())
    del config["quantization_config"]
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*weight_scale"):
        from_pretrained(fp8_dir)
