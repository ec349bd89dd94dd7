"""A run survives: a damaged newest checkpoint falls back to the previous complete one and the resumed run is bit for
bit the uninterrupted one; a non-finite loss or gradient stops the run before it reaches the weights, with the last
good checkpoint intact; after the first step exactly the LoRA parameters have gradients."""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import finetune.train as train_module
from finetune import checkpoints
from finetune.config import CheckpointSettings
from finetune.data import DataSettings, build_examples
from finetune.errors import RunStopped
from finetune.model import LoraSettings, attach_lora
from finetune.objective import ObjectiveConfig
from finetune.tiny import task_rows
from finetune.train import TrainSettings, fit

from conftest import make_model

RUN_CONFIG = {"seed": 0, "lora": {"r": 4}}


def train(tokenizer, checkpoints_dir, max_steps=6, resume_from=None, callbacks=None, every=2, model=None, lr=1e-2):
    model = model or attach_lora(make_model(tokenizer, seed=0, init=0.02), LoraSettings(r=4, alpha=8))
    examples, _ = build_examples(task_rows("shift", 24, 0), tokenizer, DataSettings(), 8, "d")
    settings = TrainSettings(max_steps=max_steps, batch_size=4, grad_accum=1, lr=lr, warmup_steps=0,
                             logging_steps=1, report_to="none", seed=0, disable_tqdm=True)
    trainer = fit(model, examples, settings, ObjectiveConfig(), 8, tokenizer.pad_token_id, str(checkpoints_dir),
                  callbacks=callbacks, checkpoint=CheckpointSettings(every=every, keep=3), resume_from=resume_from,
                  run_config=RUN_CONFIG)
    return trainer, model


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


class AppliedLr(TrainerCallback):
    """{step: the learning rate of every parameter group as the optimizer steps}: what AdamW reads, not the config
    nor the scheduler's report of it."""

    def __init__(self):
        self.lrs = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step + 1] = [group["lr"] for group in optimizer.param_groups]


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
    """An uninterrupted run of 6 steps (6 batches over 24 rows: a resume crosses an epoch), checkpoints 2, 4, 6; and
    the learning rates its optimizer applied."""
    run = tmp_path_factory.mktemp("reference")
    applied = AppliedLr()
    trainer, model = train(tokenizer, run / "checkpoints", callbacks=[applied])
    return run, trainer.step_losses, lora_weights(model), applied.lrs


def damage(path, how):
    if how == "truncated file":
        data = (path / "optimizer.pt").read_bytes()
        (path / "optimizer.pt").write_bytes(data[: len(data) // 2])
        return "truncated"
    if how == "wrong checksum":
        data = bytearray((path / "adapter_model.safetensors").read_bytes())
        data[-1] ^= 1
        (path / "adapter_model.safetensors").write_bytes(bytes(data))
        return "SHA-256"
    (path / checkpoints.MANIFEST).unlink()
    return "no manifest.json"


@pytest.mark.parametrize("how", ["truncated file", "wrong checksum", "missing manifest"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_for_the_previous_one(reference, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    reason = damage(run / "checkpoints" / "checkpoint-6", how)
    decision, warnings = checkpoints.choose("auto", str(run), RUN_CONFIG)
    assert decision.checkpoint == str(run / "checkpoints" / "checkpoint-4")
    assert len(warnings) == 1 and "skipping checkpoint" in warnings[0] and "checkpoint-6" in warnings[0]
    assert reason in warnings[0]


def test_the_run_resumed_from_the_fallback_is_bit_for_bit_the_uninterrupted_one(reference, tokenizer, tmp_path):
    ref_run, ref_losses, ref_weights, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    damage(run / "checkpoints" / "checkpoint-6", "wrong checksum")
    decision, _ = checkpoints.choose("auto", str(run), RUN_CONFIG)
    trainer, model = train(tokenizer, run / "checkpoints", resume_from=decision.checkpoint)
    assert trainer.step_losses == ref_losses  # the checkpoint's trace, then the same losses, exactly
    weights = lora_weights(model)
    assert weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "checkpoint-6" in names and any(n.startswith("checkpoint-6.replaced-") for n in names)  # damaged one kept
    assert checkpoints.verify(str(run / "checkpoints" / "checkpoint-6")) is None


def test_a_resume_trains_with_this_runs_learning_rate_not_the_checkpoints(reference, tokenizer, tmp_path):
    """The optimizer and schedule state come back from the checkpoint with its lr in them; a lower train.lr after a
    NaN must take effect from the first resumed step on (here: half of it at every step, in every parameter group)."""
    shutil.copytree(reference[0], tmp_path / "run")
    applied = AppliedLr()
    train(tokenizer, tmp_path / "run" / "checkpoints", resume_from=str(tmp_path / "run" / "checkpoints" /
                                                                       "checkpoint-4"), lr=5e-3, callbacks=[applied])
    before = reference[3]
    assert sorted(applied.lrs) == [5, 6] and sorted(before) == [1, 2, 3, 4, 5, 6]
    assert before[5] != before[6]  # the schedule moves: the comparison is at two different points of it
    for step in (5, 6):
        assert applied.lrs[step] == pytest.approx([lr / 2 for lr in before[step]], rel=1e-12), step


class PoisonGradient(TrainerCallback):
    """From step 5 on, one LoRA matrix's gradient is NaN while the loss stays finite."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 4:
            param = next(p for n, p in model.named_parameters() if "lora_B" in n)
            param.register_hook(lambda grad: grad * float("nan"))


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_non_finite_step_stops_the_run_and_leaves_the_last_checkpoint_intact(tokenizer, tmp_path, monkeypatch,
                                                                             what):
    callbacks = None
    if what == "loss":
        real, calls = train_module.diffusion_loss, []

        def poisoned(*args, **kwargs):
            out = real(*args, **kwargs)
            calls.append(1)
            if len(calls) == 5:  # step 5 (one micro-batch a step)
                out.diffusion_sum = out.diffusion_sum * float("nan")  # what the step's loss is built from
            return out

        monkeypatch.setattr(train_module, "diffusion_loss", poisoned)
    else:
        callbacks = [PoisonGradient()]
    model = attach_lora(make_model(tokenizer, seed=0, init=0.02), LoraSettings(r=4, alpha=8))
    with pytest.raises(RunStopped) as stopped:
        train(tokenizer, tmp_path / "checkpoints", callbacks=callbacks, model=model)
    message = str(stopped.value)
    assert stopped.value.code == 1
    assert message.startswith(f"step 5: the {what}") and "nan" in message
    last = tmp_path / "checkpoints" / "checkpoint-4"
    assert f"the last good checkpoint is {last}" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert checkpoints.verify(str(last)) is None
    assert all(torch.isfinite(t).all() for t in load_file(last / "adapter_model.safetensors").values())
    assert all(torch.isfinite(p).all() for p in lora_weights(model).values())  # the step never reached them


class DropGradient(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        next(p for n, p in model.named_parameters() if "lora_A" in n).grad = None


def test_after_the_first_step_every_lora_parameter_has_a_gradient_and_nothing_else(tokenizer, tmp_path):
    with pytest.raises(RunStopped, match=r"step 1: LoRA parameters that received no gradient \(1, e.g. .*lora_A"):
        train(tokenizer, tmp_path / "a", max_steps=1, callbacks=[DropGradient()])
    model = attach_lora(make_model(tokenizer, seed=0, init=0.02), LoraSettings(r=4, alpha=8))
    router = next(p for n, p in model.named_parameters() if ".router." in n)
    router.requires_grad_(True)
    with pytest.raises(RunStopped, match=r"step 1: parameters outside LoRA are set to train \(1, e.g. .*router"):
        train(tokenizer, tmp_path / "b", max_steps=1, model=model)
    trainer, _ = train(tokenizer, tmp_path / "c", max_steps=1)  # the real placement passes
    assert math.isfinite(trainer.step_losses[0])
