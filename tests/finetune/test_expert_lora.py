"""LoRA on the routed experts (finetune/expert_lora.py): peft's adapter layout, our per-expert forward."""

import copy

import pytest
import torch
from peft import PeftModel

from finetune import expert_lora
from finetune.config import LoraSettings
from finetune.errors import UserError
from finetune.model import attach_lora, load

from conftest import make_model
from test_export import randomise_lora as randomise

EXPERTS = LoraSettings(targets="attn_mlp_experts", r=4, alpha=8)


def last_experts(peft_model):
    """The decoder's last experts module's outermost wrapper (the others are alike)."""
    return expert_lora.expert_wrappers(peft_model)[-1][1]


def routed_inputs(hidden, experts=4, tokens=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    index = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=g, requires_grad=True)
    return x, index, weights


def output_and_grads(forward, outer, x, index, weights):
    """The experts' output and the gradients of a fixed scalar of it wrt input, routing weights and LoRA."""
    lora = [p for n, p in outer.named_parameters() if "lora_" in n]
    for t in (x, weights, *lora):
        t.grad = None
    y = forward(x, index, weights)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach(), x.grad.clone(), weights.grad.clone(), *(p.grad.clone() for p in lora)]


def assert_close(got, expected, rtol=1e-5):
    for a, b in zip(got, expected, strict=True):
        assert (a - b).abs().max() <= rtol * b.abs().max() + 1e-7, float((a - b).abs().max())


@pytest.fixture
def expert_model(tokenizer):
    peft_model = attach_lora(make_model(tokenizer), EXPERTS)
    randomise(peft_model)
    return peft_model


def test_each_expert_gets_its_own_lora_tied_between_encoder_and_decoder(tokenizer):
    model = attach_lora(make_model(tokenizer), LoraSettings(targets="attn_mlp_experts", r=4, expert_r=2))
    wrappers = dict(expert_lora.expert_wrappers(model))
    assert len(wrappers) == 2 * model.get_base_model().config.text_config.num_hidden_layers
    e = 4  # the tiny model's experts per layer
    for name, outer in wrappers.items():
        inner = outer.base_layer
        assert {outer.parameter_name, inner.parameter_name} == {"gate_up_proj", "down_proj"}
        for w in (outer, inner):
            assert w.r["default"] == 2 and w.num_experts == e  # lora.expert_r, one rank-2 LoRA per expert
            assert w.lora_A["default"].weight.shape[0] == 2 * e
        if ".encoder." in name:  # the same matrices as the decoder's twin: one delta for the one tied tensor
            twin = wrappers[name.replace(".encoder.language_model.layers.", ".decoder.layers.")]
            assert outer.lora_A["default"] is twin.lora_A["default"]
            assert inner.lora_B["default"] is twin.base_layer.lora_B["default"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not [n for n in trainable if "lora_" not in n]  # router and experts themselves stay frozen
    assert any("self_attn.q_proj.lora_A" in n for n in trainable)  # attn_mlp_experts keeps the attention LoRA
    only = attach_lora(make_model(tokenizer), LoraSettings(targets="experts", r=4))
    assert all(".experts." in n for n, p in only.named_parameters() if p.requires_grad)
    denoiser = attach_lora(make_model(tokenizer), LoraSettings(targets="experts", r=4, placement="decoder"))
    trained = [n for n, p in denoiser.named_parameters() if p.requires_grad]
    assert trained and all(".decoder.layers." in n and ".experts." in n for n in trained)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_our_expert_forward_matches_stock_peft_and_its_gradients(expert_model, implementation):
    outer = last_experts(expert_model)
    experts = outer.get_base_layer()
    saved = experts.config._experts_implementation
    experts.config._experts_implementation = implementation
    try:
        inputs = routed_inputs(experts.hidden_dim)
        ours = output_and_grads(outer, outer, *inputs)
        stock = output_and_grads(lambda *a: type(outer).forward(outer, *a), outer, *inputs)  # peft's parametrisation
    finally:
        experts.config._experts_implementation = saved
    assert_close(ours, stock)
    assert (ours[0] - experts(*(t.detach() for t in inputs))).abs().max() > 1e-2  # the LoRA did something


def test_our_expert_forward_keeps_no_copy_of_the_expert_weights(expert_model):
    """peft materialises W + BA for every expert and autograd keeps it; ours keeps only per-token tensors."""
    outer = last_experts(expert_model)
    experts = outer.get_base_layer()
    expert_size = experts.gate_up_proj.numel()
    weights = {p.untyped_storage().data_ptr() for p in expert_model.parameters()}

    def largest_saved(forward):
        sizes = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward(*routed_inputs(experts.hidden_dim, tokens=2))
        return max(sizes)

    assert largest_saved(lambda *a: type(outer).forward(outer, *a)) >= expert_size  # the stock way
    assert largest_saved(outer) < expert_size / 4


def test_lora_on_4_bit_experts_has_the_gradients_of_eager_on_the_dequantised_weights(tokenizer):
    pytest.importorskip("bitsandbytes")
    from finetune.quantize import quantize_experts

    quantized, reference = make_model(tokenizer), make_model(tokenizer)
    quantize_experts(quantized)
    ref_modules = dict(reference.named_modules(remove_duplicate=False))
    for name, module in quantized.named_modules(remove_duplicate=False):
        if hasattr(module, "gate_up_4bit"):
            ref_modules[name].gate_up_proj.data = module.gate_up_4bit.dequantize_all(torch.float32)
            ref_modules[name].down_proj.data = module.down_4bit.dequantize_all(torch.float32)
    reference.config.text_config._experts_implementation = "eager"
    models = [attach_lora(quantized, EXPERTS), attach_lora(reference, EXPERTS)]
    for m in models:
        randomise(m)
    outers = [last_experts(m) for m in models]
    inputs = routed_inputs(outers[1].get_base_layer().hidden_dim)
    got, expected = (output_and_grads(o, o, *inputs) for o in outers)
    assert_close(got, expected)
    # peft sized the LoRA from stand-ins that hold one element, and a cast or move keeps them that small
    models[0].to(torch.bfloat16)
    stand_in = outers[0].get_base_layer().gate_up_proj
    assert stand_in.dtype == torch.bfloat16 and stand_in.untyped_storage().nbytes() == 2


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """A saved tiny base and an expert-LoRA adapter trained on it (random LoRA), and that model."""
    tmp = tmp_path_factory.mktemp("experts")
    base_dir, adapter = tmp / "base", tmp / "adapter"
    make_model(tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = attach_lora(make_model(tokenizer), EXPERTS)
    randomise(model)
    model.save_pretrained(adapter)
    return str(base_dir), str(adapter), model.eval()


_INPUTS = torch.Generator().manual_seed(5)
IDS = torch.randint(10, 100, (2, 12), generator=_INPUTS)
CANVAS = torch.randint(10, 100, (2, 8), generator=_INPUTS)


def test_saved_expert_adapter_is_a_stock_peft_adapter(saved):
    """Stock transformers + peft (peft's own forward) and our load (our forward, re-tied) give the same logits."""
    from transformers import DiffusionGemmaForBlockDiffusion

    base_dir, adapter, trained = saved
    with torch.no_grad():
        expected = trained(input_ids=IDS, decoder_input_ids=CANVAS).logits
        stock = PeftModel.from_pretrained(DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir), adapter).eval()
        ours, _, placement = load(base_dir, "cpu", adapter=adapter)
        assert placement == "shared" and expert_lora.expert_wrappers(ours)
        for model in (stock, ours.eval()):
            got = model(input_ids=IDS, decoder_input_ids=CANVAS).logits
            assert (got - expected).abs().max() < 1e-4
        with ours.disable_adapter():  # the adapter moves the logits: the comparison above is not base vs base
            assert (ours(input_ids=IDS, decoder_input_ids=CANVAS).logits - expected).abs().max() > 1e-2


def test_an_expert_adapter_loads_onto_4_bit_experts_for_evaluation_and_chat(saved):
    """python -m eval / finetune.chat with model.quantization=experts4bit: the expert LoRA lands on the 4-bit experts
    (peft sizes it from their stand-ins) with the saved values: the model is the full-precision one with the adapter,
    its experts replaced by their dequantised values."""
    pytest.importorskip("bitsandbytes")
    base_dir, adapter, _ = saved
    model, _, _ = load(base_dir, "cpu", adapter=adapter, quantization="experts4bit")
    reference, _, _ = load(base_dir, "cpu", adapter=adapter)
    assert hasattr(last_experts(model).get_base_layer(), "gate_up_4bit")
    ref_modules = dict(reference.named_modules(remove_duplicate=False))
    for name, module in model.named_modules(remove_duplicate=False):
        if hasattr(module, "gate_up_4bit"):  # encoder and decoder twins share one tensor: set twice, same values
            ref_modules[name].gate_up_proj.data = module.gate_up_4bit.dequantize_all(torch.float32)
            ref_modules[name].down_proj.data = module.down_4bit.dequantize_all(torch.float32)
    with torch.no_grad():
        got = model.eval()(input_ids=IDS, decoder_input_ids=CANVAS).logits
        expected = reference.eval()(input_ids=IDS, decoder_input_ids=CANVAS).logits
        with model.disable_adapter():
            base = model(input_ids=IDS, decoder_input_ids=CANVAS).logits
    assert (got - expected).abs().max() < 1e-4
    assert (got - base).abs().max() > 0.1  # the adapter is on


def test_a_deep_copy_runs_its_own_experts(expert_model):
    """The forward is bound to its wrapper: a copied model (the export check casts one) uses the copy's LoRA."""
    outer = last_experts(expert_model)
    clone = copy.deepcopy(outer)
    with torch.no_grad():
        for n, p in clone.named_parameters():
            if "lora_B" in n:
                p.zero_()
    x, index, weights = (t.detach() for t in routed_inputs(outer.get_base_layer().hidden_dim))
    base = outer.get_base_layer()(x, index, weights)
    assert torch.allclose(clone(x, index, weights), base, atol=1e-6)
    assert not torch.allclose(outer(x, index, weights), base, atol=1e-3)


def test_expert_targets_refuse_dropout_and_a_bad_rank():
    with pytest.raises(UserError, match="lora.dropout=0.1 with lora.targets=experts.*set lora.dropout=0"):
        LoraSettings(targets="experts", dropout=0.1)
    with pytest.raises(UserError, match="lora.expert_r=0"):
        LoraSettings(targets="experts", expert_r=0)


def test_an_experts_implementation_without_lora_support_is_refused(tokenizer):
    model = make_model(tokenizer)
    model.config.text_config._experts_implementation = "batched_mm"
    with pytest.raises(UserError, match="model.experts_implementation=batched_mm cannot run LoRA on the experts"):
        attach_lora(model, EXPERTS)


def test_the_adapter_check_measures_each_experts_delta(expert_model):
    """eval's "did the adapter change anything" counts the expert LoRA: ||delta||_F over all experts of a tensor."""
    from eval.adapter_check import lora_delta_norms

    norms = lora_delta_norms(expert_model)
    outer = last_experts(expert_model)
    for wrapper in (outer, outer.base_layer):
        name = next(k for k in norms if k.endswith(f"decoder.layers.3.experts.{wrapper.parameter_name}[default]"))
        expected = float(expert_lora.expert_delta(wrapper, "default").norm())
        assert abs(norms[name]["delta_norm"] - expected) <= 1e-5 * expected
    assert not [k for k in norms if ".encoder." in k]  # tied: each delta listed once, under the decoder


def test_the_small_rank_fallback_is_the_same_grouped_product():
    """Below rank 8 in bf16 CUDA's grouped_mm cannot take the LoRA factors; the fallback transformers ships gets the
    same operands in the same layout (checked here on CPU, where both run)."""
    from transformers.integrations.moe import _grouped_linear

    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(10, 32, generator=g), torch.randn(4, 3, 32, generator=g)  # 4 experts, rank 3
    offsets = torch.tensor([2, 5, 5, 10], dtype=torch.int32)
    fallback = torch.ops.transformers.grouped_mm_fallback(x, a.transpose(-2, -1), offs=offsets)
    assert torch.allclose(fallback, _grouped_linear(x, a, offsets), atol=1e-5)
    for e, (lo, hi) in enumerate(zip([0, 2, 5, 5], offsets.tolist())):
        assert torch.allclose(fallback[lo:hi], x[lo:hi] @ a[e].T, atol=1e-5)


def test_a_run_with_expert_lora_resumes_bit_for_bit(tokenizer, tmp_path):
    """Checkpoints save and restore the expert LoRA (peft's adapter files) and its AdamW state: steps 3-4 after a
    resume from step 2 are those of the uninterrupted run."""
    from test_resume import lora_weights, train

    def model():
        return attach_lora(make_model(tokenizer, seed=0, init=0.02), LoraSettings(targets="attn_mlp_experts", r=4,
                                                                                   alpha=8))

    ref_trainer, ref_model = train(tokenizer, tmp_path / "ref", max_steps=4, model=model())
    trainer, resumed = train(tokenizer, tmp_path / "ref", max_steps=4, model=model(),
                             resume_from=str(tmp_path / "ref" / "checkpoint-2"))
    assert trainer.step_losses == ref_trainer.step_losses
    want, got = lora_weights(ref_model), lora_weights(resumed)
    assert any(".experts." in n for n in want) and all(torch.equal(got[n], want[n]) for n in want)
