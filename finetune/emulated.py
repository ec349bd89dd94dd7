"""Half-precision products on CPUs that have no fast half-precision matmul: computed in fp32, rounded once.

On a CPU without native bf16 arithmetic (no AVX512-BF16 / AMX, e.g. an AVX2 EPYC) aten's bf16 and fp16 matmuls fall
back to a generic loop: measured on 2 EPYC cores, ``a @ b`` ran at ~1 GFLOP/s in bf16 (~9 with the weight transposed,
as F.linear lays it out) against 66-77 GFLOP/s in fp32. One real-width training step (hidden 2816, vocabulary 262,144,
2 layers, bf16 weights) took 657 s. Upcasting the operands, multiplying in fp32 and rounding the product once to the
input dtype is what a native bf16 matmul does anyway (fp32 accumulation, one rounding), so results agree with it to
float rounding, at the fp32 rate.

- `slow_half(device, dtype)`: whether ``dtype`` products on ``device`` take the slow path.
- `fp32_products()`: a dispatch mode under which aten's matmuls of half-precision CPU tensors run that way.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HALF = (torch.bfloat16, torch.float16)


@functools.cache
def _native_half(dtype: torch.dtype) -> bool:
    # aten sends a CPU's bf16 (fp16) matmuls to oneDNN exactly when this check passes (mkldnn_bf16_device_check:
    # AVX512 or AMX on x86, bf16 arithmetic on ARM); otherwise they take the generic loop measured above. Asking
    # the same check aten asks, rather than timing a probe, gives one answer on a loaded machine and costs nothing.
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(torch.backends.mkldnn.is_available() and getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without the check: fp32 products are right everywhere
        return False


def slow_half(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True when ``dtype`` is bf16 or fp16 and ``device`` is a CPU whose matmuls in it are the generic loop."""
    return torch.device(device).type == "cpu" and dtype in HALF and not _native_half(dtype)
