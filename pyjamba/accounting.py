"""Parameter and memory accounting of a JambaConfig: pure arithmetic, no model is built.

Owns: parameter counts (total, active per token, per component), the attention KV cache and the
Mamba state per sequence, memory at a context length, weight bytes per precision (float32,
bfloat16, ExpertsInt8, int8) and the largest context that fits a memory budget, and the papers'
attention-cache table (Jamba and the pure Transformers it is compared with). Everything here is a function of the
config alone, so a 398B configuration is counted as quickly as a tiny one.

The parameters counted are exactly those of transformers' `JambaForCausalLM` (its
`model.parameters()`, where a tied lm_head is counted once):

    per layer        input_layernorm (D), pre_ff_layernorm (D)
    attention        q_proj (D x H*Dh), k_proj, v_proj (D x Hkv*Dh), o_proj (H*Dh x D); no biases
    mamba            in_proj (D -> 2*ED, bias if mamba_proj_bias), conv1d (ED x 1 x W, bias if
                     mamba_conv_bias), x_proj (ED -> R + 2N), dt_proj (R -> ED, with bias),
                     A_log (ED x N), D (ED), out_proj (ED -> D, bias if mamba_proj_bias)
    mamba norms      dt_layernorm (R), b_layernorm (N), c_layernorm (N)
    feed-forward     MoE layer: router (E x D) and E experts of gate/up/down (3 x D x I);
                     other layers: one MLP (3 x D x I)
    model            embed_tokens (V x D), final_layernorm (D), lm_head (D x V) unless tied

Active parameters per token count every parameter a token's forward pass touches: the embedding
row lookup is counted as the whole embedding matrix (the papers' convention, as for Mixtral's
12.9B of 46.7B), and on MoE layers only K of the E experts (the router counts in full). This
reproduces the papers: Jamba v0.1 ~52B total / ~12B active, Jamba 1.5 Large ~398B / ~94B.

Weight bytes per precision (`weight_bytes`, `weight_breakdown`):

    float32          4 bytes per parameter
    bfloat16         2 bytes per parameter
    experts-int8     ExpertsInt8 (Jamba 1.5 paper, vLLM's `experts_int8`): the weight matrices of the
                     MoE experts and of the dense MLPs in int8, symmetric per output channel, with one
                     float32 scale per output row (4 x out_features bytes per matrix); all else bfloat16
    int8             every linear layer's weight matrix in int8 with float32 per-row scales: attention
                     q/k/v/o, Mamba in/x/dt/out projections, MLPs, experts, router. The embedding, the
                     lm_head, norms, conv1d, A_log, D and all biases stay bfloat16
"""

from __future__ import annotations

from dataclasses import dataclass

from pyjamba.config import JambaConfig

__all__ = [
    "DTYPE_BYTES",
    "PAPER_CONTEXT",
    "PRECISIONS",
    "BudgetFit",
    "KVModel",
    "Memory",
    "active_breakdown",
    "active_params",
    "budget_fit",
    "jamba_kv_model",
    "kv_cache_bytes",
    "kv_cache_bytes_per_token",
    "mamba_state_bytes",
    "memory_at_context",
    "paper_kv_table",
    "param_breakdown",
    "total_params",
    "weight_breakdown",
    "weight_bytes",
]

DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
SSM_STATE_BYTES = 4  # the SSM state h is kept in float32 whatever the model dtype
PAPER_CONTEXT = 262144  # 256K tokens: the context of the papers' attention-cache table
GIB = 2**30

COMPONENTS = ("embedding", "head", "attention", "mamba", "mlp", "experts", "router", "norms")


# ---- parameters ------------------------------------------------------------------------------
def _attention_params(c: JambaConfig) -> int:
    q_out = c.num_attention_heads * c.head_dim
    kv_out = c.num_key_value_heads * c.head_dim
    return c.hidden_size * (q_out + 2 * kv_out) + q_out * c.hidden_size


def _mamba_params(c: JambaConfig) -> tuple[int, int]:
    """(weights, inner norms) of one Mamba mixer."""
    d, ed, n, r, w = c.hidden_size, c.mamba_inner, c.mamba_d_state, c.dt_rank, c.mamba_d_conv
    proj_bias = 2 * ed + d if c.mamba_proj_bias else 0  # in_proj and out_proj biases
    conv = ed * w + (ed if c.mamba_conv_bias else 0)
    weights = d * 2 * ed + conv + ed * (r + 2 * n) + (r * ed + ed) + ed * n + ed + ed * d + proj_bias
    return weights, r + 2 * n


def _mlp_params(c: JambaConfig) -> int:
    return 3 * c.hidden_size * c.intermediate_size


def param_breakdown(c: JambaConfig) -> dict[str, int]:
    """Parameters per component: embedding, head, attention, mamba, mlp, experts, router, norms."""
    out = dict.fromkeys(COMPONENTS, 0)
    out["embedding"] = c.vocab_size * c.hidden_size
    out["head"] = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    out["norms"] = c.hidden_size  # final_layernorm
    mamba_weights, mamba_norms = _mamba_params(c)
    for i, kind in enumerate(c.layer_types):
        out["norms"] += 2 * c.hidden_size  # input_layernorm, pre_ff_layernorm
        if kind == "attention":
            out["attention"] += _attention_params(c)
        else:
            out["mamba"] += mamba_weights
            out["norms"] += mamba_norms
        if c.is_moe_layer(i):
            out["router"] += c.num_experts * c.hidden_size
            out["experts"] += c.num_experts * _mlp_params(c)
        else:
            out["mlp"] += _mlp_params(c)
    return out


def active_breakdown(c: JambaConfig) -> dict[str, int]:
    """param_breakdown with the experts counted K of E: the parameters one token uses."""
    out = param_breakdown(c)
    out["experts"] = out["experts"] * c.num_experts_per_tok // c.num_experts
    return out


def total_params(c: JambaConfig) -> int:
    """Every parameter, a tied lm_head counted once (as `sum(p.numel() for p in model.parameters())`)."""
    return sum(param_breakdown(c).values())


def active_params(c: JambaConfig) -> int:
    """Parameters per token: all but the unchosen experts (the embedding counted in full)."""
    return sum(active_breakdown(c).values())


# ---- inference state ---------------------------------------------------------------------------
def kv_cache_bytes_per_token(c: JambaConfig, bytes_per_element: int = 2) -> int:
    """Attention KV cache per token: 2 (K and V) x attention layers x Hkv x Dh x bytes."""
    n_attn = c.layer_types.count("attention")
    return 2 * n_attn * c.num_key_value_heads * c.head_dim * bytes_per_element


def kv_cache_bytes(c: JambaConfig, context: int, bytes_per_element: int = 2) -> int:
    """Attention KV cache of one sequence of `context` tokens."""
    return context * kv_cache_bytes_per_token(c, bytes_per_element)


def mamba_state_bytes(c: JambaConfig, bytes_per_element: int = 2) -> int:
    """Mamba state of one sequence, whatever its length, summed over the Mamba layers.

    Per layer: the conv state holds the last W - 1 inputs of the causal conv, ED x (W - 1) in the
    model dtype; the SSM state h is ED x N in float32.
    """
    n_mamba = c.layer_types.count("mamba")
    conv = c.mamba_inner * (c.mamba_d_conv - 1) * bytes_per_element
    ssm = c.mamba_inner * c.mamba_d_state * SSM_STATE_BYTES
    return n_mamba * (conv + ssm)


@dataclass(frozen=True)
class Memory:
    """Bytes to serve one sequence of `context` tokens (batch 1)."""

    context: int
    weights: int
    kv_cache: int
    mamba_state: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.mamba_state


def memory_at_context(c: JambaConfig, context: int, bytes_per_element: int = 2) -> Memory:
    """Weights + attention KV cache at `context` tokens + Mamba state, batch 1, one dtype throughout."""
    return Memory(
        context=context,
        weights=total_params(c) * bytes_per_element,
        kv_cache=kv_cache_bytes(c, context, bytes_per_element),
        mamba_state=mamba_state_bytes(c, bytes_per_element),
    )


# ---- weights per precision ------------------------------------------------------------------------
PRECISIONS = ("float32", "bfloat16", "experts-int8", "int8")
INT8_SCALE_BYTES = 4  # one float32 scale per output row of an int8 matrix
# The components whose linear weight matrices each int8 format stores in int8 (the rest: bfloat16).
INT8_COMPONENTS: dict[str, frozenset[str]] = {
    "experts-int8": frozenset({"mlp", "experts"}),
    "int8": frozenset({"attention", "mamba", "mlp", "experts"}),  # the router stays (quantize.py)
}


def linear_weights(c: JambaConfig) -> dict[str, tuple[int, int]]:
    """Per component, (elements, output rows) of its linear layers' weight matrices, biases excluded.

    Attention: q, k, v, o. Mamba: in_proj, x_proj, dt_proj, out_proj (not conv1d, A_log, D, norms).
    MLP and each expert: gate, up (I rows each), down (D rows). Router: E x D.
    """
    d, i = c.hidden_size, c.intermediate_size
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    ed, r, n = c.mamba_inner, c.dt_rank, c.mamba_d_state
    attention = (_attention_params(c), q_out + 2 * kv_out + d)
    mamba = (d * 2 * ed + ed * (r + 2 * n) + r * ed + ed * d, 2 * ed + (r + 2 * n) + ed + d)
    mlp = (3 * d * i, 2 * i + d)
    out = dict.fromkeys(COMPONENTS, (0, 0))

    def add(key: str, elements: int, rows: int) -> None:
        out[key] = (out[key][0] + elements, out[key][1] + rows)

    for layer, kind in enumerate(c.layer_types):
        add(*(("attention", *attention) if kind == "attention" else ("mamba", *mamba)))
        if c.is_moe_layer(layer):
            add("experts", c.num_experts * mlp[0], c.num_experts * mlp[1])
            add("router", c.num_experts * d, c.num_experts)
        else:
            add("mlp", *mlp)
    return out


def weight_breakdown(c: JambaConfig, precision: str) -> dict[str, int]:
    """Bytes of the weights per component (the keys of param_breakdown) in one of PRECISIONS.

    In the int8 formats a quantized matrix of out x in costs out x in bytes plus 4 x out bytes of
    float32 scales; every other parameter of the component costs 2 bytes (bfloat16).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    params = param_breakdown(c)
    if precision in DTYPE_BYTES:
        return {key: n * DTYPE_BYTES[precision] for key, n in params.items()}
    quantized, linear = INT8_COMPONENTS[precision], linear_weights(c)
    out = {}
    for key, n in params.items():
        elements, rows = linear[key] if key in quantized else (0, 0)
        out[key] = 2 * (n - elements) + elements + INT8_SCALE_BYTES * rows
    return out


def weight_bytes(c: JambaConfig, precision: str) -> int:
    """Bytes of all the weights in one of PRECISIONS (a tied lm_head counted once)."""
    return sum(weight_breakdown(c, precision).values())


# ---- what fits a memory budget -----------------------------------------------------------------------
KV_BYTES = 2  # the budget's attention KV cache and Mamba conv state are bfloat16 whatever the weights


@dataclass(frozen=True)
class BudgetFit:
    """One sequence (batch 1) on `budget` bytes with the weights in `precision`.

    `max_context`: the most tokens whose attention KV cache (bfloat16) fits what the weights and the
    Mamba state leave, capped at max_position_embeddings; 0 when not even one token fits.
    """

    precision: str
    budget: int
    weights: int
    mamba_state: int
    kv_bytes_per_token: int
    max_context: int
    max_position_embeddings: int

    @property
    def weights_fit(self) -> bool:
        return self.weights <= self.budget

    @property
    def capped(self) -> bool:
        """Whether the context is the model's maximum (the memory would hold more)."""
        return self.max_context == self.max_position_embeddings

    @property
    def free_at_max_context(self) -> int:
        """Bytes left over at max_context (negative: over budget, when nothing fits)."""
        return self.budget - self.weights - self.mamba_state - self.max_context * self.kv_bytes_per_token


def budget_fit(c: JambaConfig, precision: str, budget: int) -> BudgetFit:
    """The largest context of one sequence that fits `budget` bytes: weights in `precision`, the
    Mamba state (conv state bfloat16, SSM state float32) and the attention KV cache in bfloat16.
    Activations, workspace, the CUDA context and the framework's own memory are not counted."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0 bytes, got {budget}")
    weights = weight_bytes(c, precision)
    state = mamba_state_bytes(c, KV_BYTES)
    per_token = kv_cache_bytes_per_token(c, KV_BYTES)
    free = budget - weights - state
    if free < 0:
        context = 0
    elif per_token == 0:  # no attention layers: the length costs no memory
        context = c.max_position_embeddings
    else:
        context = min(free // per_token, c.max_position_embeddings)
    return BudgetFit(precision, budget, weights, state, per_token, context, c.max_position_embeddings)


# ---- the papers' attention-cache table -----------------------------------------------------------
@dataclass(frozen=True)
class KVModel:
    """A model's attention layers, as far as the KV cache is concerned, and the papers' figure for it.

    `paper_gb` is the papers' figure at 256K tokens in 16-bit (None: no figure); their "GB" are GiB
    (Jamba's 4 GB is exactly 4 x 2^30 bytes by the formula).
    """

    name: str
    attn_layers: int
    kv_heads: int
    head_dim: int
    paper_gb: float | None = None

    def bytes_per_token(self, bytes_per_element: int = 2) -> int:
        return 2 * self.attn_layers * self.kv_heads * self.head_dim * bytes_per_element

    def kv_bytes(self, context: int, bytes_per_element: int = 2) -> int:
        return context * self.bytes_per_token(bytes_per_element)

    @property
    def formula_gib(self) -> float:
        """The formula's figure under the papers' conditions: 256K tokens, 16-bit."""
        return self.kv_bytes(PAPER_CONTEXT, 2) / GIB

    @property
    def flagged(self) -> bool:
        """Whether the papers' figure does not follow from the architecture (off by more than 5%)."""
        if self.paper_gb is None:
            return False
        return abs(self.paper_gb - self.formula_gib) > 0.05 * self.formula_gib


def jamba_kv_model(name: str, c: JambaConfig, paper_gb: float | None = None) -> KVModel:
    """A Jamba config's KVModel row: only its attention layers hold a KV cache."""
    return KVModel(name, c.layer_types.count("attention"), c.num_key_value_heads, c.head_dim, paper_gb)


# Pure Transformers of the Jamba papers' table: layers, kv heads, head_dim from their public configs.
TRANSFORMERS: tuple[KVModel, ...] = (
    KVModel("Mixtral 8x7B", 32, 8, 128, 32),
    KVModel("Mistral 7B", 32, 8, 128, 32),
    KVModel("Llama-2 70B", 80, 8, 128, 128),
    KVModel("Llama 3.1 70B", 80, 8, 128, 80),
    KVModel("Llama 3.1 405B", 126, 8, 128, 252),
    KVModel("Mistral Large 2", 88, 8, 128, 88),
)


def paper_kv_table() -> list[KVModel]:
    """The papers' attention-cache table: the Jamba rows (from the presets), then the Transformers."""
    return [
        jamba_kv_model("Jamba v0.1 / 1.5 Mini", JambaConfig.from_preset("jamba-v0.1"), 4),
        jamba_kv_model("Jamba 1.5 Large", JambaConfig.from_preset("jamba-1.5-large"), 9),
        *TRANSFORMERS,
    ]
