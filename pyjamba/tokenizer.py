"""Tokenizer: a Hugging Face tokenizer folder read with `tokenizers` and `jinja2` alone.

It owns encoding, decoding, chat templates and streaming detokenisation, and reproduces what
transformers' `AutoTokenizer` does with the same folder (the tests hold it to that), without
importing transformers:

- `tokenizer.json` is the tokenizer, post-processor included. Like transformers 5, which drops
  `add_bos_token` / `add_eos_token` whenever a `tokenizer.json` exists, the flags are read and kept
  but the post-processor decides whether BOS/EOS are added (for Jamba the two agree: BOS only).
- Named special tokens from `tokenizer_config.json` (or the legacy `special_tokens_map.json`) that
  `tokenizer.json` lacks as added tokens are added as special tokens, as transformers does.
- `decode` applies `clean_up_tokenization_spaces` only where transformers 5 does: never for a BPE
  model (Jamba's), unless the config forces it.
- Chat templates render in the same sandbox as transformers': trim_blocks, lstrip_blocks,
  loopcontrols, its `tojson`, `raise_exception`, `strftime_now`, `namespace`, `dict`, and a
  `{% generation %}` tag that renders its body.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

__all__ = ["ChatTemplateError", "StreamDecoder", "Tokenizer", "TokenizerError"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# The named special tokens of transformers (`SPECIAL_TOKENS_ATTRIBUTES`), in its order.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
# transformers' "no limit" model_max_length is int(1e30); anything this large means unbounded.
_UNBOUNDED_LENGTH = int(1e29)
# transformers' `clean_up_tokenization` replacements, applied in this order.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TokenizerError(Exception):
    """A tokenizer folder that cannot be read, or a request it cannot serve; the message names the file."""


class ChatTemplateError(TokenizerError, jinja2.TemplateError):
    """A chat template that fails to compile, or that called `raise_exception` while rendering."""


# ---- loading ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot be read: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, field: str, source: Path) -> str | None:
    """A special token's text from a string or an AddedToken-like dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(
        f"{source}: {field} must be a string or an object with a string 'content', got {value!r}"
    )


def _added_token(value: Any) -> AddedToken:
    """The AddedToken transformers builds from a config value: a plain string is special."""
    if isinstance(value, str):
        return AddedToken(value, special=True)
    return AddedToken(**{k: v for k, v in value.items() if k in _ADDED_TOKEN_FIELDS})


def _read_chat_templates(folder: Path, config: dict[str, Any], config_path: Path) -> dict[str, str]:
    """Named templates: `chat_template.jinja` and `additional_chat_templates/*.jinja` override the config's."""
    raw = config.get("chat_template")
    templates: dict[str, str] = {}
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for entry in raw:
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise TokenizerError(
                    f"{config_path}: chat_template entries must be {{'name': str, 'template': str}}, got {entry!r}"
                )
            templates[entry["name"]] = entry["template"]
    elif isinstance(raw, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        templates.update(raw)
    elif raw is not None:
        raise TokenizerError(
            f"{config_path}: chat_template must be a string or a list of named templates, got {type(raw).__name__}"
        )

    files = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        files["default"] = folder / CHAT_TEMPLATE_FILE
    if (folder / CHAT_TEMPLATE_DIR).is_dir():
        files.update(
            {p.name.removesuffix(".jinja"): p for p in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja"))}
        )
    if files:
        templates = {}  # template files take priority over every template in the config, as in transformers
        for name, path in files.items():
            try:
                templates[name] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{path}: cannot be read: {e}") from e
    return templates


# ---- the tokenizer ----------------------------------------------------------------------------


class Tokenizer:
    """A Hugging Face tokenizer folder: encode, decode, chat templates; built with `from_pretrained`."""

    def __init__(
        self,
        backend: _Backend,
        config: dict[str, Any] | None = None,
        chat_templates: dict[str, str] | None = None,
        eos_token_ids: int | Sequence[int] | None = None,
        path: str | os.PathLike | None = None,
        config_path: Path | None = None,
    ) -> None:
        config = dict(config or {})
        source = config_path or Path(CONFIG_FILE)
        self.path = Path(path) if path is not None else None
        self._backend = backend
        # transformers disables the tokenizer.json's truncation and padding unless asked for them per call.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(name), name, source)
            if content is not None:
                self.special_tokens[name] = content
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, Mapping):  # named model-specific tokens
            extra = list(extra.values())
        if not isinstance(extra, list):
            raise TokenizerError(
                f"{source}: additional_special_tokens must be a list, got {type(extra).__name__}"
            )
        for i, value in enumerate(extra):
            _token_content(value, f"additional_special_tokens[{i}]", source)

        # Tokens the config declares that tokenizer.json lacks as added tokens join as added tokens.
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        to_add = []
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, Mapping):
            raise TokenizerError(
                f"{source}: added_tokens_decoder must be an object, got {type(decoder).__name__}"
            )
        if not all(str(key).isdigit() for key in decoder):
            raise TokenizerError(
                f"{source}: added_tokens_decoder keys must be token ids, got {list(decoder)}"
            )
        for key, value in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = _token_content(value, f"added_tokens_decoder[{key}]", source)
            if content is not None and content not in known:
                to_add.append(_added_token(value))
                known.add(content)
        for value in [*(config.get(n) for n in SPECIAL_TOKEN_NAMES), *extra]:
            content = value if isinstance(value, str) or value is None else value["content"]
            if content is not None and content not in known:
                to_add.append(_added_token(value))
                known.add(content)
        if to_add:
            backend.add_tokens(to_add)

        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # transformers 5 skips the clean-up for BPE models, where it corrupts text, unless forced.
        self._clean_up = self.clean_up_tokenization_spaces and (
            type(backend.model).__name__ != "BPE"
            or bool(
                config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
            )
        )
        max_length = config.get("model_max_length")
        self.model_max_length: int | None = (
            int(max_length)
            if isinstance(max_length, (int, float)) and max_length < _UNBOUNDED_LENGTH
            else None
        )
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        if eos_token_ids is None:
            eos_token_ids = []
        elif isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self._extra_eos = [int(i) for i in eos_token_ids]
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._byte_fallback_ids = _byte_fallback_ids(backend)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, eos_token_ids: int | Sequence[int] | None = None
    ) -> Tokenizer:
        """Load a folder holding `tokenizer.json` and, optionally, `tokenizer_config.json`,
        `special_tokens_map.json`, `chat_template.jinja`.

        `eos_token_ids` (from config.json or generation_config.json) join the tokenizer's EOS token in
        `eos_token_ids`, where generation looks for its stop tokens.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: no such tokenizer folder")
        tokenizer_path = folder / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise TokenizerError(f"{tokenizer_path}: missing; a tokenizer folder needs {TOKENIZER_FILE}")
        try:
            text = tokenizer_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{tokenizer_path}: cannot be read: {e}") from e
        try:
            backend = _Backend.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for any JSON it cannot build from
            try:
                json.loads(text)
            except json.JSONDecodeError as bad:
                raise TokenizerError(
                    f"{tokenizer_path}: not valid JSON (line {bad.lineno}, column {bad.colno}: {bad.msg})"
                ) from e
            raise TokenizerError(f"{tokenizer_path}: not a tokenizers file: {e}") from e

        config_path = folder / CONFIG_FILE
        config = _read_json(config_path) if config_path.is_file() else {}
        special_map_path = folder / SPECIAL_TOKENS_MAP_FILE
        if "added_tokens_decoder" not in config and special_map_path.is_file():
            # Legacy folders: transformers reads special_tokens_map.json only when the config has no
            # added_tokens_decoder, and then its values win.
            config.update(_read_json(special_map_path))
        templates = _read_chat_templates(folder, config, config_path)
        return cls(backend, config, templates, eos_token_ids, path=folder, config_path=config_path)

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def to_json(self) -> str:
        """The tokenizer as `tokenizer.json` text (what grammar libraries read the vocabulary from)."""
        return self._backend.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Stop tokens: the tokenizer's EOS, then those passed to `from_pretrained`, without repeats."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        return list(dict.fromkeys(ids + self._extra_eos))

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special added tokens: what `decode(..., skip_special_tokens=True)` drops."""
        return self._special_ids

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch takes a list of str")
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def _decode_raw(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, equal to transformers' `tokenizer.decode(ids, skip_special_tokens=...)`."""
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        text = self._decode_raw([int(i) for i in ids], skip_special_tokens)
        return _clean_up(text) if self._clean_up else text

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- chat templates -----------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default template (None if the folder has none)."""
        return self.chat_templates.get("default")

    def chat_template_for(self, tools: Any = None) -> str | None:
        """The template `apply_chat_template` renders with these tools: the folder's `tool_use` one
        when tools are given and it has one, else the default (None if there is none)."""
        if tools is not None and "tool_use" in self.chat_templates:  # as _pick_template chooses
            return self.chat_templates["tool_use"]
        return self.chat_template

    def _pick_template(self, chat_template: str | None, tools: Any) -> tuple[str, str]:
        """(name, source) of the template to render, chosen as transformers' `get_chat_template`."""
        if chat_template is not None:
            if chat_template in self.chat_templates:
                return chat_template, self.chat_templates[chat_template]
            return "<argument>", chat_template
        if not self.chat_templates:
            raise TokenizerError(
                f"{self.path}: the tokenizer has no chat template (no chat_template in {CONFIG_FILE}, "
                f"no {CHAT_TEMPLATE_FILE}); pass chat_template= or use a folder that has one"
            )
        if tools is not None and "tool_use" in self.chat_templates:
            return "tool_use", self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return "default", self.chat_templates["default"]
        raise TokenizerError(
            f"{self.path}: several chat templates and none named 'default'; pass chat_template= one of "
            f"{sorted(self.chat_templates)}"
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **extra_context: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template, exactly as transformers does.

        Returns the text, or with `tokenize=True` its ids, encoded without adding special tokens
        (the template writes BOS itself). `chat_template` names one of the folder's templates or is
        a template source; `extra_context` reaches the template as variables.
        """
        name, source = self._pick_template(chat_template, tools)
        chat = _validate_messages(messages)
        if tools is not None:
            if not all(isinstance(t, Mapping) for t in tools):
                raise TypeError("tools must be a list of JSON-schema dicts")
            tools = [dict(t) for t in tools]
        if documents is not None:
            if not all(isinstance(d, Mapping) for d in documents):
                raise TypeError("documents must be a list of dicts with 'title' and 'text' keys")
            documents = [dict(d) for d in documents]
        context = {**self.special_tokens, **extra_context}
        template = _compile(source, name)
        try:
            text = template.render(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except ChatTemplateError as e:  # the template's own raise_exception: its message, and its name
            raise ChatTemplateError(f"chat template {name!r} refused the messages: {e}") from e
        except Exception as e:  # a template is code: it can fail in any way (1/0, 'a' + 1)
            raise ChatTemplateError(
                f"chat template {name!r} failed to render: {type(e).__name__}: {e}"
            ) from e
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _uses_byte_fallback(decoder: Any) -> bool:
    return decoder.get("type") == "ByteFallback" or any(
        _uses_byte_fallback(d) for d in decoder.get("decoders", ())
    )


def _byte_fallback_ids(backend: _Backend) -> frozenset[int]:
    """Ids of the <0xXX> byte tokens, where the decoder is SentencePiece's ByteFallback (Jamba's)."""
    if backend.decoder is None or not _uses_byte_fallback(json.loads(backend.decoder.__getstate__())):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


def _clean_up(text: str) -> str:
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Fresh copies of the messages, None-valued keys dropped and reasoning aliased, as transformers does."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f"messages[{i}] needs a str 'role', got {role!r}")
        content = message.get("content")
        if content is None:
            if "tool_calls" not in message:
                raise ValueError(f"messages[{i}] (role {role!r}) has no 'content'")
        elif not isinstance(content, (str, list, tuple)):
            raise ValueError(
                f"messages[{i}] 'content' must be a str or a list of content parts, got {type(content).__name__}"
            )
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


# ---- the template sandbox (transformers' `_cached_compile_jinja_template`) ---------------------


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in templates, without the class's attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes, a way out of the sandbox."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes, got {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for masks; here it renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=32)
def _compile(source: str, name: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template {name!r} does not compile: line {e.lineno}: {e.message}"
        ) from e


# ---- streaming ------------------------------------------------------------------------------


class StreamDecoder:
    """Text of a token stream as it grows: `push` returns what each token completes, `flush` the rest.

    The pushes and the flush join to exactly `tokenizer.decode(all_ids)`, and what a push returns is
    final: no later token changes it. Each push decodes only a small window (the prefix / read
    offsets of text-generation-inference and vLLM's `detokenize_incrementally`): the tokens since the
    last emission, plus those of the emission before as left context, so that decoders which look at
    their first token (SentencePiece's leading-space strip) see the same context as a full decode.

    Text is held back while it could still change:
    - a byte-level BPE token can end inside a multi-byte character: the decoded tail then ends with
      U+FFFD until a later token completes it;
    - SentencePiece's ByteFallback decodes a run of <0xXX> byte tokens as one group, and turns the
      whole group into U+FFFDs if any byte breaks it; so a run is held until a token that is not a
      byte closes it (a skipped special token does not).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # tokens from the prefix offset on
        self._read = 0  # window[:_read] is the already emitted prefix
        self._prefix_text = ""  # decode(window[:_read])
        self._in_byte_run = False  # the last token the decoder sees is a <0xXX> byte token
        self._pending = ""  # emitted raw text held back from the clean-up (only when it applies)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer._decode_raw(ids, self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while that text could still change)."""
        token_id = int(token_id)
        self._window.append(token_id)
        byte_ids = self.tokenizer._byte_fallback_ids
        if byte_ids and not (self.skip_special_tokens and token_id in self.tokenizer._special_ids):
            self._in_byte_run = token_id in byte_ids
        if self._in_byte_run:
            return ""
        text = self._decode(self._window)
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._prefix_text) :]
        # The tokens just emitted become the next prefix: the window slides, so it stays small.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return self._clean(new, final=False)

    def flush(self) -> str:
        """The held-back rest at the end of the stream; the decoder is then empty again."""
        text = self._decode(self._window)
        new = text[len(self._prefix_text) :]
        self._window, self._read, self._prefix_text, self._in_byte_run = [], 0, "", False
        return self._clean(new, final=True)

    def _clean(self, new: str, final: bool) -> str:
        """transformers' clean-up on a stream. Its patterns start with a space and are at most four
        characters long, and it only deletes spaces; so text whose last three characters hold no
        space cleans up the same alone as followed by anything. The rest waits."""
        if not self.tokenizer._clean_up:
            return new
        pending = self._pending + new
        cut = len(pending)
        while not final and (space := pending.find(" ", max(0, cut - 3), cut)) >= 0:
            cut = space
        self._pending = pending[cut:]
        return _clean_up(pending[:cut])
