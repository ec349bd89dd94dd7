"""model.experts_implementation: every choice trains LoRA through the frozen experts to the same gradients."""

import pytest
import torch
from test_lora import randomise_lora
from test_objective import batch_of

from finetune.config import ModelSettings
from finetune.errors import UserError
from finetune.model import LoraSettings, attach_lora, experts_for
from finetune.objective import ObjectiveConfig, diffusion_loss


def test_lora_gradients_flow_through_the_frozen_experts_the_same_way_in_every_implementation(tiny_model, tokenizer):
    model = attach_lora(tiny_model, LoraSettings(r=4, alpha=8, placement="shared")).train()
    randomise_lora(model)
    batch = batch_of(tokenizer, 4)
    grads = {}
    for name in ("eager", "grouped_mm", "batched_mm"):
        model.get_base_model().set_experts_implementation(name)
        model.zero_grad()
        diffusion_loss(model.get_base_model(), batch, ObjectiveConfig(), 8,
                       generator=torch.Generator().manual_seed(0)).loss.backward()
        experts = [p for n, p in model.named_parameters() if ".experts." in n]
        assert experts and all(p.grad is None and not p.requires_grad for p in experts)
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    # an implementation that cut the gradient at the experts' input (one writing into a fresh buffer) would give
    # every LoRA matrix below the last MoE block a different gradient than eager
    assert all(grad.abs().max() > 0 for grad in grads["eager"].values())
    for name in ("grouped_mm", "batched_mm"):
        for param, grad in grads["eager"].items():
            torch.testing.assert_close(grads[name][param], grad, atol=1e-6, rtol=1e-4, msg=f"{name} {param}")


def test_auto_is_eager_on_cpu_and_grouped_mm_on_cuda_and_a_typo_is_one_line():
    assert experts_for("auto", "cpu") == "eager" and experts_for("auto", "cuda") == "grouped_mm"
    assert experts_for("grouped_mm", "cpu") == "grouped_mm"
    with pytest.raises(UserError, match="model.experts_implementation='grouped'"):
        ModelSettings(experts_implementation="grouped")
