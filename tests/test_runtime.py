"""runtime.py, the one loading path: what `load` chooses and why, the one stop-token rule, the one dtype
parser, and `--kernels` / `--verbose` on the commands that load a model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import pyjamba
from pyjamba import runtime
from pyjamba.__main__ import main as pyjamba_main
from pyjamba.checkpoint import CheckpointError, from_pretrained, save_pretrained
from pyjamba.config import JambaConfig
from pyjamba.dtypes import auto_dtype, dtype_name, parse_dtype, resolve_dtype
from pyjamba.pipeline import TextGenerator
from pyjamba.testing import tiny_model_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-runtime"))


@pytest.fixture(scope="module")
def eos_dir(tmp_path_factory, model_dir):
    """The tiny model with end-of-sequence tokens in all three places: the tokenizer's (2),
    config.json's ([2, 5]) and generation_config.json's (7), and some sampling defaults."""
    folder = tmp_path_factory.mktemp("tiny-eos") / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [2, 5]
    (folder / "config.json").write_text(json.dumps(config))
    generation = {"temperature": 0.7, "top_k": 5, "eos_token_id": 7, "max_new_tokens": None}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_load_records_what_it_chose_and_why(model_dir):
    generator = pyjamba.load(model_dir, kernels="torch", threads=1)
    choices = generator.choices
    assert isinstance(generator, TextGenerator)
    assert choices.folder == model_dir and choices.device == torch.device("cpu")
    assert (choices.kernels, choices.kernels_why) == ("torch", "asked for")
    assert generator.model.kernels.name == "torch"
    config = JambaConfig.from_pretrained(model_dir)
    assert choices.dtype == dtype_name(auto_dtype(config))
    assert {p.dtype for p in generator.model.parameters()} == {auto_dtype(config)}
    assert choices.dtype_why == resolve_dtype("auto", config)[1] and choices.dtype_why.startswith("auto: ")
    assert (choices.threads, choices.threads_why) == (1, "asked for") and torch.get_num_threads() == 1
    assert choices.huge_pages_bytes > 0 or choices.huge_pages_why  # moved, or why not
    assert generator.eos_token_ids == [2]  # the tokenizer's and config.json's: the same token
    assert generator.defaults == {}  # no generation_config.json
    summary = choices.summary()
    assert summary.startswith(f"kernels torch (asked for), dtype {choices.dtype} ({choices.dtype_why}), ")
    assert "1 thread (asked for)" in summary


def test_load_as_stored_with_the_reference_kernels_and_no_huge_pages(model_dir):
    choices = runtime.load(model_dir, dtype="stored", kernels="reference", huge_pages=False).choices
    assert (choices.kernels, choices.kernels_why) == ("reference", "asked for")
    assert (choices.dtype, choices.dtype_why) == ("float32", "stored: each tensor as the checkpoint holds it")
    assert (choices.huge_pages_bytes, choices.huge_pages_why) == (0, "huge pages not asked for")
    assert choices.threads_why == "torch's choice"
    model, weights_choices = runtime.load_weights(model_dir, dtype=torch.bfloat16, kernels="torch")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (weights_choices.dtype, weights_choices.dtype_why) == ("bfloat16", "asked for")


def test_the_one_stop_token_rule_joins_tokenizer_config_and_generation_config(eos_dir):
    generator = runtime.load(eos_dir, kernels="torch", huge_pages=False)
    assert generator.tokenizer.eos_token_ids == [2]
    assert generator.model.config.eos_token_ids == [2, 5]
    assert generator.eos_token_ids == [2, 5, 7]
    # Only the keys generation_config.json sets (a null is not set), as generate.stream's arguments.
    assert generator.defaults == {"temperature": 0.7, "top_k": 5, "eos_token_id": 7}
    assert generator.options()["eos_token_id"] == [2, 5, 7]
    assert generator.options(eos_token_id=9)["eos_token_id"] == [2, 5, 7, 9]  # an override adds
    # A TextGenerator built by hand gets the same rule from its parts.
    by_hand = TextGenerator(generator.model, generator.tokenizer, generator.defaults)
    assert by_hand.eos_token_ids == [2, 5, 7] and by_hand.choices is None


def test_stop_token_ids():
    config = JambaConfig.from_preset("jamba-tiny").replace(eos_token_id=[3, 1])

    class Stub:  # of a Tokenizer, the rule reads eos_token_ids only
        eos_token_ids = (4,)

    assert runtime.stop_token_ids(Stub(), config) == [1, 3, 4]
    assert runtime.stop_token_ids(Stub(), config, 9) == [1, 3, 4, 9]
    assert runtime.stop_token_ids(Stub(), config, [9, 3]) == [1, 3, 4, 9]
    assert runtime.stop_token_ids(None, config.replace(eos_token_id=None)) == []


def test_serve_backend_gets_its_model_and_stop_tokens_from_runtime(eos_dir, capsys):
    from pyjamba.serve import cli as serve_cli

    args = serve_cli._parser().parse_args(["--model", str(eos_dir), "--kernels", "torch", "--verbose"])
    backend = serve_cli._backend(eos_dir, args)
    assert backend.stop_tokens == frozenset({2, 5, 7})
    assert backend.defaults == {"temperature": 0.7, "top_k": 5}  # the sampling settings only
    assert backend.engine.model.kernels.name == "torch"
    assert capsys.readouterr().err.startswith("pyjamba serve: kernels torch (asked for), dtype ")


def test_load_errors(model_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="threads must be an integer of at least 1"):
        runtime.load(model_dir, threads=0)
    with pytest.raises(ValueError, match="unknown kernels 'fast'"):
        runtime.load(model_dir, kernels="fast")
    with pytest.raises(ValueError, match="got 'int8'"):
        runtime.load_weights(tmp_path / "absent", dtype="int8")  # before the folder is looked for
    monkeypatch.setattr(runtime, "numba_unavailable", lambda: "numba is not importable (test)")
    for call in (runtime.load, runtime.check):
        with pytest.raises(ValueError, match="kernels numba are unavailable: numba is not importable"):
            call(model_dir, kernels="numba")
    with pytest.raises(runtime.ModelNotFoundError, match="no model folder at"):
        runtime.load(tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        runtime.check(tmp_path)


# ---- the one dtype parser and policy ------------------------------------------------------------
def test_parse_dtype():
    assert parse_dtype("auto") == "auto"
    assert parse_dtype("stored") is None and parse_dtype(None) is None
    assert parse_dtype("float32") is torch.float32 and parse_dtype("torch.bfloat16") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16 and parse_dtype(torch.float64) is torch.float64
    assert parse_dtype("half") is torch.float16  # torch's aliases, as before


@pytest.mark.parametrize(
    ("value", "allow_auto", "words"),
    [
        ("int8", True, "dtype must be one of auto, stored, float32, bfloat16, float16, float64 or a"),
        ("fp32", True, "got 'fp32'"),
        (torch.int64, True, "dtype must be a floating-point dtype, got torch.int64"),
        (32, True, "got 32"),
        ("auto", False, "dtype must be one of stored, float32, bfloat16, float16, float64"),
    ],
)
def test_parse_dtype_errors(value, allow_auto, words):
    with pytest.raises(ValueError) as error:
        parse_dtype(value, allow_auto=allow_auto)
    assert words in str(error.value)


def test_bad_dtypes_fail_before_anything_is_read(tmp_path):
    with pytest.raises(ValueError, match="got 'int8'"):
        from_pretrained(tmp_path / "absent", dtype="int8")  # not "no checkpoint folder"
    model = pyjamba.JambaForCausalLM(JambaConfig.from_preset("jamba-tiny"))
    with pytest.raises(ValueError, match="dtype must be one of stored"):
        save_pretrained(model, tmp_path / "out", dtype="auto")
    assert not (tmp_path / "out").exists()


def test_resolve_dtype_says_why():
    small = JambaConfig.from_preset("jamba-small")
    plenty = 64 * 2**30
    assert resolve_dtype("auto", small, native_bf16=False, available_bytes=plenty) == (
        torch.float32,
        "auto: bfloat16 is not faster on this CPU (as given)",
    )
    assert resolve_dtype("auto", small, native_bf16=True, available_bytes=plenty) == (
        torch.bfloat16,
        "auto: bfloat16 is faster on this CPU (as given)",
    )
    dtype, why = resolve_dtype("auto", small, "meta", native_bf16=False, available_bytes=plenty)
    assert dtype is torch.bfloat16 and why.startswith("auto: meta multiplies bfloat16")
    big = JambaConfig.from_preset("jamba2-3b")
    dtype, why = resolve_dtype("auto", big, native_bf16=False, available_bytes=12 * 2**30)
    assert dtype is torch.bfloat16 and "would not fit in 80% of the available memory" in why
    assert resolve_dtype("bfloat16", small) == (torch.bfloat16, "asked for")
    assert resolve_dtype(None, small) == (None, "stored: each tensor as the checkpoint holds it")


# ---- the commands ---------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyjamba", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_with_the_reference_kernels_writes_what_torch_writes(model_dir):
    common = ("generate", "It is a truth", "--model", str(model_dir), "--max-new-tokens", "12")
    common += ("--temperature", "0", "--threads", "1", "--dtype", "float32")
    reference = _cli(*common, "--kernels", "reference", "--verbose")
    torch_ = _cli(*common, "--kernels", "torch")
    assert reference.returncode == 0, reference.stderr
    assert torch_.returncode == 0, torch_.stderr
    assert reference.stdout == torch_.stdout and len(reference.stdout) > len("It is a truth\n")
    # --verbose: one line on stderr saying which kernels and dtype, and why; none without it.
    lines = [line for line in reference.stderr.splitlines() if line.startswith("pyjamba: ")]
    assert len(lines) == 1, reference.stderr
    assert lines[0].startswith("pyjamba: kernels reference (asked for), dtype float32 (asked for), ")
    assert "1 thread (asked for), weights in " in lines[0]
    assert "pyjamba: kernels" not in torch_.stderr


@pytest.mark.parametrize("verb", ["generate", "chat", "serve", "bench"])
def test_an_unknown_kernel_is_a_usage_error(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        pyjamba_main([verb, "--kernels", "fast"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--kernels: invalid choice: 'fast'" in err and "reference" in err


@pytest.mark.parametrize("verb", ["generate", "serve"])
def test_an_unknown_dtype_is_a_usage_error(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        pyjamba_main([verb, "--dtype", "int8"])
    assert exit_.value.code == 2
    assert "--dtype: invalid choice: 'int8'" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["checkpoint", "generate", "dtypes", "pipeline"])
def test_modules_model_py_uses_do_not_import_it_at_their_top(module):
    """model.py may import checkpoint.py and generate.py at its top: neither imports model.py there
    (only under TYPE_CHECKING, or inside a function)."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(pyjamba.__file__).parent / f"{module}.py").read_text())
    for node in tree.body:  # module level only; `if TYPE_CHECKING:` blocks are ast.If, skipped
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            assert not {"model", "runtime"} & set(names), ast.unparse(node)
        elif isinstance(node, ast.Import):
            assert all(a.name not in ("pyjamba.model", "pyjamba.runtime") for a in node.names)
