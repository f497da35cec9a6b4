"""The GPU figures of the triton backend, one JSON line per figure (run by benchmarks/gpu_check.sh).

    PYTHONPATH=. python benchmarks/gpu_check.py [--quick] [--budget-s 420] [--only scan,moe,...]

Figures (each in its own try block: one that fails prints {"figure": ..., "error": ...} and the rest go on):
  device     the GPU, its datasheet bandwidth where known, and the bandwidth of a device-to-device copy
             (bytes read + written), measured here: the roofline every "of_peak" below divides by
  scan       the selective scan, bfloat16 inputs, N = 16, forward and forward + backward, at (B, ED, L) =
             (1, 8192, 4096), (8, 5120, 2048), (1, 5120, 65536): triton against the chunked torch scan and
             transformers' `mamba_selective_scan` (whatever kernels it finds: mamba_ssm's, or its torch
             path), each as achieved bandwidth = the fewest bytes the op must move / time, over the copy's
  moe        the fused MoE against the Experts module's loop over experts (the torch backend), Jamba
             1.5 Mini's expert shape (D 4096, I 14336, E 16, K 2) in bfloat16, at 1, 8, 64 and 4096 tokens
  prefill    tok/s of the jamba2-3b shape in bfloat16, random weights, at 4K and 32K tokens: pyjamba with
             the triton kernels against transformers' JambaForCausalLM on the same weights and device
  decode     tok/s at batch 1, 8 and 64 (128-token prompt, 64 new tokens), the same two models; pyjamba
             eager and with the decode step captured in CUDA graphs (pyjamba/cuda_graph.py)
  floor      the decode floor at batch 1: the weight bytes a token reads / the copy bandwidth, and
             decode's measured time per token over it
  long       a 256K-token prefill of the jamba2-3b shape on one GPU, in chunks of 16K tokens into one
             cache: its time and peak memory, and the attention cache's share of that memory

--quick runs every figure at tiny shapes (on the CPU under TRITON_INTERPRET=1 when there is no GPU),
to check this script end to end; its numbers mean nothing. Figures still to run when --budget-s is
spent are skipped, each with a line saying so. Needs only torch, triton and (for its columns)
transformers: nothing of the server.
"""

# ruff: noqa: B023  (each timed lambda runs inside the loop iteration that defines it)
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # --quick without a GPU: the kernels interpreted

from pyjamba.accounting import active_params, kv_cache_bytes  # noqa: E402
from pyjamba.config import PRESETS, JambaConfig  # noqa: E402
from pyjamba.kernels import chunked, resolve_kernels  # noqa: E402
from pyjamba.kernels import triton as tk  # noqa: E402
from pyjamba.model import Experts, JambaForCausalLM  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"
DATASHEET_GBPS = {"H100 80GB HBM3": 3350, "H100 SXM": 3350, "H100 PCIe": 2000, "H200": 4800, "A100": 2039}
_START = time.perf_counter()
_STATE: dict = {"copy_gbps": None, "quick": False}


def emit(**fields: object) -> None:
    print(json.dumps(fields, default=str), flush=True)


def run_figure(name: str, budget_s: float, fn: Callable[..., object], *args: object) -> object:
    """One figure: skipped once the budget is spent; an exception is printed as that figure's error."""
    if time.perf_counter() - _START > budget_s:
        emit(figure=name, skipped=f"the --budget-s of {budget_s:.0f} s is spent")
        return None
    try:
        return fn(*args)
    except Exception as e:  # one failure must not lose the other figures
        emit(figure=name, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=4)[-1500:])
        return None
    finally:
        if GPU:
            torch.cuda.empty_cache()


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of `reps` calls after `warmup` (CUDA events on a GPU); one call in --quick."""
    if _STATE["quick"]:
        reps, warmup = 1, 0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def of_peak(bytes_moved: float, seconds: float) -> dict:
    gbps = bytes_moved / seconds / 1e9
    peak = _STATE["copy_gbps"]
    return {"GBps": round(gbps, 1), "of_copy_bw": round(gbps / peak, 3) if peak else None}


# ---- device -----------------------------------------------------------------------------------


def device_figure(quick: bool) -> None:
    name = torch.cuda.get_device_name() if GPU else "cpu"
    n = (1 << 20) if quick else (1 << 30)  # 1 GiB per buffer on a GPU: no cache holds it
    src = torch.randn(n // 4, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = timeit(lambda: dst.copy_(src), reps=10, warmup=3)
    copy_gbps = 2 * n / seconds / 1e9
    _STATE["copy_gbps"] = copy_gbps
    sheet = next((v for k, v in DATASHEET_GBPS.items() if k in name), None)
    emit(
        figure="device", name=name, torch=torch.__version__, triton=_version("triton"),
        transformers=_version("transformers"), copy_GBps=round(copy_gbps, 1), datasheet_GBps=sheet,
    )  # fmt: skip


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


# ---- scan -------------------------------------------------------------------------------------


def _scan_inputs(batch: int, inner: int, length: int, n_state: int = 16, grad: bool = False) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g, device=DEVICE)).to(dtype).requires_grad_(grad)

    return {
        "u": randn(batch, length, inner),
        "delta": randn(batch, length, inner, scale=0.5),
        "A": (-torch.exp(0.5 * torch.randn(inner, n_state, generator=g, device=DEVICE))).requires_grad_(grad),
        "B": randn(batch, length, n_state),
        "C": randn(batch, length, n_state),
        "D": randn(inner, dtype=torch.float32),
        "z": randn(batch, length, inner),
        "delta_bias": (torch.randn(inner, generator=g, device=DEVICE) - 3.0).requires_grad_(grad),
    }


def _scan_bytes(batch: int, inner: int, length: int, backward: bool) -> float:
    """The fewest bytes: bf16 u, delta, z read and y written (forward); the backward reads those
    three and dy and writes du, ddelta, dz (and re-reads nothing, in the ideal)."""
    per = batch * length * inner * 2
    return (4 * per) + (7 * per if backward else 0)


def _transformers_scan() -> Callable | None:
    try:
        from transformers.models.jamba.modeling_jamba import mamba_selective_scan
    except ImportError:
        return None
    return mamba_selective_scan


def scan_figure(quick: bool) -> None:
    shapes = [(1, 16, 20), (2, 8, 9)] if quick else [(1, 8192, 4096), (8, 5120, 2048), (1, 5120, 65536)]
    hf_scan = _transformers_scan()
    for batch, inner, length in shapes:
        for backward in (False, True):
            impls = {"triton": tk.selective_scan, "torch_chunked": chunked.selective_scan}
            row: dict = {
                "figure": "scan",
                "B": batch,
                "ED": inner,
                "L": length,
                "pass": "fwd+bwd" if backward else "fwd",
            }
            moved = _scan_bytes(batch, inner, length, backward)
            for impl, fn in impls.items():
                row[impl] = _time_scan(fn, batch, inner, length, backward, moved, slow=impl != "triton")
            # transformers' layout is channel-first; its torch path makes (B, ED, L, N) float32 tensors
            big = batch * inner * length * 16 * 4 * 4 > 40e9
            if hf_scan is None:
                row["transformers"] = {"unavailable": "no mamba_selective_scan in this transformers"}
            elif big:
                row["transformers"] = {"skipped": "its (B, ED, L, N) float32 tensors would pass 40 GB"}
            else:
                row["transformers"] = _time_scan(
                    _channel_first(hf_scan), batch, inner, length, backward, moved, slow=True
                )
            if "s" in row["triton"] and "s" in row["torch_chunked"]:
                row["speedup_vs_chunked"] = round(row["torch_chunked"]["s"] / row["triton"]["s"], 2)
            emit(**row)


def _channel_first(hf_scan: Callable) -> Callable:
    def call(u, delta, A, B, C, D, z, delta_bias, **_):
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        out, last = hf_scan(
            t(u), t(delta), A, t(B), t(C), D=D, z=t(z), delta_bias=delta_bias, delta_softplus=True,
            return_last_state=True,
        )  # fmt: skip
        return out, last

    return call


def _time_scan(
    fn: Callable, batch: int, inner: int, length: int, backward: bool, moved: float, slow: bool
) -> dict:
    inputs = _scan_inputs(batch, inner, length, grad=backward)

    def run() -> None:
        with torch.set_grad_enabled(backward):
            y, _ = fn(**inputs)
            if backward:
                y.float().sum().backward()
                for t in inputs.values():
                    t.grad = None

    seconds = timeit(run, reps=1 if slow else 5, warmup=1)
    return {"s": round(seconds, 6), **of_peak(moved, seconds)}


# ---- MoE --------------------------------------------------------------------------------------


def moe_figure(quick: bool) -> None:
    d, inner, experts_n, top_k = (64, 96, 8, 2) if quick else (4096, 14336, 16, 2)
    config = JambaConfig(
        vocab_size=128, hidden_size=d, intermediate_size=inner, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, num_experts=experts_n, num_experts_per_tok=top_k,
    )  # fmt: skip
    with torch.device(DEVICE):
        loop = Experts(config, resolve_kernels("torch", DEVICE))
    with torch.no_grad():
        for p in (loop.gate_proj, loop.up_proj, loop.down_proj):
            p.normal_(0.0, 0.02)
    loop = loop.to(torch.bfloat16)
    stacks = (loop.gate_proj, loop.up_proj, loop.down_proj)
    expert_bytes = 3 * d * inner * 2
    for tokens in (1, 8, 64) if quick else (1, 8, 64, 4096):
        x = torch.randn(tokens, d, device=DEVICE, dtype=torch.bfloat16)
        probs = torch.softmax(torch.randn(tokens, experts_n, device=DEVICE), dim=-1)
        weights, index = torch.topk(probs, top_k, dim=-1)
        weights = weights.to(torch.bfloat16)
        touched = int(torch.unique(index).numel())
        with torch.no_grad():
            fused_s = timeit(lambda: tk.experts(x, weights, index, *stacks), reps=10, warmup=2)
            loop_s = timeit(lambda: loop(x, weights, index), reps=5, warmup=1)
        emit(
            figure="moe", tokens=tokens, D=d, I=inner, E=experts_n, K=top_k, experts_touched=touched,
            fused_s=round(fused_s, 6), loop_s=round(loop_s, 6), speedup=round(loop_s / fused_s, 2),
            fused=of_peak(touched * expert_bytes, fused_s),
        )  # fmt: skip


# ---- models -----------------------------------------------------------------------------------


def _config(quick: bool) -> JambaConfig:
    if quick:  # interpreted kernels are slow: the smallest hybrid with every kind of layer
        return JambaConfig(**dict(
            PRESETS["jamba-tiny"], vocab_size=64, hidden_size=16, intermediate_size=24, mamba_expand=1,
            mamba_d_state=4, num_attention_heads=2, num_key_value_heads=1,
        ))  # fmt: skip
    return JambaConfig(**PRESETS["jamba2-3b"])


def _models(quick: bool, with_transformers: bool = True) -> tuple[JambaForCausalLM, object | None]:
    config = _config(quick)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = JambaForCausalLM(config, kernels="triton" if GPU else tk.kernels("--quick"), device=DEVICE)
        model.init_weights()
    model = model.to(torch.bfloat16).eval()
    hf = None
    if with_transformers:
        try:
            from pyjamba.testing import to_transformers

            with torch.device(DEVICE):  # built (and randomly initialised) on the GPU: seconds, not a minute
                hf = to_transformers(model).to(DEVICE, torch.bfloat16)
        except Exception as e:
            emit(figure="transformers", unavailable=f"{type(e).__name__}: {e}")
    return model, hf


def prefill_figure(quick: bool, model: JambaForCausalLM, hf: object | None) -> None:
    vocab = model.config.vocab_size
    for length in (16, 24) if quick else (4096, 32768):
        ids = torch.randint(0, vocab, (1, length), device=DEVICE)
        with torch.no_grad():
            ours = timeit(lambda: model(ids, logits_to_keep=1), reps=3, warmup=1)
            row = {"figure": "prefill", "tokens": length, "pyjamba_tok_s": round(length / ours, 1)}
            if hf is not None and (quick or length <= 4096 or _STATE.get("hf_prefill_4k_s", 1e9) < 15):
                theirs = timeit(lambda: hf(ids, logits_to_keep=1, use_cache=False), reps=1, warmup=0)
                if length == 4096:
                    _STATE["hf_prefill_4k_s"] = theirs
                row.update(transformers_tok_s=round(length / theirs, 1), speedup=round(theirs / ours, 2))
            elif hf is not None:
                row["transformers"] = "skipped: its 4K prefill took over 15 s, 32K would take minutes"
        emit(**row)


def decode_figure(quick: bool, model: JambaForCausalLM, hf: object | None) -> None:
    """Decoding steps alone (the prefill not counted): tok/s = batch / seconds per step."""
    from pyjamba.cuda_graph import GraphedDecoder

    vocab = model.config.vocab_size
    prompt, new = (4, 3) if quick else (128, 64)
    for batch in (1, 8, 64):
        ids = torch.randint(0, vocab, (batch, prompt), device=DEVICE)
        row: dict = {"figure": "decode", "batch": batch, "prompt": prompt, "new_tokens": new}
        with torch.no_grad():
            step_s = _median(lambda: _decode_steps(model, ids, new), 1 if quick else 3)
            row["pyjamba_eager_tok_s"] = round(batch / step_s, 1)
            # captured on a GPU; on the CPU (--quick) the same static step, eagerly
            decoder = GraphedDecoder(model, max_batch=batch, max_length=prompt + new)
            graphed_s = _median(lambda: _decode_steps(model, ids, new, decoder), 1 if quick else 3)
            row["pyjamba_graphs_tok_s" if GPU else "pyjamba_static_step_tok_s"] = round(batch / graphed_s, 1)
            if batch == 1:
                _STATE["decode_s_per_token_b1"] = min(step_s, graphed_s)
            if hf is not None:

                def hf_generate(n: int) -> None:
                    hf.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, use_cache=True,
                    )  # fmt: skip

                hf_generate(2)  # warm up
                per_step = (
                    timeit(lambda: hf_generate(new), reps=1) - timeit(lambda: hf_generate(1), reps=1)
                ) / (new - 1)
                row["transformers_tok_s"] = round(batch / per_step, 1) if per_step > 0 else None
        emit(**row)


def _median(fn: Callable[[], float], reps: int) -> float:
    fn()  # warm up (and, for a GraphedDecoder, capture)
    return statistics.median(fn() for _ in range(reps))


def _decode_steps(
    model: JambaForCausalLM, ids: torch.Tensor, new: int, decoder: object | None = None
) -> float:
    """Greedy decoding, prefill then `new` - 1 steps (through the GraphedDecoder `decoder` if given):
    the seconds per step, the prefill and the decoder's start not counted."""
    cache = model.make_cache(ids.shape[0], max_length=ids.shape[1] + new)
    logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]
    if decoder is not None:
        decoder.start(cache)
    sync()
    t0 = time.perf_counter()
    for _ in range(new - 1):
        tokens = logits.argmax(-1)
        if decoder is None:
            logits = model(tokens[:, None], cache=cache).logits[:, -1]
        else:
            logits = decoder.step(tokens)
    sync()
    return (time.perf_counter() - t0) / (new - 1)


def floor_figure(quick: bool, model: JambaForCausalLM) -> None:
    config = model.config
    embedding = config.vocab_size * config.hidden_size
    weight_bytes = 2 * (active_params(config) - (0 if config.tie_word_embeddings else embedding))
    floor_s = weight_bytes / (_STATE["copy_gbps"] * 1e9)
    measured = _STATE.get("decode_s_per_token_b1")
    emit(
        figure="floor", weight_bytes=weight_bytes, floor_ms=round(floor_s * 1e3, 4),
        decode_ms=None if measured is None else round(measured * 1e3, 4),
        over_floor=None if measured is None else round(measured / floor_s, 2),
    )  # fmt: skip


def long_figure(quick: bool, model: JambaForCausalLM) -> None:
    total, chunk = (48, 16) if quick else (262144, 16384)
    config = model.config
    if GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    cache = model.make_cache(1, max_length=total)
    ids = torch.randint(0, config.vocab_size, (1, total), device=DEVICE)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, total, chunk):
            model(ids[:, start : start + chunk], cache=cache, logits_to_keep=1)
    sync()
    seconds = time.perf_counter() - t0
    row = {
        "figure": "long",
        "tokens": total,
        "chunk": chunk,
        "s": round(seconds, 2),
        "tok_s": round(total / seconds, 1),
    }
    if GPU:
        row.update(
            peak_GiB_over_weights=round((torch.cuda.max_memory_allocated() - base) / 2**30, 2),
            attention_cache_GiB=round(kv_cache_bytes(config, total) / 2**30, 2),
        )
    emit(**row)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: check the script itself runs")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="skip figures once this much time is spent"
    )
    parser.add_argument("--only", default="", help="comma-separated figures (default: all)")
    args = parser.parse_args(argv)
    _STATE["quick"] = args.quick
    if not GPU and not args.quick:
        sys.exit("no CUDA device: the GPU figures need one (--quick checks the script on the CPU)")
    only = set(filter(None, args.only.split(",")))

    def wanted(name: str) -> bool:
        return not only or name in only

    run_figure("device", args.budget_s, device_figure, args.quick)
    if wanted("scan"):
        run_figure("scan", args.budget_s, scan_figure, args.quick)
    if wanted("moe"):
        run_figure("moe", args.budget_s, moe_figure, args.quick)
    if any(wanted(f) for f in ("prefill", "decode", "floor", "long")):
        models = run_figure(
            "models", args.budget_s, _models, args.quick, wanted("prefill") or wanted("decode")
        )
        if models is not None:
            model, hf = models
            if wanted("prefill"):
                run_figure("prefill", args.budget_s, prefill_figure, args.quick, model, hf)
            if wanted("decode"):
                run_figure("decode", args.budget_s, decode_figure, args.quick, model, hf)
            if wanted("floor"):
                run_figure("floor", args.budget_s, floor_figure, args.quick, model)
            del hf, models
            if wanted("long"):
                run_figure("long", args.budget_s, long_figure, args.quick, model)
    emit(figure="done", elapsed_s=round(time.perf_counter() - _START, 1))


if __name__ == "__main__":
    main()
