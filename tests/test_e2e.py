"""The default run from a cold cache, as a fresh clone does it: `python -m finetune`."""

import json
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import ROOT  # the repository root
TRAIN_TAGS = ("train/loss", "train/diffusion_loss", "train/ar_loss", "train/learning_rate", "train/grad_norm")


@pytest.mark.slow
def test_default_run_writes_the_run_directory_and_the_adapter_beats_base(default_run):
    tmp, _, result = default_run
    run = tmp / "run"
    for name in ("config.yaml", "metrics.json", "loss_curve.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json", "adapter/generation_config.json"):
        assert (run / name).is_file(), name
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run / "adapter.tmp").exists()
    # the end-of-run export (export.format=adapter): the adapter again, with its card, checked in a fresh process
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "generation_config.json",
                 "README.md"):
        assert (run / "export" / "adapter" / name).is_file(), name
    assert "## Export verification" in (run / "export" / "adapter" / "README.md").read_text()
    # the reload computes the same float32 logits from the same weights, but not bit for bit: the training process
    # streamed its weights into buffers of its own and the reload memory-maps them, so matmul kernels see other
    # alignments and round otherwise (1.5e-05 on an EPYC, 0 when both mapped). Far below the check's tolerance and
    # the adapter's effect on the logits is what says the export is the fine-tuned model; not one CPU's rounding.
    found = re.search(r"export: adapter reloads to max \|logit diff\| (\S+) \(tolerance (\S+); adapter effect (\S+)\)",
                      result.stdout)
    assert found, result.stdout[-2000:]
    diff, tolerance, effect = (float(x) for x in found.groups())
    assert diff <= tolerance / 10 and effect >= 1000 * diff, found.group(0)
    metrics = json.loads((run / "metrics.json").read_text())
    base, adapter = metrics["eval"]["base"], metrics["eval"]["adapter"]
    assert adapter["exact_match"] >= base["exact_match"] + 0.5, (base["exact_match"], adapter["exact_match"])
    assert adapter["heldout_loss_mean"] < base["heldout_loss_mean"]
    for t, loss in adapter["heldout_loss_by_t"].items():
        assert loss < base["heldout_loss_by_t"][t], t
    assert metrics["training"]["loss_last"] < metrics["training"]["loss_first"]
    out = result.stdout
    assert "Run finished: tiny" in out and "adapter beats base" in out and str(run) in out
    assert "Pre-training the tiny base once" in out


@pytest.mark.slow
def test_default_run_writes_the_eval_report_and_it_shows_the_adapter_better(default_run):
    tmp, _, result = default_run
    run = tmp / "run"
    for name in ("report.json", "report.md", "loss_by_t.png", "scores.png"):
        assert (run / name).is_file(), name
    for name in ("loss_by_t.png", "scores.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((run / "report.json").read_text())
    base, adapter = report["base"], report["adapter"]
    assert report["verdict"]["better_on_task"] is True
    assert adapter["score"] >= base["score"] + 0.5 and adapter["scores"]["exact_match"] == adapter["exact_match"]
    assert adapter["heldout_loss_mean"] < base["heldout_loss_mean"]
    assert report["adapter_check"]["adapter_changed_nothing"] is False
    assert report["adapter_check"]["changed_generations_fraction"] > 0.5
    for side in (base, adapter):  # speed numbers present and consistent with their definitions
        speed = side["speed"]
        assert speed["tokens_per_forward"] > 0 and speed["tokens_per_second"] > 0
        assert 1 <= speed["steps_per_canvas"] <= report["generation_settings"]["max_denoising_steps"]
    assert report["benchmark"]["name"] == "copy" and report["benchmark"]["base"]["score"] > 0.5  # the base's skill
    assert json.loads((run / "metrics.json").read_text())["eval"]["verdict"] == report["verdict"]
    md = (run / "report.md").read_text()
    assert "| better at the task? (exact_match) |" in md and "**yes**" in md and "shift: " in md
    assert "report.md" in result.stdout


@pytest.mark.slow
def test_adapter_loads_with_stock_transformers_and_peft_and_does_the_task(default_run):
    tmp, _, _ = default_run
    adapter = tmp / "run" / "adapter"
    code = f"""
import json, torch
from peft import PeftModel
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion
cfg = json.load(open({str(adapter / 'adapter_config.json')!r}))
base = DiffusionGemmaForBlockDiffusion.from_pretrained(cfg["base_model_name_or_path"])
model = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()
tok = AutoTokenizer.from_pretrained({str(adapter)!r})
ids = tok.apply_chat_template([{{"role": "user", "content": "shift: hello"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
torch.manual_seed(0)
out = model.get_base_model().generate(input_ids=ids)
print(repr(tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=False)))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ifmmp<turn|>" in result.stdout  # hello shifted by one letter


@pytest.mark.slow
def test_second_run_reuses_the_cached_base(default_run):
    tmp, env, _ = default_run
    result = subprocess.run(
        [sys.executable, "-m", "finetune", f"output_dir={tmp / 'run2'}", "train.max_steps=5", "eval.enabled=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Pre-training" not in result.stdout
    assert (tmp / "run2" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp / "run2" / "preflight.txt").is_file()  # every run writes these, not only the default one
    assert any(name.startswith("events.out.tfevents.") for name in os.listdir(tmp / "run2" / "tensorboard"))


@pytest.mark.slow
def test_existing_adapter_is_never_overwritten(default_run):
    tmp, env, _ = default_run
    before = (tmp / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    result = subprocess.run([sys.executable, "-m", "finetune", f"output_dir={tmp / 'run'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "holds a finished run (adapter/)" in result.stderr
    assert (tmp / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_default_run_writes_preflight_naming_its_data(default_run):
    tmp, _, result = default_run
    run = tmp / "run"
    text = (run / "preflight.txt").read_text()
    assert (run / "preflight.json").is_file()
    data_cfg = OmegaConf.load(run / "config.yaml").data
    assert text.startswith(f"preflight: data.train={data_cfg.train} data.eval={data_cfg.eval} ")  # named sources
    data = json.loads((run / "metrics.json").read_text())["data"]
    counts = [tuple(map(int, m)) for m in re.findall(r"^rows read (\d+)\s+kept (\d+)", text, re.M)]
    assert counts == [(data[s]["read"], data[s]["kept"]) for s in ("train", "eval")]  # this run's rows, both splits
    assert "shift: " in text  # rendered examples of the task it trained on
    assert f"{run}/preflight.txt" in result.stdout


@pytest.mark.slow
def test_default_run_report_names_the_copy_regression(default_run):
    """README: the tiny adapter learns shift and forgets the base's copy, and the report says so."""
    tmp, _, result = default_run
    run = tmp / "run"
    report = json.loads((run / "report.json").read_text())
    bench = report["benchmark"]
    assert bench["name"] == "copy" and bench["adapter"]["score"] < bench["base"]["score"] - 0.5
    named = [r for r in report["verdict"]["regressions"] if r.startswith("benchmark copy: exact_match")]
    assert named and report["verdict"]["nothing_else_broke"] is False, report["verdict"]
    md_row = next(line for line in (run / "report.md").read_text().splitlines() if "anything else broken?" in line)
    assert "**yes**" in md_row and "benchmark copy: exact_match" in md_row, md_row
    assert "BROKE: benchmark copy: exact_match" in result.stdout  # the end-of-run summary too


@pytest.mark.slow
def test_default_run_logs_loss_parts_lr_and_grad_norm_to_tensorboard(default_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _, _ = default_run
    run = tmp / "run"
    assert any(name.startswith("events.out.tfevents.") for name in os.listdir(run / "tensorboard"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert set(TRAIN_TAGS) <= set(events.Tags()["scalars"]), events.Tags()["scalars"]
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in TRAIN_TAGS}
    # the same points as the Trainer's log history in metrics.json: every logging step, to the last one
    metrics = json.loads((run / "metrics.json").read_text())
    logged = [e for e in metrics["training"]["log_history"] if "loss" in e]
    assert len(logged) >= 3 and logged[-1]["step"] == metrics["training"]["steps"]
    for tag in TRAIN_TAGS:
        key = tag.removeprefix("train/")
        assert sorted(scalars[tag]) == [e["step"] for e in logged], tag
        for e in logged:
            assert scalars[tag][e["step"]] == pytest.approx(e[key], rel=1e-6, abs=1e-7), (tag, e["step"])
    weight = OmegaConf.load(run / "config.yaml").objective.encoder_ar_weight
    for step, loss in scalars["train/loss"].items():  # the loss is its two parts
        parts = scalars["train/diffusion_loss"][step] + weight * scalars["train/ar_loss"][step]
        assert loss == pytest.approx(parts, abs=1e-3), step
    assert scalars["train/loss"][logged[-1]["step"]] < scalars["train/loss"][logged[0]["step"]]


@pytest.mark.slow
def test_default_run_takes_under_5_minutes_start_to_finish(default_run):
    """The README's promise, timed around the whole process (start-up and export included, by the fixture): under
    5 minutes with the tiny base cached, plus its one-time pre-training (about 4 minutes), which the run reports.
    The run's own seconds_total starts after the imports and stops before the export, so a slow export or start-up
    never showed."""
    tmp, _, result = default_run
    wall = float((tmp / "wall_seconds").read_text())
    pretraining = float(re.search(r"Pre-trained the tiny base in (\d+) s", result.stdout).group(1))
    assert pretraining < 360, pretraining  # the README's "about 4 minutes", with room for a slower machine
    assert wall - pretraining < 300, (wall, pretraining)  # under 5 minutes on 2 CPU cores


def expert_run(default_run, name: str, *overrides: str):
    """A short tiny run with LoRA on the experts too, exported as adapter and merged (each verified by the export
    in a fresh process against the trained model). Merged in float32, where the check is exact on any CPU (a bf16
    merge may flip a router near-tie, which the check allows at one position in ten: tests/finetune/test_export.py)."""
    tmp, env, _ = default_run
    run = tmp / name
    result = subprocess.run([sys.executable, "-m", "finetune", f"output_dir={run}", "lora.targets=attn_mlp_experts",
                             *overrides, "train.max_steps=20", "eval.max_examples=8", "eval.benchmark.max_examples=8",
                             "train.report_to=none", "export.format=both", "export.dtype=float32"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for kind in ("adapter", "merged"):
        assert (run / "export" / kind).is_dir(), kind
    return run, result


def merged_experts_are_the_original_plus_each_experts_delta_once(run):
    """Every merged expert tensor is the base's own (not dequantised) plus its expert's LoRA delta, added once
    (peft's merge_and_unload adds it twice: encoder and decoder wrap the one tied tensor)."""
    import torch
    from safetensors.torch import load_file

    base = json.loads((run / "metrics.json").read_text())["base_model"]
    original = load_file(os.path.join(base, "model.safetensors"))
    adapter = load_file(run / "export" / "adapter" / "adapter_model.safetensors")
    lora_cfg = json.loads((run / "export" / "adapter" / "adapter_config.json").read_text())
    merged = {}
    for shard in (run / "export" / "merged").glob("*.safetensors"):
        merged.update(load_file(shard))
    experts = [k for k in original if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts and all(k.startswith("model.decoder.") for k in experts)  # the tied layout: one copy each
    for key in experts:
        module, _, param = key.rpartition(".")
        prefix = f"base_model.model.{module}."
        # peft nests one wrapper per parameter: the lora weights of this parameter are at one of the two levels
        level = next(lvl for lvl in ("", "base_layer.") if adapter[f"{prefix}{lvl}lora_A.weight"].shape[1] ==
                     original[key].shape[2] and adapter[f"{prefix}{lvl}lora_B.weight"].shape[0] ==
                     original[key].shape[1])
        a, b = adapter[f"{prefix}{level}lora_A.weight"].float(), adapter[f"{prefix}{level}lora_B.weight"].float()
        e = original[key].shape[0]
        delta = torch.bmm(b.view(b.shape[0], -1, e).permute(2, 0, 1), a.view(e, -1, a.shape[-1]))
        delta *= lora_cfg["lora_alpha"] / lora_cfg["r"]
        expected = (original[key].float() + delta).to(merged[key].dtype)
        assert delta.abs().max() > 0 and torch.equal(merged[key], expected), key


@pytest.mark.slow
def test_a_tiny_run_with_lora_on_the_experts_trains_evaluates_and_exports_merged(default_run):
    """lora.targets=attn_mlp_experts end to end: trains, evaluates, and the merged export folds each expert's delta
    into its fused tensor once; the export's own check reloads adapter and merged in a fresh process and matches
    them to the trained model."""
    run, result = expert_run(default_run, "run_experts")
    assert "adapter" in (run / "report.md").read_text()
    merged_experts_are_the_original_plus_each_experts_delta_once(run)
    for kind in ("adapter", "merged"):  # the export's fresh-process check ran on both
        assert f"export: {kind} reloads to max |logit diff|" in result.stdout, result.stdout[-2000:]


@pytest.mark.slow
def test_a_tiny_run_on_4_bit_experts_with_expert_lora_trains_evaluates_and_exports_from_the_original_weights(
        default_run):
    """model.quantization=experts4bit with LoRA on the experts end to end: the run trains on 4-bit experts, its
    evaluation says so, and the adapter and merged exports are built on the original weights (each merged expert is
    the base's bf16 tensor plus its delta, never a dequantised one) and verified there."""
    pytest.importorskip("bitsandbytes")
    run, result = expert_run(default_run, "run4bit", "model.quantization=experts4bit")
    assert "base weights: `experts in 4-bit NF4 (model.quantization=experts4bit)" in (run / "report.md").read_text()
    assert "built on the original bf16 base" in result.stdout
    merged_experts_are_the_original_plus_each_experts_delta_once(run)


@pytest.mark.slow
def test_the_tiny_recipe_learns_a_users_reversal_file_as_the_readme_says(default_run, tmp_path):
    """The README's own-task command: 300 steps on a JSONL of five-letter reversals (a whole-word task the
    tiny base never saw; it mirrors words, the reversed half first) and the adapter reverses at least 80% of its 64
    held-out words exactly.

    One run stands for other machines because the vehicle was measured across roundings, not tuned to one:
    bench/demo_seeds.py ran this command on 5 training seeds x 2 base pre-training seeds on an AMD EPYC on one thread
    (where the six-task base scored 0%), and it reached 98% on a base pre-trained and trained with 2 threads, where
    200 steps gave 45% (bench/ABLATION.md). The held-out denoising loss is checked too, with a margin: a mean over
    hundreds of tokens, it separates a learnt task from an unlearnt one without exact match's 1/64 steps (learnt:
    ~0.03, 45% at 0.15, the base above 3)."""
    import shlex

    line = next(line for line in open(os.path.join(ROOT, "README.md")) if "data.train=tests/data/reverse.jsonl" in line)
    command = shlex.split(line)
    assert command[:3] == ["python", "-m", "finetune"], line
    result = subprocess.run([sys.executable, *command[1:], f"output_dir={tmp_path / 'run'}"], cwd=ROOT,
                            env=default_run[1], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.eval: held out of data.train: 64 of its 1500 rows" in result.stdout  # the file's own rows
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    base, adapter = metrics["eval"]["base"], metrics["eval"]["adapter"]
    assert adapter["exact_match"] >= 0.8 and base["exact_match"] < 0.2, (base["exact_match"], adapter["exact_match"])
    assert adapter["heldout_loss_mean"] < 0.1 < base["heldout_loss_mean"], (base["heldout_loss_mean"],
                                                                             adapter["heldout_loss_mean"])
    assert metrics["training"]["steps"] == 300
