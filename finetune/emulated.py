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


aten = torch.ops.aten
# The products a training step runs, and which of each op's outputs a native half kernel returns in the half dtype
# (the others, the attention's log-sum-exp, are fp32 either way). Listed from a dispatch trace of a bf16 step of
# DiffusionGemma on CPU: F.linear and matmul decompose into mm/addmm/bmm before dispatch, the experts run as
# _grouped_mm (transformers' grouped_mm implementation) or as a loop of F.linear (eager), attention through sdpa's CPU
# flash kernel, whose inner products are the same generic half loop.
ROUNDED = {
    aten.mm.default: (0,),
    aten.addmm.default: (0,),
    aten.bmm.default: (0,),
    aten.baddbmm.default: (0,),
    aten._grouped_mm.default: (0,),
    aten._scaled_dot_product_flash_attention_for_cpu.default: (0,),
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (0, 1, 2),
}


class Fp32Products(TorchDispatchMode):
    """Runs each op of ROUNDED whose first operand is a bf16/fp16 CPU tensor on a CPU where that dtype's matmul is
    slow from its half operands upcast to fp32, and rounds the outputs the native op gives in half precision once to
    that dtype. Everything else (fp32, GPU tensors, every other op) runs untouched. ``rerouted`` counts the ops it
    took."""

    def __init__(self):
        super().__init__()
        self.rerouted = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rounded = ROUNDED.get(func)
        first = args[0] if args else None
        if rounded is None or not isinstance(first, torch.Tensor) or not slow_half(first.device, first.dtype):
            return func(*args, **kwargs)
        self.rerouted += 1
        return in_fp32(func, args, kwargs, first.dtype, rounded)


def in_fp32(func, args, kwargs, half: torch.dtype, rounded=(0,)):
    """``func`` on its ``half`` tensors upcast to fp32, outputs at ``rounded`` cast back to ``half`` (or to the
    op's out_dtype where it names one): the exact reference the mode's tests compare against."""
    def up(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype == half else x

    args, kwargs = [up(a) for a in args], {k: up(v) for k, v in kwargs.items()}
    target = half
    names = [a.name for a in func._schema.arguments]
    if "out_dtype" in names:  # _grouped_mm: multiply in fp32, then round to what was asked for
        i = names.index("out_dtype")
        asked = args[i] if i < len(args) else kwargs.get("out_dtype")
        target = asked or half
        if i < len(args):
            args[i] = None
        else:
            kwargs.pop("out_dtype", None)
    out = func(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return out.to(target)
    return type(out)(o.to(target) if i in rounded else o for i, o in enumerate(out))


@contextmanager
def fp32_products(enabled: bool = True):
    """Half-precision products through fp32 inside the block (`Fp32Products`), when ``enabled``; yields the mode or
    None. The mode is Python on every op of the block (~5 us each), so callers enable it only where it pays:
    `wanted`."""
    if not enabled:
        yield None
        return
    with Fp32Products() as mode:
        yield mode


def wanted(device: torch.device | str, dtypes) -> bool:
    """Whether a step on ``device`` whose products run in any of ``dtypes`` (the weights', autocast's) needs
    `fp32_products`: a CPU without native matmul in one of them. False on a GPU and for fp32 runs."""
    return any(slow_half(device, d) for d in dtypes)
