"""model.quantization loads: the experts are quantised to 4 bits as the checkpoint streams in
(finetune/quantized_load.py), giving the model that loading it whole and then quantising gives, without ever holding
the bf16 model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_safe_loading import CANVAS, OTHER, REPO, hub  # noqa: F401 (hub: the fake hub cache fixture)

from conftest import ROOT, make_model
from finetune.errors import UserError
from finetune.model import attach_lora, base_commit, load_model, text_layers
from finetune.quantize import quantize_dense, quantize_experts

F32 = torch.float32


def logits(model, grad=False):
    g = torch.Generator().manual_seed(1)
    vocab, canvas_length = model.config.text_config.vocab_size, model.config.canvas_length
    ids = torch.randint(5, vocab, (2, 20), generator=g)
    canvas = torch.randint(5, vocab, (2, canvas_length), generator=g)
    with torch.set_grad_enabled(grad):
        return model(input_ids=ids, decoder_input_ids=canvas).logits


def then_quantize(path, **kwargs):
    model = load_model(path, F32, "cpu", experts="eager", **kwargs)
    quantize_experts(model)
    return model


def experts_of(model):
    return [layer.experts for layer in text_layers(model)]


def storages(module):
    return module.gate_up_4bit, module.down_4bit


def assert_same_model(streamed, reference):
    """Same function and same state: logits, every remaining tensor (non-persistent buffers included), ties."""
    torch.testing.assert_close(logits(streamed), logits(reference), rtol=0, atol=0)
    mine, theirs = dict(streamed.named_buffers()), dict(reference.named_buffers())
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    mine, theirs = streamed.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert not [n for n, t in [*streamed.named_parameters(), *streamed.named_buffers()] if t.device.type == "meta"]
    for target, source in reference.all_tied_weights_keys.items():
        assert streamed.get_parameter(target) is streamed.get_parameter(source), target
    assert streamed.all_tied_weights_keys == reference.all_tied_weights_keys
    for ours, ref in zip(experts_of(streamed), experts_of(reference)):
        assert not ours._parameters and all(torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
                                            for a, b in zip(storages(ours), storages(ref)))


def test_a_sharded_checkpoint_streams_into_the_model_load_then_quantize_gives(tokenizer, tmp_path):
    make_model(tokenizer).save_pretrained(tmp_path / "base", max_shard_size="100KB")
    assert len([f for f in os.listdir(tmp_path / "base") if f.endswith(".safetensors")]) > 5
    model = load_model(str(tmp_path / "base"), F32, "cpu", "experts4bit", experts="eager")
    assert_same_model(model, then_quantize(str(tmp_path / "base")))
    # the encoder's experts are the decoder's: one 4-bit storage each, used by both passes
    n = len(experts_of(model)) // 2
    for enc, dec in zip(experts_of(model)[:n], experts_of(model)[n:]):
        assert all(a is b for a, b in zip(storages(enc), storages(dec)))
    # nothing of transformers' quantizer stays behind: the model is what quantize_experts leaves, and a saved config
    # names no quantization method another loader would look for
    assert not [a for a in ("hf_quantizer", "quantization_method", "is_quantized") if hasattr(model, a)]
    assert "quantization_config" not in model.config.to_dict() and "finetune" not in model.config.to_json_string()
    # LoRA goes on as on any base, and trains through the 4-bit experts
    from finetune.config import LoraSettings

    peft_model = attach_lora(model, LoraSettings(r=2, alpha=4)).train()
    logits(peft_model.get_base_model(), grad=True).float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def rewrite_experts(path, how):
    """The checkpoint's expert tensors under the encoder's names instead (transformers ties the decoder to them), or
    under both (a checkpoint saved untied: equal, or not), or under neither (missing: transformers initialises)."""
    weights = load_file(path / "model.safetensors")
    out = {k: v for k, v in weights.items() if ".experts." not in k}
    for key, value in weights.items():
        if ".experts." in key:
            encoder = key.replace("model.decoder.", "model.encoder.language_model.")
            if how in ("decoder", "both", "differ"):
                out[key] = value
            if how in ("encoder", "both"):
                out[encoder] = value.clone()
            if how == "differ":
                out[encoder] = value + 0.05
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("how", ["encoder", "both", "differ", "missing"])
def test_every_way_a_checkpoint_can_hold_the_tied_experts_loads_as_from_pretrained_ties_it(tokenizer, tmp_path, how):
    make_model(tokenizer).save_pretrained(tmp_path)
    rewrite_experts(tmp_path, how)
    torch.manual_seed(0)  # "missing": both routes initialise the absent experts from the same seed
    model = load_model(str(tmp_path), F32, "cpu", "experts4bit", experts="eager")
    torch.manual_seed(0)
    assert_same_model(model, then_quantize(str(tmp_path)))
    n = len(experts_of(model)) // 2
    shared = [storages(enc)[0] is storages(dec)[0] for enc, dec in zip(experts_of(model)[:n], experts_of(model)[n:])]
    assert all(shared) if how != "differ" else not any(shared)  # untied copies that differ stay two, as transformers


def test_all4bit_also_quantises_the_dense_linears_as_quantize_dense_does(tokenizer, tmp_path):
    make_model(tokenizer).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), F32, "cpu", "all4bit", experts="eager")
    reference = then_quantize(str(tmp_path))
    quantize_dense(reference)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)
    import bitsandbytes as bnb

    decoder = model.model.decoder.layers[0].self_attn.q_proj
    encoder = model.model.encoder.language_model.layers[0].self_attn.q_proj
    assert isinstance(decoder, bnb.nn.Linear4bit) and decoder.weight is encoder.weight


def test_a_hub_base_streams_in_at_its_revision(hub, tokenizer):  # noqa: F811
    model = load_model(REPO, F32, "cpu", "experts4bit", revision="v1")
    assert base_commit(model) == OTHER and model.config.canvas_length == CANVAS[OTHER]


def test_refusals_are_one_line(tokenizer, tmp_path):
    make_model(tokenizer).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="model.quantization='int4': use one of none, experts4bit, all4bit"):
        load_model(str(tmp_path), F32, "cpu", "int4")
    with pytest.raises(UserError, match="model.revision=.main. is set but .* is a local directory"):
        load_model(str(tmp_path), F32, "cpu", "experts4bit", revision="main")
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="holds only pickled weights"):
        load_model(str(tmp_path), F32, "cpu", "experts4bit")


def mid_config(tokenizer, layers, experts, hidden, moe, dense):
    """The tiny architecture widened until the experts are nearly all of it, in many small tensors."""
    from transformers import DiffusionGemmaConfig

    from finetune.tiny import build_config

    base = build_config(tokenizer, canvas_length=16)
    text = base.text_config.to_dict()
    for key in ("per_layer_config", "model_type", "transformers_version"):
        text.pop(key, None)
    text.update(num_hidden_layers=layers, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
                hidden_size=hidden, intermediate_size=dense, moe_intermediate_size=moe, num_experts=experts,
                head_dim=hidden // 4, global_head_dim=hidden // 2, initializer_range=0.1)
    top = {k: v for k, v in base.to_dict().items() if k not in ("text_config", "model_type", "transformers_version")}
    return DiffusionGemmaConfig(**top, text_config=text)


# glibc keeps freed memory as it sees fit; fixed thresholds make RSS follow the tensors alive (as in test_plan.py)
MEASURE = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def probe(path, how, *flags):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "finetune", "quantized_load_probe.py"),
                             str(path), how, *flags], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=MEASURE)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_mid_size_load_peaks_near_its_quantised_size_never_the_bf16_model(tokenizer, tmp_path):
    """40 layers of 16 experts (hidden 128, 256 wide): 66M parameters, 95% experts, 132 MB in bf16, in 20 MB shards,
    no tensor over 2 MB. Measured on CPU (MB, growth over the process before the load): streamed, peak 71 = 55
    resident once loaded (42 of it tensors) + 16 (one expert tensor read and quantised: bitsandbytes' CPU kernel
    alone needs 15 for it). Load then quantize (`python tests/finetune/quantized_load_probe.py DIR then_quantize`,
    not run here) peaks at 193 and stays at 180: the 132 MB checkpoint stays mapped while its tensors live."""
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(mid_config(tokenizer, 40, 16, 128, 256, 64)).to(torch.bfloat16)
    checkpoint = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert experts > 0.9 * checkpoint
    model.save_pretrained(tmp_path, max_shard_size="20MB")
    del model
    numbers = {"checkpoint": checkpoint, "largest tensor": largest, **probe(tmp_path, "streamed", "--compare")}
    print(json.dumps(numbers))
    assert numbers["max_abs_diff"] == 0, numbers  # the model load-then-quantize gives
    # well under the bf16 route, which holds at least the whole bf16 checkpoint before quantising
    assert numbers["peak"] < 0.65 * checkpoint, numbers
    # near the quantised model: above what stays resident once loaded, only one bf16 tensor and the quantiser's work
    # on it (bitsandbytes' CPU kernel takes about 7 times the tensor's bytes)
    assert numbers["peak"] - numbers["end"] < numbers["quantize_one"] + largest + 8 * 2**20, numbers
    assert numbers["end"] < numbers["held"] + 16 * 2**20, numbers  # module objects and allocator: not tensors


def test_without_bitsandbytes_a_quantised_run_is_refused_saying_what_to_install(monkeypatch):
    import importlib.util

    from finetune.model import check_quantization

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match=r'experts4bit needs bitsandbytes: pip install -e ".\[quant\]"'):
        check_quantization("experts4bit")
    check_quantization("none")  # the default needs nothing
