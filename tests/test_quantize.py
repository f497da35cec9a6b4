"""int8 weight quantization (quantize.py): the rows, which weights each method takes, quantizing on
load, quantized checkpoints (`pyjamba quantize`) and what is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pyjamba.checkpoint import CheckpointError, from_pretrained, save_pretrained
from pyjamba.fp8 import FP8FormatError, read_quantization_config
from pyjamba.kernels import ops
from pyjamba.model import JambaForCausalLM
from pyjamba.quantize import (
    METHODS,
    is_quantized,
    method_of,
    quantization_config,
    quantize_model,
    quantize_rows,
    quantized_names,
)
from pyjamba.testing import PARITY_CONFIGS, random_model, tiny_model_folder

ARCHS = ["moe-gqa-untied", "dense-mha-tied-projbias", "moe-every-layer-tied-bothbias"]


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model: JambaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids(model.config.vocab_size)).logits


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """The same weights, maybe in other memory: equal up to the summation order a BLAS picks by
    alignment (seen: 2e-7 between a model in memory and its memory-mapped copy)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- the rows ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 16), (1, 1)])
def test_quantize_rows_is_symmetric_per_row_and_within_half_a_step(shape, dtype):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    w.view(-1, shape[-1])[0] = 0  # an all-zero row: scale 0, int8 0, no NaN
    q, scale = quantize_rows(w, rows=2)  # blocks of 2 rows: the block loop is exercised
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == w.shape[:-1]
    expected = w.float().abs().amax(-1) / 127
    assert torch.equal(scale, expected)
    assert int(q.abs().max()) <= 127
    assert torch.equal(q.view(-1, shape[-1])[0], torch.zeros(shape[-1], dtype=torch.int8))
    error = (ops.dequantize(q, scale, torch.float32) - w.float()).abs()
    assert bool((error <= scale[..., None] / 2 + 1e-6).all())
    # The largest |w| of each row maps to +-127 exactly.
    nonzero = scale.view(-1) > 0
    assert bool((q.view(-1, shape[-1]).abs().amax(-1)[nonzero] == 127).all())


def test_reference_linear_with_a_scale_is_dequantize_then_linear():
    w, x, bias = torch.randn(6, 10), torch.randn(3, 10), torch.randn(6)
    q, scale = quantize_rows(w)
    expected = torch.nn.functional.linear(x, q.float() * scale[:, None], bias)
    assert torch.equal(ops.linear(x, q, bias, scale), expected)


# ---- which weights -------------------------------------------------------------------------------
def test_methods_choose_the_papers_weights():
    model = random_model(PARITY_CONFIGS["moe-gqa-untied"], kernels="torch")
    names = [n for n, _ in model.named_parameters()]
    experts = quantized_names(names, "experts-int8")
    every = quantized_names(names, "int8")
    assert experts and all(".feed_forward." in n and "router" not in n for n in experts)
    assert any(".experts." in n for n in experts) and any(".mlp" in n or "_proj.weight" in n for n in experts)
    assert set(experts) < set(every)
    for part in ("self_attn.q_proj", "self_attn.o_proj", "mamba.in_proj", "mamba.x_proj", "mamba.dt_proj"):
        assert any(part in n for n in every), part
    for kept in ("router", "embed_tokens", "lm_head", "layernorm", "conv1d", "A_log"):
        assert not any(kept in n for n in every), kept
    assert set(quantized_names(names, "int8-head")) == {*every, "lm_head.weight"}
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantized_names(names, "int4")


@pytest.mark.parametrize("method", METHODS)
def test_quantize_model_in_place(method):
    model = random_model(PARITY_CONFIGS["moe-gqa-untied"], kernels="reference")
    before = _logits(model)
    quantize_model(model, method)
    assert is_quantized(model) and method_of(model) == method
    for name, p in model.named_parameters():
        if p.dtype == torch.int8:
            assert not p.requires_grad
            owner, _, leaf = name.rpartition(".")
            scale = getattr(model.get_submodule(owner), leaf + "_scale")
            assert scale.shape == p.shape[:-1] and scale.dtype == torch.float32
    after = _logits(model)
    assert torch.isfinite(after).all()
    # Close to the float model (int8 per row: ~0.4% of a row's range per weight), but not equal.
    assert 0 < (after - before).abs().max() < 0.1 * before.abs().max()


# ---- quantizing on load, and quantized checkpoints -----------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_on_load_equals_in_memory_and_a_saved_copy_loads_back_the_same(tmp_path, arch, method):
    source = tmp_path / "float"
    save_pretrained(random_model(PARITY_CONFIGS[arch]), source)
    loaded = from_pretrained(source, quantize=method, kernels="torch")
    in_memory = quantize_model(random_model(PARITY_CONFIGS[arch], kernels="torch"), method)
    _same(_logits(loaded), _logits(in_memory))

    target = tmp_path / "int8"
    loaded.save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    assert config["quantization_config"] == quantization_config(method)
    back = from_pretrained(target, kernels="torch")  # int8 as stored, no quantize= needed
    assert method_of(back) == method
    _same(_logits(back), _logits(loaded))
    assert "quantization_config" not in back.config.extra  # written from the weights, not carried


def test_quantized_file_layout_is_compressed_tensors_int8(tmp_path):
    source, target = tmp_path / "float", tmp_path / "int8"
    save_pretrained(random_model(PARITY_CONFIGS["moe-gqa-untied"]), source)
    from_pretrained(source, quantize="experts-int8").save_pretrained(target)
    with safe_open(target / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        expert = "model.layers.1.feed_forward.experts.0.gate_proj"
        assert f.get_slice(expert + ".weight").get_dtype() == "I8"
        out = f.get_slice(expert + ".weight").get_shape()[0]
        assert f.get_slice(expert + ".weight_scale").get_dtype() == "F32"
        assert f.get_slice(expert + ".weight_scale").get_shape() == [out, 1]
        assert f.get_slice("model.layers.0.mamba.in_proj.weight").get_dtype() == "F32"  # not an expert
    assert "model.layers.0.mamba.in_proj.weight_scale" not in keys
    assert read_quantization_config(quantization_config("int8")).weight_code == "I8"


def test_stored_experts_int8_quantized_further_on_load(tmp_path):
    source, target = tmp_path / "float", tmp_path / "int8"
    save_pretrained(random_model(PARITY_CONFIGS["moe-gqa-untied"]), source)
    from_pretrained(source, quantize="experts-int8").save_pretrained(target)
    both = from_pretrained(target, quantize="int8", kernels="torch")
    assert method_of(both) == "int8"
    _same(_logits(both), _logits(from_pretrained(source, quantize="int8", kernels="torch")))


def test_bfloat16_checkpoint_quantizes_and_keeps_the_rest_bfloat16(tmp_path):
    source = tmp_path / "bf16"
    save_pretrained(random_model(PARITY_CONFIGS["moe-gqa-untied"]), source, dtype=torch.bfloat16)
    model = from_pretrained(source, quantize="experts-int8", dtype="stored", kernels="torch")
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.int8, torch.bfloat16}
    assert torch.isfinite(_logits(model).float()).all()


def test_fp8_checkpoint_is_requantized_to_int8(tmp_path):
    from test_fp8 import make_fp8  # the FP8 checkpoint writer of the FP8 tests

    fp8_dir, ref_dir = make_fp8(tmp_path)
    requantized = from_pretrained(fp8_dir, quantize="int8", kernels="torch")
    expected = from_pretrained(ref_dir, quantize="int8", kernels="torch")  # its dequantized weights
    _same(_logits(requantized), _logits(expected))


def test_an_int8_head_from_elsewhere_stays_int8_unless_ignored(tmp_path):
    source, target = tmp_path / "float", tmp_path / "int8"
    model = random_model(PARITY_CONFIGS["moe-gqa-untied"])
    save_pretrained(model, source)
    from_pretrained(source, quantize="experts-int8").save_pretrained(target)
    tensors = load_file(target / "model.safetensors")
    q, scale = quantize_rows(tensors["lm_head.weight"])
    tensors["lm_head.weight"], tensors["lm_head.weight_scale"] = q, scale[:, None]
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"lm_head\.weight is stored in int8, but quantization_config.s ignore"
    ):
        from_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"]["ignore"].remove("lm_head")
    (target / "config.json").write_text(json.dumps(config))
    loaded = from_pretrained(target, kernels="torch")
    assert method_of(loaded) == "int8-head"
    assert torch.equal(loaded.lm_head.weight, q) and torch.equal(loaded.lm_head.weight_scale, scale)


# ---- what is refused -----------------------------------------------------------------------------
def _int8_folder(tmp_path: Path) -> Path:
    source, target = tmp_path / "float", tmp_path / "int8"
    save_pretrained(random_model(PARITY_CONFIGS["moe-gqa-untied"]), source)
    from_pretrained(source, quantize="int8").save_pretrained(target)
    return target


def test_int8_weight_without_its_scale_is_named(tmp_path):
    target = _int8_folder(tmp_path)
    tensors = load_file(target / "model.safetensors")
    del tensors["model.layers.0.mamba.in_proj.weight_scale"]
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.0.mamba.in_proj.weight.*weight_scale"):
        from_pretrained(target)


def test_scale_of_the_wrong_shape_is_named(tmp_path):
    target = _int8_folder(tmp_path)
    tensors = load_file(target / "model.safetensors")
    key = "model.layers.0.mamba.out_proj.weight_scale"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"mamba.out_proj.weight_scale has shape"):
        from_pretrained(target)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_bits", 4, "num_bits 4 is not supported"),
        ("strategy", "group", "strategy 'group' is not supported"),
        ("type", "float", "type 'float' is not supported"),
        ("symmetric", False, "only symmetric"),
    ],
)
def test_other_int_quantizations_are_refused_by_name(tmp_path, field, value, message):
    qc = quantization_config("int8")
    qc["config_groups"]["group_0"]["weights"][field] = value
    with pytest.raises(FP8FormatError, match=message):
        read_quantization_config(qc)
    target = _int8_folder(tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = qc
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: quantization_config: .*" + message):
        from_pretrained(target)


def test_unknown_method_is_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'int4'; choose one of experts-int8, int8"):
        from_pretrained(tmp_path / "nowhere", quantize="int4")


# ---- the command ---------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyjamba", *args], capture_output=True, text=True, timeout=300
    )


def test_pyjamba_quantize_writes_a_loadable_folder_with_the_tokenizer(tmp_path):
    source = tiny_model_folder(tmp_path / "tiny")
    target = tmp_path / "tiny-int8"
    done = _cli("quantize", str(source), str(target), "--method", "int8")
    assert done.returncode == 0, done.stderr
    assert "of the parameters in int8" in done.stderr
    assert (target / "tokenizer.json").is_file() and (target / "config.json").is_file()
    loaded = from_pretrained(target, kernels="torch")
    _same(_logits(loaded), _logits(from_pretrained(source, quantize="int8", kernels="torch")))
    # What the commands load: generate runs on the quantized folder.
    done = _cli("generate", "hello", "--model", str(target), "--max-new-tokens", "3", "--temperature", "0",
                "--kernels", "torch", "--verbose")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "int8 weights" in done.stderr


def test_pyjamba_quantize_errors_are_one_line(tmp_path):
    done = _cli("quantize", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.startswith("pyjamba quantize: error: no checkpoint folder at")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    done = _cli("quantize", str(tmp_path), str(tmp_path / "out"), "--method", "int4")
    assert done.returncode == 2 and "invalid choice: 'int4'" in done.stderr


def test_generate_quantize_option(tmp_path):
    source = tiny_model_folder(tmp_path / "tiny")
    done = _cli("generate", "hello", "--model", str(source), "--max-new-tokens", "3", "--temperature", "0",
                "--kernels", "torch", "--quantize", "experts-int8", "--verbose")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "experts-int8 weights" in done.stderr


def test_int8_head_of_tied_embeddings_is_a_copy_made_on_load(tmp_path):
    source, target = tmp_path / "float", tmp_path / "int8"
    save_pretrained(random_model(PARITY_CONFIGS["dense-mha-tied-projbias"]), source)  # tied
    model = from_pretrained(source, quantize="int8-head", kernels="torch")
    assert model.lm_head.weight.dtype == torch.int8
    assert model.model.embed_tokens.weight.dtype == torch.float32  # a token reads one row: kept
    q, scale = quantize_rows(model.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, q) and torch.equal(model.lm_head.weight_scale, scale)
    model.save_pretrained(target)
    with safe_open(target / "model.safetensors", "pt") as f:
        names = f.keys()
        assert not any(k.startswith("lm_head") for k in names)  # made again from the embeddings
    config = json.loads((target / "config.json").read_text())
    assert "lm_head" in config["quantization_config"]["config_groups"]["group_0"]["targets"]
    back = from_pretrained(target, kernels="torch")
    assert method_of(back) == "int8-head" and torch.equal(back.lm_head.weight, q)
    _same(_logits(back), _logits(model))


def test_int8_head_with_bfloat16_activations_decodes(tmp_path):
    source = tmp_path / "bf16"
    save_pretrained(random_model(PARITY_CONFIGS["moe-gqa-untied"]), source, dtype=torch.bfloat16)
    model = from_pretrained(source, quantize="int8-head", dtype="stored")
    assert model.make_cache(1).conv_states[0].dtype == torch.bfloat16  # the model's dtype, not the head's
    out = model.generate(_ids(model.config.vocab_size), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 13)
