"""eval.speed_curve: the area under the score-vs-parallelism frontier (hand-computed cases), every forward counted
(checked with hooks on the encoder and decoder of a tiny random model), the best training-free point, the
`eval.speed_curve=true` shorthand, and the report block written by the evaluation."""

import json

import pytest
import torch

from conftest import make_model
from eval.compare import active_speed_curve, compare, validate
from eval.generation import GenerationSettings, generate
from eval.speed_curve import area, best_training_free, forwards, frontier, grid, tokens_per_forward
from finetune.config import SpeedCurveSettings
from finetune.data import DataSettings, build_examples, eval_prompts
from finetune.errors import UserError
from finetune.model import LoraSettings, attach_lora
from finetune.objective import ObjectiveConfig
from finetune.tiny import generation_config, task_rows

pytestmark = pytest.mark.usefixtures("one_thread")

CANVAS = 8
GEN = dict(max_new_tokens=16, max_denoising_steps=4, entropy_bound=0.1, t_max=0.8, t_min=0.4, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def data(tokenizer):
    rows = task_rows("shift", 4, 1)
    settings = DataSettings()
    examples, _ = build_examples(rows, tokenizer, settings, CANVAS, "test")
    return rows, eval_prompts(rows, tokenizer, settings), examples


# --- the area ---------------------------------------------------------------------------------------------------
def test_area_of_a_staircase_by_hand():
    # F(x) = 0.8 on [0, 1], 0.5 on (1, 2], 0.1 on (2, 4]: 0.8 + 0.5 + 0.2
    assert area([(1, 0.8), (2, 0.5), (4, 0.1)]) == pytest.approx(1.5)
    assert area([(4, 0.1), (1, 0.8), (2, 0.5)]) == pytest.approx(1.5)  # order does not matter


def test_a_dominated_point_adds_nothing_and_a_dominating_one_replaces():
    assert area([(1, 0.8), (2, 0.5), (4, 0.1), (1.5, 0.4), (0.5, 0.2)]) == pytest.approx(1.5)
    # (2, 0.9) is faster and better than (1, 0.8): F = 0.9 on [0, 2], 0.1 on (2, 4]
    assert area([(1, 0.8), (2, 0.9), (4, 0.1)]) == pytest.approx(0.9 * 2 + 0.1 * 2)
    assert frontier([(1, 0.8), (2, 0.9), (4, 0.1)]) == [(4, 0.1), (2, 0.9)]


def test_area_edge_cases():
    assert area([]) == 0.0
    assert area([(2, 0.5)]) == pytest.approx(1.0)  # one point: score x tokens per forward
    assert area([(3, 0.0), (1, 1.0)]) == pytest.approx(1.0)  # a fast point that scores 0 adds nothing
    assert area([(2, 0.5), (2, 0.7)]) == pytest.approx(1.4)  # the same speed twice: the better one counts


def test_best_training_free_is_the_fastest_point_within_the_paired_noise():
    points = [{"score": 1.0, "tokens_per_forward": 0.5}, {"score": 0.75, "tokens_per_forward": 2.0},
              {"score": 0.0, "tokens_per_forward": 4.0}]
    per_example = [[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]]
    # point 1 differs from the best on 1 of 4 examples: paired s.e. 0.25, noise 0.5 > 0.25 drop: within the noise
    best = best_training_free(points, per_example, tolerance=0.02)
    assert best["index"] == 1 and best["best_score_index"] == 0 and best["noise"] == pytest.approx(0.5)
    # with no spread (every example drops) only the tolerance counts: the drop of 1.0 is beyond it
    assert best_training_free(points[::2], per_example[::2], tolerance=0.02)["index"] == 0


def test_grid_adds_the_default_sampler_only_when_missing():
    spec = SpeedCurveSettings(enabled=True, max_denoising_steps=[1, 4], entropy_bound=[0.1])
    assert grid(spec, GenerationSettings(**GEN)) == [(1, 0.1, False), (4, 0.1, True)]
    assert grid(spec, GenerationSettings(**{**GEN, "max_denoising_steps": 48}))[-1] == (48, 0.1, True)


# --- the settings ------------------------------------------------------------------------------------------------
def test_speed_curve_true_on_the_command_line_turns_on_the_default_grid():
    from omegaconf import OmegaConf

    from finetune.config import check, compose

    cfg = compose(["eval.speed_curve=true"])
    check(cfg)
    spec = active_speed_curve(validate(OmegaConf.to_container(cfg.eval, resolve=True)))
    assert spec == SpeedCurveSettings(enabled=True)
    assert len(spec.max_denoising_steps) * len(spec.entropy_bound) == 9
    cfg = compose(["eval.speed_curve.enabled=true", "eval.speed_curve.max_denoising_steps=[2,4]"])
    assert active_speed_curve(OmegaConf.to_container(cfg.eval)).max_denoising_steps == [2, 4]
    assert active_speed_curve(OmegaConf.to_container(compose([]).eval)) is None  # off by default
    with pytest.raises(UserError, match="entropy_bound"):
        validate({"speed_curve": {"enabled": True, "entropy_bound": [-1.0]}})
    with pytest.raises(UserError, match="no such key"):
        SpeedCurveSettings.of({"enabled": True, "steps": [1]})


# --- forward counting ----------------------------------------------------------------------------------------------
def test_forwards_equal_the_encoder_and_decoder_calls_counted_by_hooks(tokenizer, data):
    """Alone in its batch, an answer's forwards are exactly the encoder calls (prefill + one per canvas but the
    last) plus the decoder calls (one per denoising step; self-conditioning adds none)."""
    _, pairs, _ = data
    model = make_model(tokenizer)
    model.generation_config = generation_config(tokenizer, CANVAS)
    calls = {"encoder": 0, "decoder": 0}

    def counter(name):
        def hook(*_):
            calls[name] += 1
        return hook

    handles = [model.model.encoder.register_forward_hook(counter("encoder")),
               model.model.decoder.register_forward_hook(counter("decoder"))]
    settings = GenerationSettings(**{**GEN, "max_new_tokens": 3 * CANVAS, "batch_size": 1})
    seen_canvases = set()
    try:
        for prompt in [p for p, _, _ in pairs]:
            calls.update(encoder=0, decoder=0)
            (g,) = generate(model, tokenizer, [prompt], settings)
            assert g.decoder_forward_passes == calls["decoder"]
            assert g.canvases == calls["encoder"]  # 1 prefill + (canvases - 1) commits
            assert forwards(g) == calls["encoder"] + calls["decoder"]
            assert tokens_per_forward([g])["tokens_per_forward"] == pytest.approx(g.tokens / forwards(g))
            assert tokens_per_forward([g])["tokens_per_decoder_forward"] == pytest.approx(g.tokens_per_forward)
            seen_canvases.add(g.canvases)
    finally:
        for h in handles:
            h.remove()
    assert 1 in seen_canvases and max(seen_canvases) > 1  # answers of one canvas and of several (commit passes)


# --- the evaluation path -------------------------------------------------------------------------------------------
def test_compare_writes_the_speed_curve_block(tokenizer, data, tmp_path):
    rows, pairs, examples = data
    model = make_model(tokenizer)
    model.generation_config = generation_config(tokenizer, CANVAS)
    torch.manual_seed(0)
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    cfg = dict(max_examples=4, loss_t=[0.5], loss_batches=1, scorers=["exact_match"], samples=dict(shown=2),
               generation=dict(GEN, max_new_tokens=8), benchmark=None, sweep=None,
               speed_curve=dict(enabled=True, max_denoising_steps=[1, 4], entropy_bound=[0.1], timing_prompts=1))
    compare(peft_model, tokenizer, pairs, examples, ObjectiveConfig(), CANVAS, cfg, out_dir=str(tmp_path))
    saved = json.loads((tmp_path / "report.json").read_text())
    curve = saved["speed_curve"]
    assert curve["grid"] == {"max_denoising_steps": [1, 4], "entropy_bound": [0.1]} and not curve["default_added"]
    assert "integral" in curve["definition"] and "encoder" in curve["forwards"]
    for side in ("base", "adapter"):
        points = curve[side]["points"]
        assert [(p["max_denoising_steps"], p["entropy_bound"], p["default"]) for p in points] == \
            [(1, 0.1, False), (4, 0.1, True)]
        for p in points:
            assert 0 <= p["score"] <= 1 and p["seconds_per_answer"] > 0
            assert p["forwards_per_answer"] == pytest.approx(p["decoder_forwards_per_answer"]
                                                             + p["encoder_forwards_per_answer"])
            assert 0 < p["tokens_per_forward"] < p["tokens_per_decoder_forward"]  # encoder passes count too
        assert points[0]["decoder_forwards_per_answer"] == points[0]["encoder_forwards_per_answer"]  # 1 step/canvas
        assert curve[side]["area"] == pytest.approx(area([(p["tokens_per_forward"], p["score"]) for p in points]))
        assert curve[side]["best_training_free"]["default"]["max_denoising_steps"] == 4
    assert (tmp_path / "speed_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speed_curve.png" in saved["files"]
    md = (tmp_path / "report.md").read_text()
    assert "## Score vs parallelism" in md and "![speed curve](speed_curve.png)" in md
    assert "batch 1" in md and "area under the score-vs-parallelism curve" in md and "best training-free" in md
