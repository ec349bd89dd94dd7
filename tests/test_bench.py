"""bench/train_step.py: the model-FLOPs count on the real architecture (meta device) and a one-step run of the tiny
case."""

import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step", os.path.join(ROOT, "bench", "train_step.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_step"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)  # also puts bench/ on sys.path (make_26b_config)
    return module


def test_flops_of_the_real_architecture_at_chat_spark(bench):
    """3.8B active parameters per token (the published "A4B"), and the step's FLOPs against a hand count."""
    from make_26b_config import OUT
    from transformers import DiffusionGemmaConfig

    from finetune.config import ObjectiveConfig

    config = DiffusionGemmaConfig.from_pretrained(OUT)
    model = bench.lora_model(config, "meta", torch.bfloat16)
    text, c = config.text_config, config.canvas_length
    batch, tokens = bench.make_batch(2048, 4 * c - 1, 1, c, text.vocab_size, 3, 1, 0)
    objective = ObjectiveConfig()
    work = bench.Workload("spark", batch, bench.fixed_noise(batch, c, text.vocab_size, 1e-3), tokens, c, "cpu")
    flops = bench.model_flops(model, work, objective)
    h, v = text.hidden_size, text.vocab_size
    per_layer = {  # q, k, (v,) o + dense MLP + router + 8 of 128 experts
        "sliding_attention": h * (16 * 256 + 2 * 8 * 256) + 16 * 256 * h,
        "full_attention": h * (16 * 512 + 2 * 512) + 16 * 512 * h,
    }
    moe = 3 * h * 2112 + h * 128 + 8 * 3 * 704 * h
    n = sum(per_layer[t] + moe for t in text.layer_types)
    assert flops["active_params_per_token"] == n + h * v
    assert 3.7e9 < flops["active_params_per_token"] < 3.9e9
    adapted = ([(h, 4096), (h, 2048), (h, 2048), (4096, h)] * 25 + [(h, 8192), (h, 1024), (8192, h)] * 5
               + [(h, 2112), (h, 2112), (2112, h)] * 30)
    assert flops["lora_params_per_token"] == sum(16 * (i + o) for i, o in adapted)
    t_enc, sc = 2048 + 4 * c, 3 * h * text.intermediate_size
    weights = 4 * n * t_enc + 4 * (n + sc) * c + 2 * (n + sc) * c  # encoder and decoder with grad, the SC pass
    head = 2 * h * v * (2 * c + 2 * (4 * c) + 2 * c)  # canvas CE, encoder CE (fwd + bwd), SC logits + embeddings
    # the rest: attention (~11% here) and LoRA (~1%)
    assert 1.05 * (weights + head) < flops["model_flops"] < 1.2 * (weights + head)


def test_tiny_case_runs_and_both_paths_agree(bench, tmp_path, one_thread):
    out = tmp_path / "tiny.json"
    assert bench.main(["--case", "tiny", "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    stock, lean = rows["stock eager"], rows["lean eager"]
    assert stock["loss"] == pytest.approx(lean["loss"], rel=1e-5)  # same batch, same noise
    for row in (stock, lean):
        assert row["seconds"] > 0 and row["peak_gb"] >= 0 and row["tokens"] == 4 * (32 + 23)
