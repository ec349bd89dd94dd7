"""Same seed, same data order and noise; a resumed run neither repeats nor skips rows."""

from transformers import TrainerCallback

from finetune.config import CheckpointSettings
from finetune.data import DataSettings, build_examples
from finetune.model import LoraSettings, attach_lora
from finetune.objective import ObjectiveConfig
from finetune.tiny import task_rows
from finetune.train import TrainSettings, fit

from conftest import make_model


class Interrupt(TrainerCallback):
    """Stops training after a step, as a crash would (the checkpoint of that step is already on disk)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def train(tokenizer, out, max_steps, every=0, resume=None, seed=0, stop_after=None):
    model = attach_lora(make_model(tokenizer, seed=0, init=0.02), LoraSettings(r=4, alpha=8))
    examples, _ = build_examples(task_rows("shift", 40, 0), tokenizer, DataSettings(), 8, "d")
    settings = TrainSettings(max_steps=max_steps, batch_size=4, grad_accum=1, lr=1e-2, warmup_steps=0, logging_steps=1,
                             report_to="none", seed=seed, disable_tqdm=True)
    callbacks = [Interrupt(stop_after)] if stop_after else None
    trainer = fit(model, examples, settings, ObjectiveConfig(), 8, tokenizer.pad_token_id, str(out),
                  callbacks=callbacks, checkpoint=CheckpointSettings(every=every), resume_from=resume)
    return trainer.seen_rows, trainer.step_losses


def test_same_seed_same_order_and_noise_other_seed_differs(tokenizer, tmp_path):
    rows_a, losses_a = train(tokenizer, tmp_path / "a", 4)
    rows_b, losses_b = train(tokenizer, tmp_path / "b", 4)
    assert rows_a == rows_b and losses_a == losses_b
    rows_c, _ = train(tokenizer, tmp_path / "c", 4, seed=1)
    assert rows_c != rows_a
    assert sorted(r for batch in rows_a for r in batch) == sorted(set(r for batch in rows_a for r in batch))


def test_resume_continues_exactly_where_the_checkpoint_left(tokenizer, tmp_path):
    rows, losses = train(tokenizer, tmp_path / "straight", 6)
    first_rows, _ = train(tokenizer, tmp_path / "resumed", 6, every=3, stop_after=3)
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    later_rows, later_losses = train(tokenizer, tmp_path / "resumed", 6, every=3, resume=str(checkpoint))
    assert first_rows == rows[:3]
    assert later_rows == rows  # the trace resumes with the checkpoint's rows; nothing repeated, nothing skipped
    assert later_losses == losses  # bit for bit: same weights, optimizer, schedule, noise
