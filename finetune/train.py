"""The training loop: a transformers `Trainer` with our collator and `compute_loss`.

`Trainer` brings the optimizer and schedule, gradient accumulation and clipping, mixed precision, checkpoints
and resume; stock `SFTTrainer` cannot be used because the model's logits cover one canvas, not the sequence.
"""

from __future__ import annotations

import logging
import os

import torch

from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from finetune import checkpointing
from finetune.canvas import Example, collate
from finetune.config import TrainSettings
from finetune.model import base_of, text_layers
from finetune.objective import ObjectiveConfig, diffusion_loss

log = logging.getLogger(__name__)


class ExampleDataset(Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


class DiffusionTrainer(Trainer):
    """`Trainer` whose loss is the block-diffusion objective; logs its parts next to the total."""

    def __init__(self, *args, objective: ObjectiveConfig, canvas_length: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.canvas_length = canvas_length
        self.step_losses: list[float] = []  # one per micro-batch, for the loss curve
        self.seen_rows: list[list[int]] = []  # source rows of each micro-batch: data order is checkable
        self._parts: dict[str, list[float]] = {"diffusion_loss": [], "ar_loss": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        base = base_of(model)
        # accelerate puts mixed precision around model.forward, which the objective does not call (it runs the
        # encoder and decoder itself): without this, hardware.bf16 would leave the fp32 LoRA layers running in fp32
        with self.accelerator.autocast():
            out = diffusion_loss(base, inputs, self.objective, self.canvas_length)
        if model.training:
            self.seen_rows.append(inputs["rows"].tolist())
            self.step_losses.append(float(out.loss.detach()))
            self._parts["diffusion_loss"].append(float(out.diffusion_loss))
            self._parts["ar_loss"].append(float(out.ar_loss))
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs, *args, **kwargs):
        for key, values in self._parts.items():
            if values and "loss" in logs:
                logs[key] = round(sum(values) / len(values), 4)
                values.clear()
        super().log(logs, *args, **kwargs)


def training_arguments(settings: TrainSettings, output_dir: str, bf16: bool, use_cpu: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": settings.min_lr_ratio},
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        save_total_limit=settings.save_total_limit,
        gradient_checkpointing=False,  # ours covers the encoder too: see prepare()
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=bf16,
        use_cpu=use_cpu,
        report_to=[name for name in settings.report_to_list() if name != "tensorboard"],  # ours: see fit()
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=settings.disable_tqdm,
        logging_first_step=True,
    )


def prepare(model, settings: TrainSettings) -> None:
    """What a step runs through: checkpointed encoder and decoder layers, compiled layers."""
    if settings.gradient_checkpointing:
        checkpointing.enable(model)
    if settings.compile:
        compile_layers(model)


def compile_layers(model, **options) -> None:
    """Regional compilation: each text layer's forward compiled on its own, so one compiled graph serves every
    layer of a kind (sliding or full attention) instead of one huge graph for the whole model."""
    layers = text_layers(model)
    # Each layer index is its own variant (it picks its cache entry), times grad mode (the self-conditioning pass
    # runs without gradient) and evaluation shapes: past dynamo's default of 8 the rest would silently run eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(layers))
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           16 * len(layers))
    for layer in layers:
        layer.compile(**options)


def fit(model, examples, settings: TrainSettings, objective: ObjectiveConfig, canvas_length: int, pad_id: int,
        output_dir: str, bf16: bool = False, use_cpu: bool = True, callbacks=None,
        log_dir: str | None = None) -> DiffusionTrainer:
    """Train ``model`` in place on ``examples``; returns the trainer (its state holds the log history).

    With train.report_to naming tensorboard, the loss, its two parts, the learning rate and the grad norm go live
    to ``log_dir`` (the run directory's tensorboard/, not Trainer's default checkpoints/runs/<time>_<host>).
    """
    callbacks = list(callbacks or [])
    prepare(model, settings)
    if "tensorboard" in settings.report_to_list():
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=log_dir or os.path.join(output_dir, "tensorboard"))))
    trainer = DiffusionTrainer(
        model=model,
        args=training_arguments(settings, output_dir, bf16, use_cpu),
        train_dataset=ExampleDataset(examples),
        data_collator=lambda batch: collate(batch, pad_id),
        objective=objective,
        canvas_length=canvas_length,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=settings.resume_from_checkpoint)
    return trainer
