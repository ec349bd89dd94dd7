"""LoRA placement, saving and stock reloading, and gradient checkpointing on the tiny model."""

import pytest
import torch
from peft import PeftModel

from finetune.model import LoraSettings, attach_lora, target_regex

from conftest import make_model


def randomise_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, ids, canvas):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=canvas).logits


@pytest.mark.parametrize("placement", ["shared", "decoder", "separate"])
def test_saved_adapter_reloads_with_stock_peft_to_identical_logits(tokenizer, tmp_path, placement):
    model = attach_lora(make_model(tokenizer), LoraSettings(r=4, alpha=8, placement=placement)).eval()
    randomise_lora(model)
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(1))
    canvas = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    expected = logits(model, ids, canvas)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_model(tokenizer), tmp_path).eval()  # stock peft, no re-tying
    torch.testing.assert_close(logits(reloaded, ids, canvas), expected, atol=1e-6, rtol=1e-6)
    base = logits(make_model(tokenizer), ids, canvas)
    assert (expected - base).abs().max() > 1e-3  # the adapter does something
    enc = reloaded.get_base_model().model.encoder.language_model.layers[0].self_attn.q_proj
    dec = reloaded.get_base_model().model.decoder.layers[0].self_attn.q_proj
    if placement == "decoder":
        assert not hasattr(enc, "lora_A")
    elif placement == "shared":  # both names were saved with one value
        assert torch.equal(enc.lora_A["default"].weight, dec.lora_A["default"].weight)


def test_target_regex_matches_only_text_linears(tokenizer):
    import re

    model = make_model(tokenizer)
    pattern = re.compile(target_regex(LoraSettings()))
    hits = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    assert hits and all(".layers." in n and "vision" not in n and "self_conditioning" not in n for n in hits)
    assert {n.split(".")[-1] for n in hits} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}
    layers = model.config.text_config.num_hidden_layers
    full = model.config.text_config.layer_types.count("full_attention")
    assert len(hits) == 2 * (7 * layers - full)  # encoder + decoder; full-attention layers have no v_proj


