"""finetune/emulated.py: half-precision products through fp32 on CPUs without native half matmul."""

import pytest
import torch
from test_lora import randomise_lora
from test_objective import C, batch_of

import finetune.emulated as emulated
import finetune.train as train_module
from conftest import make_model
from finetune.model import LoraSettings, attach_lora
from finetune.objective import ObjectiveConfig, diffusion_loss

aten = torch.ops.aten


@pytest.fixture
def slow_cpu(monkeypatch):
    """Every CPU a slow-half CPU, whatever this one is: the mode's path is checked on any machine."""
    monkeypatch.setattr(emulated, "slow_half", lambda device, dtype: torch.device(device).type == "cpu"
                        and dtype in emulated.HALF)


def cases(dtype):
    """(op, args, kwargs) for each op the mode covers, at shapes a step gives them (strides _grouped_mm accepts)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = r(1, 2, 8, 16), r(1, 2, 8, 16), r(1, 2, 8, 16)
    mask = torch.zeros(1, 1, 8, 8).masked_fill(torch.ones(8, 8).triu(1).bool(), float("-inf")).to(dtype)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q.float(), k.float(), v.float(),
                                                                 attn_mask=mask.float())
    return [
        (aten.mm.default, (r(8, 16), r(16, 8)), {}),
        (aten.mm.default, (r(8, 16), r(8, 16).t()), {}),  # F.linear's layout
        (aten.addmm.default, (r(8), r(8, 16), r(16, 8)), {"beta": 0.5, "alpha": 2.0}),
        (aten.bmm.default, (r(3, 8, 16), r(3, 16, 8)), {}),
        (aten.baddbmm.default, (r(3, 8, 8), r(3, 8, 16), r(3, 16, 8)), {}),
        (aten._grouped_mm.default, (r(24, 16), r(2, 16, 8), torch.tensor([8, 24], dtype=torch.int32)), {}),
        (aten._grouped_mm.default, (r(24, 16), r(2, 16, 8), torch.tensor([8, 24], dtype=torch.int32)),
         {"out_dtype": dtype}),  # (a CPU's grouped mm takes no other)
        (aten._scaled_dot_product_flash_attention_for_cpu.default, (q, k, v), {"attn_mask": mask}),
        (aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
         (r(1, 2, 8, 16), q, k, v, out.to(dtype), lse, 0.0, False), {"attn_mask": mask}),
    ]


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("dtype", emulated.HALF)
def test_each_covered_op_is_its_fp32_product_rounded_once(dtype, slow_cpu):
    """Exactly, by construction: the operands upcast, one fp32 op, the half outputs rounded once (the fp32
    log-sum-exp left as the native op gives it)."""
    for func, args, kwargs in cases(dtype):
        with emulated.Fp32Products() as mode:
            ours = as_tuple(func(*args, **kwargs))
        assert mode.rerouted == 1, func
        plain = as_tuple(func(*args, **kwargs))  # the native half kernel: its dtypes are the contract
        up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == dtype else a for a in args]
        upk = {n: a.float() if isinstance(a, torch.Tensor) and a.dtype == dtype else a for n, a in kwargs.items()}
        reference = as_tuple(func(*up, **{**upk, **({"out_dtype": None} if "out_dtype" in kwargs else {})}))
        for o, p, ref in zip(ours, plain, reference, strict=True):
            assert o.dtype == p.dtype, func
            assert torch.equal(o, ref.to(p.dtype)), func
            torch.testing.assert_close(o.float(), p.float(), atol=0.1, rtol=0.05)  # and near the half kernel


def test_fp32_and_non_cpu_tensors_pass_through_untouched(slow_cpu):
    for func, args, kwargs in cases(torch.float32):
        with emulated.Fp32Products() as mode:
            ours = as_tuple(func(*args, **kwargs))
        assert mode.rerouted == 0
        for o, p in zip(ours, as_tuple(func(*args, **kwargs))):
            assert torch.equal(o, p)
    a = torch.randn(4, 8, dtype=torch.bfloat16, device="meta")  # not a CPU: a GPU's half matmul is its own
    with emulated.Fp32Products() as mode:
        assert (a @ a.t()).dtype == torch.bfloat16
    assert mode.rerouted == 0
    assert not emulated.wanted("cpu", {torch.float32}) and not emulated.wanted("cuda", emulated.HALF)
    with emulated.fp32_products(False) as none:
        assert none is None


def test_slow_half_is_aten_own_check():
    """slow_half asks what aten asks before sending a half matmul to oneDNN; fp32 and GPUs are never slow."""
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert emulated.slow_half("cpu", torch.bfloat16) == (not native)
    assert not emulated.slow_half("cpu", torch.float32) and not emulated.slow_half("cuda", torch.bfloat16)


def lora_step(model, batch, mode_on):
    model.zero_grad()
    with emulated.fp32_products(mode_on) as mode:
        out = diffusion_loss(model.get_base_model(), batch, ObjectiveConfig(encoder_ar_weight=1.0), C,
                             generator=torch.Generator().manual_seed(3), lean=True,
                             self_conditioning=torch.tensor([True, False, True]))
        out.loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads, mode


def test_a_bf16_step_under_the_mode_agrees_with_the_plain_step_to_bf16_rounding(tokenizer, slow_cpu):
    """The tiny model in bf16, LoRA on. Its bf16 LoRA gradients are far from exact (measured: 40-60% relative
    distance, median over the matrices, from the same step in fp32 arithmetic on the same bf16 weights: long
    cancelling sums rounded at every product), so the mode's step is held to the plain bf16 step's own distance from
    that fp32 step, not to a fixed digit: no further from it (x1.5 margin), and the loss within bf16 rounding."""
    import copy
    import statistics

    model = attach_lora(make_model(tokenizer).to(torch.bfloat16), LoraSettings(r=4, alpha=8, placement="shared"))
    randomise_lora(model)
    model.train()
    batch = batch_of(tokenizer, 3)
    exact, exact_grads, _ = lora_step(copy.deepcopy(model).float(), batch, False)
    plain, plain_grads, _ = lora_step(model, batch, False)
    ours, grads, mode = lora_step(model, batch, True)
    assert mode.rerouted > 50  # attention, experts, dense linears and their backward went through it
    torch.testing.assert_close(ours.loss, plain.loss, atol=0, rtol=2e-2)
    torch.testing.assert_close(ours.loss.float(), exact.loss.float(), atol=0, rtol=2e-2)

    def distances(g):
        return [float((g[n] - ref).norm() / ref.norm()) for n, ref in exact_grads.items()]

    assert len(exact_grads) > 10 and all(g.abs().max() > 0 for g in grads.values())
    ours_d, plain_d = distances(grads), distances(plain_grads)
    assert statistics.median(ours_d) <= 1.5 * statistics.median(plain_d)
    assert max(ours_d) <= 1.5 * max(plain_d)


@pytest.mark.parametrize("dtype,bf16,expected", [(torch.bfloat16, False, True), (torch.float32, True, True),
                                                 (torch.float32, False, False)])
def test_the_trainer_steps_under_the_mode_only_where_products_are_half(tokenizer, tmp_path, monkeypatch, slow_cpu,
                                                                       dtype, bf16, expected):
    """bf16 weights or bf16 autocast on a slow-half CPU: forward and backward inside the mode; fp32: not entered."""
    entered = []
    real = emulated.fp32_products

    def spy(enabled=True):
        entered.append(enabled)
        return real(enabled)

    monkeypatch.setattr(train_module.emulated, "fp32_products", spy)
    model = attach_lora(make_model(tokenizer).to(dtype), LoraSettings(r=4, alpha=8, placement="shared"))
    _, examples = batch_of(tokenizer, 2, with_examples=True)
    settings = train_module.TrainSettings(max_steps=1, batch_size=2, warmup_steps=0, logging_steps=1,
                                          report_to="none", disable_tqdm=True)
    trainer = train_module.fit(model, examples, settings, ObjectiveConfig(), C, tokenizer.pad_token_id,
                               str(tmp_path), bf16=bf16)
    assert entered == [expected] and trainer.state.global_step == 1
