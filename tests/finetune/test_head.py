"""The chunked soft-capped head (finetune/head.py) against the full-logits path it replaces."""

import pytest
import torch
import torch.nn.functional as F
from test_lora import randomise_lora
from test_objective import batch_of

import finetune.head as head
from finetune.emulated import HALF
from finetune.model import LoraSettings, attach_lora
from finetune.objective import ObjectiveConfig, diffusion_loss


def full_path(hidden, weight, targets, cap):
    logits = F.linear(hidden, weight).float()
    logits = torch.tanh(logits / cap) * cap if cap else logits
    return F.cross_entropy(logits, targets, reduction="none")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 rows x 16 columns on CPU, bands of 4 rows elsewhere: many chunks, the last ones short."""
    monkeypatch.setattr(head, "CPU_TILE", (4, 16))
    monkeypatch.setattr(head, "CHUNK_BYTES", 4 * 50 * 4)


@pytest.fixture(params=["half", "fp32"])
def half_products(request, monkeypatch):
    """Half-precision tile products as this CPU would run them, forced either way: in the half dtype (a GPU, a CPU
    with native bf16) or in fp32 rounded once (`finetune.emulated.slow_half`), so both paths are checked anywhere."""
    monkeypatch.setattr(head, "slow_half", lambda device, dtype: request.param == "fp32" and dtype in HALF)
    return request.param


@pytest.mark.parametrize("cap", [30.0, 2.0, None])
def test_chunked_cross_entropy_matches_full_logits_in_loss_and_both_gradients(cap, small_tiles):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(37, 16, generator=g) * 3).requires_grad_()
    head_layer = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.rand(37, generator=g)  # a weighted sum, as inverse_t weighting makes it
    lean = head.softcapped_cross_entropy(head_layer, hidden, targets, cap)
    lean_grads = torch.autograd.grad((lean * upstream).sum(), [hidden, head_layer.weight])
    full = full_path(hidden, head_layer.weight, targets, cap)
    full_grads = torch.autograd.grad((full * upstream).sum(), [hidden, head_layer.weight])
    torch.testing.assert_close(lean, full, atol=1e-5, rtol=1e-5)
    for ours, ref in zip(lean_grads, full_grads):
        assert ref.abs().max() > 1e-3  # the comparison is of something
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_chunked_cross_entropy_in_bf16_rounds_like_the_models_head(small_tiles, half_products):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, 32, generator=g).bfloat16().requires_grad_()
    head_layer = torch.nn.Linear(32, 300, bias=False).bfloat16().requires_grad_(False)
    targets = torch.randint(0, 300, (20,), generator=g)
    lean = head.softcapped_cross_entropy(head_layer, hidden, targets, 30.0)
    (lean_grad,) = torch.autograd.grad(lean.sum(), hidden)
    full = full_path(hidden, head_layer.weight, targets, 30.0)
    (full_grad,) = torch.autograd.grad(full.sum(), hidden)
    assert lean.dtype == full.dtype == torch.float32 and lean_grad.dtype == torch.bfloat16
    torch.testing.assert_close(lean, full, atol=1e-5, rtol=1e-5)  # the same bf16 matmul, then fp32
    torch.testing.assert_close(lean_grad, full_grad, atol=2e-2, rtol=2e-2)  # bf16: a rounding step apart


@pytest.mark.parametrize("temperature", [None, [0.4, 0.8]])
def test_lean_objective_equals_stock_loss_and_lora_gradients(tiny_model, tokenizer, small_tiles, temperature):
    """Self-conditioning for some examples, the encoder's next-token loss on: every loss and every LoRA gradient
    of the chunked path equals the full-logits path's, with the self-conditioning logits raw or over a temperature
    per example (the stock path divides full logits, as generate() does)."""
    model = attach_lora(tiny_model, LoraSettings(r=4, alpha=8, placement="shared"))
    randomise_lora(model)  # B starts at zero: give every LoRA matrix a value that matters
    model.train()
    base = model.get_base_model()
    batch = batch_of(tokenizer, 4)
    cfg = ObjectiveConfig(encoder_ar_weight=1.0, self_conditioning_temperature=temperature)
    sc = torch.tensor([True, False, True, True])
    tau = torch.tensor([0.4, 0.5, 0.8, 0.6])

    def run(lean, self_conditioning=sc, cfg=cfg):
        model.zero_grad()
        out = diffusion_loss(base, batch, cfg, 8, generator=torch.Generator().manual_seed(3), lean=lean,
                             self_conditioning=self_conditioning, temperature=tau)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out, grads

    lean, lean_grads = run(True)
    stock, stock_grads = run(False)
    assert lean.ar_loss > 0 and lean.counted_tokens > 10
    torch.testing.assert_close(lean.per_target_loss, stock.per_target_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean.ar_loss, stock.ar_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean.loss, stock.loss, atol=1e-5, rtol=1e-5)
    assert lean_grads.keys() == stock_grads.keys() and len(lean_grads) > 10
    for name, grad in stock_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(lean_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # the self-conditioning signal reached the lean path's decoder: without it the losses differ
    unconditioned, _ = run(True, torch.zeros(4, dtype=torch.bool))
    assert (unconditioned.per_target_loss - lean.per_target_loss)[sc].abs().min() > 1e-4
    if temperature is not None:  # and the temperature reached it: raw logits give other losses
        raw, _ = run(True, cfg=ObjectiveConfig(encoder_ar_weight=1.0))
        assert (raw.per_target_loss - lean.per_target_loss)[sc].abs().min() > 1e-5


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_soft_embeddings_equal_the_decoders_own_in_every_dtype(dtype, scaled, small_tiles, half_products):
    """softmax(logits) @ E * scale as DiffusionGemmaDecoderModel builds it from full logits (scaled: from the logits
    over a temperature per row, what generate() hands it). float16 is the trap: exponentials shifted by the cap
    underflow there, so the running max is used."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 32, generator=g).to(dtype)
    embed = torch.nn.Embedding(300, 32).to(dtype).requires_grad_(False)
    embed.embed_scale = torch.tensor(32**0.5)
    head_layer = torch.nn.Linear(32, 300, bias=False).to(dtype)
    head_layer.weight = embed.weight  # tied, as in the model
    tau = torch.linspace(0.4, 0.8, 9) if scaled else None
    ours = head.soft_embeddings(head_layer, embed, hidden, 30.0, tau).float()
    logits = F.linear(hidden, head_layer.weight).float()
    logits = torch.tanh(logits / 30.0) * 30.0
    logits = (logits / tau[:, None] if scaled else logits).to(dtype)
    reference = (logits.softmax(-1, dtype=torch.float32).to(dtype) @ embed.weight) * embed.embed_scale.to(dtype)
    assert reference.float().abs().max() > 0.1
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(ours, reference.float(), atol=tolerance, rtol=tolerance)


def test_chunked_cross_entropy_under_cpu_autocast_rounds_like_the_models_head(small_tiles, half_products):
    """hardware.bf16 on a CPU: fp32 weights, bf16 autocast. The model's head then multiplies bf16-rounded operands;
    the fp32 tile products must round them first too, not multiply the fp32 originals."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(20, 32, generator=g).requires_grad_()
    head_layer = torch.nn.Linear(32, 300, bias=False).requires_grad_(False)
    targets = torch.randint(0, 300, (20,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = head.softcapped_cross_entropy(head_layer, hidden, targets, 30.0)
        full = full_path(hidden, head_layer.weight, targets, 30.0)
    exact = full_path(hidden, head_layer.weight, targets, 30.0)
    assert (full - exact).abs().max() > 1e-3  # autocast did round: the comparison below is of something
    torch.testing.assert_close(lean, full, atol=1e-5, rtol=1e-5)
