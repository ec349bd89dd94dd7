"""The command line as a user meets it: errors are one line, exit code 2, no traceback; --cfg job works offline."""

import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, assert_one_line_error


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
    assert_one_line_error(result, expected)
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_model_dir_without_config_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    result = run_cli(f"model.name_or_path={tmp_path / 'model'}")
    assert result.returncode == 2 and "holds no config.json" in result.stderr


@pytest.mark.parametrize("recipe", ["chat_spark", "chat_rtx", "tiny"])
def test_cfg_job_prints_the_resolved_config_offline(recipe):


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
        (["lora.targets=router"], "lora.targets='router': use one of attn_mlp, attn, mlp, attn_mlp_experts, experts"),
        (["lora.placement=decoder"], "lora.placement=decoder leaves the encoder frozen"),
        (["lora.placement=separate", "objective=unsloth"], "leaves part of the encoder LoRA untrainable"),
    ],
)
def test_invalid_settings_fail_before_any_work(tmp_path, args, expected):
    # FINETUNE_CACHE points nowhere: the check must come before the tiny base is built
    result = run_cli(*args, f"output_dir={tmp_path}/r")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_a_failed_start_leaves_no_run_directory(tmp_path):
    """The hub cannot be reached here: the error is one line and outputs/ stays empty (Hydra creates the
    run directory before the job starts; the job removes it when it wrote nothing of its own)."""
    # plan.enforce=false: the plan would refuse 52 GB here before the hub is asked
    result = subprocess.run([sys.executable, "-m", "finetune", "recipe=chat_spark", "hardware=cpu",
                             "plan.enforce=false"], cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "could not read the config of 'google/diffusiongemma-26B-A4B-it'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists() or not os.listdir(tmp_path / "outputs"), os.listdir(tmp_path / "outputs")


def test_a_wrong_type_in_a_recipe_file_names_the_key(tmp_path):
    (tmp_path / "mine.yaml").write_text("# python -m finetune recipe=mine\ntrain:\n  max_steps: lots\n")
    result = run_cli("recipe=mine", "--cfg", "job", env_extra={"FINETUNE_RECIPES": str(tmp_path)})
    assert_one_line_error(result, "train.max_steps: Value 'lots'")


def test_hydra_flags_work(tmp_path):
    info = run_cli("--info", "defaults")
    assert info.returncode == 0 and "recipe/tiny" in info.stdout, info.stderr[-1000:]
    hydra_cfg = run_cli("--cfg", "hydra")
    assert hydra_cfg.returncode == 0 and "sweep:" in hydra_cfg.stdout and "multirun/" in hydra_cfg.stdout
    usage = run_cli("--help")
    assert usage.returncode == 0 and "-m key=a,b" in usage.stdout
    assert "recipe: chat_rtx, chat_spark, tiny" in usage.stdout
    # tab completion: `eval "$(finetune -sc install=bash)"` makes bash ask the installed command for candidates
    app = os.path.join(os.path.dirname(sys.executable), "finetune")
    completion = subprocess.run([app, "-sc", "query=bash"], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "COMP_LINE": "finetune train.max_s", "COMP_POINT": "21"})
    assert completion.returncode == 0 and "train.max_steps=" in completion.stdout, completion.stderr[-500:]


def test_every_default_lives_once():
    """The schema (finetune/config.py) holds the defaults: a group file or recipe that restates one is a second
    truth that will drift (TrainSettings and conf/train/default.yaml once disagreed on steps, batch and
    accumulation). A `_global_` group file (a hardware profile) may set a key to the schema's value only where a
    group that config.yaml or a recipe chooses, composed before it, sets it otherwise (rtx_pro_6000's
    data.max_prompt_tokens=1024 undoes data/chat's 2048)."""
    import glob

    from omegaconf import OmegaConf

    from conftest import CONF, group_file, leaf_keys
    from finetune.config import Config

    schema = leaf_keys(OmegaConf.structured(Config))
    # config.yaml's group choices, in composition order (entries are DictConfigs: `isinstance(d, dict)` is False)
    chosen = {k: v for d in OmegaConf.load(os.path.join(CONF, "config.yaml")).defaults if OmegaConf.is_dict(d)
              for k, v in d.items()}
    order = list(chosen)
    files = {group: sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONF, group, "*.yaml")))
             for group in order if group != "recipe"}
    recipes = {path: OmegaConf.load(path) for path in glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))}
    used = {(g, n) for g, n in chosen.items()} | {(k.replace("override /", ""), v) for r in recipes.values()
                                                  for entry in r.get("defaults", []) for k, v in entry.items()}
    restated = []
    for group, names in files.items():
        earlier = {key for g, n in used if g in order[:order.index(group)] and g in files
                   for key, value in leaf_keys(group_file(g, n)).items() if key in schema and value != schema[key]}
        for name in names:
            for key, value in leaf_keys(group_file(group, name)).items():
                if key in schema and value == schema[key] and key not in earlier:
                    restated.append(f"finetune/conf/{group}/{name}.yaml: {key}={value}")
    for path, recipe in recipes.items():
        groups = dict(chosen)  # what the recipe is applied over: the schema with its group choices merged in, in order
        for entry in recipe.get("defaults", []):
            groups.update({k.replace("override /", ""): v for k, v in entry.items()})
        under = OmegaConf.structured(Config)
        for group, name in groups.items():
            if group != "recipe":
                under = OmegaConf.merge(under, group_file(group, name))
        under = leaf_keys(under)
        for key, value in leaf_keys(OmegaConf.masked_copy(recipe, [k for k in recipe if k != "defaults"])).items():
            if key in under and value == under[key]:
                restated.append(f"{os.path.relpath(path, ROOT)}: {key}={value}")
    assert not restated, restated


@pytest.mark.slow
def test_multirun_and_run_dir(default_run, tmp_path):
    """`-m` runs one job per value into its own directory; hydra.run.dir places a single run (the tiny base comes
    from the end-to-end fixture's cache)."""
    import json

    _, env, _ = default_run
    sweep = tmp_path / "sweep"
    common = ["eval.enabled=false", "export.format=none", "train.logging_steps=1", "data.train_rows=64"]
    result = subprocess.run([sys.executable, "-m", "finetune", "-m", "train.max_steps=2,3", *common,
                             f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, steps in (("0", 2), ("1", 3)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["training"]["steps"] == steps
        assert (sweep / job / "adapter" / "adapter_config.json").is_file()
        assert (sweep / job / ".hydra" / "overrides.yaml").is_file()
    assert (sweep / "multirun.yaml").is_file()

    placed = tmp_path / "placed"
    result = subprocess.run([sys.executable, "-m", "finetune", "train.max_steps=1", *common,
                             f"hydra.run.dir={placed}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (placed / "adapter" / "adapter_config.json").is_file() and not (tmp_path / "outputs").exists()
    assert yaml.safe_load((placed / "config.yaml").read_text())["output_dir"] == str(placed)


def test_a_base_of_another_architecture_is_one_line_and_leaves_nothing(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64).save_pretrained(tmp_path / "llama")
    result = run_cli(f"model.name_or_path={tmp_path / 'llama'}", f"output_dir={tmp_path / 'run'}")
    assert_one_line_error(result, "is a 'llama' checkpoint, not DiffusionGemma")
    assert not (tmp_path / "run").exists()


def test_a_logger_that_is_not_installed_is_refused_before_anything_is_written(tmp_path):
    import importlib.util

    if importlib.util.find_spec("trackio") is not None:
        pytest.skip("trackio is installed here")
    result = run_cli("train.report_to='tensorboard,trackio'", f"output_dir={tmp_path / 'run'}")  # Hydra: quote commas
    assert_one_line_error(result, "trackio is not installed: pip install trackio")
    assert not (tmp_path / "run").exists()


def test_a_sweep_refuses_output_dir_and_a_used_sweep_dir(tmp_path):
    result = run_cli("-m", "train.lr=1e-3,2e-3", f"output_dir={tmp_path / 'one'}")
    assert_one_line_error(result, "give hydra.sweep.dir=DIR instead")
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    result = run_cli("-m", "train.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert_one_line_error(result, "already holds runs")
    assert os.listdir(tmp_path / "sweep") == ["0"]  # nothing of Hydra's written into it


def test_cfg_job_prints_values_not_interpolations():
    result = run_cli("--cfg", "job")
    assert result.returncode == 0 and "${" not in result.stdout, result.stdout[:1000]


def test_pretrain_cfg_job_prints_the_config_and_trains_nothing(capsys, monkeypatch, tmp_path):
    """`python -m finetune.pretrain --cfg job` answers as `python -m finetune --cfg job` does (in process: the body
    that would pre-train is the thing under test, and it must not run)."""
    from finetune import pretrain

    def refuse(*args, **kwargs):
        raise AssertionError("--cfg job pre-trained the tiny base")

    monkeypatch.setattr(pretrain, "ensure_base", refuse)
    assert pretrain.main(["--cfg", "job", f"cache_dir={tmp_path}", "model.tiny.steps=7"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["tiny"]["steps"] == 7 and cfg["cache_dir"] == str(tmp_path)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.tiny.size=big", "model.tiny.size='big': use one of tiny, small"),
        ("hardware.device=cuda:1", "hardware.device='cuda:1': use one of auto, cpu, cuda"),
        ("model.attn_implementation=flash_attention_2", "model.attn_implementation='flash_attention_2': use sdpa or"),
    ],
)
def test_a_choice_out_of_its_list_is_one_line_naming_the_key_and_the_choices(override, expected, capsys, tmp_path):
    """Checked when the config is, in process (finetune.__main__.check: what `python -m finetune` runs first)."""
    from finetune.__main__ import check

    assert check([override, f"output_dir={tmp_path / 'run'}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
