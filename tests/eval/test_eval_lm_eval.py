"""The lm-evaluation-harness model class: it answers a small local generate_until task through the harness, and
likelihood requests fail with a message that says why."""

import json
import subprocess
import sys

import pytest

# the optional extra; pytest -ra (pyproject's addopts) lists this reason under "short test summary info"
lm_eval = pytest.importorskip("lm_eval", reason='lm-evaluation-harness is not installed: pip install -e ".[lm-eval]" '
                              "to run the lm-eval model tests")

import torch  # noqa: E402
from conftest import ROOT, make_model  # noqa: E402
from eval.generation import GenerationSettings, generate  # noqa: E402
from finetune.tiny import generation_config, task_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
generation_kwargs:
  until: ["<turn|>"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_task(directory, name="tiny_shift_local", rows=8, task="shift"):
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_rows(task, rows, 7)))
    (directory / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    return name


def test_generate_until_answers_a_local_task_through_the_harness(tokenizer, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from eval.lm_eval_model import DiffusionGemmaLM

    model = make_model(tokenizer)
    model.generation_config = generation_config(tokenizer, 8)
    lm = DiffusionGemmaLM(model=model, tokenizer=tokenizer, batch_size=4, max_denoising_steps=4)
    name = write_task(tmp_path)
    out = simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=str(tmp_path)),
                          apply_chat_template=True, log_samples=True)
    assert "exact_match,none" in out["results"][name]
    samples = out["samples"][name]
    assert len(samples) == 8
    # the harness rendered the chat template through the class, and the answers are our generate()'s answers
    prompts = [s["arguments"][0][0] for s in samples]
    assert all(p.startswith("<bos><|turn>user\nshift: ") and p.endswith("<|turn>model\n")
               for p in prompts)
    ours = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8, max_denoising_steps=4,
                                                                  batch_size=4))
    assert [s["resps"][0][0] for s in samples] == [g.text.split("<turn|>")[0] for g in ours]


def test_likelihood_requests_say_block_diffusion_has_none(tokenizer):
    from eval.lm_eval_model import DiffusionGemmaLM

    lm = DiffusionGemmaLM(model=make_model(tokenizer), tokenizer=tokenizer)
    for method in (lm.loglikelihood, lm.loglikelihood_rolling):
        with pytest.raises(NotImplementedError, match="no left-to-right token likelihood"):
            method([])


def test_sampler_defaults_are_the_schema_and_model_args_override_them(tokenizer):
    """One source for the sampler's defaults: finetune.config.GenerationSettings, as python -m eval uses them."""
    from dataclasses import replace

    from eval.lm_eval_model import DiffusionGemmaLM

    model = make_model(tokenizer)
    assert DiffusionGemmaLM(model=model, tokenizer=tokenizer).settings == GenerationSettings()
    # as the harness passes them: strings from --model_args, batch_size "auto", keys of other samplers
    lm = DiffusionGemmaLM(model=model, tokenizer=tokenizer, batch_size="auto", max_denoising_steps="4",
                          entropy_bound="0.5", seed=3, temperature=0.0, do_sample=False)
    assert lm.settings == replace(GenerationSettings(), max_denoising_steps=4, entropy_bound=0.5, seed=3)
    assert DiffusionGemmaLM(model=model, tokenizer=tokenizer, batch_size=2).settings.batch_size == 2


def test_a_stock_peft_adapter_loads_through_the_one_loader(tokenizer, tmp_path):
    """model_args adapter=DIR alone: the base from adapter_config.json, the base's tokenizer (the adapter has none),
    the placement inferred (a separate encoder LoRA stays separate)."""
    from peft import PeftModel
    from test_eval_cli import save_stock_adapter

    from eval.lm_eval_model import DiffusionGemmaLM
    from finetune.tiny import generation_config

    base = tmp_path / "base"
    model = make_model(tokenizer)
    model.generation_config = generation_config(tokenizer, 8)
    model.save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    adapter = save_stock_adapter(base, tmp_path / "adapter", "separate")
    lm = DiffusionGemmaLM(adapter=str(adapter), device="cpu")
    assert isinstance(lm.model, PeftModel) and lm.tokenizer.name_or_path == str(base)
    layers = dict(lm.model.named_modules())
    enc = layers["base_model.model.model.encoder.language_model.layers.0.self_attn.q_proj"].lora_B["default"]
    dec = layers["base_model.model.model.decoder.layers.0.self_attn.q_proj"].lora_B["default"]
    assert enc is not dec and not torch.equal(enc.weight, dec.weight)


def test_the_model_is_registered_under_its_name():
    from lm_eval.api.registry import get_model

    from eval.lm_eval_model import DiffusionGemmaLM

    assert get_model("diffusiongemma") is DiffusionGemmaLM


@pytest.mark.slow
def test_harness_cli_scores_the_trained_adapter(default_run, tmp_path):
    """`python -m eval.harness` with the default run's adapter: the shift task, answered by the adapter."""
    tmp, env, _ = default_run
    name = write_task(tmp_path, rows=16)
    adapter = tmp / "run" / "adapter"
    result = subprocess.run(
        [sys.executable, "-m", "eval.harness", "--model", "diffusiongemma", "--model_args",
         f"adapter={adapter},max_denoising_steps=48", "--tasks", name, "--include_path", str(tmp_path),
         "--apply_chat_template", "--batch_size", "16", "--output_path", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = list((tmp_path / "out").rglob("results_*.json"))
    score = json.loads(path.read_text())["results"][name]["exact_match,none"]
    assert score >= 0.8, score
