"""eval/ on a tiny random model: the denoising loss is deterministic, the speed numbers are what they claim, the
"adapter changed nothing" check flags a zero adapter, and the report files are written."""

import json

import pytest
import torch

from conftest import make_model
from eval.adapter_check import adapter_check, lora_delta_norms
from eval.compare import compare, verdict
from eval.generation import GenerationSettings, generate, row_speed, speed_summary
from eval.loss import heldout_loss
from eval.report import console_summary, markdown
from finetune.canvas import collate
from finetune.data import DataSettings, build_examples, eval_prompts
from finetune.model import LoraSettings, attach_lora
from finetune.objective import ObjectiveConfig, diffusion_loss
from finetune.tiny import generation_config, task_rows

pytestmark = pytest.mark.usefixtures("one_thread")

CANVAS = 8
GEN = dict(max_new_tokens=8, max_denoising_steps=4, entropy_bound=0.1, t_max=0.8, t_min=0.4, batch_size=4, seed=0)


def eval_cfg(**extra):
    return {**dict(max_examples=6, loss_t=[0.1, 0.5, 0.9], loss_batches=1, scorers=["exact_match", "numeric"],
                   samples=dict(shown=4), generation=dict(GEN), benchmark=None, sweep=None), **extra}


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


def test_heldout_loss_is_the_training_loss_at_that_t(tokenizer, data):
    """The number in the report is `diffusion_loss` itself, called with the same t, canvases, noise (the seeded
    generator) and no self-conditioning: no second loss to drift from the one training minimises."""
    _, _, examples = data
    model = make_model(tokenizer)
    objective = ObjectiveConfig(self_conditioning_p=0.9)  # the report must switch it off, whatever training used
    losses = heldout_loss(model, examples, objective, CANVAS, tokenizer.pad_token_id, t_values=(0.3, 0.7),
                          batches=1, seed=5)
    batch = collate(examples, tokenizer.pad_token_id)
    n = len(examples)
    for t in (0.3, 0.7):
        direct = diffusion_loss(model, batch, ObjectiveConfig(self_conditioning_p=0.0, encoder_ar_weight=0.0),
                                CANVAS, generator=torch.Generator().manual_seed(5), t=torch.full((n,), t),
                                self_conditioning=torch.zeros(n, dtype=torch.bool))
        assert losses[t] == pytest.approx(float(direct.diffusion_loss), rel=1e-6, abs=0.0)
    with_self_conditioning = diffusion_loss(model, batch, objective, CANVAS, generator=torch.Generator().manual_seed(5),
                                            t=torch.full((n,), 0.7), self_conditioning=torch.ones(n, dtype=torch.bool))
    assert float(with_self_conditioning.diffusion_loss) != pytest.approx(losses[0.7], rel=1e-6)  # the check can fail


def test_heldout_loss_is_a_mean_over_tokens_whatever_the_chunks(tokenizer, data):
    """Like the trained loss, the held-out loss is summed CE over all counted tokens: chunks that count different
    numbers of tokens (loss_on=corrupted) are not averaged as if each example weighed the same."""
    _, _, examples = data
    model = make_model(tokenizer)
    kwargs = dict(objective=ObjectiveConfig(loss_on="corrupted"), canvas_length=CANVAS, pad_id=tokenizer.pad_token_id,
                  t_values=(0.3, 0.7), seed=3)
    whole = heldout_loss(model, examples, batch_size=len(examples), batches=1, **kwargs)
    chunked = heldout_loss(model, examples, batch_size=4, batches=2, **kwargs)  # 4 and 2 of the 6 examples
    assert chunked == pytest.approx(whole, rel=1e-5)


def test_heldout_loss_of_multi_turn_examples_scores_every_target_at_t(tokenizer):
    """data.supervise=all: an example holds a target per assistant turn, and each gets the fixed t (a t per example
    once crashed the end-of-run evaluation of every multi-turn run)."""
    examples, _ = build_examples(task_rows("followup", 4, 0), tokenizer, DataSettings(supervise="all"), CANVAS, "t")
    batch = collate(examples, tokenizer.pad_token_id)
    assert len(batch["target_example"]) == 8
    model = make_model(tokenizer)
    losses = heldout_loss(model, examples, ObjectiveConfig(), CANVAS, tokenizer.pad_token_id, t_values=(0.5,),
                          batches=1, seed=2)
    direct = diffusion_loss(model, batch, ObjectiveConfig(self_conditioning_p=0.0, encoder_ar_weight=0.0), CANVAS,
                            generator=torch.Generator().manual_seed(2), t=torch.full((8,), 0.5),
                            self_conditioning=torch.zeros(4, dtype=torch.bool))
    assert losses[0.5] == pytest.approx(float(direct.diffusion_loss), rel=1e-6, abs=0.0)


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
    compare(peft_model, tokenizer, pairs, examples, ObjectiveConfig(), CANVAS, cfg, out_dir=str(tmp_path))
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
    rows, pairs, examples = data
    model = make_model(tokenizer)
    model.generation_config = generation_config(tokenizer, CANVAS)
    report = compare(model, tokenizer, pairs, examples, ObjectiveConfig(), CANVAS, eval_cfg(),
                     out_dir=str(tmp_path), has_adapter=False)
    assert "base" in report and "adapter" not in report and "adapter_check" not in report
    assert set(report["verdict"]) == {"caveats"}  # nothing to compare; a random model's answers never end
    assert report["verdict"]["caveats"][0].startswith("answers cut (held-out): 100% of base answers")
    assert (tmp_path / "report.md").read_text().startswith("# Evaluation: base\n")
    console = console_summary(report, str(tmp_path))
    assert "Evaluation: base" in console and "CAVEAT: answers cut" in console and "->" not in console


def side(score, loss=None, cut=0.0):
    """One side of a report as `compare` writes it, with only the numbers a verdict test sets."""
    speed = {key: 1.0 for key in ("tokens_per_forward", "tokens_per_forward_pooled", "decoder_forward_passes_mean",
                                  "steps_per_canvas", "generated_tokens_mean", "tokens_per_second")}
    block = {"score": score, "scores": {"exact_match": score}, "exact_match": score, "tokens_per_forward": 1.0,
             "speed": {**speed, "finished_fraction": 1.0 - cut}, "answers_cut": cut}
    if loss is not None:
        block.update(heldout_loss_mean=loss, heldout_loss_by_t={0.5: loss})
    return block


def rows(pairs, scorer="exact_match"):
    return [{"base": {scorer: b}, "adapter": {scorer: a}} for b, a in pairs]


def verdict_report(pairs, loss=(None, None), cut=(0.0, 0.0)):
    base = sum(b for b, _ in pairs) / len(pairs)
    adapter = sum(a for _, a in pairs) / len(pairs)
    return {"base": side(base, loss[0], cut[0]), "adapter": side(adapter, loss[1], cut[1]), "scorers": ["exact_match"],
            "examples": len(pairs), "generations": rows(pairs),
            "adapter_check": {"adapter_changed_nothing": False, "warnings": [], "changed_generations_fraction": 0.5,
                              "lora_modules": 2, "zero_delta_modules": 0, "delta_norm_total": 1.0,
                              "delta_norm_max": 1.0, "relative_delta_max": 0.1},
            "generation_settings": {"max_denoising_steps": 4, "entropy_bound": 0.1, "t_max": 0.8, "t_min": 0.4,
                                    "seed": 0},
            "max_new_tokens": {"max_new_tokens": 16, "canvases": 2, "sized_from": "the model's generation_config",
                               "reference_canvases": 3, "reference_tokens": 24}}


@pytest.mark.parametrize("pairs,expected", [
    ([(0, 1)] * 8 + [(1, 1)] * 2, "better"),  # +80%, every change the same way: far beyond the noise
    ([(1, 0)] * 6 + [(1, 1)] * 4, "worse"),
    ([(0, 1), (1, 0)] * 5, "not shown"),  # as many gained as lost
    ([(0, 1)] + [(0, 0)] * 9, "not shown"),  # +10% from one example: within two paired standard errors (0.2)
    ([(0, 1)], "not shown"),  # one example: no noise estimate, nothing shown
])
def test_the_verdict_has_three_outcomes(pairs, expected):
    v = verdict(verdict_report(pairs), 0.02, 0.1)
    assert v["task"] == expected and v["better_on_task"] is (expected == "better")
    report = verdict_report(pairs)
    report["verdict"] = v
    headline = console_summary(report).split("-> ")[1].splitlines()[0]
    assert headline.startswith(expected + ":"), headline
    assert ("adapter beats base" in headline) is (expected == "better")


def test_a_tie_at_zero_is_not_shown_and_the_loss_is_only_a_loss(tokenizer):
    """The issue's case: every answer cut, 0% vs 0%, the adapter's loss far lower: no win is claimed, the loss
    change is called what it is, and the cut answers are a caveat of the verdict, in every place it is printed."""
    from finetune.report import summary

    report = verdict_report([(0, 0)] * 10, loss=(4.6, 0.01), cut=(1.0, 1.0))
    report["verdict"] = v = verdict(report, 0.02, 0.1)
    assert v["task"] == "not shown" and v["better_on_task"] is False
    assert v["heldout_loss"]["change"] == pytest.approx(-4.59)
    (caveat,) = v["caveats"]
    assert "100% of base and 100% of adapter answers did not end within max_new_tokens=16" in caveat
    assert "raise eval.generation.max_new_tokens" in caveat  # the references need 3 canvases, the limit gives 2
    console = console_summary(report)
    assert "-> not shown: no task difference beyond the noise: exact_match 0.0% -> 0.0%" in console
    assert "held-out denoising loss (mean over t) 4.6 -> 0.01: a change in loss, not a task result" in console
    assert "CAVEAT: answers cut (held-out)" in console and "beats" not in console
    md = markdown({**report, "definitions": {}, "generations": [], "samples_shown": 0})
    assert "## Verdict" in md and "> **Caveat:** answers cut" in md and "| **not shown** (+0.0%" in md
    assert md.index("> **Caveat:**") < md.index("## Answers")  # with the verdict, not a footnote
    report["adapter"]["samples"] = []
    metrics = {"run_name": "r", "training": {"steps": 1, "seconds": 1, "trainable_params": 1, "loss_first": 1.0,
                                             "loss_last": 0.5}, "eval": report}
    end_of_run = summary(metrics, "/tmp/run")
    assert "-> not shown:" in end_of_run and "CAVEAT: answers cut" in end_of_run and "beats" not in end_of_run


def test_a_benchmark_drop_within_sampling_noise_is_not_a_regression():
    report = verdict_report([(0, 1), (1, 1)])
    # 10 examples, one lost and none gained: -10% but within two standard errors (~0.2)
    report["benchmark"] = {"name": "b", "scorers": ["exact_match"], "base": side(0.5), "adapter": side(0.4),
                           "generations": rows([(1, 0)] + [(1, 1)] * 4 + [(0, 0)] * 5)}
    assert verdict(report, 0.02, 0.1)["nothing_else_broke"] is True
    report["benchmark"]["generations"] = rows([(1, 0)] * 5 + [(0, 0)] * 5)  # every right answer lost
    assert verdict(report, 0.02, 0.1)["regressions"] == ["benchmark b: exact_match 50.0% -> 40.0%"]


@pytest.fixture(scope="module")
def long_answers(tokenizer):
    """Held-out rows whose answers fill 3 canvases of 8 (the tiny base's generation_config stops at 16 tokens)."""
    rows = [{"prompt": f"copy: {w}", "completion": w} for w in ("abcdefghijklmnopqr", "stuvwxyzabcdefghij",
                                                               "klmnopqrstuvwxyzab", "cdefghijklmnopqrst")]
    settings = DataSettings()
    examples, _ = build_examples(rows, tokenizer, settings, CANVAS, "long")
    assert {e.num_canvases for e in examples} == {3}  # the premise: as the data layer lays them out
    return eval_prompts(rows, tokenizer, settings), examples


def test_max_new_tokens_is_sized_from_the_references(tokenizer, long_answers):
    pairs, examples = long_answers
    model = make_model(tokenizer)
    model.generation_config = generation_config(tokenizer, CANVAS)
    assert model.generation_config.max_new_tokens == 16  # what generate() would use on its own: 2 canvases
    cfg = eval_cfg(generation={**GEN, "max_new_tokens": None}, loss_t=[0.5], scorers=["exact_match"])
    report = compare(model, tokenizer, pairs, examples, ObjectiveConfig(), CANVAS, cfg, has_adapter=False)
    limit = report["max_new_tokens"]
    assert limit["reference_canvases"] == 3 and limit["sized_from"] == "the references"
    assert limit["max_new_tokens"] == 4 * CANVAS == report["generation_settings"]["max_new_tokens"]  # 3 + 1 canvases
    assert max(g["base"]["canvases"] for g in report["generations"]) > 2  # generate() really got the room
    capped = compare(model, tokenizer, pairs, examples, ObjectiveConfig(), CANVAS, cfg, has_adapter=False,
                     data_settings=DataSettings(max_response_canvases=3))
    assert capped["max_new_tokens"]["max_new_tokens"] == 3 * CANVAS  # plus one, but within max_response_canvases


def test_a_too_small_explicit_max_new_tokens_wins_and_is_reported_as_cutting(tokenizer, long_answers, tmp_path):
    pairs, examples = long_answers
    peft_model = lora_model(tokenizer)
    cfg = eval_cfg(generation={**GEN, "max_new_tokens": CANVAS}, loss_t=[0.5], scorers=["exact_match"])
    report = compare(peft_model, tokenizer, pairs, examples, ObjectiveConfig(), CANVAS, cfg, out_dir=str(tmp_path))
    assert report["max_new_tokens"]["max_new_tokens"] == CANVAS  # the user's value wins
    assert report["max_new_tokens"]["sized_from"] == "eval.generation.max_new_tokens"
    assert all(g[s]["canvases"] == 1 for g in report["generations"] for s in ("base", "adapter"))
    assert report["base"]["answers_cut"] == 1.0  # a 3-canvas answer cannot end within one canvas
    (caveat,) = report["verdict"]["caveats"]
    assert caveat.startswith("answers cut (held-out): 100% of base and 100% of adapter answers did not end within "
                             "max_new_tokens=8 (1 canvas, from eval.generation.max_new_tokens)")
    assert "the longest reference needs 3 canvases" in caveat
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["verdict"]["caveats"] == [caveat] and saved["adapter"]["answers_cut"] == 1.0
    assert f"> **Caveat:** {caveat}" in (tmp_path / "report.md").read_text()
    assert f"CAVEAT: {caveat}" in console_summary(report)
