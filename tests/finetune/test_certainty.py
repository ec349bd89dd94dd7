"""The certainty penalty (objective.certainty_weight, objective=fast): its chunked entropy against autograd on the
full logits, and the lean objective with it against the stock one."""

import pytest
import torch
import torch.nn.functional as F
from test_head import small_tiles  # noqa: F401  (a fixture)
from test_lora import randomise_lora
from test_objective import batch_of

import finetune.head as head
from finetune.model import LoraSettings, attach_lora
from finetune.objective import ObjectiveConfig, diffusion_loss


def full_entropy(hidden, weight, targets, cap, tau):
    logits = F.linear(hidden, weight)
    logits = logits.float() if logits.dtype != torch.float64 else logits
    logits = torch.tanh(logits / cap) * cap if cap else logits
    log_p = F.log_softmax(logits / tau, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1), logits.argmax(dim=-1) == targets


@pytest.mark.parametrize("cap", [30.0, 2.0, None])
@pytest.mark.parametrize("tau", [1.0, 0.25])
def test_chunked_entropy_and_its_gradients_equal_autograd_on_the_full_logits(cap, tau, small_tiles):  # noqa: F811
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(37, 16, generator=g) * 3).requires_grad_()
    head_layer = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (37,), generator=g)
    # some rows' targets are their argmax, so the mask is neither empty nor full
    with torch.no_grad():
        targets[:12] = F.linear(hidden[:12], head_layer.weight).argmax(dim=-1)
    upstream = torch.rand(37, generator=g)
    lean, right = head.softcapped_entropy(head_layer, hidden, targets, cap, tau)
    full, full_right = full_entropy(hidden, head_layer.weight, targets, cap, tau)
    assert torch.equal(right, full_right) and 12 <= int(right.sum()) < 37
    torch.testing.assert_close(lean, full, atol=1e-5, rtol=1e-5)
    # the penalty's gradient: only the positions predicted right, weighted as a loss sum would weight them
    # against autograd in float64, so that the tolerance is the lean path's float32 error, not the reference's
    # (at tau 0.25 with no cap the softmax is sharp enough that two float32 orders of summation differ by ~1e-4)
    hidden64, weight64 = hidden.detach().double().requires_grad_(), head_layer.weight.detach().double().requires_grad_()
    full64, _ = full_entropy(hidden64, weight64, targets, cap, tau)
    lean_grads = torch.autograd.grad((lean * upstream * right).sum(), [hidden, head_layer.weight])
    full_grads = torch.autograd.grad((full64 * upstream.double() * full_right).sum(), [hidden64, weight64])
    for ours, ref in zip(lean_grads, full_grads):
        assert ref.abs().max() > 1e-3  # the comparison is of something
        torch.testing.assert_close(ours.double(), ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)
    assert lean_grads[0][~right].abs().max() == 0  # wrong predictions are not sharpened


def test_lean_objective_with_the_certainty_penalty_equals_stock_loss_and_lora_gradients(tiny_model, tokenizer,
                                                                                         small_tiles):  # noqa: F811
    model = attach_lora(tiny_model, LoraSettings(r=4, alpha=8, placement="shared"))
    randomise_lora(model)
    model.train()
    base = model.get_base_model()
    batch = batch_of(tokenizer, 4)
    sc = torch.tensor([True, False, True, False])

    def run(lean, weight, t=None):
        model.zero_grad()
        cfg = ObjectiveConfig(encoder_ar_weight=1.0, certainty_weight=weight, certainty_temperature=0.7)
        out = diffusion_loss(base, batch, cfg, 8, generator=torch.Generator().manual_seed(3), lean=lean,
                             self_conditioning=sc, t=t)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    low_noise = torch.full((4,), 0.05)  # mostly clean canvases: the model gets many positions right
    lean, lean_grads = run(True, 0.5, low_noise)
    stock, stock_grads = run(False, 0.5, low_noise)
    plain, plain_grads = run(True, 0.0, low_noise)
    assert lean.certain_tokens == stock.certain_tokens and lean.certain_tokens > 0
    assert plain.certainty_sum == 0 and plain.certain_tokens == 0  # off: nothing computed
    torch.testing.assert_close(lean.certainty_sum, stock.certainty_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean.loss, stock.loss, atol=1e-5, rtol=1e-5)
    # the loss is the plain objective's plus weight x summed entropy over the diffusion loss's denominator
    torch.testing.assert_close(lean.loss, plain.loss + 0.5 * lean.certainty_sum / lean.counts[0].float(),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lean.diffusion_loss, plain.diffusion_loss)  # the logged CE stays the CE
    moved = 0
    for name, grad in stock_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
        moved += int(not torch.allclose(grad, plain_grads[name], atol=1e-6))
    assert moved > len(stock_grads) // 2  # the penalty reaches the LoRA weights


@pytest.mark.parametrize("key,value,expected", [
    ("certainty_weight", -1.0, "objective.certainty_weight=-1.0 must be >= 0"),
    ("certainty_temperature", 0.0, "objective.certainty_temperature=0.0 must be > 0"),
])
def test_bad_certainty_settings_name_the_key(key, value, expected):
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        ObjectiveConfig(**{key: value})
