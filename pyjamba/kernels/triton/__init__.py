"""The triton backend: GPU kernels written in Triton, each a torch custom op (`torch.library`) with a
fake (meta) implementation, so that torch.compile and CUDA graphs see through them.

    scan.py          the Mamba-1 selective scan, forward and backward (registered autograd)
    state_update.py  its one-token step, optionally on rows of a pool of states (slot indices)
    conv.py          the causal depthwise conv + SiLU of a prompt, and of one token
    moe.py           the fused MoE: assignments sorted by expert, one grouped GEMM per projection,
                     SwiGLU fused; float or int8 (ExpertsInt8) weights
    common.py        which calls a kernel takes; TRITON_INTERPRET

Each public function has its torch reference's signature (reference.py, ops.py) and falls back to
the torch backend's op for a call its kernel does not take (float64, a tensor on another device);
under TRITON_INTERPRET=1 the kernels also run on CPU tensors, which is how the tests check them
without a GPU. The projections, norms and attention are PyTorch's own CUDA ops.
"""

from __future__ import annotations

from .. import Kernels, ops
from .conv import conv_silu, conv_silu_step
from .moe import experts
from .scan import selective_scan
from .state_update import selective_state_update

__all__ = ["conv_silu", "conv_silu_step", "experts", "kernels", "selective_scan", "selective_state_update"]


def kernels(why: str = "") -> Kernels:
    """The triton backend's table."""
    return Kernels(
        name="triton",
        why=why,
        selective_scan=selective_scan,
        selective_state_update=selective_state_update,
        linear=ops.linear,
        rms_norm=ops.rms_norm_fast,
        conv_silu=conv_silu,
        conv_silu_step=conv_silu_step,
        experts=experts,
    )
