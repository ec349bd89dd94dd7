"""The memory planner (finetune/plan.py) against measurement, its report, and training's refusal to start a run
that cannot fit."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_one_line_error

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# glibc keeps freed memory mapped as it sees fit (its mmap threshold adapts to what was freed), which moves RSS by
# hundreds of MB from run to run; a fixed threshold makes RSS follow the tensors a step holds, what a plan predicts
MEASURE = {**ENV, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def test_the_certainty_penalty_is_planned_as_its_own_part_on_the_26b_config():
    """objective=fast keeps three numbers per scored row (it shares the loss's gathered hidden rows) and a larger
    head chunk: a part of the plan of exactly that size, absent when certainty_weight is 0."""
    from finetune.config import compose
    from finetune.plan import plan

    plain, fast = (plan(compose(["recipe=chat_spark", "hardware=dgx_spark", *o])) for o in ([], ["objective=fast"]))
    parts = dict((name, size) for name, size, _ in fast.parts)
    assert "certainty penalty" not in dict((name, size) for name, size, _ in plain.parts)
    tokens = 1 * 256  # the Spark profile: batch 1, one 256-token canvas per step (data.supervise=last)
    rows = 256 * 2**20 // (4 * 262144)  # the GPU chunk: 256 MiB of fp32 logits over the full vocabulary
    assert parts["certainty penalty"] == tokens * 9 + rows * 262144 * 4
    assert fast.peak - plain.peak == parts["certainty penalty"]


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory, tokenizer):
    """A mid-size DiffusionGemma where the model dominates (hidden 512, 4 layers, 32 experts of 256, top 4,
    vocabulary 32,000: 77M parameters, 0.3 GB in fp32), saved as a checkpoint the way a real base is loaded."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from make_26b_config import slice_config
    from transformers import DiffusionGemmaForBlockDiffusion

    from finetune.tiny import build_config

    config = slice_config(build_config(tokenizer, canvas_length=32), 4, hidden_size=512, intermediate_size=1024,
                          moe_intermediate_size=256, num_experts=32, top_k_experts=4, vocab_size=32000,
                          num_attention_heads=8, head_dim=64, num_key_value_heads=4, sliding_window=512)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mid")
    DiffusionGemmaForBlockDiffusion(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def probe(mid_model):
    """probe(settings): the plan_probe.py numbers for these settings on the mid model, measured once per module (the
    4-bit test's unquantised SMALL_STEP is the first parametrized case's measurement)."""
    measured = {}

    def numbers(settings) -> dict:
        key = tuple(settings)
        if key not in measured:
            measured[key] = run_probe(mid_model, settings)
        return measured[key]

    return numbers


def run_probe(mid_model, settings) -> dict:
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "finetune", "plan_probe.py"),
                             json.dumps([f"model.name_or_path={mid_model}", *settings])],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=MEASURE)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


SMALL_STEP = ["data.max_prompt_tokens=256", "data.max_response_canvases=2", "train.batch_size=2"]  # weights ~ 60%


@pytest.mark.parametrize("settings", [
    SMALL_STEP,
    ["data.max_prompt_tokens=1024", "data.max_response_canvases=4", "train.batch_size=2",
     "train.gradient_checkpointing=true"],  # checkpointed: kept inputs, one layer recomputed
    ["data.max_prompt_tokens=512", "train.batch_size=2", "lora.placement=decoder",
     "objective.self_conditioning_p=0"],  # a frozen encoder keeps nothing
    [*SMALL_STEP, "lora.targets=attn_mlp_experts"],  # one LoRA per expert: its weights, AdamW and activations
])
def test_predicted_peak_is_within_15_percent_of_measured_rss_growth(probe, settings):
    numbers = probe(settings)
    ratio = numbers["predicted"] / numbers["measured"]
    assert 0.85 <= ratio <= 1.15, (ratio, numbers)
    assert numbers["parts"]["weights: experts"] > 0.15 * numbers["predicted"]  # a model-dominated config


def test_4_bit_experts_lower_the_measured_peak_by_the_planned_amount_within_15_percent(probe):
    """The same step with bf16-loaded (here fp32) and 4-bit experts: the planner's drop against the measured one."""
    pytest.importorskip("bitsandbytes")
    full, four = probe(SMALL_STEP), probe([*SMALL_STEP, "model.quantization=experts4bit"])
    planned, measured = full["predicted"] - four["predicted"], full["measured"] - four["measured"]
    assert 0.85 <= planned / measured <= 1.15, (planned, measured, full, four)
    assert 0.85 <= four["predicted"] / four["measured"] <= 1.15, four


def plan_command(capsys, *args):
    """`python -m finetune.plan ARGS` in this process (its imports are already paid for): (exit code, stdout)."""
    from finetune.plan import main

    code = main(list(args))
    return code, capsys.readouterr().out


def test_chat_spark_fits_the_spark_with_a_breakdown(capsys):
    code, out = plan_command(capsys, "recipe=chat_spark", "hardware=dgx_spark")
    assert code == 0, out
    for part in ("weights: dense", "weights: experts", "weights: embeddings/head", "weights: vision tower",
                 "LoRA weights + gradients + AdamW state", "activations: encoder", "activations: decoder",
                 "KV cache", "logits and loss buffers", "self-conditioning", "CUDA context"):
        assert part in out, part
    experts = next(line for line in out.splitlines() if "weights: experts" in line)
    assert "45.68 GB" in experts  # 30 layers x 128 experts x 3 x 704 x 2816 bf16: the published shape
    assert out.splitlines()[-1].startswith("fits: ")


def test_chat_rtx_fits_a_32_gb_card_under_30_gb_with_4_bit_experts(capsys):
    code, out = plan_command(capsys, "recipe=chat_rtx", "hardware=rtx_5090")
    assert code == 0, out
    assert "on rtx_5090 (cuda)" in out and "NF4, each expert block-wise (model.quantization=experts4bit)" in out
    experts = next(line for line in out.splitlines() if "weights: experts" in line)
    assert "12.85 GB" in experts  # 45.68 GB of bf16 experts at 4.5 bits a value
    verdict = out.splitlines()[-1]
    assert verdict.startswith("fits: ") and float(verdict.split()[1]) < 30, verdict


def test_expert_lora_on_the_rtx_5090_is_planned_with_its_share_of_the_peak(capsys):
    """The issue's command: the verdict says what LoRA on the 128 experts costs; the count is the layout's own
    (30 layers x 128 experts x r x (2816 + 1408 + 704 + 2816) fp32 values, with gradients and AdamW's moments)."""
    code, out = plan_command(capsys, "recipe=chat_rtx", "hardware=rtx_5090", "lora.targets=attn_mlp_experts")
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.strip().startswith("expert LoRA weights"))
    assert f"{30 * 128 * 16 * (2816 + 1408 + 704 + 2816):,} fp32 parameters" in line
    verdict = out.splitlines()[-1]
    share = float(verdict.split("; expert LoRA ")[1].split(" GB")[0])
    assert 30 * 128 * 16 * 7744 * 16 / 1e9 < share < 8.0, verdict  # its weights, grads, AdamW and a few activations
    _, lean = plan_command(capsys, "recipe=chat_rtx", "hardware=rtx_5090", "lora.targets=attn_mlp_experts",
                           "lora.expert_r=4")
    assert float(lean.splitlines()[-1].split("; expert LoRA ")[1].split(" GB")[0]) < share / 3.5


def test_on_a_24_gb_card_the_plan_says_what_fits_and_why_nothing_does_below(capsys):
    code, out = plan_command(capsys, "recipe=chat_rtx", "hardware=rtx_4090")
    assert code == 0 and out.splitlines()[-1].startswith("fits: "), out
    assert "NF4 linears (model.quantization=all4bit)" in out
    code, out = plan_command(capsys, "recipe=chat_rtx", "hardware=rtx_4090", "model.quantization=none")
    assert "does not fit" in out and "model.quantization=experts4bit" in out  # the change that makes it fit
    code, out = plan_command(capsys, "recipe=chat_rtx", "hardware=rtx_4090", "hardware.memory_gb=12")
    assert "no change here makes it fit" in out and "why: the frozen weights alone are" in out


def test_a_smaller_prompt_is_suggested_when_it_is_what_makes_a_run_fit():
    from finetune.config import compose
    from finetune.plan import plan, report

    cfg = compose(["recipe=tiny", "train.batch_size=16", "data.max_prompt_tokens=1024"])
    full = plan(cfg).peak
    cfg = compose(["recipe=tiny", "train.batch_size=16", "data.max_prompt_tokens=1024",
                   f"hardware.memory_gb={0.7 * full / 1e9}"])
    text = report(cfg, plan(cfg))
    assert "does not fit" in text and "changes that make it fit" in text
    fitting = [line for line in text.splitlines()[text.splitlines().index(
        "changes that make it fit, smallest first (predicted total):") + 1:]]
    assert fitting and all(float(line.split(" GB")[0].split()[-1]) * 1e9 < 0.7 * full for line in fitting)


def test_training_refuses_a_run_that_cannot_fit_before_it_loads_and_plan_enforce_false_lets_it(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "finetune", "recipe=tiny", "hardware.memory_gb=0.5",
                             f"output_dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=ENV)
    assert_one_line_error(result, "does not fit")
    assert "plan.enforce=false" in result.stderr and "python -m finetune.plan" in result.stderr
    assert not run_dir.exists()  # refused before anything was written
    from finetune.__main__ import check

    assert check(["recipe=tiny", "hardware.memory_gb=0.5", "plan.enforce=false", f"output_dir={run_dir}"]) == 0


def test_on_a_gpu_the_plan_uses_what_the_device_has_free_when_that_is_less_than_the_profile(monkeypatch):
    """A Spark reports ~102 GiB free to CUDA after boot, not its profile's 115 GB: the plan takes the smaller and
    says which it used; a profile below what the card has free keeps the profile's."""
    import finetune.model  # noqa: F401  (peft, then bitsandbytes, read torch.cuda once at import: before the patch)
    from finetune import plan as planner
    from finetune.config import compose

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GB10")
    free = int(102 * 2**30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, int(119.7 * 2**30)))
    spark = planner.plan(compose(["recipe=chat_spark", "hardware=dgx_spark"]))
    assert spark.memory == free and "free on NVIDIA GB10 now" in planner.verdict(spark)
    assert "hardware.memory_gb=115" in planner.verdict(spark)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(130e9), int(139e9)))
    spark = planner.plan(compose(["recipe=chat_spark", "hardware=dgx_spark"]))
    assert spark.memory == 115e9 and "free on" not in planner.verdict(spark)


def test_a_plan_over_by_less_than_the_planners_error_warns_and_the_run_goes_on(capsys):
    """Within PLAN_ERROR of the prediction a verdict cannot tell fit from not: training is told, not refused;
    further over, plan.enforce still refuses."""
    from finetune.config import compose
    from finetune.errors import UserError
    from finetune.plan import PLAN_ERROR, plan, refuse_if_it_cannot_fit

    peak = plan(compose(["recipe=tiny"])).peak
    near = compose(["recipe=tiny", f"hardware.memory_gb={peak * (1 - PLAN_ERROR / 2) / 0.95 / 1e9}"])
    assert refuse_if_it_cannot_fit(near).close
    assert "may not fit" in capsys.readouterr().out
    far = compose(["recipe=tiny", f"hardware.memory_gb={peak * (1 - 2 * PLAN_ERROR) / 0.95 / 1e9}"])
    with pytest.raises(UserError, match="does not fit"):
        refuse_if_it_cannot_fit(far)


def test_supervise_all_is_planned_with_a_canvas_per_supervised_turn(capsys):
    """data.supervise=all scores every assistant turn, each on its own canvas of one decoder pass: the plan counts
    the data's most turns in one example (K), not one canvas (an enforced plan then passed runs that could not
    fit)."""
    from finetune.config import compose
    from finetune.plan import data_turns, plan

    cfg = compose(["recipe=tiny", "data.train=tiny:followup", "data.supervise=all", "train.batch_size=4"])
    turns, note = data_turns(cfg)
    assert turns == 2 and "2 canvases per example" in note
    parts = {k: dict((n, b) for n, b, _ in plan(cfg, k).parts) for k in (1, 2, 3)}
    assert parts[2]["self-conditioning"] == 2 * parts[1]["self-conditioning"]
    # the decoder pass (the real objective's decode on meta) keeps per-canvas tensors on top of its attention over
    # the encoder's cache, which does not grow with K: linear in K, above one canvas
    growth = [parts[k + 1]["activations: decoder"] - parts[k]["activations: decoder"] for k in (1, 2)]
    assert growth[0] > 0 and growth[1] == pytest.approx(growth[0], rel=0.01), growth
    assert data_turns(compose(["recipe=tiny", "data.train=tiny:followup"]))[0] == 1  # supervise=last: one
    code, out = plan_command(capsys, "recipe=tiny", "data.train=tiny:followup", "data.supervise=all")
    assert code == 0 and "2 canvases per example" in out and "canvas tokens (2 turns)" in out
