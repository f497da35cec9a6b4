"""Tiny random Jamba models for tests and parity reports, and their twin in transformers.

transformers is a test-only dependency: it is imported only when a twin is asked for.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .config import JambaConfig
from .model import JambaForCausalLM

__all__ = [
    "PARITY_CONFIGS",
    "random_model",
    "relative_error",
    "tiny_model_folder",
    "tiny_tokenizer",
    "to_transformers",
]

_BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_expand=2,
    pad_token_id=0,
    max_position_embeddings=512,
)

# Six-plus tiny architectures that between them cover: MoE and dense; tied and untied heads;
# attention and expert periods/offsets (offset 0 included); one kv head and kv = heads;
# mamba_proj_bias and mamba_conv_bias both ways; dt_rank "auto" and explicit.
PARITY_CONFIGS: dict[str, dict] = {
    "moe-gqa-untied": dict(
        _BASE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=4, num_experts_per_tok=2, mamba_dt_rank="auto",
    ),
    "dense-mha-tied-projbias": dict(
        _BASE, num_key_value_heads=4, attn_layer_period=4, attn_layer_offset=0, num_experts=1,
        num_experts_per_tok=1, expert_layer_period=1, expert_layer_offset=0, tie_word_embeddings=True,
        mamba_proj_bias=True, mamba_dt_rank=5,
    ),
    "moe-mqa-noconvbias": dict(
        _BASE, num_hidden_layers=5, num_key_value_heads=1, attn_layer_period=3, attn_layer_offset=2,
        expert_layer_period=3, expert_layer_offset=0, num_experts=3, num_experts_per_tok=2,
        mamba_conv_bias=False,
    ),
    "moe-every-layer-tied-bothbias": dict(
        _BASE, attn_layer_period=5, attn_layer_offset=4, num_hidden_layers=5, expert_layer_period=1,
        expert_layer_offset=0, num_experts=5, num_experts_per_tok=1, tie_word_embeddings=True,
        mamba_proj_bias=True, mamba_conv_bias=False, mamba_dt_rank=3,
    ),
    "pure-mamba-small-conv": dict(
        _BASE, num_hidden_layers=3, attn_layer_period=8, attn_layer_offset=7, num_experts=1,
        num_experts_per_tok=1, expert_layer_period=1, expert_layer_offset=0, mamba_d_conv=2,
        mamba_d_state=4, mamba_expand=1,
    ),
    "pure-attention-moe": dict(
        _BASE, num_hidden_layers=3, attn_layer_period=1, attn_layer_offset=0, expert_layer_period=2,
        expert_layer_offset=0, num_experts=4, num_experts_per_tok=3,
    ),
    "jamba-pattern-8": dict(
        _BASE, num_hidden_layers=8, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
        expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_dt_rank="auto",
        eos_token_id=[2, 5],
    ),
}  # fmt: skip


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def random_model(config_kwargs: dict, seed: int = 0, kernels: str = "auto") -> JambaForCausalLM:
    """A pyjamba model with random weights (not just the init: norms and D perturbed too)."""
    torch.manual_seed(seed)
    model = JambaForCausalLM(JambaConfig(**config_kwargs), kernels=kernels)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Move every parameter off its initial value so that a swapped or ignored tensor shows.
            if name.endswith(("layernorm.weight", ".D")) or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.mul_(3.0)  # larger weights make every sublayer matter in the logits
    return model.eval()


def to_transformers(model: JambaForCausalLM):
    """The same weights in transformers' JambaForCausalLM (its in-memory layout fuses gate and up)."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # use_cache off: transformers' cache fails on a model with no attention layer.
        hf_config = transformers.JambaConfig(**model.config.to_dict(), use_cache=False)
        hf = transformers.JambaForCausalLM(hf_config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_proj"):
            up = model.state_dict()[name.replace("gate_proj", "up_proj")]
            state[name.replace("gate_proj", "gate_up_proj")] = torch.cat([tensor, up], dim=1)
        elif not name.endswith("experts.up_proj"):
            state[name] = tensor
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def tiny_tokenizer(
    folder: str | Path,
    vocab_size: int = 300,
    chat_template: str | None = (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
) -> Path:
    """Write a tiny Jamba-like tokenizer folder (tokenizer.json, tokenizer_config.json) and return it.

    A byte-level BPE trained in milliseconds, deterministically, on a few built-in paragraphs (accents,
    CJK, emoji included). Ids as Jamba's: 0 <|pad|>, 1 <|startoftext|> (BOS, added by the
    post-processor), 2 <|endoftext|> (EOS), 3 <|unk|>; then 4 <|im_start|>, 5 <|im_end|> for the
    ChatML-style default `chat_template` (None writes no template). Both pyjamba's Tokenizer and
    transformers' AutoTokenizer load it.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size must be at least {256 + len(specials)} (256 bytes and {len(specials)} specials)"
        )
    text = [
        "The Jamba models interleave Mamba layers with attention layers, and some of their MLPs are "
        "mixtures of experts. A long context costs little memory: only one layer in eight keeps a KV cache.",
        'Once upon a time, a quick brown fox jumped over the lazy dog; the dog didn\'t mind. "Hello," said '
        "the fox, \"it's a lovely day, isn't it?\" They walked to the café and ordered crème brûlée.",
        "Numbers: 0 1 2 3 4 5 6 7 8 9, 3.14159, 2024-06-01. Code: def f(x): return x * 2\n\tindented line",
        "Naïve résumé, façade, Ångström, jalapeño, Straße. 日本語のテキスト、中文文本，한국어. Emoji: 🙂 🚀 👍🏽.",
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text, trainer)
    bos = tokenizer.token_to_id("<|startoftext|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A",
        pair="<|startoftext|> $A <|startoftext|> $B",
        special_tokens=[("<|startoftext|>", bos)],
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        add_bos_token=True,  # as Jamba's configs; the post-processor is what adds it
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    if chat_template is not None:
        config["chat_template"] = chat_template
    text_config = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (folder / "tokenizer_config.json").write_text(text_config, encoding="utf-8")
    return folder


def tiny_model_folder(folder: str | Path, preset: str = "jamba-tiny", seed: int = 0, **config_fields) -> Path:
    """A random-weight model folder of a preset with the `tiny_tokenizer` (its vocabulary and special ids).

    `config_fields` replace further config fields (e.g. max_position_embeddings).
    """
    from .tokenizer import Tokenizer

    folder = tiny_tokenizer(folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    config = JambaConfig.from_preset(preset).replace(
        vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_fields,
    )
    torch.manual_seed(seed)
    model = JambaForCausalLM(config)
    model.init_weights()
    model.save_pretrained(folder)
    return folder
