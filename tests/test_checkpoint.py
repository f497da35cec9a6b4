"""Checkpoints: transformers' files load here and ours there, round trips, every error, atomic saves."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import kill_while_replacing
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pyjamba import folders
from pyjamba.checkpoint import (
    CheckpointError,
    from_hf,
    from_pretrained,
    parse_size,
    recover_folder,
    save_pretrained,
    to_hf,
)
from pyjamba.config import ConfigError, JambaConfig
from pyjamba.dtypes import auto_dtype, cpu_has_native_bf16
from pyjamba.model import JambaForCausalLM
from pyjamba.testing import random_model, relative_error

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # float32, relative to the logits' norm

_TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    attn_layer_period=4,
    attn_layer_offset=2,
    mamba_d_state=8,
    max_position_embeddings=512,
)
ARCHS = {
    "moe": dict(_TINY, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1),
    "dense": dict(_TINY, num_experts=1, num_experts_per_tok=1, expert_layer_period=1, expert_layer_offset=0),
}
SMALL_SHARD = "40KB"  # splits the tiny models (~0.3 MB in float32) into several shards
EXPERT = "model.layers.1.feed_forward.experts.2.up_proj.weight"


def _ids(vocab_size: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))


def _hf_model(arch: str, tied: bool):
    """A transformers JambaForCausalLM with random weights (norms, D and biases moved off their init)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.JambaConfig(**ARCHS[arch], tie_word_embeddings=tied, use_cache=False)
        hf = transformers.JambaForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return hf.eval()


def _keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys |= set(f.keys())
    return keys


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---- transformers -> here, here -> transformers ---------------------------------------------------
@pytest.mark.parametrize("shard", [None, SMALL_SHARD])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.no_grad()
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, arch, tied, shard):
    hf = _hf_model(arch, tied)
    hf.save_pretrained(tmp_path, **({} if shard is None else {"max_shard_size": shard}))
    index = tmp_path / "model.safetensors.index.json"
    assert index.is_file() == (shard is not None)
    assert ("lm_head.weight" in _keys(tmp_path)) == (not tied)  # transformers leaves a tied head out

    model = from_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = _ids(hf.config.vocab_size)
    assert relative_error(model(ids).logits, hf(ids).logits) < TOL


@pytest.mark.parametrize(("arch", "tied", "shard"), [("moe", False, SMALL_SHARD), ("dense", True, None)])
@torch.no_grad()
def test_checkpoint_saved_here_loads_in_transformers(tmp_path, arch, tied, shard):
    model = random_model(dict(ARCHS[arch], tie_word_embeddings=tied))
    save_pretrained(model, tmp_path, max_shard_size=shard or "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.JambaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.dtype == torch.float32
    ids = _ids(model.config.vocab_size)
    assert relative_error(hf(ids).logits, model(ids).logits) < TOL


def test_saved_files_follow_the_transformers_layout(tmp_path):
    model = random_model(ARCHS["moe"])
    save_pretrained(model, tmp_path, max_shard_size=SMALL_SHARD)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == _keys(tmp_path)
    assert EXPERT in index["weight_map"]
    total = 0
    for name in shards:
        with safe_open(tmp_path / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            total += sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118
        assert (tmp_path / name).stat().st_size < parse_size(SMALL_SHARD) + 4096  # data + header
    assert index["metadata"]["total_size"] == total
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    assert JambaConfig.from_pretrained(tmp_path) == model.config


# ---- here -> here -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shard", ["5GB", SMALL_SHARD])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_round_trip_is_exact(tmp_path, arch, shard):
    model = random_model(dict(ARCHS[arch], tie_word_embeddings=arch == "dense"))
    save_pretrained(model, tmp_path, max_shard_size=shard)
    loaded = from_pretrained(tmp_path)
    _assert_same_state(loaded, model)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == model.config.tie_word_embeddings


@torch.no_grad()
def test_dtype_conversion_on_load_and_on_save(tmp_path):
    model = random_model(ARCHS["moe"])
    save_pretrained(model, tmp_path / "f32")
    loaded = from_pretrained(tmp_path / "f32", dtype=torch.bfloat16)
    _assert_same_state(loaded, model.to(torch.bfloat16))
    ids = _ids(model.config.vocab_size)
    assert relative_error(loaded(ids).logits, model(ids).logits) == 0

    save_pretrained(model, tmp_path / "bf16", dtype="bfloat16", max_shard_size=SMALL_SHARD)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_same_state(from_pretrained(tmp_path / "bf16"), model)
    _assert_same_state(from_pretrained(tmp_path / "bf16", dtype="float32"), model.float())


_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma {extra}\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert not cpu_has_native_bf16(_CPUINFO.format(extra="avx512f avx512bw"))
    assert cpu_has_native_bf16(_CPUINFO.format(extra="avx512f avx512_bf16"))
    assert cpu_has_native_bf16(_CPUINFO.format(extra="amx_tile amx_bf16"))
    assert cpu_has_native_bf16("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")  # Arm
    assert not cpu_has_native_bf16("")


def test_auto_dtype_chooses_by_cpu_and_memory():
    small = JambaConfig.from_preset("jamba-small")  # 77M parameters: 0.3 GB in float32
    plenty = 64 * 2**30
    assert auto_dtype(small, native_bf16=False, available_bytes=plenty) == torch.float32
    assert auto_dtype(small, native_bf16=True, available_bytes=plenty) == torch.bfloat16
    assert auto_dtype(small, "meta", native_bf16=False, available_bytes=plenty) == torch.bfloat16
    # 3.2B parameters: 12.8 GB in float32, 6.4 GB in bfloat16.
    big = JambaConfig.from_preset("jamba2-3b")
    assert auto_dtype(big, native_bf16=False, available_bytes=24 * 2**30) == torch.float32
    assert auto_dtype(big, native_bf16=False, available_bytes=12 * 2**30) == torch.bfloat16
    # Too big even in bfloat16: float32 is no worse, and keeps the precision.
    assert auto_dtype(big, native_bf16=False, available_bytes=4 * 2**30) == torch.float32
    assert auto_dtype(small) in (torch.float32, torch.bfloat16)  # this machine's own answer


@torch.no_grad()
def test_load_with_dtype_auto(tmp_path):
    model = random_model(ARCHS["moe"])
    save_pretrained(model, tmp_path, dtype="bfloat16")
    loaded = from_pretrained(tmp_path, dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {auto_dtype(model.config)}


def _mapping_of(ptr: int) -> str | None:
    """The file behind the memory mapping that holds address ptr (None: anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= ptr < end:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_load_maps_the_file_and_reads_experts_into_place(tmp_path):
    save_pretrained(random_model(ARCHS["moe"]), tmp_path)
    model = from_pretrained(tmp_path)
    file = str((tmp_path / "model.safetensors").resolve())
    assert _mapping_of(model.model.embed_tokens.weight.data_ptr()) == file  # zero-copy view
    assert _mapping_of(model.model.layers[0].mamba.in_proj.weight.data_ptr()) == file
    assert _mapping_of(model.model.layers[1].feed_forward.experts.up_proj.data_ptr()) != file  # stacked copy
    bf16 = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert _mapping_of(bf16.model.embed_tokens.weight.data_ptr()) != file  # converted: a copy


def test_from_hf_and_to_hf_are_inverse():
    for tied in (False, True):
        model = random_model(dict(ARCHS["moe"], tie_word_embeddings=tied))
        state = model.state_dict()
        hf = to_hf(state, model.config)
        assert ("lm_head.weight" in hf) == (not tied)
        assert hf[EXPERT].shape == (48, 32)
        assert torch.equal(hf[EXPERT], state["model.layers.1.feed_forward.experts.up_proj"][2])
        back = from_hf(hf, model.config)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)
        del hf[EXPERT]
        with pytest.raises(CheckpointError, match=r"experts\.up_proj.*expert\(s\) \[2\] missing"):
            from_hf(hf, model.config)


def test_parse_size():
    assert parse_size(1234) == 1234
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1GiB") == 2**30
    assert parse_size("1.5 KiB") == 1536
    for bad in ("5XB", "-1", "GB", 0, True, 1.5):
        with pytest.raises(ValueError):
            parse_size(bad)


# ---- errors --------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    """A single-file MoE checkpoint (untied)."""
    folder = tmp_path / "ck"
    save_pretrained(random_model(ARCHS["moe"]), folder)
    return folder


@pytest.fixture
def sharded(tmp_path) -> Path:
    folder = tmp_path / "sharded"
    save_pretrained(random_model(ARCHS["moe"]), folder, max_shard_size=SMALL_SHARD)
    return folder


def _edit(folder: Path, change) -> None:
    """Rewrite model.safetensors with change(state) applied."""
    file = folder / "model.safetensors"
    state = load_file(file)
    change(state)
    save_file(state, file, metadata={"format": "pt"})


def _load_error(folder: Path, *fragments: str, error: type[Exception] = CheckpointError) -> str:
    with pytest.raises(error) as info:
        from_pretrained(folder)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_missing_folder_config_or_weights(tmp_path, saved):
    _load_error(tmp_path / "nowhere", "nowhere")
    (saved / "model.safetensors").unlink()
    _load_error(saved, "model.safetensors", "no weights")
    (saved / "config.json").unlink()
    _load_error(saved, "config.json")


def test_config_that_is_not_jamba(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    _load_error(saved, "config.json", "llama", error=ConfigError)


def test_pickle_checkpoint_is_refused_not_read(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    JambaConfig(**ARCHS["moe"]).save(folder)
    (folder / "pytorch_model.bin").write_bytes(b"unpickling this would fail loudly")
    _load_error(folder, "pytorch_model.bin", "safetensors", "pickle")


def test_malformed_index(sharded):
    index = sharded / "model.safetensors.index.json"
    original = index.read_text()
    index.write_text("{not json")
    _load_error(sharded, "model.safetensors.index.json", "JSON")
    index.write_text(json.dumps({"metadata": {}}))
    _load_error(sharded, "model.safetensors.index.json", "weight_map")
    data = json.loads(original)
    data["weight_map"][EXPERT] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    _load_error(sharded, "model.safetensors.index.json", EXPERT)
    data["weight_map"][EXPERT] = "model-00001-of-00099.safetensors"
    data["weight_map"].pop("model.embed_tokens.weight")
    index.write_text(json.dumps(data))
    _load_error(sharded, "model.safetensors.index.json", "model-00001-of-00099.safetensors")
    data = json.loads(original)
    first = data["weight_map"]["model.embed_tokens.weight"]
    other = next(name for name in data["weight_map"].values() if name != first)
    data["weight_map"]["model.embed_tokens.weight"] = other  # names a shard that lacks it
    index.write_text(json.dumps(data))
    _load_error(sharded, "model.safetensors.index.json", "model.embed_tokens.weight", other)


def test_shard_deleted_truncated_or_corrupted(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sharded / index["weight_map"][EXPERT]
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) - 100])
    _load_error(sharded, shard.name, "truncated or corrupted")
    shard.write_bytes(b"\xff" * 8 + original[8:])  # header length
    _load_error(sharded, shard.name)
    shard.write_bytes(original[:8] + b"#" * 16 + original[24:])  # header JSON
    _load_error(sharded, shard.name)
    shard.unlink()
    _load_error(sharded, shard.name, "model.safetensors.index.json")


def test_missing_unexpected_and_misshapen_tensors(saved):
    state = load_file(saved / "model.safetensors")
    _edit(saved, lambda s: s.pop("model.layers.2.self_attn.k_proj.weight"))
    _load_error(saved, "model.safetensors", "model.layers.2.self_attn.k_proj.weight", "1 tensor(s) missing")
    _edit(saved, lambda s: s.update({"model.layers.2.self_attn.k_proj.weight": state["model.layers.2.self_attn.k_proj.weight"], "model.layers.0.extra.weight": torch.zeros(3)}))  # fmt: skip
    _load_error(saved, "model.safetensors", "model.layers.0.extra.weight", "unexpected")
    _edit(saved, lambda s: s.pop("model.layers.0.extra.weight"))
    from_pretrained(saved)  # restored

    _edit(saved, lambda s: s.update({"model.layers.0.mamba.A_log": torch.zeros(64, 9)}))
    _load_error(saved, "model.safetensors", "model.layers.0.mamba.A_log", "(64, 9)", "(64, 8)")
    _edit(saved, lambda s: s.update({"model.layers.0.mamba.A_log": torch.zeros(64, 8, dtype=torch.int32)}))
    _load_error(saved, "model.safetensors", "model.layers.0.mamba.A_log", "I32")
    _edit(saved, lambda s: s.update({"model.layers.0.mamba.A_log": state["model.layers.0.mamba.A_log"]}))
    _edit(saved, lambda s: s.update({EXPERT: torch.zeros(48, 33)}))
    _load_error(saved, "model.safetensors", EXPERT, "(48, 33)", "(48, 32)")
    _edit(saved, lambda s: s.pop(EXPERT))
    _load_error(
        saved, "model.safetensors", "model.layers.1.feed_forward.experts.up_proj", "[2] missing", EXPERT
    )


@pytest.mark.parametrize("shard", [None, SMALL_SHARD])
def test_a_tied_config_with_a_head_in_the_files(tmp_path, shard, caplog):
    """Equal to the embedding, the head in the files is the tie written out; different, it is loaded
    untied (Jamba Reasoning 3B's checkpoint carries an lm_head.weight with tie_word_embeddings set),
    with a warning, and the logits are transformers' for the same folder."""
    model = random_model(dict(ARCHS["dense"], tie_word_embeddings=True))
    save_pretrained(model, tmp_path, **({"max_shard_size": shard} if shard else {}))
    embed = model.model.embed_tokens.weight.detach()

    def put_head(head: torch.Tensor) -> None:  # into the single file, or a shard of its own
        if shard is None:
            _edit(tmp_path, lambda s: s.update({"lm_head.weight": head}))
            return
        save_file({"lm_head.weight": head}, tmp_path / "head.safetensors", metadata={"format": "pt"})
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        index["weight_map"]["lm_head.weight"] = "head.safetensors"
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    put_head(embed.clone())
    loaded = from_pretrained(tmp_path)
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _assert_same_state(loaded, model)

    head = embed + 0.01 * torch.randn_like(embed)
    put_head(head)
    with caplog.at_level("WARNING", logger="pyjamba.checkpoint"):
        loaded = from_pretrained(tmp_path)
    assert "loading the head untied" in caplog.text
    assert not loaded.config.tie_word_embeddings
    assert torch.equal(loaded.lm_head.weight, head) and torch.equal(loaded.model.embed_tokens.weight, embed)
    ids = _ids(model.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.JambaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    # Saved again, it is an ordinary untied checkpoint.
    save_pretrained(loaded, tmp_path / "again")
    assert "lm_head.weight" in _keys(tmp_path / "again")
    assert not json.loads((tmp_path / "again" / "config.json").read_text())["tie_word_embeddings"]

    put_head(embed[:, :-1].clone())
    _load_error(tmp_path, "lm_head.weight", "shape")


def test_empty_or_foreign_weight_files(saved, sharded):
    single = saved / "model.safetensors"
    for content in (b"", b"not safetensors at all, but text\n" * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00[]"):
        single.write_bytes(content)
        _load_error(saved, str(single), "not a readable safetensors file")
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"")
    _load_error(sharded, str(shard), "not a readable safetensors file")


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"jamba"', "1" * 5000, "[" * 100_000])
def test_config_json_that_is_not_an_object(saved, text):
    (saved / "config.json").write_text(text)
    _load_error(saved, str(saved / "config.json"), error=ConfigError)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"weight_map": {"a": ' + "1" * 5000 + "}}", "[]"])
def test_index_that_is_not_an_object(sharded, text):
    (sharded / "model.safetensors.index.json").write_text(text)
    _load_error(sharded, "model.safetensors.index.json")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_unreadable_file_is_named(sharded, monkeypatch, name):
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    _load_error(sharded, name, "cannot be read", "Permission denied")


@pytest.mark.parametrize(("field", "value"), [("hidden_size", 2**40), ("num_experts", 10**9)])
def test_absurd_config_is_refused_before_the_model_is_built(saved, monkeypatch, field, value):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(dict(config, **{field: value})))
    # Whichever way the class reaches checkpoint.py, building one fails the test.
    monkeypatch.setattr(JambaForCausalLM, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    start = time.perf_counter()
    _load_error(saved, "config.json", f"{field} ({value}) exceeds its bound", error=ConfigError)
    assert time.perf_counter() - start < 5


# ---- atomic saving --------------------------------------------------------------------------------
@pytest.mark.usefixtures("replace_mode")
def test_save_replaces_an_existing_checkpoint_and_keeps_other_files(tmp_path):
    folder = tmp_path / "ck"
    first, second = random_model(ARCHS["moe"], seed=1), random_model(ARCHS["moe"], seed=2)
    save_pretrained(first, folder, max_shard_size=SMALL_SHARD)
    (folder / "tokenizer.json").write_text("{}")
    loaded = from_pretrained(folder)  # its parameters map the files about to be replaced
    save_pretrained(second, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary or moved-aside folder
    _assert_same_state(from_pretrained(folder), second)
    _assert_same_state(loaded, first)  # still readable
    save_pretrained(loaded, folder)  # saving over the files a model was loaded from
    _assert_same_state(from_pretrained(folder), first)


@pytest.mark.usefixtures("replace_mode")
def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    save_pretrained(random_model(ARCHS["moe"], seed=1), folder)
    before = _digest(folder)
    real, calls = safetensors.torch.save_file, []

    def fail_after_first_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError("disk full")
        real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_after_first_shard)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(random_model(ARCHS["moe"], seed=2), folder, max_shard_size=SMALL_SHARD)
    assert len(calls) == 2
    assert _digest(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    from_pretrained(folder)


def _killed_save(folder: Path, step: str) -> None:
    body = (
        "import json\nfrom pyjamba import checkpoint\nfrom pyjamba.testing import random_model\n"
        "checkpoint.save_pretrained(random_model(json.loads(sys.argv[3]), seed=2), folder)\n"
    )
    kill_while_replacing(folder, step, body, json.dumps(ARCHS["moe"]))


def _others(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if p.name != "ck")


def test_kill_between_the_two_renames_is_recovered(tmp_path, caplog):
    folder = tmp_path / "ck"
    first = random_model(ARCHS["moe"], seed=1)
    save_pretrained(first, folder)
    (folder / "tokenizer.json").write_text("{}")
    _killed_save(folder, "between the two renames")
    assert not folder.exists()
    assert [name[:8] for name in _others(tmp_path)] == [".ck.old-", ".ck.tmp-"]
    with caplog.at_level(logging.WARNING, logger="pyjamba.folders"):
        _assert_same_state(from_pretrained(folder), first)
    assert "a save was interrupted" in caplog.text
    assert (folder / "tokenizer.json").read_text() == "{}"
    save_pretrained(random_model(ARCHS["moe"], seed=3), folder)  # deletes the killed save's folder
    assert _others(tmp_path) == []
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.usefixtures("needs_exchange")
def test_kill_after_the_exchange_leaves_the_new_checkpoint(tmp_path):
    folder = tmp_path / "ck"
    save_pretrained(random_model(ARCHS["moe"], seed=1), folder)
    _killed_save(folder, "after the exchange")
    _assert_same_state(from_pretrained(folder), random_model(ARCHS["moe"], seed=2))
    assert [name[:8] for name in _others(tmp_path)] == [".ck.tmp-"]  # the previous version
    save_pretrained(random_model(ARCHS["moe"], seed=3), folder)
    assert _others(tmp_path) == []


def test_recovery_takes_only_a_complete_previous_folder(tmp_path):
    folder = tmp_path / "ck"
    model = random_model(ARCHS["moe"])
    save_pretrained(model, folder, max_shard_size=SMALL_SHARD)
    aside = tmp_path / ".ck.old-0123abcd"
    os.rename(folder, aside)  # what a kill between the two renames leaves
    newer = tmp_path / ".ck.old-ffffffff"  # incomplete: no weights
    newer.mkdir()
    (newer / "config.json").write_text((aside / "config.json").read_text())
    shard = next(aside.glob("model-*.safetensors"))
    shard.rename(tmp_path / "away")
    _load_error(folder, "no checkpoint folder")
    with pytest.raises(FileNotFoundError):
        JambaConfig.from_pretrained(folder)
    assert _others(tmp_path) == [".ck.old-0123abcd", ".ck.old-ffffffff", "away"]

    (tmp_path / "away").rename(shard)
    assert JambaConfig.from_pretrained(folder) == model.config  # reading the config recovers too
    assert _others(tmp_path) == [".ck.old-ffffffff"]
    assert not recover_folder(folder)
    _assert_same_state(from_pretrained(folder), model)


def test_a_load_between_the_two_renames_waits_for_the_save(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    folder = tmp_path / "ck"
    save_pretrained(random_model(ARCHS["moe"], seed=1), folder)
    second = random_model(ARCHS["moe"], seed=2)
    rename, loaded, readers = os.rename, [], []

    def rename_then_load(src, dst):
        rename(src, dst)
        if ".old-" in os.fspath(dst):  # between the two renames: a reader finds no folder
            reader = threading.Thread(target=lambda: loaded.append(from_pretrained(folder)))
            reader.start()
            reader.join(0.5)
            assert reader.is_alive()  # waiting for the save, not putting the old folder back
            readers.append(reader)

    monkeypatch.setattr(os, "rename", rename_then_load)
    save_pretrained(second, folder)
    readers[0].join(60)
    _assert_same_state(loaded[0], second)
    assert _others(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
@pytest.mark.usefixtures("replace_mode")
def test_saved_folder_has_ordinary_permissions(tmp_path, umask):
    folder = tmp_path / "ck"
    old = os.umask(umask)
    try:
        for seed in (1, 2):  # a new folder, then one replacing it
            save_pretrained(random_model(ARCHS["moe"], seed=seed), folder, max_shard_size=SMALL_SHARD)
            assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
            assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o666 & ~umask}
    finally:
        os.umask(old)
