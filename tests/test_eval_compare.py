"""eval/ on a tiny random model: the denoising loss is deterministic, the speed numbers are what they claim, the
"adapter changed nothing" check flags a zero adapter, and the report files are written."""

import json

import pytest
import torch

from conftest import make_model
from eval.adapter_check import adapter_check, lora_delta_norms
from eval.compare import compare
from eval.generation import GenerationSettings, generate, row_speed, speed_summary
from eval.loss import heldout_loss
from finetune.data import DataSettings, build_examples, eval_prompts
from finetune.model import LoraSettings, attach_lora
from finetune.objective import ObjectiveConfig
from finetune.tiny import generation_config, task_rows

pytestmark = pytest.mark.usefixtures("one_thread")

CANVAS = 8
GEN = dict(max_new_tokens=8, max_denoising_steps=4, entropy_bound=0.1, t_max=0.8, t_min=0.4, batch_size=4, seed=0)


def eval_cfg(**extra):
    return {**dict(max_examples=6, loss_t=[0.1, 0.5, 0.9], loss_batches=1, scorers=["exact_match", "numeric"],
                   samples=4, generation=dict(GEN), benchmark=None, sweep=None), **extra}


@pytest.fixture(scope="module")
def data(tokenizer):
    rows = task_rows("shift", 6, 1)
    settings = DataSettings()
    examples, _ = build_examples(rows, tokenizer, settings, CANVAS, "test")
    pairs = eval_prompts(rows, tokenizer, settings)
    return rows, pairs, examples


def lora_model(tokenizer, seed=0):
    model = make_model(tokenizer, seed=seed)
    model.generation_config = generation_config(tokenizer, CANVAS)
    torch.manual_seed(seed)
    return attach_lora(model, LoraSettings(r=4, alpha=8))


def randomise_lora_b(peft_model, scale=0.5):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)


def test_heldout_loss_same_seed_same_number(tokenizer, data):
    _, _, examples = data
    model = make_model(tokenizer)
    kwargs = dict(objective=ObjectiveConfig(), canvas_length=CANVAS, pad_id=tokenizer.pad_token_id,
                  t_values=(0.1, 0.5, 0.9), batches=1, seed=0)
    first = heldout_loss(model, examples, **kwargs)
    torch.manual_seed(12345)  # the global generator must not matter
    torch.rand(100)
    again = heldout_loss(model, examples, **kwargs)
    other_seed = heldout_loss(model, examples, **{**kwargs, "seed": 1})
    assert first == again  # bit for bit, every t
    assert first != other_seed
    assert first[0.1] < first[0.9]  # more noise, harder to denoise
    rebuilt = heldout_loss(make_model(tokenizer), examples, **kwargs)  # a fresh process would build the same
    assert rebuilt == first


def test_row_speed_counts_tokens_passes_and_canvases():
    pad, eos = 0, [1, 6]
    new = torch.tensor([
        [5, 5, 5, 5, 5, 6, 0, 0, 0, 0, 0, 0],  # ends in canvas 2 (canvas length 4)
        [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5],  # never ends: all 3 canvases
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # ends at once
    ])
    tpf = torch.tensor([6 / 5, 12 / 9, 1 / 4])
    rows = row_speed(new, tpf, pad, eos, canvas_length=4)
    assert rows == [(6, 5, 2, True), (12, 9, 3, False), (1, 4, 1, True)]
    assert row_speed(new[:1], torch.tensor([0.0]), pad, eos, 4)[0][1] is None  # no token: passes unknown


def test_decoder_passes_equal_a_count_of_decoder_forwards(tokenizer, data):
    """Alone in its batch, an example's decoder_forward_passes is exactly the number of decoder calls."""
    _, pairs, _ = data
    prompts = [p for p, _, _ in pairs]
    model = make_model(tokenizer)
    model.generation_config = generation_config(tokenizer, CANVAS)
    calls = []
    handle = model.model.decoder.register_forward_hook(lambda *a: calls.append(1))
    settings = GenerationSettings(**{**GEN, "max_new_tokens": 16, "batch_size": 1})
    try:
        for prompt in prompts[:3]:
            calls.clear()
            (g,) = generate(model, tokenizer, [prompt], settings)
            assert g.decoder_forward_passes == len(calls)
            assert g.steps_per_canvas <= settings.max_denoising_steps
            assert g.tokens_per_forward == pytest.approx(g.tokens / g.decoder_forward_passes)
        calls.clear()
        settings_batched = GenerationSettings(**{**GEN, "max_new_tokens": 16, "batch_size": 6})
        batch = generate(model, tokenizer, prompts, settings_batched)
        assert max(g.decoder_forward_passes for g in batch) <= len(calls)  # rows that stopped early count less
    finally:
        handle.remove()
    summary = speed_summary(batch, settings.max_denoising_steps)
    assert summary["decoder_forward_passes_total"] == sum(g.decoder_forward_passes for g in batch)
    assert summary["tokens_per_second"] > 0 and summary["generate_seconds"] == batch[0].seconds


def test_zero_adapter_is_flagged_and_a_trained_one_is_not(tokenizer, data, tmp_path):
    rows, pairs, examples = data
    peft_model = lora_model(tokenizer)  # fresh LoRA: B = 0, the adapter is the base
    report = compare(peft_model, tokenizer, pairs, examples, ObjectiveConfig(), CANVAS, eval_cfg())
    check = report["adapter_check"]
    assert check["adapter_changed_nothing"] is True
    assert check["delta_norm_max"] == 0.0 and check["zero_delta_modules"] == check["lora_modules"] > 0
    assert check["changed_generations_fraction"] == 0.0
    assert any("~0" in w for w in check["warnings"]) and any("no generation changed" in w for w in check["warnings"])
    assert report["verdict"]["adapter_changed_nothing"] is True
    assert report["base"]["heldout_loss_by_t"] == report["adapter"]["heldout_loss_by_t"]

    randomise_lora_b(peft_model)
    check = adapter_check(peft_model, ["a", "b"], ["a", "c"])
    assert check["adapter_changed_nothing"] is False and check["changed_generations_fraction"] == 0.5
    assert check["zero_delta_modules"] == 0 and not check["warnings"]


def test_delta_norms_equal_the_dense_lora_delta(tokenizer):
    peft_model = lora_model(tokenizer)
    randomise_lora_b(peft_model)
    norms = lora_delta_norms(peft_model)
    modules = dict(peft_model.named_modules())
    name = next(n for n in norms if ".decoder.layers.1.self_attn.q_proj" in n)
    module = modules[name.split("[")[0]]
    dense = (module.lora_B["default"].weight @ module.lora_A["default"].weight) * module.scaling["default"]
    assert norms[name]["delta_norm"] == pytest.approx(float(dense.detach().norm()), rel=1e-5)
    assert not any(".encoder." in n for n in norms)  # lora.placement=shared: one set of matrices, listed once


def test_report_files_benchmark_and_sweep(tokenizer, data, tmp_path):
    rows, pairs, examples = data
    peft_model = lora_model(tokenizer)
    randomise_lora_b(peft_model)
    cfg = eval_cfg(benchmark=dict(name="copy", source="tiny:copy", scorers=["exact_match"], max_examples=4),
                   sweep=dict(param="max_denoising_steps", values=[1, 4]))
    report = compare(peft_model, tokenizer, pairs, examples, ObjectiveConfig(), CANVAS, cfg,
                     out_dir=str(tmp_path))
    for name in ("report.json", "report.md", "loss_by_t.png", "scores.png", "sweep.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved["base"]["heldout_loss_by_t"]) == {"0.1", "0.5", "0.9"}
    assert saved["benchmark"]["name"] == "copy" and saved["benchmark"]["examples"] == 4
    assert [p["value"] for p in saved["sweep"]["adapter"]] == [1, 4]
    one_step = saved["sweep"]["adapter"][0]
    assert one_step["steps_per_canvas"] == 1 and one_step["tokens_per_forward"] > 1  # 1 step: whole canvas at once
    assert len(saved["generations"]) == 6 and {"base", "adapter", "changed"} <= set(saved["generations"][0])
    md = (tmp_path / "report.md").read_text()
    for heading in ("## Answers", "## Speed", "## Benchmark: copy", "## Speed vs quality", "side by side"):
        assert heading in md
    assert "adapter_changed_nothing: **false**" in md


def test_base_alone_without_an_adapter(tokenizer, data, tmp_path):
    from eval.report import console_summary

    rows, pairs, examples = data
    model = make_model(tokenizer)
    model.generation_config = generation_config(tokenizer, CANVAS)
    report = compare(model, tokenizer, pairs, examples, ObjectiveConfig(), CANVAS, eval_cfg(),
                     out_dir=str(tmp_path), has_adapter=False)
    assert "base" in report and "adapter" not in report and "adapter_check" not in report
    assert report["verdict"] == {}
    assert (tmp_path / "report.md").read_text().startswith("# Evaluation: base\n")
    assert "Evaluation: base" in console_summary(report, str(tmp_path))


def test_a_benchmark_drop_within_sampling_noise_is_not_a_regression():
    from eval.compare import verdict

    def side(score):
        return {"score": score, "tokens_per_forward": 1.0, "speed": {"finished_fraction": 1.0}}

    def rows(pairs):
        return [{"base": {"exact_match": b}, "adapter": {"exact_match": a}} for b, a in pairs]

    report = {"base": side(0.5), "adapter": side(1.0), "scorers": ["exact_match"],
              "generations": rows([(0, 1), (1, 1)]), "adapter_check": {"adapter_changed_nothing": False}}
    # 10 examples, one lost and none gained: -10% but within two standard errors (~0.2)
    report["benchmark"] = {"name": "b", "scorers": ["exact_match"], "base": side(0.5), "adapter": side(0.4),
                           "generations": rows([(1, 0)] + [(1, 1)] * 4 + [(0, 0)] * 5)}
    assert verdict(report, 0.02, 0.1)["nothing_else_broke"] is True
    report["benchmark"]["generations"] = rows([(1, 0)] * 5 + [(0, 0)] * 5)  # every right answer lost
    assert verdict(report, 0.02, 0.1)["regressions"] == ["benchmark b: exact_match 50.0% -> 40.0%"]
