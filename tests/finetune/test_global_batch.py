"""What makes N processes train like one: the noise of a sample depends on which sample it is, not on the batch it
lands in, and a step's loss is normalised by all of the step's counted tokens (here across micro-batches, the same
sums DDP makes across processes: tests/test_distributed.py runs the processes)."""

import pytest
import torch
from transformers import TrainerCallback

from finetune.canvas import collate
from finetune.data import DataSettings, build_examples
from finetune.model import LoraSettings, attach_lora
from finetune.objective import ObjectiveConfig, diffusion_loss, draw_noise, loss_counts
from finetune.tiny import task_rows
from finetune.train import TrainSettings, fit

from conftest import make_model


def examples(tokenizer, n=8):
    return build_examples(task_rows("shift", n, 0), tokenizer, DataSettings(), 8, "noise")[0]


def test_a_sample_draws_the_same_noise_in_any_batch(tokenizer):
    ex = examples(tokenizer)
    cfg = ObjectiveConfig(self_conditioning_p=0.5)
    whole = draw_noise(collate(ex[:4], 0), cfg, 8, 100, [10, 11, 12, 13], seed=3)
    halves = [draw_noise(collate(ex[i:i + 2], 0), cfg, 8, 100, [10 + i, 11 + i], seed=3) for i in (0, 2)]
    for field in ("t", "canvas_index", "noisy", "self_conditioning"):
        torch.testing.assert_close(getattr(whole, field), torch.cat([getattr(h, field) for h in halves]))
    other_seed = draw_noise(collate(ex[:4], 0), cfg, 8, 100, [10, 11, 12, 13], seed=4)
    other_sample = draw_noise(collate(ex[:4], 0), cfg, 8, 100, [20, 21, 22, 23], seed=3)
    assert not torch.equal(other_seed.t, whole.t) and not torch.equal(other_sample.t, whole.t)


def test_the_self_conditioning_temperature_is_drawn_per_sample_after_the_rest(tokenizer):
    """[lo, hi]: each sample's temperature comes from its own stream, within [lo, hi], and after everything else, so
    the other draws are those of raw self-conditioning (a raw run's noise is unchanged by the setting existing)."""
    batch = collate(examples(tokenizer)[:4], 0)
    raw = draw_noise(batch, ObjectiveConfig(), 8, 100, [5, 6, 7, 8], seed=1)
    scaled = draw_noise(batch, ObjectiveConfig(self_conditioning_temperature=[0.4, 0.8]), 8, 100, [5, 6, 7, 8], seed=1)
    assert raw.temperature is None
    for field in ("t", "canvas_index", "noisy", "self_conditioning"):
        torch.testing.assert_close(getattr(raw, field), getattr(scaled, field))
    assert scaled.temperature.shape == (4,) and len(set(scaled.temperature.tolist())) == 4
    assert bool(((scaled.temperature >= 0.4) & (scaled.temperature <= 0.8)).all())


def test_loss_counts_are_the_denominators_the_objective_divides_by(tokenizer):
    batch = collate(examples(tokenizer)[:4], 0)
    for cfg in (ObjectiveConfig(), ObjectiveConfig(loss_on="corrupted"),
                ObjectiveConfig(loss_on="corrupted", weighting="inverse_t")):
        noise = draw_noise(batch, cfg, 8, 100, [0, 1, 2, 3], seed=0)
        model = make_model(tokenizer)
        out = diffusion_loss(model, batch, cfg, 8, t=noise.t, canvas_index=noise.canvas_index, noisy=noise.noisy,
                             self_conditioning=noise.self_conditioning)
        torch.testing.assert_close(out.counts, loss_counts(batch, noise, cfg, 8))
        torch.testing.assert_close(out.diffusion_loss, (out.diffusion_sum / out.counts[0]).detach().float())


class FirstGradients(TrainerCallback):
    """The LoRA gradients of the first optimizer step (same weights in both runs: comparable element by element)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(tokenizer, tmp_path, batch_size, grad_accum):
    model = attach_lora(make_model(tokenizer, seed=0, init=0.02), LoraSettings(r=4, alpha=8))
    settings = TrainSettings(max_steps=3, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, warmup_steps=0,
                             logging_steps=1, report_to="none", seed=0, disable_tqdm=True)
    first = FirstGradients()
    # corrupted positions only: micro-batches count different numbers of tokens, so a mean of their means would
    # differ from the loss over the step's tokens
    trainer = fit(model, examples(tokenizer, 24), settings, ObjectiveConfig(loss_on="corrupted"), 8,
                  tokenizer.pad_token_id, str(tmp_path / f"{batch_size}x{grad_accum}"), callbacks=[first])
    return trainer, [e for e in trainer.state.log_history if "loss" in e], first.grads


def test_micro_batches_of_one_step_give_the_step_of_one_batch(tokenizer, tmp_path):
    whole, whole_logs, whole_grads = run(tokenizer, tmp_path, 4, 1)
    split, split_logs, split_grads = run(tokenizer, tmp_path, 2, 2)
    assert [r for rows in split.seen_rows for r in rows] == [r for rows in whole.seen_rows for r in rows]
    for key in ("loss", "grad_norm"):
        assert [e[key] for e in split_logs] == pytest.approx([e[key] for e in whole_logs], rel=1e-5), key
    assert split_grads.keys() == whole_grads.keys() and whole_grads
    for name in whole_grads:
        torch.testing.assert_close(split_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6, msg=name)
