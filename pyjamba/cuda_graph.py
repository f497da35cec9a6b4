"""Graph-captured decoding: the one-token step on static buffers, captured once per batch-size bucket
and replayed (CUDA graphs), so that a step costs one launch instead of a few hundred.

A captured graph replays fixed kernels on fixed addresses, so nothing in the step may change shape,
allocate anew, or read a value back to the host. The model's own step is close: the Mamba state
updates in place, the triton backend's MoE sizes its work by an upper bound. What changes shape is
attention, whose keys grow by one per step. Here:

- `StaticCache` holds the keys and values of `capacity` positions and says its `length` is
  capacity - 1, so the one-token step of `Attention` attends over every position with a mask; the
  mask (a static buffer) hides the positions not yet written and the prompts' left padding. The
  position of the next token is a device tensor, moved on inside the graph.
- `decode_step_static(model, tokens, cache)` is the model's forward for one token per sequence
  written for those buffers (the layers, the final norm and head: model.py's own modules).
- `GraphedDecoder` keeps one `StaticCache` of `max_batch` rows and a graph per bucket of batch
  sizes (1, 2, 4, 8, 16, ...): a batch runs on the first rows of the smallest bucket that holds it;
  the padding rows compute on what they hold, and rows never mix. `start(cache, mask)` copies a
  prefilled `HybridCache` in; `step(tokens)` returns the next logits. Without CUDA (`capture=False`)
  the same static step runs eagerly: that is how the CPU tests hold it to the model's own step.

The prompt stays eager (or compiled): its shapes change with every prompt. Needs a model whose every
op can be captured: on CUDA the triton backend (a MoE layer's loop over experts reads counts back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .cache import HybridCache, mamba_states

if TYPE_CHECKING:
    from .model import JambaForCausalLM

__all__ = ["GraphedDecoder", "StaticCache", "bucket_for", "decode_step_static"]


def bucket_for(batch: int, max_batch: int) -> int:
    """The batch-size bucket of `batch`: the smallest power of two that holds it, at most `max_batch`."""
    if not 1 <= batch <= max_batch:
        raise ValueError(f"batch {batch} is outside [1, max_batch={max_batch}]")
    return min(1 << (batch - 1).bit_length(), max_batch)


class StaticCache:
    """The decoding state of up to `batch_size` sequences in fixed buffers (an `InferenceCache` for the
    one-token step only): keys and values (B, Hkv, capacity, Dh), Mamba states, the next position
    (a (1,) device tensor) and which positions each row may attend to, `visible` (B, capacity)."""

    def __init__(self, model: JambaForCausalLM, batch_size: int, capacity: int) -> None:
        config = model.config
        param = model.model.final_layernorm.weight
        dtype, device = param.dtype, param.device
        self.batch_size = batch_size
        self.capacity = capacity
        shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)
        attention = [i for i, kind in enumerate(config.layer_types) if kind == "attention"]
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in attention}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in attention}
        self.conv_states, self.ssm_states = mamba_states(config, batch_size, dtype, device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.prompt_visible = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.mask = torch.zeros(batch_size, 1, 1, capacity, dtype=torch.bool, device=device)
        self._positions = torch.arange(capacity, device=device)

    @property
    def length(self) -> int:
        """capacity - 1: the one-token step then attends over every position, masked (see the module)."""
        return self.capacity - 1

    def rows(self, n: int) -> StaticCache:
        """A view of the first n rows (the same buffers), for a bucket of n."""
        view = object.__new__(StaticCache)
        view.__dict__.update(self.__dict__)
        view.batch_size = n
        view.keys = {i: t[:n] for i, t in self.keys.items()}
        view.values = {i: t[:n] for i, t in self.values.items()}
        view.conv_states = {i: t[:n] for i, t in self.conv_states.items()}
        view.ssm_states = {i: t[:n] for i, t in self.ssm_states.items()}
        view.prompt_visible, view.mask = self.prompt_visible[:n], self.mask[:n]
        return view

    def load(self, cache: HybridCache, attention_mask: torch.Tensor | None) -> None:
        """Copy a prefilled cache's B sequences into the first B rows; attention_mask (B, length) or None."""
        batch, length = cache.batch_size, cache.length
        if batch > self.batch_size or length >= self.capacity:
            raise ValueError(
                f"a cache of {batch} sequences at {length} tokens does not fit {self.batch_size} rows of "
                f"{self.capacity} positions"
            )
        for store, source in ((self.keys, cache.keys), (self.values, cache.values)):
            for i, t in store.items():
                t[:batch, :, :length] = source[i][:, :, :length]
        for store, source in ((self.conv_states, cache.conv_states), (self.ssm_states, cache.ssm_states)):
            for i, t in store.items():
                t[:batch] = source[i]
        self.prompt_visible.zero_()
        self.prompt_visible[:batch, :length] = True if attention_mask is None else attention_mask.bool()
        self.position.fill_(length)

    def update_kv(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's key and value (B, Hkv, 1, Dh) at `position`; return every position's."""
        self.keys[layer].index_copy_(2, self.position, key)
        self.values[layer].index_copy_(2, self.position, value)
        return self.keys[layer], self.values[layer]

    def advance(self, n_tokens: int) -> None:
        self.position.add_(n_tokens)


def decode_step_static(model: JambaForCausalLM, tokens: torch.Tensor, cache: StaticCache) -> torch.Tensor:
    """One token per row (B,) on a `StaticCache`: the next logits (B, V) in float32. No host reads."""
    visible = cache.prompt_visible | (cache._positions == cache.position)  # (B, capacity)
    cache.mask.copy_(visible[:, None, None, :])  # the new token sees its prompt, the new tokens and itself
    cache.prompt_visible.copy_(visible)  # ...and every later step sees it too
    x = model.model.embed_tokens(tokens[:, None])  # (B, 1, D)
    for layer in model.model.layers:
        x, _ = layer(x, cache.mask, None, cache)
    cache.advance(1)
    norm, head = model.model.final_layernorm, model.lm_head
    logits = model.kernels.norm_linear(x, norm.weight, norm.eps, head.weight, head.weight_scale)  # (B, 1, V)
    return logits[:, -1].float()


class GraphedDecoder:
    """Decoding steps replayed from CUDA graphs, one per batch-size bucket, captured on first use.

    `start(cache, attention_mask)` after the prompt's prefill, then `step(tokens)` per new token.
    capture=False (the default off CUDA) runs the same static step eagerly.
    """

    def __init__(
        self, model: JambaForCausalLM, max_batch: int, max_length: int, capture: bool | None = None
    ) -> None:
        device = model.model.final_layernorm.weight.device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, not on {device.type}")
        if (
            self.capture
            and model.kernels.experts is None
            and any(layer.is_moe for layer in model.model.layers)
        ):
            raise ValueError(
                f"kernels {model.kernels.name!r} run a MoE layer's experts in a loop that reads counts "
                "back to the host, which a CUDA graph cannot capture: use kernels='triton'"
            )
        self.model = model
        self.max_batch = max_batch
        self.cache = StaticCache(model, max_batch, max_length)
        self.batch = 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def start(self, cache: HybridCache, attention_mask: torch.Tensor | None = None) -> None:
        """Take over a prefilled cache (B sequences): later steps continue them."""
        self.batch = cache.batch_size
        bucket = bucket_for(self.batch, self.max_batch)
        if self.capture and bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)  # runs steps on the buffers: before the load
        self.cache.load(cache, attention_mask)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits (B, V) float32 after one more token per sequence (B,)."""
        if tokens.shape != (self.batch,):
            raise ValueError(
                f"expected {self.batch} tokens, one per sequence, got shape {tuple(tokens.shape)}"
            )
        bucket = bucket_for(self.batch, self.max_batch)
        if not self.capture:
            padded = torch.zeros(bucket, dtype=tokens.dtype, device=tokens.device)
            padded[: self.batch] = tokens
            return decode_step_static(self.model, padded, self.cache.rows(bucket))[: self.batch]
        graph, static_tokens, static_logits = self._graphs[bucket]
        static_tokens.zero_()
        static_tokens[: self.batch] = tokens
        graph.replay()
        return static_logits[: self.batch].clone()

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        rows = self.cache.rows(bucket)
        tokens = torch.zeros(bucket, dtype=torch.long, device=self.cache.position.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its kernels, off the graph
                decode_step_static(self.model, tokens, rows)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            logits = decode_step_static(self.model, tokens, rows)
        return graph, tokens, logits
