"""Tokenizer: encode, decode and chat templates equal transformers' AutoTokenizer on the same folder;
streaming detokenisation joins to `decode`; every error names its problem.

Tokenizers are built on the fly: `tiny_tokenizer` (byte-level BPE, ChatML template) and a
Jamba-like SentencePiece BPE with byte fallback and a Jamba-1.5-style template list.
"""

from __future__ import annotations

import json
import random
import re
import string
from datetime import datetime
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from pyjamba.testing import tiny_tokenizer
from pyjamba.tokenizer import ChatTemplateError, StreamDecoder, Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    " ",
    "Hello world",
    "Hello, world! It's a test; isn't it? We'll see.",
    "  two leading spaces and two trailing  ",
    "\n\nnew lines\n\tand a tab\r\n",
    "Café naïve résumé façade Ångström jalapeño Straße",
    "日本語のテキスト、中文文本，한국어",
    "Emoji 🙂🚀 and a skin tone 👍🏽 and a flag 🇫🇷",
    "combining e\u0301 and zero\u200bwidth",
    "special <|endoftext|> in the middle and <|im_start|>user at the end",
    "<|startoftext|><|startoftext|>",
    "numbers 3.14159 2024-06-01 1e-5 0x1F",
    "The Jamba models interleave Mamba layers with attention layers. " * 8,
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Jamba? 🙂"}],
    [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Tell me about café culture in 日本."},
    ],
    [
        {"role": "user", "content": "First"},
        {"role": "assistant", "content": "Second", "tool_calls": None},
        {"role": "user", "content": "Third"},
    ],
]

# A template in the style of Jamba 1.5's: BOS, an optional system turn (with documents), then
# alternating turns between <|bom|><|role|> ... <|eom|> markers; bad roles raise.
JAMBA_STYLE_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if system_message or documents %}
    {{- '<|bom|><|system|> ' + system_message }}
    {%- if documents %}
        {{- '\\n\\n# Documents\\n' }}
        {%- for doc in documents %}
            {{- '<document title=' + doc['title'] | tojson + '>' + doc['text'] + '</document>\\n' }}
        {%- endfor %}
    {%- endif %}
    {{- '<|eom|>' }}
{%- endif %}
{%- set ns = namespace(previous='system') %}
{%- for message in loop_messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Jamba chats take user and assistant turns after an optional system message, got role ' + message['role']) }}
    {%- endif %}
    {%- if message['role'] == ns.previous %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set ns.previous = message['role'] %}
    {{- '<|bom|><|' + message['role'] + '|> ' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for part in message['content'] if part['type'] == 'text' %}
            {{- part['text'] }}
        {%- endfor %}
    {%- endif %}
    {{- '<|eom|>' }}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|bom|><|assistant|>' }}
    {%- endif %}
{%- endfor %}"""

JAMBA_STYLE_TOOL_TEMPLATE = """{{- bos_token }}
{{- '<|bom|><|system|> You can call these tools:\\n' + tools | tojson(indent=2, sort_keys=True) + '<|eom|>' }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% continue %}{% endif %}
    {{- '<|bom|><|' + message['role'] + '|> ' }}
    {%- if message.get('tool_calls') %}
        {{- message['tool_calls'] | tojson(separators=(',', ':')) }}
    {%- else %}
        {{- message['content'] }}
    {%- endif %}
    {{- '<|eom|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|bom|><|assistant|>' }}{% endif %}"""

# Template features beyond loops: generation blocks, loop controls, dict(), tojson's options, extra
# context variables, every special token string.
FEATURES_TEMPLATE = """{% set d = dict(a=1, b='é') %}{{ d | tojson }}{{ d | tojson(ensure_ascii=True) }}
{% for message in messages %}{% if loop.index > 3 %}{% break %}{% endif %}
{% if message.role == 'assistant' %}{% generation %}[{{ message.content }}]{% endgeneration %}
{% else %}{{ message.role }}: {{ message.content | trim }}
{% endif %}{% endfor %}
{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ custom | default('none') }}|{{ tools }}|{{ documents }}"""


def _auto(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _jamba_like(folder: Path) -> Path:
    """A SentencePiece-style BPE as Jamba's tokenizer.json: Prepend/Replace normalizer, byte fallback
    (bytes as <0xXX> tokens), a Replace/ByteFallback/Fuse/Strip decoder, BOS from the post-processor;
    `tokenizer_class` LlamaTokenizer and model_type jamba, as the real checkpoints."""
    specials = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>", "<|bom|>", "<|eom|>"]
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Backend(models.BPE(unk_token="<|unk|>"))
    trainer_tok.normalizer = normalizer
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # words, for training only
    # Every character outside this alphabet falls back to bytes. (A limit_alphabet that cuts among
    # equally frequent characters would make the training nondeterministic.)
    alphabet = sorted(set(string.ascii_letters + string.digits + "▁.,;:!?'-"))
    trainer = trainers.BpeTrainer(
        vocab_size=220, initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False
    )
    trainer_tok.train_from_iterator(TEXTS[2:] + [t["content"] for c in CONVERSATIONS for t in c], trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for tok in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Backend(models.BPE(vocab, merges, unk_token="<|unk|>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A",
        pair="<|startoftext|> $A <|startoftext|> $B",
        special_tokens=[("<|startoftext|>", 1)],
    )
    tok.add_special_tokens(specials)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "unk_token": "<|unk|>",
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "LlamaTokenizer",
        "chat_template": [
            {"name": "default", "template": JAMBA_STYLE_TEMPLATE},
            {"name": "tool_use", "template": JAMBA_STYLE_TOOL_TEMPLATE},
        ],
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "config.json").write_text(json.dumps({"model_type": "jamba"}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_tokenizer(tmp_path_factory.mktemp("tiny"))
    return Tokenizer.from_pretrained(folder), _auto(folder)


@pytest.fixture(scope="module")
def jamba_like(tmp_path_factory):
    folder = _jamba_like(tmp_path_factory.mktemp("jamba") / "tok")
    return Tokenizer.from_pretrained(folder), _auto(folder)


@pytest.fixture(params=["tiny", "jamba_like"])
def pair(request):
    return request.getfixturevalue(request.param)


def _random_ids(rng: random.Random, vocab_size: int, n: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(n)]


# ---- the tiny tokenizer -----------------------------------------------------------------------


def test_tiny_tokenizer_is_deterministic_and_jamba_like(tmp_path):
    a, b = tiny_tokenizer(tmp_path / "a"), tiny_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    tok = Tokenizer.from_pretrained(a)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 300 and tok.model_max_length == 1024
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert Tokenizer.from_pretrained(tiny_tokenizer(tmp_path / "c", vocab_size=400)).vocab_size == 400
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_tokenizer(tmp_path / "d", vocab_size=100)


# ---- parity with transformers -----------------------------------------------------------------


def test_vocabulary_and_special_ids_match_transformers(pair):
    ours, theirs = pair
    assert ours.vocab_size == len(theirs)
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.pad_token_id == theirs.pad_token_id
    assert ours.unk_token_id == theirs.unk_token_id
    assert set(theirs.all_special_ids) <= ours.special_ids
    assert ours.special_tokens == theirs.special_tokens_map


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    ours, theirs = pair
    for text in TEXTS:
        expected = theirs(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
    assert ours.encode_batch(TEXTS, add_special_tokens=add_special_tokens) == [
        ours.encode(t, add_special_tokens=add_special_tokens) for t in TEXTS
    ]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(pair, skip_special_tokens):
    ours, theirs = pair
    rng = random.Random(0)
    sequences = [ours.encode(t) for t in TEXTS] + [_random_ids(rng, ours.vocab_size, 30) for _ in range(30)]
    for ids in sequences:
        expected = theirs.decode(ids, skip_special_tokens=skip_special_tokens)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected, ids


def test_round_trip_on_valid_text(pair):
    ours, _ = pair
    for text in TEXTS:
        if "<|" not in text:
            assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(pair, add_generation_prompt):
    ours, theirs = pair
    for messages in CONVERSATIONS:
        kwargs = dict(add_generation_prompt=add_generation_prompt)
        expected = theirs.apply_chat_template(messages, tokenize=False, **kwargs)
        assert ours.apply_chat_template(messages, **kwargs) == expected
        expected_ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
        assert ours.apply_chat_template(messages, tokenize=True, **kwargs) == expected_ids
        assert expected_ids.count(ours.bos_token_id) == 1  # the template writes BOS, encode adds none


def test_jamba_style_template_list_parts_tools_and_documents(jamba_like):
    ours, theirs = jamba_like
    assert set(ours.chat_templates) == {"default", "tool_use"}
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look: "},
                {"type": "image"},
                {"type": "text", "text": "ok"},
            ],
        }
    ]
    documents = [
        {"title": 'Jamba "paper"', "text": "Hybrid SSM-Transformer."},
        {"title": "Notes", "text": "日本"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    calls = [
        {"role": "system", "content": "skipped"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18°C"},
    ]  # fmt: skip
    cases = [
        (parts, {}),
        (CONVERSATIONS[1], {"documents": documents}),
        (calls, {"tools": tools}),  # tools select the tool_use template
        (CONVERSATIONS[2], {"chat_template": "tool_use", "tools": tools}),
    ]
    for messages, kwargs in cases:
        for gen in (False, True):
            expected = theirs.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen, **kwargs
            )
            assert ours.apply_chat_template(messages, add_generation_prompt=gen, **kwargs) == expected
    assert "<|bom|><|assistant|>" in ours.apply_chat_template(calls, tools=tools, add_generation_prompt=True)


def test_template_features_match_transformers(tiny):
    ours, theirs = tiny
    messages = CONVERSATIONS[2] + [{"role": "assistant", "content": "cut by break"}]
    for extra in ({}, {"custom": "x", "tools": [{"name": "t"}], "documents": [{"title": "a", "text": "b"}]}):
        expected = theirs.apply_chat_template(
            messages, chat_template=FEATURES_TEMPLATE, tokenize=False, **extra
        )
        assert ours.apply_chat_template(messages, chat_template=FEATURES_TEMPLATE, **extra) == expected
    year = ours.apply_chat_template(CONVERSATIONS[0], chat_template="{{ strftime_now('%Y') }}")
    assert year == datetime.now().strftime("%Y")


def test_chat_template_files_list_and_legacy_special_tokens_map(tmp_path):
    # chat_template.jinja overrides the config's template, as newer transformers saves it.
    folder = tiny_tokenizer(tmp_path / "jinja")
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
    )
    # special_tokens_map.json (legacy) wins over the config when it has no added_tokens_decoder;
    # its pad token is unknown to tokenizer.json and joins as an added special token.
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": {"content": "<pad>"}, "eos_token": "<|im_end|>"})
    )
    ours, theirs = Tokenizer.from_pretrained(folder), _auto(folder)
    assert ours.apply_chat_template(CONVERSATIONS[2]) == theirs.apply_chat_template(
        CONVERSATIONS[2], tokenize=False
    )
    assert ours.apply_chat_template(CONVERSATIONS[2]).startswith("[system]")
    assert (ours.eos_token_id, ours.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id) == (5, 300)
    assert ours.vocab_size == len(theirs) == 301
    assert ours.encode("a <pad> b") == theirs("a <pad> b")["input_ids"]


def test_add_bos_token_flag_follows_transformers(tmp_path):
    # transformers 5 drops add_bos_token/add_eos_token when tokenizer.json exists: the post-processor
    # decides. Here tokenizer.json has none, and neither adds BOS despite the flag.
    folder = tiny_tokenizer(tmp_path / "nopost")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, add_eos_token=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = Tokenizer.from_pretrained(folder), _auto(folder)
    assert ours.encode("hello") == theirs("hello")["input_ids"]
    assert ours.add_bos_token and ours.bos_token_id not in ours.encode("hello")


def test_clean_up_tokenization_spaces_as_transformers(tmp_path):
    # BPE: transformers 5 ignores the flag (it corrupts BPE text); WordPiece: it applies it.
    bpe = tiny_tokenizer(tmp_path / "bpe")
    config = json.loads((bpe / "tokenizer_config.json").read_text())
    (bpe / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    wordpiece = _wordpiece(tmp_path / "wp")
    rng = random.Random(1)
    for folder in (bpe, wordpiece):
        ours, theirs = Tokenizer.from_pretrained(folder), _auto(folder)
        ids = ours.encode("It 's a dog . Is n't it ? Yes , we 're here !", add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert (" ." in ours.decode(ids)) == (folder == bpe)  # cleaned up for WordPiece only
        for _ in range(200):
            ids = _random_ids(rng, ours.vocab_size, rng.randrange(25))
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
            assert _stream(ours, ids) == ours.decode(ids)


def _wordpiece(folder: Path) -> Path:
    words = ["[UNK]", "[PAD]", "a", "dog", "it", "is", "yes", "we", "here", "n", "t", "s", "m", "re", "ve", "'",
             ".", ",", "?", "!", "##s", "##n", "##t", "##'", "i", "y", "e"]  # fmt: skip
    tok = Backend(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(["[UNK]", "[PAD]"])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"unk_token": "[UNK]", "pad_token": "[PAD]", "clean_up_tokenization_spaces": True,
              "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_eos_token_ids_merge(tmp_path):
    folder = tiny_tokenizer(tmp_path / "t")
    assert Tokenizer.from_pretrained(folder).eos_token_ids == [2]
    assert Tokenizer.from_pretrained(folder, eos_token_ids=5).eos_token_ids == [2, 5]
    assert Tokenizer.from_pretrained(folder, eos_token_ids=[5, 2, 5]).eos_token_ids == [2, 5]


def test_unbounded_model_max_length(jamba_like):
    assert jamba_like[0].model_max_length is None


# ---- streaming --------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    decoder = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    return "".join([decoder.push(i) for i in ids] + [decoder.flush()])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_random_sequences_join_to_decode(pair, skip_special_tokens):
    """On random ids, which split and break UTF-8 at will: what a push emits is final (a prefix of the
    full decode) and never ends inside a character; flush adds only a trailing broken character or,
    with byte fallback, a trailing run of byte tokens."""
    ours, _ = pair
    rng = random.Random(2)
    byte_tokens = [i for i in range(ours.vocab_size) if re.fullmatch(r"<0x[0-9A-F]{2}>", ours.id_to_token(i))]
    for n in range(400):
        # Runs of byte tokens (when the tokenizer has them) make valid and broken characters alike.
        pool = byte_tokens if byte_tokens and n % 2 else range(ours.vocab_size)
        ids = [
            rng.choice(pool) if rng.random() < 0.7 else rng.randrange(ours.vocab_size) for _ in range(n % 40)
        ]
        full = ours.decode(ids, skip_special_tokens=skip_special_tokens)
        decoder = StreamDecoder(ours, skip_special_tokens=skip_special_tokens)
        emitted = ""
        for i in ids:
            chunk = decoder.push(i)
            assert not chunk.endswith("\ufffd")
            emitted += chunk
            assert full.startswith(emitted)
        rest = decoder.flush()
        assert emitted + rest == full
        seen = [i for i in ids if not (skip_special_tokens and i in ours.special_ids)]
        assert rest == "" or full.endswith("\ufffd") or seen[-1] in byte_tokens


def test_stream_valid_text_never_emits_replacement_characters(pair):
    ours, _ = pair
    for text in TEXTS:
        ids = ours.encode(text)
        decoder = StreamDecoder(ours)
        chunks = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert not any("\ufffd" in c for c in chunks)
        assert "".join(chunks) == ours.decode(ids)


def test_stream_holds_a_split_character_back(tiny):
    ours, _ = tiny
    ids = ours.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1 and ours.decode(ids[:1]).endswith("\ufffd")  # the emoji's bytes span tokens
    decoder = StreamDecoder(ours)
    assert [decoder.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]
    assert decoder.flush() == ""
    # A stream that ends inside a character gives its replacement character at the flush, as decode.
    decoder = StreamDecoder(ours)
    assert decoder.push(ids[0]) == "" and decoder.flush() == ours.decode(ids[:1])


def test_stream_windows_stay_small(pair, monkeypatch):
    ours, _ = pair
    ids = ours.encode(" ".join(TEXTS) * 4)
    expected = ours.decode(ids)
    lengths = []
    decode = ours._decode_raw
    monkeypatch.setattr(ours, "_decode_raw", lambda ids, skip: lengths.append(len(ids)) or decode(ids, skip))
    assert _stream(ours, ids) == expected and len(ids) > 500
    # The window, never the whole sequence: a few tokens, plus any run of held byte-fallback tokens.
    runs = re.findall(r"(?:<0x[0-9A-F]{2}>)+", "".join(ours.id_to_token(i) for i in ids))
    longest_run = max((len(r) // 6 for r in runs), default=0)
    assert max(lengths) <= 12 + 2 * longest_run  # the held run, after the previous one as prefix


def test_stream_keeps_leading_spaces_of_sentencepiece_tokens(jamba_like):
    ours, _ = jamba_like
    ids = ours.encode("Hello world, hello Jamba and Mamba")
    decoder = StreamDecoder(ours)
    chunks = [decoder.push(i) for i in ids]
    assert "".join(chunks) == "Hello world, hello Jamba and Mamba"
    assert any(c.startswith(" ") for c in chunks)  # later words keep their space though decoded in windows


# ---- errors -----------------------------------------------------------------------------------


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer folder"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("tokenizer.json", "{not json", r"tokenizer\.json: not valid JSON \(line 1"),
        ("tokenizer.json", "{}", r"tokenizer\.json: not a tokenizers file"),
        ("tokenizer_config.json", '{"bos_token": ', r"tokenizer_config\.json: not valid JSON"),
        ("tokenizer_config.json", "[1, 2]", r"tokenizer_config\.json: expected a JSON object"),
        ("tokenizer_config.json", '{"bos_token": 7}', r"tokenizer_config\.json: bos_token must be a string"),
        ("tokenizer_config.json", '{"chat_template": [{"name": "x"}]}', r"chat_template entries must be"),
        ("tokenizer_config.json", '{"chat_template": 3}', r"chat_template must be a string or a list"),
        ("special_tokens_map.json", "{bad", r"special_tokens_map\.json: not valid JSON"),
    ],
)
def test_corrupted_files_name_the_file(tmp_path, name, text, match):
    folder = tiny_tokenizer(tmp_path / "t")
    (folder / name).write_text(text)
    if name == "special_tokens_map.json":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert "added_tokens_decoder" not in config  # else transformers (and we) skip the file
    with pytest.raises(TokenizerError, match=match) as info:
        Tokenizer.from_pretrained(folder)
    assert str(folder / name) in str(info.value)


def test_no_chat_template_names_the_folder(tmp_path):
    folder = tiny_tokenizer(tmp_path / "plain", chat_template=None)
    tok = Tokenizer.from_pretrained(folder)
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="has no chat template") as info:
        tok.apply_chat_template(CONVERSATIONS[0])
    assert str(folder) in str(info.value)


def test_several_templates_without_default(tmp_path):
    folder = tiny_tokenizer(tmp_path / "t")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(folder)
    with pytest.raises(TokenizerError, match=r"none named 'default'.*\['a', 'b'\]"):
        tok.apply_chat_template(CONVERSATIONS[0])
    assert tok.apply_chat_template(CONVERSATIONS[0], chat_template="b") == "B"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "must be a list of dicts"),
        ({"role": "user", "content": "x"}, "must be a list of dicts"),
        ([], "empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], r"messages\[0\] needs a str 'role'"),
        (
            [{"role": "user", "content": "x"}, {"role": 3, "content": "x"}],
            r"messages\[1\] needs a str 'role'",
        ),
        ([{"role": "user"}], r"messages\[0\] \(role 'user'\) has no 'content'"),
        ([{"role": "user", "content": 5}], r"'content' must be a str or a list"),
    ],
)
def test_bad_messages(tiny, messages, match):
    with pytest.raises(ValueError, match=match):
        tiny[0].apply_chat_template(messages)


def test_raise_exception_in_template(jamba_like):
    ours, theirs = jamba_like
    for messages, match in [
        ([{"role": "robot", "content": "beep"}], "got role robot"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ]:
        with pytest.raises(ChatTemplateError, match=match) as info:
            ours.apply_chat_template(messages)
        assert isinstance(info.value, jinja2.TemplateError) and isinstance(info.value, TokenizerError)
        with pytest.raises(jinja2.TemplateError, match=match):
            theirs.apply_chat_template(messages, tokenize=False)


def test_template_that_does_not_compile(tiny):
    with pytest.raises(ChatTemplateError, match="does not compile: line 1"):
        tiny[0].apply_chat_template(CONVERSATIONS[0], chat_template="{% for m in messages %}")


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{% set ns = namespace(_x=1) %}", "underscore attributes"),
        ("{{ messages.append(1) }}", "unsafe"),
    ],
)
def test_template_sandbox(tiny, template, match):
    with pytest.raises(ChatTemplateError, match=match) as info:
        tiny[0].apply_chat_template(CONVERSATIONS[0], chat_template=template)
    assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)
