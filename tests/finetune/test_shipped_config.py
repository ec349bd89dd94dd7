"""The shipped 26B-A4B config (finetune/models/diffusiongemma-26b-a4b-it): it loads, bench/make_26b_config.py
reproduces it, and it builds the published layer shapes. Meta device only: nothing is allocated."""

import importlib.util
import json
import os

import pytest
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(ROOT, "finetune", "models", "diffusiongemma-26b-a4b-it")

H, V, E, TOP_K, I_MOE, I_DENSE = 2816, 262_144, 128, 8, 704, 2112


@pytest.fixture(scope="module")
def maker():
    spec = importlib.util.spec_from_file_location("make_26b_config", os.path.join(ROOT, "bench", "make_26b_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config():
    return DiffusionGemmaConfig.from_pretrained(SHIPPED)


def on_meta(config):
    with torch.device("meta"):
        return DiffusionGemmaForBlockDiffusion(config)


def unique_numel(module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def read_json(path):
    with open(path) as f:
        values = json.load(f)
    values.pop("transformers_version")
    return values


def test_the_script_reproduces_the_shipped_files(maker, tmp_path):
    maker.main(["--out", str(tmp_path)])
    for name in ("config.json", "generation_config.json"):
        ours, shipped = read_json(tmp_path / name), read_json(os.path.join(SHIPPED, name))
        assert ours == shipped, f"{name} is stale: rerun python bench/make_26b_config.py"


def test_published_values(config):
    text = config.text_config
    assert config.canvas_length == 256 and config.tie_word_embeddings
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.vocab_size) == (30, H, 16, V)
    assert (text.num_experts, text.top_k_experts, text.moe_intermediate_size, text.intermediate_size) == \
        (E, TOP_K, I_MOE, I_DENSE)
    assert (text.sliding_window, text.final_logit_softcapping, text.rms_norm_eps) == (1024, 30.0, 1e-6)
    assert text.hidden_activation == "gelu_pytorch_tanh" and text.attention_k_eq_v is True
    assert text.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 5
    for i, kind in enumerate(text.layer_types):
        layer = text.per_layer_config[i]
        assert (layer.head_dim, layer.num_key_value_heads) == ((512, 2) if kind == "full_attention" else (256, 8))
    assert text.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 10_000.0}
    assert text.rope_parameters["full_attention"] == {
        "rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}


def test_generation_config_holds_the_samplers_defaults():
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    shipped = DiffusionGemmaGenerationConfig.from_pretrained(SHIPPED)
    for key, value in DiffusionGemmaGenerationConfig._get_default_generation_params().items():
        assert getattr(shipped, key) == value, key


def test_one_layer_slice_has_the_real_layer_sizes(maker, config):
    sliced = maker.slice_config(config, 1)
    assert sliced.text_config.layer_types == ["full_attention"]  # the last layer is always full attention
    layer = on_meta(sliced).model.encoder.language_model.layers[0]
    attn = layer.self_attn
    assert attn.v_proj is None  # V = K on full-attention layers
    assert (attn.q_proj.weight.numel(), attn.k_proj.weight.numel(), attn.o_proj.weight.numel()) == \
        (H * 16 * 512, H * 2 * 512, 16 * 512 * H)
    assert unique_numel(layer.mlp) == 3 * H * I_DENSE
    assert unique_numel(layer.experts) == E * (2 * I_MOE * H + H * I_MOE)
    assert unique_numel(layer.router) == E * H + H + E


def test_two_layer_slice_has_a_sliding_layer(maker, config):
    sliced = maker.slice_config(config, 2)
    assert sliced.text_config.layer_types == ["sliding_attention", "full_attention"]
    attn = on_meta(sliced).model.encoder.language_model.layers[0].self_attn
    assert (attn.q_proj.weight.numel(), attn.k_proj.weight.numel(), attn.v_proj.weight.numel()) == \
        (H * 16 * 256, H * 8 * 256, H * 8 * 256)


def test_full_model_is_25_billion_parameters_with_encoder_and_decoder_tied(config):
    model = on_meta(config)
    total = unique_numel(model)
    assert 25.0e9 < total < 26.0e9, total
    experts = sum(unique_numel(layer.experts) for layer in model.model.encoder.language_model.layers)
    assert experts == 30 * E * 3 * I_MOE * H  # 22.8B of the 25.4B
    # one stack run twice: the decoder's layers are the encoder's parameters, not a second copy
    assert model.model.decoder.layers[0].experts.gate_up_proj is \
        model.model.encoder.language_model.layers[0].experts.gate_up_proj
