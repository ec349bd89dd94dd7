"""Did the adapter change anything? LoRA weight deltas and the fraction of generations that differ from base.

A LoRA adapter that trained on nothing (a wrong target regex, a zero learning rate, an adapter saved under names
that load nothing) keeps B = 0, so the model is the base and every evaluation silently compares base with base.
"""

from __future__ import annotations

import torch


def lora_delta_norms(model) -> dict[str, dict]:
    """Per LoRA module: ||delta W||_F = ||B A||_F * scaling, and the same relative to ||W||_F.

    Encoder modules that share their decoder twin's matrices (lora.placement=shared) are listed once, under the
    decoder's name. ||B A||_F^2 = sum((B^T B) * (A A^T)), so no out x in matrix is built (r x r only).
    """
    from peft.tuners.lora import LoraLayer, ParamWrapper

    seen, norms = set(), {}
    modules = sorted(model.named_modules(), key=lambda item: ".decoder." not in item[0])  # stable: decoder first
    for name, module in modules:
        if not isinstance(module, LoraLayer):
            continue
        experts = isinstance(module, ParamWrapper)  # LoRA on the experts (finetune.expert_lora): one per expert
        if experts:
            name = f"{name.replace('.base_layer', '')}.{module.parameter_name}"
        for key in module.active_adapters:
            if key not in module.lora_A or not hasattr(module.lora_A[key], "weight"):
                continue  # not a Linear-style LoRA; no dense delta to measure here
            a, b = module.lora_A[key].weight, module.lora_B[key].weight
            if (id(a), id(b)) in seen:
                continue
            seen.add((id(a), id(b)))
            a32, b32 = a.detach().float(), b.detach().float()
            if experts:  # ||delta||_F over all experts: expert e's A is rows e*r.., its B columns e::E
                e = module.num_experts
                a32, b32 = a32.view(e, -1, a32.shape[-1]), b32.view(b32.shape[0], -1, e).permute(2, 0, 1)
                squared = ((b32.transpose(1, 2) @ b32) * (a32 @ a32.transpose(1, 2))).sum().clamp_min(0.0)
            else:
                squared = ((b32.T @ b32) * (a32 @ a32.T)).sum().clamp_min(0.0)
            delta = float(squared.sqrt()) * float(module.scaling[key])
            base_weight = module.get_param() if experts else module.get_base_layer().weight
            base_norm = float(base_weight.detach().float().norm()) if base_weight.dtype.is_floating_point else 0.0
            norms[f"{name}[{key}]"] = {"delta_norm": delta, "relative": delta / base_norm if base_norm else None}
    return norms


def changed_fraction(base_texts: list[str], adapter_texts: list[str]) -> float:
    """Fraction of examples whose generated text differs between base and adapter (same prompts, same noise)."""
    pairs = list(zip(base_texts, adapter_texts))
    return sum(b != a for b, a in pairs) / max(len(pairs), 1)


def adapter_check(model, base_texts: list[str] | None, adapter_texts: list[str] | None,
                  tolerance: float = 1e-8) -> dict:
    """The report's "does the adapter change anything" block: a boolean, the evidence and warnings."""
    norms = lora_delta_norms(model)
    values = [v["delta_norm"] for v in norms.values()]
    warnings = []
    zero_weights = not values or max(values) <= tolerance
    if not values:
        warnings.append("the model has no LoRA module: nothing was adapted")
    elif zero_weights:
        warnings.append(f"all {len(values)} LoRA weight deltas are ~0 (max {max(values):.2e}): the adapter is the "
                        "base model (did training run, and did the adapter load? check its target modules)")
    fraction = None
    if base_texts is not None and adapter_texts is not None:
        fraction = changed_fraction(base_texts, adapter_texts)
        if fraction == 0.0:
            warnings.append(f"no generation changed: all {len(base_texts)} adapter outputs equal the base outputs")
    relative = [v["relative"] for v in norms.values() if v["relative"] is not None]
    return {
        "adapter_changed_nothing": zero_weights or fraction == 0.0,
        "changed_generations_fraction": fraction,
        "lora_modules": len(values),
        "delta_norm_total": float(torch.tensor(values).square().sum().sqrt()) if values else 0.0,
        "delta_norm_max": max(values) if values else 0.0,
        "relative_delta_max": max(relative) if relative else None,
        "zero_delta_modules": sum(v <= tolerance for v in values),
        "warnings": warnings,
        "delta_norms": norms,
    }
