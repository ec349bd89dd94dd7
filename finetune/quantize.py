"""4-bit frozen weights under LoRA: the fused MoE experts (model.quantization=experts4bit) and, for all4bit, the
dense text linears too. The experts are about 46 of the 26B model's 52 GB, and bitsandbytes' 4-bit loading skips
them (they are 3-D Parameters, not nn.Linear), so this module quantises them itself with bitsandbytes' kernels.

Why not ``bitsandbytes.nn.parametrize.replace_parameter_4bit``, which bitsandbytes ships for MoE parameters: it
quantises the whole (E, a, b) tensor and dequantises all of it on every access, so the expert loop (which indexes
``gate_up_proj[e]`` once per expert) would build the whole layer per expert (its forward-scoped cache makes that
once per layer), and ``F.linear`` then saves a view of that full dequantised tensor for backward: every layer's
experts come back in bf16 through the autograd graph, the 46 GB again. It also swaps the Parameter on one module
only, which splits the encoder/decoder tie into a 4-bit and a bf16 copy. Instead ``Experts4bitWeight`` keeps
``F.quantize_4bit``'s packed codes and absmax per expert, and ``_Experts4bit`` (a custom autograd function) runs the
expert loop dequantising one expert at a time, only the experts the batch routed tokens to, saves nothing but the
layer's input, routing indices and weights, and dequantises again in backward. At peak one expert's dequantised
gate_up + down (26B: 6 M values, 12 MB in bf16) is alive, besides that expert's tokens' activations.

NF4 by default, by measurement: on the 26B model's expert shapes (gate_up 1408x2816, down 2816x704, bf16) NF4
reconstructs with 9.2% relative (Frobenius) error against FP4's 12.2% on Gaussian weights and 11.1% against 16.8%
on heavy-tailed ones (Student-t, 4 dof), at the same 4.5 bits a value (tests/finetune/test_quantize.py checks the
ordering on smaller experts). torchao's formats were not tried (not installed).
"""

from __future__ import annotations

import re

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4")
EXPERTS_BLOCKSIZE = 64  # bitsandbytes' default: one fp32 absmax per 64 values, 4.5 bits a value in all
# Bytes a quantised value costs, as stored (the planner counts weights with these): experts as above; the dense
# linears as bitsandbytes' Linear4bit with double quantisation (an 8-bit absmax per 64, an fp32 per 256 absmaxes)
EXPERT_BYTES_PER_PARAM = 0.5 + 4 / EXPERTS_BLOCKSIZE
DENSE_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)

# The dense linears all4bit quantises: attention and dense MLP of the text layers of both stacks. The router, the
# embeddings and head, the vision tower and the self-conditioning MLP stay as loaded:
# anchoring on `layers.N.` leaves those out by construction.
DENSE_LINEARS = re.compile(r"(^|\.)(encoder\.language_model|decoder)\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|"
                           r"mlp\.(gate|up|down)_proj)$")


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r}: use one of {', '.join(QUANT_TYPES)}")


class Experts4bitWeight(nn.Module):
    """One (E, a, b) expert tensor in 4 bits: ``packed`` (E, ceil(a*b/2)) uint8 codes and ``absmax`` (E, blocks)
    fp32 scales, each expert quantised on its own so it dequantises alone. A module, so that ``model.to(device)``
    moves it, and one object on both twins, so that moving it keeps the tie (buffers of two modules would be copied
    apart). Its buffers are not persistent: a state dict of a quantised model carries no 4-bit experts; exports
    rebuild from the original bf16 weights."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype,
                 quant_type: str, blocksize: int):
        super().__init__()
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("absmax", absmax, persistent=False)
        self.shape, self.dtype, self.quant_type, self.blocksize = tuple(shape), dtype, quant_type, blocksize

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the fp32 scales: only the device of a move applies to them
        self.packed = fn(self.packed)
        self.absmax = self.absmax.to(self.packed.device)
        return self

    @property
    def num_experts(self) -> int:
        return self.packed.shape[0]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.absmax.nbytes

    def dequantize(self, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert ``e`` as an (a, b) tensor of ``dtype`` (default: the dtype it was quantised from)."""
        # The registered op, not F.dequantize_4bit (which transposes a result whose packed input has one row). The
        # CPU kernel of bitsandbytes 0.50 blocks each row on its own, so a row that is not whole blocks (the tiny
        # model's down_proj: 32 wide) comes back wrong (23-40% error instead of 9%): such a tensor goes flat.
        a, b = self.shape
        shape = self.shape if b % self.blocksize == 0 else (a * b,)
        return torch.ops.bitsandbytes.dequantize_4bit.default(self.packed[e], self.absmax[e], self.blocksize,
                                                              self.quant_type, shape,
                                                              dtype or self.dtype).view(a, b)

    def dequantize_all(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All experts, (E, a, b): for the tests' comparisons; training never builds this, and the export does not
        either (it merges into the base reloaded in bf16, finetune.export)."""
        out = torch.empty(self.num_experts, *self.shape, dtype=dtype or self.dtype, device=self.packed.device)
        for e in range(self.num_experts):
            out[e] = self.dequantize(e, out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, shape={self.shape}, {self.quant_type}, blocksize={self.blocksize}, "
                f"{self.nbytes / 2**20:.1f} MiB")


def quantize_expert_weight(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = EXPERTS_BLOCKSIZE,
                           chunk_values: int = 1 << 20) -> Experts4bitWeight:
    """One (E, a, b) expert tensor of any float dtype, on its own device, to 4 bits, block-wise with blocks that never
    cross experts. Quantises ``chunk_values`` values per call so the fp32 temporaries of the kernel stay small."""
    import bitsandbytes.functional as F

    _check_quant_type(quant_type)
    if weight.dim() != 3 or not weight.is_floating_point():
        raise ValueError(f"expected a 3-D float expert tensor (E, a, b), got {tuple(weight.shape)} {weight.dtype}")
    w = weight.detach()
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        w = w.float()
    experts, a, b = w.shape
    n = a * b
    packed = torch.empty(experts, (n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(experts, -(-n // blocksize), dtype=torch.float32, device=w.device)
    # a run of whole experts quantised flat has the same blocks as each expert alone when a*b fills whole blocks
    per_call = max(1, chunk_values // n) if n % blocksize == 0 else 1
    for start in range(0, experts, per_call):
        stop = min(start + per_call, experts)
        codes, state = F.quantize_4bit(w[start:stop].contiguous(), blocksize=blocksize, quant_type=quant_type)
        packed[start:stop] = codes.view(stop - start, -1)
        absmax[start:stop] = state.absmax.view(stop - start, -1)
    return Experts4bitWeight(packed, absmax, (a, b), weight.dtype, quant_type, blocksize)


def routes(top_k_index: torch.Tensor, num_experts: int):
    """(expert, token rows, top-k slots) for each expert that received tokens, in expert order."""
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one device sync per call, not one per expert
    tokens, slots = order // top_k_index.shape[-1], order % top_k_index.shape[-1]
    start = 0
    for e, count in enumerate(counts[:num_experts]):  # index num_experts (expert parallel's "not here") sorts last
        if count:
            yield e, tokens[start:start + count], slots[start:start + count]
        start += count


def lora_linear(x, w, pairs, e):
    """x w^T plus each LoRA pair's s (x A_e^T) B_e^T, and the rank-r inputs x A_e^T (kept for backward)."""
    y = nn.functional.linear(x, w)
    us = []
    for a, b, scale in pairs:
        u = nn.functional.linear(x, a[e])
        y = y + nn.functional.linear(u, b[e]) * scale
        us.append(u)
    return y, us


def _lora_backward(g, x, w, pairs, us, e, grads):
    """Of y = x w^T + sum s (x A_e^T) B_e^T, given dL/dy = g: returns dL/dx and adds into ``grads`` (fp32, one
    (A (E, r, in), B (E, out, r)) pair per LoRA pair) dL/dA_e = s (g B_e)^T x and dL/dB_e = s g^T (x A_e^T)."""
    gx = g @ w
    for (a, b, scale), u, (grad_a, grad_b) in zip(pairs, us, grads):
        gb = (g @ b[e]) * scale  # (n, r)
        gx = gx + gb @ a[e]
        if grad_a is not None:
            grad_a[e] += (gb.T @ x).float()
        if grad_b is not None:
            grad_b[e] += ((g * scale).T @ u).float()
    return gx


class _Experts4bit(torch.autograd.Function):
    """The eager expert loop of DiffusionGemmaTextExperts on 4-bit storage, with optional LoRA on each expert
    (finetune.expert_lora). Forward dequantises each routed expert, uses it and drops it; it saves only its inputs
    (and the LoRA factors, which are parameters). Backward walks the experts again, dequantising each one a second
    time, recomputes the gate/up projection and the rank-r LoRA inputs, and returns the gradients of the hidden
    states, the routing weights and the LoRA factors (never of the experts: they are frozen). Costs one extra matmul
    per expert in backward (the gate/up recompute) and the dequantisation twice; saves every expert activation eager
    would keep.

    ``spec`` says how the flat LoRA tensors split: (number of gate_up pairs, number of down pairs, their scales);
    each pair is A (E, r, in) and B (E, out, r)."""

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, experts, spec, *lora):
        ctx.experts, ctx.spec = experts, spec
        ctx.save_for_backward(hidden, top_k_index, top_k_weights, *lora)
        gate_up_lora, down_lora = _pairs(spec, lora)
        out = torch.zeros_like(hidden)
        gate_up, down = experts.gate_up_4bit, experts.down_4bit
        for e, tokens, slots in routes(top_k_index, gate_up.num_experts):
            z, _ = lora_linear(hidden[tokens], gate_up.dequantize(e, hidden.dtype), gate_up_lora, e)
            gate, up = z.chunk(2, dim=-1)
            y, _ = lora_linear(experts.act_fn(gate) * up, down.dequantize(e, hidden.dtype), down_lora, e)
            out.index_add_(0, tokens, (y * top_k_weights[tokens, slots, None]).to(out.dtype))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, top_k_index, top_k_weights, *lora = ctx.saved_tensors
        experts = ctx.experts
        gate_up_lora, down_lora = _pairs(ctx.spec, lora)
        needs = ctx.needs_input_grad[5:]
        grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) if need else None
                 for t, need in zip(lora, needs)]
        n_gate_up = 2 * ctx.spec[0]
        gate_up_grads = list(zip(grads[:n_gate_up:2], grads[1:n_gate_up:2]))
        down_grads = list(zip(grads[n_gate_up::2], grads[n_gate_up + 1::2]))
        gate_up, down = experts.gate_up_4bit, experts.down_4bit
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weights = torch.zeros_like(top_k_weights) if ctx.needs_input_grad[2] else None
        for e, tokens, slots in routes(top_k_index, gate_up.num_experts):
            x = hidden[tokens]
            w_gate_up = gate_up.dequantize(e, hidden.dtype)
            z, us_gate_up = lora_linear(x, w_gate_up, gate_up_lora, e)
            gate, up = z.chunk(2, dim=-1)
            with torch.enable_grad():  # the activation's own derivative, whatever act_fn is
                gate = gate.detach().requires_grad_()
                act = experts.act_fn(gate)
            h = act.detach() * up
            w_down = down.dequantize(e, hidden.dtype)
            # y = h @ down_e.T (+ LoRA) and out += y * w: d/dy = w * g, d/dw = <g, y>
            g = grad_out[tokens]
            routing = top_k_weights[tokens, slots, None]
            if grad_weights is not None:
                y, _ = lora_linear(h, w_down, down_lora, e)
                grad_weights[tokens, slots] = (g.float() * y.float()).sum(-1).to(grad_weights.dtype)
            grad_y = (g * routing).to(hidden.dtype)
            us_down = [nn.functional.linear(h, a[e]) for a, _, _ in down_lora]
            grad_h = _lora_backward(grad_y, h, w_down, down_lora, us_down, e, down_grads)
            del w_down
            (grad_gate,) = torch.autograd.grad(act, gate, grad_h * up)
            grad_z = torch.cat([grad_gate, grad_h * act.detach()], -1)
            grad_x = _lora_backward(grad_z, x, w_gate_up, gate_up_lora, us_gate_up, e, gate_up_grads)
            if grad_hidden is not None:
                grad_hidden.index_add_(0, tokens, grad_x.to(hidden.dtype))
            del w_gate_up  # before the next expert's: one expert's weights alive at a time
        lora_grads = [None if grad is None else grad.to(t.dtype) for grad, t in zip(grads, lora)]
        return (grad_hidden, None, grad_weights, None, None, *lora_grads)


def _pairs(spec, lora):
    """The flat LoRA tensors as ([(A, B, scale)] for gate_up, [...] for down)."""
    n_gate_up, n_down, scales = spec
    pairs = [(lora[2 * i], lora[2 * i + 1], scales[i]) for i in range(n_gate_up + n_down)]
    return pairs[:n_gate_up], pairs[n_gate_up:]


def run_experts4bit(experts, hidden, top_k_index, top_k_weights, lora: dict | None = None):
    """One 4-bit experts module's forward, with ``lora`` (``{"gate_up_proj": [(A, B, scale)], "down_proj": ...}``,
    finetune.expert_lora.factors) added per expert."""
    lora = lora or {}
    gate_up_lora, down_lora = lora.get("gate_up_proj", []), lora.get("down_proj", [])
    pairs = [*gate_up_lora, *down_lora]
    spec = (len(gate_up_lora), len(down_lora), tuple(scale for _, _, scale in pairs))
    flat = [t for a, b, _ in pairs for t in (a, b)]
    return _Experts4bit.apply(hidden, top_k_index, top_k_weights, experts, spec, *flat)


def _forward_4bit(self, hidden_states, top_k_index, top_k_weights):
    return run_experts4bit(self, hidden_states, top_k_index, top_k_weights)


def install_experts4bit(module: nn.Module, gate_up: Experts4bitWeight, down: Experts4bitWeight) -> None:
    """Make one DiffusionGemmaTextExperts run on 4-bit storage: its bf16 Parameters go, its forward (whatever
    experts_implementation says) becomes `_Experts4bit`. Call it on the encoder's and the decoder's twin with the same
    two objects and they share them."""
    expected = {"gate_up": (module.num_experts, 2 * module.intermediate_dim, module.hidden_dim),
                "down": (module.num_experts, module.hidden_dim, module.intermediate_dim)}
    for name, weight in (("gate_up", gate_up), ("down", down)):
        if (weight.num_experts, *weight.shape) != expected[name]:
            raise ValueError(f"{name}: storage of shape {(weight.num_experts, *weight.shape)} does not fit this "
                             f"experts module, which needs {expected[name]}")
    for name in ("gate_up_proj", "down_proj"):
        if name in module._parameters:
            delattr(module, name)
    module.gate_up_4bit, module.down_4bit = gate_up, down
    module.forward = _forward_4bit.__get__(module)


def _stand_in(shape, dtype, device) -> nn.Parameter:
    """A frozen Parameter of ``shape`` holding one element (a zero, expanded: every stride 0)."""
    param = nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(shape), requires_grad=False)
    param._stand_in = True
    return param


def _apply_keeping_stand_ins(self, fn, recurse=True):
    """``nn.Module._apply`` for a 4-bit experts module with stand-ins: a move or cast makes new one-element stand-ins
    (applying ``fn`` to the expanded ones would allocate the experts' full size) and moves the 4-bit storage."""
    for child in self.children():
        child._apply(fn)
    for name in ("gate_up_proj", "down_proj"):
        param = self._parameters.get(name)
        if param is not None:
            scalar = fn(torch.zeros((), dtype=param.dtype, device=param.device))
            self._parameters[name] = _stand_in(param.shape, scalar.dtype, scalar.device)
    return self


def expose_expert_shapes(model) -> int:
    """Give each 4-bit experts module stand-in Parameters ``gate_up_proj`` and ``down_proj`` of the experts' shapes
    and dtype, one element each, so that peft's ``target_parameters`` finds and sizes them (LoRA on 4-bit experts:
    lora.targets=*experts); the 4-bit forward never reads them (finetune.expert_lora passes the LoRA factors into
    `_Experts4bit`). Not trainable, not in any saved file (exports rebuild from the original weights); DDP and FSDP
    leave them alone as they leave every frozen tensor. Returns how many modules got them."""
    done = 0
    for _, module in _experts_modules(model):
        if not hasattr(module, "gate_up_4bit") or "gate_up_proj" in module._parameters:
            continue
        device = module.gate_up_4bit.packed.device
        module.gate_up_proj = _stand_in((module.gate_up_4bit.num_experts, *module.gate_up_4bit.shape),
                                        module.gate_up_4bit.dtype, device)
        module.down_proj = _stand_in((module.down_4bit.num_experts, *module.down_4bit.shape), module.down_4bit.dtype,
                                     device)
        module._apply = _apply_keeping_stand_ins.__get__(module)
        done += 1
    return done


def _experts_modules(model):
    """(name, module) for every experts module of a DiffusionGemma (PEFT-wrapped or not), the twins included."""
    for name, module in model.named_modules(remove_duplicate=False):
        if name.endswith(".experts") and hasattr(module, "num_experts") and hasattr(module, "intermediate_dim"):
            yield name, module


def _forget_tied(model, fragment_re: re.Pattern) -> None:
    """Drop the tie entries of parameters that no longer exist, in the expanded mapping (`all_tied_weights_keys`)
    and, on the instance, in the patterns it is expanded from (`_tied_weights_keys`): transformers' `tie_weights`
    would look them up and fail. The quantised twins share their storage by construction."""
    for module in model.modules():
        for attr in ("all_tied_weights_keys", "_tied_weights_keys"):
            keys = getattr(module, attr, None)
            if isinstance(keys, dict):
                setattr(module, attr, {t: s for t, s in keys.items()
                                       if not (fragment_re.search(t) or fragment_re.search(s))})


def quantize_experts(model, quant_type: str = "nf4") -> int:
    """Quantise every expert tensor of a loaded model to 4 bits, each unique tensor once (tied twins get the same
    storage), and install the 4-bit forward; returns the bytes of expert storage now held. Modules already on 4 bits
    are left as they are. Twins are done together, so each layer's bf16 experts are freed (when nothing else holds
    them) before the next layer is quantised: the extra memory on the way is one layer's 4-bit storage."""
    _check_quant_type(quant_type)
    twins: dict[int, list] = {}
    held = {}
    for _, module in _experts_modules(model):
        if hasattr(module, "gate_up_4bit"):
            held.update({id(w): w.nbytes for w in (module.gate_up_4bit, module.down_4bit)})
        else:
            twins.setdefault(id(module.gate_up_proj), []).append(module)
    for modules in twins.values():
        if len({id(m.down_proj) for m in modules}) != 1:
            raise ValueError("experts modules share gate_up_proj but not down_proj: cannot quantise them as twins")
        gate_up, down = (quantize_expert_weight(getattr(modules[0], name), quant_type)
                         for name in ("gate_up_proj", "down_proj"))
        for module in modules:
            install_experts4bit(module, gate_up, down)
        held.update({id(gate_up): gate_up.nbytes, id(down): down.nbytes})
    forget_expert_ties(model)
    return sum(held.values())


def forget_expert_ties(model) -> None:
    """The expert tensors are no Parameters once on 4 bits: drop their tie entries (dense names end in .weight)."""
    _forget_tied(model, re.compile(r"(gate_up|down)_proj$"))


def quantize_dense(model, quant_type: str = "nf4") -> int:
    """Replace the dense text linears (attention q/k/v/o, dense MLP gate/up/down, both stacks) with bitsandbytes
    Linear4bit (NF4 by default, double-quantised absmax as QLoRA does), before LoRA is attached: peft wraps Linear4bit
    base layers. Twins stay two modules (peft wraps each by name) holding ONE Params4bit, as they held one Parameter;
    returns the bytes of dense 4-bit storage."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    _check_quant_type(quant_type)
    if hasattr(model, "peft_config"):
        raise ValueError("quantize_dense runs on the base model before attach_lora: peft must wrap the 4-bit layers")
    shared: dict[int, bnb.nn.Params4bit] = {}
    total = 0
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not DENSE_LINEARS.search(name) or isinstance(module, bnb.nn.Linear4bit):
            continue
        if type(module) is not nn.Linear:
            raise ValueError(f"{name} is a {type(module).__name__}, not a plain nn.Linear: quantize_dense runs on the "
                             "model as loaded")
        weight = module.weight
        if id(weight) not in shared:
            codes, state = F.quantize_4bit(weight.detach(), compress_statistics=True, quant_type=quant_type)
            shared[id(weight)] = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=state,
                                                   blocksize=state.blocksize, compress_statistics=True,
                                                   quant_type=quant_type, bnb_quantized=True)
            total += codes.nbytes + _state_nbytes(state)
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=weight.dtype, compress_statistics=True, quant_type=quant_type,
                                  device="meta")
        layer.weight = shared[id(weight)]
        layer.quant_state = layer.weight.quant_state
        if module.bias is not None:
            layer.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    # what transformers sets after a bitsandbytes load: peft then wraps these layers with its bnb LoRA layer (which
    # merges by dequantising) instead of its plain one, and Trainer does not wrap the model in DataParallel
    model.is_loaded_in_4bit = True
    return total


def _state_nbytes(state) -> int:
    nbytes = state.absmax.nbytes
    if state.state2 is not None:
        nbytes += state.state2.absmax.nbytes + state.state2.code.nbytes
    return nbytes
