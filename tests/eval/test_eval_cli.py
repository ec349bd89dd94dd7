"""`python -m eval` as a user meets it: bad input is one line and exit code 2 before any model loads; on the
default run's adapter it writes the report, reproduces the end-of-run numbers and sweeps the sampler."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error


def run_eval(*args, env=None, timeout=120):
    env = env or {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE": "/nonexistent-cache-should-not-be-used"}
    return subprocess.run([sys.executable, "-m", "eval", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def fake_adapter(tmp_path):
    """An adapter directory whose config names an existing base directory (nothing is loaded in these tests)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path)}))
    return adapter


def test_bad_input_from_the_shell_is_one_line_exit_2():
    assert_one_line_error(run_eval("adapter=/no/such/adapter"), "adapter='/no/such/adapter' does not exist")


def main_in_process(capsys, monkeypatch, *args):
    """The same entry point without a new interpreter (seconds saved per case); returns (code, stdout, stderr)."""
    from eval.__main__ import main

    monkeypatch.setenv("FINETUNE_CACHE", "/nonexistent-cache-should-not-be-used")
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args,expected",
    [
        (["recipe=nope"], "unknown recipe 'nope'"),
        (["eval.nope=1"], "unknown config key 'eval.nope'"),
        (["eval.scorers=[exactmatch]"], "unknown scorer 'exactmatch'"),
        (["eval.sweep={param:temperature,values:[1]}"], "eval.sweep.param='temperature'"),
        (["eval.sweep={param:entropy_bound,values:[x]}"], "eval.sweep entropy_bound=x: not a number"),
        (["eval.sweep={param:entropy_bound,values:[0.1,-1]}"], "eval.sweep entropy_bound=-1: `entropy_bound` must be"),
        (["eval.generation.t_min=0.9"], "eval.generation: `t_max` must be >= t_min"),
        (["--cfg", "nope"], "--cfg takes job, hydra, all (got nope)"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, monkeypatch, args, expected):
    code, _, err = main_in_process(capsys, monkeypatch, *args)
    assert code == 2 and err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1, err


def test_adapter_dir_without_config_and_adapter_with_a_lost_base(capsys, monkeypatch, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = main_in_process(capsys, monkeypatch, f"adapter={tmp_path / 'empty'}")
    assert code == 2 and "holds no adapter_config.json" in err
    (tmp_path / "lost").mkdir()
    (tmp_path / "lost" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/base"}))
    code, _, err = main_in_process(capsys, monkeypatch, f"adapter={tmp_path / 'lost'}")
    assert code == 2 and "base model /gone/base" in err


def test_an_existing_report_is_never_overwritten(capsys, monkeypatch, fake_adapter, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("{}")
    code, _, err = main_in_process(capsys, monkeypatch, f"adapter={fake_adapter}", f"out={tmp_path / 'out'}")
    assert code == 2 and "already holds a report.json" in err
    assert (tmp_path / "out" / "report.json").read_text() == "{}"


def test_cfg_job_checks_and_prints_without_loading(capsys, monkeypatch, fake_adapter):
    code, out, err = main_in_process(capsys, monkeypatch, "recipe=chat_spark", f"adapter={fake_adapter}",
                                     "eval.max_examples=5", "--cfg", "job")
    assert code == 0, err
    assert "max_examples: 5" in out and "name: gsm8k" in out and f"# adapter: {fake_adapter}" in out


def save_stock_adapter(base_dir, adapter_dir, placement: str, seed: int = 0):
    """A LoRA adapter as stock peft saves it outside our runs: get_peft_model with a target regex, random non-zero
    B, save_pretrained; no tokenizer, no generation config, no run directory around it.

    shared: encoder and decoder LoRA with equal values (a tied model trained as one); separate: both, different
    (Unsloth's DiffusionTrainer); decoder: the denoiser only."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DiffusionGemmaForBlockDiffusion

    stacks = r"model\.decoder\.layers\.\d+\." if placement == "decoder" else \
        r"(model\.encoder\.language_model\.layers\.\d+\.|model\.decoder\.layers\.\d+\.)"
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=stacks + r"self_attn\.(q|v)_proj"))
    torch.manual_seed(seed)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        if placement == "shared":
            for name, p in params.items():
                if "lora_" in name and ".encoder.language_model.layers." in name:
                    p.copy_(params[name.replace(".encoder.language_model.layers.", ".decoder.layers.")])
    peft_model.save_pretrained(str(adapter_dir))
    return adapter_dir


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer):
    """A small DiffusionGemma saved as any hub model is: weights, config, generation config, tokenizer."""
    from conftest import make_model
    from finetune.tiny import generation_config

    path = tmp_path_factory.mktemp("base") / "tiny-diffusiongemma"
    model = make_model(tokenizer)
    model.generation_config = generation_config(tokenizer, model.config.canvas_length)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("placement", ["shared", "separate", "decoder"])
def test_eval_takes_any_stock_peft_adapter(capsys, monkeypatch, tiny_base, tmp_path, placement):
    from safetensors.torch import load_file

    from finetune.model import adapter_placement

    adapter = save_stock_adapter(tiny_base, tmp_path / f"{placement}-adapter", placement)
    assert not (adapter / "tokenizer_config.json").exists()
    assert adapter_placement(str(adapter)) == placement  # the premise: each kind of adapter is what it says
    out = tmp_path / "eval"
    code, stdout, err = main_in_process(
        capsys, monkeypatch, f"adapter={adapter}", f"out={out}", "data.train_rows=8", "data.eval_rows=4",
        "eval.max_examples=4", "eval.loss_t=[0.5]", "eval.loss_batches=1", "eval.benchmark=null",
        "eval.generation.max_denoising_steps=2", "eval.generation.batch_size=4")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["base_model"] == str(tiny_base) and report["adapter_placement"] == placement
    assert (out / "report.md").is_file() and f"({placement} LoRA)" in stdout
    base, tuned = report["base"], report["adapter"]
    assert tuned["heldout_loss_by_t"] != base["heldout_loss_by_t"]  # the adapter side is the adapter, not the base
    check = report["adapter_check"]
    saved = [k for k in load_file(str(adapter / "adapter_model.safetensors")) if "lora_A" in k]
    decoder = [k for k in saved if ".decoder.layers." in k]
    # every saved module is measured; shared encoder LoRA is re-tied to its decoder twin on load: counted once
    assert check["lora_modules"] == (len(decoder) if placement == "shared" else len(saved)) > 0
    assert check["zero_delta_modules"] == 0
    # a random base and a random adapter: neither does the task (0% vs 0%), and a tie shows nothing either way
    assert report["base"]["score"] == report["adapter"]["score"] == 0.0
    assert report["verdict"]["task"] == "not shown" and report["verdict"]["score_delta"] == 0.0


@pytest.mark.slow
def test_eval_cli_on_the_default_run_reproduces_its_numbers_and_sweeps(default_run, tmp_path):
    tmp, env, _ = default_run
    run = tmp / "run"
    out = tmp_path / "eval"
    result = run_eval("recipe=tiny", f"adapter={run / 'adapter'}", f"out={out}",
                      "eval.sweep={param:max_denoising_steps,values:[1,4,48]}",
                      # the README's eval.speed_curve=true on a grid of two (48 steps at bound 0.1: the default sampler)
                      "eval.speed_curve={enabled:true,max_denoising_steps:[1,48],entropy_bound:[0.1],timing_prompts:1}",
                      env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("report.json", "report.md", "loss_by_t.png", "scores.png", "sweep.png", "speed_curve.png",
                 "config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    at_end_of_training = json.loads((run / "report.json").read_text())
    # fixed t, fixed noise, fixed sampler seed: a separate process gives the end-of-run numbers again
    for side in ("base", "adapter"):
        assert report[side]["heldout_loss_by_t"] == at_end_of_training[side]["heldout_loss_by_t"]
        assert report[side]["scores"] == at_end_of_training[side]["scores"]
    assert report["verdict"]["task"] == "better" and report["adapter"]["score"] >= report["base"]["score"] + 0.5
    assert report["adapter_check"]["adapter_changed_nothing"] is False
    sweep = report["sweep"]["adapter"]
    assert [p["value"] for p in sweep] == [1, 4, 48]
    assert sweep[0]["steps_per_canvas"] == 1 and sweep[0]["tokens_per_forward"] > sweep[-1]["tokens_per_forward"]
    assert "adapter beats base" in result.stdout and str(out) in result.stdout
    curve = report["speed_curve"]["adapter"]
    assert [p["max_denoising_steps"] for p in curve["points"]] == [1, 48] and curve["points"][1]["default"]
    # the adapter learnt the task at the default sampler: its area is at least that point's score x its speed
    assert curve["area"] >= curve["points"][1]["score"] * curve["points"][1]["tokens_per_forward"] > 0
    assert f"adapter **{curve['area']:.4g}**" in (out / "report.md").read_text()
