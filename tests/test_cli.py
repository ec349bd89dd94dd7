"""The command line as a user meets it: errors are one line, exit code 2, no traceback; --cfg job works offline."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env_extra=None, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE": "/nonexistent-cache-should-not-be-used",
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["recipe=nope"], "unknown recipe 'nope': choose one of chat_rtx, chat_spark, tiny"),
        (["trian.lr=3"], "unknown config key 'trian.lr'"),
        (["train.lrr=3"], "unknown config key 'train.lrr'"),
        (["model=nope"], "model=nope is not a known model config; choose one of diffusiongemma_26b, tiny"),
        (["model.name_or_path=/no/such/model"], "model.name_or_path='/no/such/model' does not exist"),
        (["model.name_or_path=./missing-dir"], "model.name_or_path='./missing-dir' does not exist"),
        (["--cfg", "nope"], "--cfg takes job, hydra, all"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback(args, expected, tmp_path):
    result = run_cli(*args, "output_dir=" + str(tmp_path / "run") if args[0] != "--cfg" else "")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_model_dir_without_config_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    result = run_cli(f"model.name_or_path={tmp_path / 'model'}")
    assert result.returncode == 2 and "holds no config.json" in result.stderr


@pytest.mark.parametrize("recipe", ["chat_spark", "chat_rtx", "tiny"])
def test_cfg_job_prints_the_resolved_config_offline(recipe):
    import yaml

    result = run_cli(f"recipe={recipe}", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert set(cfg) >= {"model", "data", "lora", "objective", "train", "hardware", "eval"}
    assert cfg["run_name"] == recipe
    if recipe == "chat_spark":
        assert cfg["model"]["name_or_path"] == "google/diffusiongemma-26B-A4B-it"
        assert cfg["model"]["dtype"] == "bfloat16" and cfg["hardware"]["bf16"] is True
        assert (cfg["lora"]["r"], cfg["lora"]["alpha"], cfg["lora"]["targets"]) == (16, 32, "attn_mlp")
        t = cfg["train"]
        assert (t["lr"], t["adam_beta1"], t["adam_beta2"], t["weight_decay"]) == (1.5e-4, 0.95, 0.99, 1e-4)
        assert (t["warmup_steps"], t["min_lr_ratio"], t["max_grad_norm"]) == (25, 0.1, 1.0)
        assert cfg["data"]["train"] == "HuggingFaceH4/ultrachat_200k"


def test_overrides_reach_the_config():
    import yaml

    result = run_cli("recipe=chat_spark", "data.train=/data/mine.jsonl", "lora.r=8", "objective=axolotl",
                     "--cfg", "job")
    cfg = yaml.safe_load(result.stdout)
    assert cfg["data"]["train"] == "/data/mine.jsonl" and cfg["lora"]["r"] == 8
    assert cfg["objective"]["loss_on"] == "corrupted" and cfg["objective"]["weighting"] == "inverse_t"


def test_every_recipe_opens_with_the_command_that_runs_it():
    for name in os.listdir(os.path.join(ROOT, "recipes")):
        head = open(os.path.join(ROOT, "recipes", name)).read().splitlines()[0]
        assert head == f"# python -m finetune recipe={name[:-5]}" or head.startswith(
            f"# python -m finetune recipe={name[:-5]} "), (name, head)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["objective.loss_on=everything"], "objective.loss_on='everything' is not one of supervised, corrupted"),
        (["objective.t_min=1.5"], "objective.t_min=1.5 must be in [0, 1)"),
        (["lora.targets=experts"], "lora.targets='experts': use one of attn_mlp, attn, mlp"),
        (["lora.placement=decoder"], "lora.placement=decoder leaves the encoder frozen"),
    ],
)
def test_invalid_settings_fail_before_any_work(tmp_path, args, expected):
    # FINETUNE_CACHE points nowhere: the check must come before the tiny base is built
    result = run_cli(*args, f"output_dir={tmp_path}/r")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()
