"""The real Jamba tokenizers (tests/fixtures/real, see its README) through pyjamba's Tokenizer: the
golden ids from the `tokenizers` library, decoding, streaming decoding of byte-fallback text, the
special and chat tokens, and the presets' end-of-turn ids."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest

from pyjamba.config import JambaConfig
from pyjamba.serve.chat_output import ChatOutput, OutputSpec
from pyjamba.serve.text import ChoiceText
from pyjamba.serve.tools import JAMBA2_TOOLS, ToolCall
from pyjamba.tokenizer import StreamDecoder, Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "real"
SHA256 = {
    "jamba-v0.1-tokenizer": "168522c4bc2db021984eb9ec0534b2421adee443b7fc038ed2ff8c36e934096a",
    "jamba2-tokenizer": "e7a4e48ea138a47ad25233b59d59babae314ee104ba9557644f28f5f2e49f900",
}
# Text the vocabulary mostly lacks pieces for: emoji (4-byte UTF-8, some joined by ZWJ or a skin
# tone), CJK, accents, so that byte-fallback tokens <0xXX> carry whole characters.
BYTE_FALLBACK_TEXT = "Fox 🦊 and 👩🏽‍🚀 said 日本語のテキスト、中文文本，한국어 — crème brûlée 🙂🚀"


def _unpack(folder: Path, name: str) -> Path:
    out = folder / name
    out.mkdir()
    with gzip.open(FIXTURES / name / "tokenizer.json.gz") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-tokenizers")
    return {name: _unpack(root, name) for name in SHA256}


@pytest.fixture(scope="module", params=sorted(SHA256))
def real(request, folders) -> tuple[str, Tokenizer]:
    return request.param, Tokenizer.from_pretrained(folders[request.param])


def test_the_fixtures_are_the_published_files(folders):
    for name, digest in SHA256.items():
        assert hashlib.sha256((folders[name] / "tokenizer.json").read_bytes()).hexdigest() == digest


def test_golden_ids(real):
    _, tok = real
    assert tok.vocab_size == 65536
    assert tok.encode("Hello world!") == [1, 13654, 2620, 63028]
    assert tok.encode("hello") == [1, 26928]
    assert tok.encode(" hello") == [1, 27164]
    assert tok.encode("  two  spaces\tand tab\n\nnewlines") == [
        1, 62934, 2345, 62934, 9645, 1553, 1927, 8656, 1554, 1554, 3129, 7980,
    ]  # fmt: skip
    assert tok.encode("hello", add_special_tokens=False) == [26928]
    assert [tok.id_to_token(i) for i in range(4)] == [
        "<|pad|>",
        "<|startoftext|>",
        "<|endoftext|>",
        "<|unk|>",
    ]


def test_decode_and_special_tokens(real):
    name, tok = real
    assert tok.decode([1, 26928], skip_special_tokens=False) == "<|startoftext|>hello"
    assert tok.decode([1, 26928]) == "hello"
    assert tok.decode([1, 13654, 2620, 63028]) == "Hello world!"
    if name == "jamba-v0.1-tokenizer":
        assert tok.encode("<|endoftext|>") == [1, 2]
        assert tok.special_ids == {0, 1, 2, 3}
    else:
        # <|endoftext|> is no added token in Jamba2: ordinary pieces, and its turns end at <|im_end|>.
        assert tok.encode("<|endoftext|>")[1:] != [2]
        assert tok.decode(tok.encode("<|endoftext|>")) == "<|endoftext|>"
        assert {0, 1, 3, 518, 519} <= tok.special_ids and not {531, 532, 541, 542} & tok.special_ids


def test_jamba2_chat_tokens(folders):
    tok = Tokenizer.from_pretrained(folders["jamba2-tokenizer"])
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert tok.encode(prompt) == [1, 518, 4771, 1554, 11694, 519, 1554, 518, 543, 1554, 541, 1554]
    named = {518: "<|im_start|>", 519: "<|im_end|>", 531: "<tool_call>", 532: "</tool_call>"}
    named |= {539: "<tool_response>", 540: "</tool_response>", 541: "<think>", 542: "</think>"}
    assert {i: tok.id_to_token(i) for i in named} == named
    # The chat markers are special (skipped in decoded text); the tool and thinking tags are not, so
    # that the server's parsers see them in the text.
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    ids = tok.encode(f"<|im_start|>assistant\n<think>\nok</think>{call}<|im_end|>", add_special_tokens=False)
    assert 531 in ids and 532 in ids and 541 in ids and 542 in ids
    assert tok.decode(ids) == f"assistant\n<think>\nok</think>{call}"


@pytest.mark.parametrize(
    ("preset", "tokens"),
    [
        ("jamba2-mini", ["<|im_end|>"]),
        ("jamba2-3b", ["<|im_end|>"]),
        ("jamba-reasoning-3b", ["<|endoftext|>", "<|im_end|>"]),
    ],
)
def test_jamba2_presets_end_turns_at_im_end(folders, preset, tokens):
    eos = JambaConfig.from_preset(preset).eos_token_ids
    tok = Tokenizer.from_pretrained(folders["jamba2-tokenizer"], eos_token_ids=eos)
    assert tok.eos_token_ids == eos
    assert [tok.id_to_token(i) for i in eos] == tokens


def test_byte_fallback_text_round_trips(real):
    _, tok = real
    ids = tok.encode(BYTE_FALLBACK_TEXT, add_special_tokens=False)
    byte_tokens = [i for i in ids if (tok.id_to_token(i) or "").startswith("<0x")]
    assert len(byte_tokens) >= 8  # the text does exercise byte fallback (two whole emoji)
    assert tok.decode(ids) == BYTE_FALLBACK_TEXT


def test_streaming_decode_of_byte_fallback_text(real):
    """Token by token, no push returns a broken character, each is final, and they join to decode()."""
    _, tok = real
    text = f"<|startoftext|>{BYTE_FALLBACK_TEXT}\n{BYTE_FALLBACK_TEXT[::-1]}"
    ids = tok.encode(text, add_special_tokens=False)
    for skip in (True, False):
        decoder = StreamDecoder(tok, skip_special_tokens=skip)
        pieces = [decoder.push(i) for i in ids]
        pieces.append(decoder.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)
        # Each push's text is final: the joined prefix is always a prefix of the whole decode.
        for n in range(1, len(ids)):
            assert tok.decode(ids[:n], skip_special_tokens=skip).startswith(
                "".join(pieces[:n]).rstrip("\ufffd")
            )


def test_a_stream_cut_inside_a_character_holds_it_back(real):
    _, tok = real
    ids = tok.encode("🦊", add_special_tokens=False)
    assert len(ids) == 4  # four byte tokens: F0 9F A6 8A
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids[:3]] == ["", "", ""]
    assert decoder.push(ids[3]) + decoder.flush() == "🦊"
    # A stream that ends inside the character flushes what the full decode gives.
    decoder = StreamDecoder(tok)
    assert "".join(decoder.push(i) for i in ids[:2]) + decoder.flush() == tok.decode(ids[:2])


def test_jamba2_output_parses_token_by_token(folders):
    """Reasoning 3B's answer as its token ids arrive: detokenized (text.py), then split (chat_output.py)
    into reasoning, content and a tool call, the same as the whole text."""
    tok = Tokenizer.from_pretrained(folders["jamba2-tokenizer"], eos_token_ids=[2, 519])
    answer = (
        "The user wants the weather 🌦 in 東京.</think>\n\nLet me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call><|im_end|>'
    )
    ids = tok.encode(answer, add_special_tokens=False)
    assert {531, 532, 542, 519} <= set(ids)
    text = ChoiceText(tok, [], frozenset(tok.eos_token_ids))
    output = ChatOutput(OutputSpec(tools=JAMBA2_TOOLS, reasoning=True))
    for i in ids:
        output.push(text.push(i).text)
    output.push(text.finish().text)
    output.finish()
    assert output.reasoning == "The user wants the weather 🌦 in 東京."
    assert output.message_content() == "Let me check."
    assert output.tool_calls == [ToolCall("get_weather", '{"city": "東京"}')]
