"""LoRA on the routed experts (lora.targets=attn_mlp_experts | experts): one low-rank delta per expert on its fused
gate/up projection and on its down projection; the router stays frozen.

The adapter is peft's own (``LoraConfig.target_parameters``, a ``lora.ParamWrapper`` per expert tensor): one LoRA per
expert, ``lora_A`` (r * E, in) and ``lora_B`` (out, r * E), expert e using rows ``e*r:(e+1)*r`` of A and columns
``e::E`` of B. Saved adapters are stock peft files that ``PeftModel.from_pretrained`` loads without this toolkit.

What is not peft's is the forward, because peft's does not do the job leanly (measured on the tiny model and at the
26B's expert shapes, tests/finetune/test_expert_lora.py and bench/ABLATION.md): it parametrises the whole (E, out,
in) expert tensor as W + B A (peft 0.21 with one ``baddbmm``) and runs the experts on that, so every forward builds a
second copy of the layer's 128 experts and autograd keeps it for backward (1.52 GB in bf16 per layer and pass at
26B, about 91 GB over the step's 60 layer passes), for any number of routed tokens. Here the experts stay as they
are and each expert adds its delta on its own tokens only: ``x W_e^T + s (x A_e^T) B_e^T``, the rank-r product
computed per routed token (2 r (in + out) flops a token, no weight-sized temporary), inside the same per-expert loop
(eager) or as two more rank-r grouped matmuls (grouped_mm, the fast path on CUDA), or inside the 4-bit experts'
own loop (finetune.quantize, which dequantises one expert at a time and saves nothing but its inputs). peft's
parametrisation also cannot see the 4-bit experts (their Parameters are gone), and its merge_and_unload folds each
twin's delta into the one tensor encoder and decoder share, so twice (finetune.export.merge adds it once).
"""

from __future__ import annotations

import torch

from finetune.errors import UserError

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
# the experts' implementations this forward reproduces; batched_mm (80x slower than eager on CPU, bench/RESULTS.md)
# gains nothing a LoRA user needs over grouped_mm
LORA_IMPLEMENTATIONS = ("eager", "grouped_mm")


def expert_parameter_names(model, prefixes: list[str]) -> list[str]:
    """The full names of the expert tensors of the text layers under ``prefixes`` (the encoder's and the decoder's
    layers, or the decoder's only), for peft's ``target_parameters``: exact names, as its matching has no anchors."""
    names = []
    for name, module in model.named_modules():
        if name.endswith(".experts") and hasattr(module, "num_experts") and name.startswith(tuple(prefixes)):
            names += [f"{name}.{p}" for p in EXPERT_PARAMETERS]
    if not names:
        raise UserError("lora.targets asks for the experts, but this model has no experts modules in its text layers")
    return names


def _wrappers(outer) -> dict:
    """``{parameter name: ParamWrapper}`` of one nested stack of wrappers, and the experts module under them."""
    from peft.tuners.lora import ParamWrapper

    found, module = {}, outer
    while isinstance(module, ParamWrapper):
        found[module.parameter_name] = module
        module = module.base_layer
    return found, module


def expert_wrappers(model) -> list:
    """(name, outermost ParamWrapper) for each experts module that carries expert LoRA."""
    from peft.tuners.lora import ParamWrapper

    out = []
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper) and not name.endswith(".base_layer"):
            out.append((name, module))
    return out


def install(model) -> int:
    """Give every expert-LoRA wrapper stack of ``model`` (a PeftModel) this module's forward, in place of peft's
    parametrisation. Returns how many experts modules it found."""
    found = expert_wrappers(model)
    for _, outer in found:
        wrappers, experts = _wrappers(outer)
        unknown = set(wrappers) - set(EXPERT_PARAMETERS)
        if unknown:
            raise UserError(f"an adapter targets the experts' {sorted(unknown)}: only {EXPERT_PARAMETERS} are known")
        _check_implementation(experts)
        outer.forward = _Forward(outer)
    return len(found)


def _check_implementation(experts) -> None:
    if hasattr(experts, "gate_up_4bit"):
        return
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None) or "eager"
    if impl not in LORA_IMPLEMENTATIONS:
        raise UserError(f"model.experts_implementation={impl} cannot run LoRA on the experts: use eager or "
                        "grouped_mm (or auto)")


class _Forward:
    """The experts' forward with each expert's LoRA delta on its own tokens (an object, not a closure, so that
    copy.deepcopy and pickling of the model see a plain callable)."""

    def __init__(self, outer):
        self.outer = outer

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        wrappers, experts = _wrappers(self.outer)
        lora = {name: factors(w, hidden_states.dtype) for name, w in wrappers.items()}
        return experts_forward(experts, lora, hidden_states, top_k_index, top_k_weights)


def factors(wrapper, dtype: torch.dtype) -> list:
    """``[(A (E, r, in), B (E, out, r), scale)]`` for each active adapter of one ParamWrapper (none when disabled).
    Views of peft's weights: gradients reach them as they are."""
    if wrapper.disable_adapters or wrapper.merged:
        return []
    out = []
    for adapter in wrapper.active_adapters:
        if adapter not in wrapper.lora_A:
            continue
        a = wrapper.lora_A[adapter].weight
        b = wrapper.lora_B[adapter].weight
        e = wrapper.num_experts
        # B per expert made contiguous (a LoRA-sized copy): grouped_mm needs a unit stride in its last two dims
        out.append((a.view(e, -1, a.shape[-1]).to(dtype),
                    b.view(b.shape[0], -1, e).permute(2, 0, 1).to(dtype).contiguous(), wrapper.scaling[adapter]))
    return out


def expert_delta(wrapper, adapter: str) -> torch.Tensor:
    """One wrapper's delta for all experts, (E, out, in), in float32 (for the merged export)."""
    a = wrapper.lora_A[adapter].weight.float()
    b = wrapper.lora_B[adapter].weight.float()
    e = wrapper.num_experts
    return torch.bmm(b.view(b.shape[0], -1, e).permute(2, 0, 1), a.view(e, -1, a.shape[-1])) * wrapper.scaling[adapter]


def experts_forward(experts, lora: dict, hidden, top_k_index, top_k_weights):
    """The experts of one layer with ``lora`` (``{parameter: factors(...)}``) added per expert."""
    if not any(lora.values()):
        return experts(hidden, top_k_index, top_k_weights)  # the module's own forward, whatever it is
    if hasattr(experts, "gate_up_4bit"):
        from finetune.quantize import run_experts4bit

        return run_experts4bit(experts, hidden, top_k_index, top_k_weights, lora)
    impl = getattr(experts.config, "_experts_implementation", None) or "eager"
    if impl == "grouped_mm":
        return _grouped(experts, lora, hidden, top_k_index, top_k_weights)
    return _eager(experts, lora, hidden, top_k_index, top_k_weights)


def _eager(experts, lora, hidden, top_k_index, top_k_weights):
    """transformers' eager expert loop (DiffusionGemmaTextExperts.forward), each expert's delta on its tokens."""
    from finetune.quantize import lora_linear, routes

    gate_up_lora, down_lora = lora.get("gate_up_proj", []), lora.get("down_proj", [])
    out = torch.zeros_like(hidden)
    for e, tokens, slots in routes(top_k_index, experts.num_experts):
        x = hidden[tokens]
        gate, up = lora_linear(x, experts.gate_up_proj[e], gate_up_lora, e)[0].chunk(2, dim=-1)
        y, _ = lora_linear(experts.act_fn(gate) * up, experts.down_proj[e], down_lora, e)
        out.index_add_(0, tokens, (y * top_k_weights[tokens, slots, None]).to(out.dtype))
    return out


def rank_linear(x, weight, offsets):
    """x (S, in) by each group's ``weight`` (E, out, in), transposed, where one side is the LoRA rank r. CUDA's
    grouped_mm wants every row of its operands a multiple of 16 bytes, which r * 2 bytes is not below rank 8 in
    bf16: such a rank runs transformers' fallback grouped matmul (a loop over the experts) instead."""
    from transformers.integrations.moe import _grouped_linear

    rank = min(weight.shape[-2:])
    if x.device.type == "cuda" and (rank * weight.element_size()) % 16:
        return torch.ops.transformers.grouped_mm_fallback(x.to(weight.dtype), weight.transpose(-2, -1), offs=offsets)
    return _grouped_linear(x, weight, offsets)


def _grouped_lora(x, weight, pairs, offsets):
    from transformers.integrations.moe import _grouped_linear

    y = _grouped_linear(x, weight, offsets)
    for a, b, scale in pairs:  # two rank-r grouped matmuls: (S, in) -> (S, r) -> (S, out)
        y = y + rank_linear(rank_linear(x, a, offsets), b, offsets) * scale
    return y


def _grouped(experts, lora, hidden, top_k_index, top_k_weights):
    """transformers' grouped_mm experts forward (integrations.moe.grouped_mm_experts_forward: tokens sorted by
    expert, one grouped matmul per projection), each projection's delta as two rank-r grouped matmuls."""
    top_k = top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden[perm // top_k]
    weights = top_k_weights.reshape(-1)[perm]
    counts = torch.histc(expert_ids.float() if hidden.device.type in ("cpu", "mps") else expert_ids.int(),
                         bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    h = _grouped_lora(x, experts.gate_up_proj, lora.get("gate_up_proj", []), offsets)
    gate, up = h.chunk(2, dim=-1)
    y = _grouped_lora(experts.act_fn(gate) * up, experts.down_proj, lora.get("down_proj", []), offsets)
    y = y * weights.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return y[inverse].view(hidden.size(0), top_k, -1).sum(dim=1).to(hidden.dtype)
