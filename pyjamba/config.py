"""JambaConfig: the architecture only, with the field names and defaults of Hugging Face's `config.json`.

Runtime knobs (device, dtype, kernels, compile) are not here; they belong to whoever runs the model.
Validation bounds every size and the total parameter count, so that a config.json with an absurd
field is refused with a ConfigError before anything is built from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MAX_PARAMS", "MAX_SIZES", "PRESETS", "ConfigError", "JambaConfig"]


class ConfigError(ValueError):
    """A config that is not Jamba's, or whose fields break a rule; the message names the field."""


# Upper bounds on the sizes. Each lies far above every Jamba released (Jamba 1.5 Large: hidden 8192,
# intermediate 24576, 72 layers, 64 heads, 16 experts, vocab 65536, context 262144) and far below
# sizes whose model could never be allocated: a config.json with hidden_size 2**40 is an error to
# report, not a model to try to build. num_attention_heads <= hidden_size and num_key_value_heads <=
# num_attention_heads follow from the divisibility rules; num_experts_per_tok <= num_experts is a rule.
MAX_SIZES: dict[str, int] = {
    "vocab_size": 2**22,  # 4M tokens: 64x Jamba's, 16x the largest vocabularies in use (256K)
    "hidden_size": 2**16,  # 8x Jamba 1.5 Large
    "intermediate_size": 2**20,  # 42x Jamba 1.5 Large
    "num_hidden_layers": 4096,  # 57x Jamba 1.5 Large
    "num_experts": 4096,  # 256x Jamba; fine-grained MoEs use a few hundred
    "mamba_d_state": 1024,  # 64x Jamba's 16; Mamba-2 uses up to 256
    "mamba_d_conv": 64,  # 16x Jamba's 4
    "mamba_expand": 64,  # 32x Jamba's 2
    "max_position_embeddings": 2**24,  # 16M tokens, 64x Jamba's 256K: the server sizes caches from it
}
# The fields can each be within bounds and still multiply to an impossible model (4096 layers of
# 4096 experts): the total parameter count is bounded too. 10**13 is 25x Jamba 1.5 Large (398B),
# 20 TB in bfloat16.
MAX_PARAMS = 10**13


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Keys that early checkpoints (Jamba v0.1's remote code) or transformers write, which carry no
# architecture: read and dropped so that they neither fail validation nor pollute `extra`.
_IGNORED_KEYS = {
    "architectures",
    "auto_map",
    "calc_logits_for_entire_prompt",
    "use_mamba_kernels",
    "use_mambapy",
    "use_associative_scan",
    "use_cache",
    "output_router_logits",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "model_type",
    "_name_or_path",
}


@dataclass
class JambaConfig:
    """The fields of a Hugging Face Jamba `config.json`, with transformers' defaults (Jamba v0.1)."""

    vocab_size: int = 65536
    tie_word_embeddings: bool = False
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    router_aux_loss_coef: float = 0.001
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    max_position_embeddings: int = 262144
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2
    num_experts: int = 16
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # Unknown keys from a config.json, kept so that a load/save round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived architecture -------------------------------------------------------------
    @property
    def dt_rank(self) -> int:
        """R: the rank of the dt projection; "auto" is ceil(hidden_size / 16)."""
        if self.mamba_dt_rank == "auto":
            return math.ceil(self.hidden_size / 16)
        return int(self.mamba_dt_rank)

    @property
    def mamba_inner(self) -> int:
        """ED: the Mamba mixer's inner width."""
        return self.mamba_expand * self.hidden_size

    @property
    def head_dim(self) -> int:
        """Dh: hidden_size / num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_types(self) -> list[str]:
        """'attention' or 'mamba' for each layer, from attn_layer_period and attn_layer_offset."""
        return [
            "attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba"
            for i in range(self.num_hidden_layers)
        ]

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i's feed-forward is a Mixture of Experts (a single expert is a plain MLP)."""
        return self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset

    @property
    def eos_token_ids(self) -> list[int]:
        """eos_token_id as a list (it may be an int, a list or None)."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the field and the rule it breaks."""
        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "num_experts",
            "num_experts_per_tok",
            "expert_layer_period",
            "attn_layer_period",
            "mamba_d_state",
            "mamba_d_conv",
            "mamba_expand",
            "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
            if name in MAX_SIZES and value > MAX_SIZES[name]:
                raise ConfigError(f"{name} ({value}) exceeds its bound {MAX_SIZES[name]}")
        for name in ("tie_word_embeddings", "mamba_conv_bias", "mamba_proj_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("attn_layer_offset", "expert_layer_offset"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.attn_layer_offset >= self.attn_layer_period:
            raise ConfigError(
                f"attn_layer_offset ({self.attn_layer_offset}) must be smaller than "
                f"attn_layer_period ({self.attn_layer_period})"
            )
        if self.expert_layer_offset >= self.expert_layer_period:
            raise ConfigError(
                f"expert_layer_offset ({self.expert_layer_offset}) must be smaller than "
                f"expert_layer_period ({self.expert_layer_period})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must not exceed "
                f"num_experts ({self.num_experts})"
            )
        if self.mamba_dt_rank != "auto" and not (_is_int(self.mamba_dt_rank) and self.mamba_dt_rank > 0):
            raise ConfigError(
                f"mamba_dt_rank must be 'auto' or a positive integer, got {self.mamba_dt_rank!r}"
            )
        if self.dt_rank > self.mamba_inner:  # a rank above the width dt is projected to adds nothing
            raise ConfigError(
                f"mamba_dt_rank ({self.dt_rank}) exceeds its bound mamba_expand * hidden_size "
                f"({self.mamba_inner})"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' (Jamba's only activation), got {self.hidden_act!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value < self.vocab_size):
                raise ConfigError(f"{name} ({value!r}) must lie in [0, vocab_size={self.vocab_size})")
        if not (self.eos_token_id is None or isinstance(self.eos_token_id, (int, list))):
            raise ConfigError(f"eos_token_id must be an integer or a list of them, got {self.eos_token_id!r}")
        for eos in self.eos_token_ids:
            if not (_is_int(eos) and 0 <= eos < self.vocab_size):
                raise ConfigError(f"eos_token_id ({eos!r}) must lie in [0, vocab_size={self.vocab_size})")
        self._check_total_params()

    def _check_total_params(self) -> None:
        """The parameter count against MAX_PARAMS, counted from the fields alone (no model is built)."""
        from .accounting import param_breakdown  # accounting imports this module

        breakdown = param_breakdown(self)
        total = sum(breakdown.values())
        if total > MAX_PARAMS:
            largest = max(breakdown, key=breakdown.__getitem__)
            raise ConfigError(
                f"the config describes {total:,} parameters ({largest}: {breakdown[largest]:,}), more than "
                f"the bound of {MAX_PARAMS:,}: check hidden_size, intermediate_size, num_experts, "
                "num_hidden_layers and vocab_size"
            )

    # ---- dict and file I/O ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JambaConfig:
        """Build from a `config.json` dict: legacy keys are translated, unknown keys kept in `extra`."""
        if not isinstance(data, dict):
            raise ConfigError(f"a Jamba config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "jamba")
        if model_type != "jamba":
            raise ConfigError(f"model_type is {model_type!r}, not 'jamba': this is not a Jamba config")
        data = dict(data)
        if "n_ctx" in data:  # Jamba v0.1's remote code called the context length n_ctx.
            n_ctx = data.pop("n_ctx")
            data.setdefault("max_position_embeddings", n_ctx)
        if data.pop("mamba_inner_layernorms", True) is False:
            raise ConfigError(
                "mamba_inner_layernorms is false: Jamba checkpoints normalise dt, B and C inside the "
                "Mamba mixer, and a mixer without those norms is not supported"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k not in _IGNORED_KEYS}
        if "num_local_experts" in extra:  # transformers' alias of num_experts.
            known.setdefault("num_experts", extra.pop("num_local_experts"))
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` dict that transformers reads as a JambaConfig."""
        out: dict[str, Any] = {"architectures": ["JambaForCausalLM"], "model_type": "jamba"}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> JambaConfig:
        """Read a `config.json`; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:  # also an int of over 4300 digits, deep nesting
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> JambaConfig:
        """Read `config.json` from a model folder (or the file itself).

        A model folder missing because a save was killed midway is first put back (see
        `checkpoint.recover_folder`).
        """
        path = Path(path)
        if not path.exists():
            from .checkpoint import recover_folder  # torch comes with it: imported only when needed

            recover_folder(path.parent if path.name == "config.json" else path)
        return cls.from_json_file(path / "config.json" if path.is_dir() else path)

    def save(self, path: str | os.PathLike) -> None:
        """Write `config.json` into a folder (or to the file path given), atomically."""
        from .folders import write_file

        path = Path(path)
        write_file(
            path / "config.json" if path.is_dir() else path, json.dumps(self.to_dict(), indent=2) + "\n"
        )

    def replace(self, **changes: Any) -> JambaConfig:
        """A copy with some fields changed (validated anew)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str) -> JambaConfig:
        """A named preset: see PRESETS."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])


# Named architectures. The large ones follow the public Hugging Face configs; the small ones are
# for tests, benchmarks and training on one machine.
_JAMBA_52B = dict(
    vocab_size=65536,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_experts=16,
    num_experts_per_tok=2,
    expert_layer_period=2,
    expert_layer_offset=1,
    attn_layer_period=8,
    attn_layer_offset=4,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_dt_rank=256,
    max_position_embeddings=262144,
)

# Jamba2 3B: dense (one expert), attention at layers 7 and 21 of 28.
_JAMBA2_3B = dict(
    _JAMBA_52B,
    hidden_size=2560,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=20,
    num_key_value_heads=1,
    num_experts=1,
    num_experts_per_tok=1,
    expert_layer_period=1,
    expert_layer_offset=0,
    attn_layer_period=14,
    attn_layer_offset=7,
    mamba_dt_rank="auto",
)

PRESETS: dict[str, dict[str, Any]] = {
    "jamba-v0.1": dict(_JAMBA_52B),
    # Jamba 1.5 ends a turn at <|endoftext|> (2) or <|eom|> (518); Jamba2's ChatML at <|im_end|> (519).
    "jamba-1.5-mini": dict(_JAMBA_52B, eos_token_id=[2, 518]),
    "jamba2-mini": dict(_JAMBA_52B, eos_token_id=519),
    "jamba-1.5-large": dict(
        _JAMBA_52B,
        hidden_size=8192,
        intermediate_size=24576,
        num_hidden_layers=72,
        num_attention_heads=64,
        num_key_value_heads=8,
        mamba_dt_rank=512,
        eos_token_id=[2, 518],
    ),
    "jamba2-3b": dict(_JAMBA2_3B, eos_token_id=519),
    # Jamba Reasoning 3B: the Jamba2 3B geometry with the head tied to the embeddings, dt rank 160
    # written out; it ends at <|endoftext|> or <|im_end|>.
    "jamba-reasoning-3b": dict(
        _JAMBA2_3B, mamba_dt_rank=160, tie_word_embeddings=True, eos_token_id=[2, 519]
    ),
    # ~77M: the small hybrid of the CPU benchmarks (one attention layer in 8, 4 experts every other layer).
    "jamba-small": dict(
        vocab_size=65536,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=8,
        attn_layer_offset=4,
        tie_word_embeddings=True,
        max_position_embeddings=262144,
    ),
    # A few hundred thousand parameters: for tests.
    "jamba-tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=4,
        attn_layer_offset=2,
        mamba_d_state=8,
        max_position_embeddings=4096,
    ),
}
