"""model.experts_implementation: every choice trains LoRA through the frozen experts to the same gradients."""

import copy

import pytest
import torch
from test_lora import randomise_lora
from test_objective import batch_of

from finetune.config import ModelSettings
from finetune.errors import UserError
from finetune.model import LoraSettings, attach_lora, experts_for
from finetune.objective import ObjectiveConfig, diffusion_loss


def lora_gradients(model, batch) -> dict:
    model.zero_grad()
    diffusion_loss(model.get_base_model(), batch, ObjectiveConfig(), 8,
                   generator=torch.Generator().manual_seed(0)).loss.backward()
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(p.grad is None and not p.requires_grad for p in experts)
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_gradients_flow_through_the_frozen_experts_the_same_way_in_every_implementation(tiny_model, tokenizer):
    model = attach_lora(tiny_model, LoraSettings(r=4, alpha=8, placement="shared")).train()
    randomise_lora(model)
    batch = batch_of(tokenizer, 4)
    # the reference: eager in float64, where rounding is ~1e-16 and every float32 implementation's error shows
    exact = copy.deepcopy(model).double()
    exact.get_base_model().set_experts_implementation("eager")
    reference = lora_gradients(exact, batch)
    errors = {}
    for name in ("eager", "grouped_mm", "batched_mm"):
        model.get_base_model().set_experts_implementation(name)
        grads = lora_gradients(model, batch)
        # an implementation that cut the gradient at the experts' input (one writing into a fresh buffer) would give
        # every LoRA matrix below the last MoE block a wrong gradient, not a rounding difference
        errors[name] = max(float((grads[n] - g).norm() / g.norm()) for n, g in reference.items())
    assert all(g.norm() > 0 for g in reference.values())
    # Each implementation is float32 arithmetic in another order (grouped or batched matmuls instead of a loop), so
    # its normwise error against float64 is of the order of eager's own: float32's 6e-8 per operation, grown through
    # reductions, the layers' backward and small-norm LoRA gradients (the worst tensor: ~1e-5 measured here). Bounds
    # from that arithmetic, not from one CPU's digits: within 10x of eager's error, and that error under 1e-3 (a
    # gradient that is wrong, not rounded, is off by O(1)).
    assert errors["eager"] < 1e-3, errors
    for name, error in errors.items():
        assert error <= 10 * errors["eager"] + 1e-7, (name, errors)


def test_auto_is_eager_on_cpu_and_grouped_mm_on_cuda_and_a_typo_is_one_line():
    assert experts_for("auto", "cpu") == "eager" and experts_for("auto", "cuda") == "grouped_mm"
    assert experts_for("grouped_mm", "cpu") == "grouped_mm"
    with pytest.raises(UserError, match="model.experts_implementation='grouped'"):
        ModelSettings(experts_implementation="grouped")
