"""The training loop: a transformers `Trainer` with our collator and `compute_loss`, and what keeps a long run safe.

`Trainer` brings the optimizer and schedule, gradient accumulation and clipping, mixed precision, checkpoint files
and resume; stock `SFTTrainer` cannot be used because the model's logits cover one canvas, not the sequence. Ours on
top: checkpoints sealed and renamed into place (finetune.checkpoints), a checkpoint at the next step boundary on
SIGINT/SIGTERM, a stop on a non-finite loss or gradient before it reaches the weights, and a check after the first
step that exactly the LoRA parameters receive gradients.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from finetune import checkpointing, checkpoints, disk, distributed, emulated
from finetune.canvas import Example, collate
from finetune.config import CheckpointSettings, TrainSettings
from finetune.errors import RunStopped
from finetune.model import base_commit, base_identity, base_of, text_layers
from finetune.objective import ObjectiveConfig, diffusion_loss, draw_noise, loss_counts

log = logging.getLogger(__name__)


class ExampleDataset(Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


class GuardTripped(Exception):
    """A guard stopped training before the optimizer step; the message names the step and what was wrong."""


class DiffusionTrainer(Trainer):
    """`Trainer` whose loss is the block-diffusion objective; logs its parts next to the total; writes sealed
    checkpoints (Trainer writes into <checkpoints>/.staging, we seal and rename)."""

    def __init__(self, *args, objective: ObjectiveConfig, canvas_length: int,
                 checkpoint: CheckpointSettings | None = None, run_config: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.canvas_length = canvas_length
        self.checkpoint = checkpoint
        self.run_config = run_config or {}
        self.step_losses: list[float] = []  # one per micro-batch, for the loss curve
        self.seen_rows: list[list[int]] = []  # source rows of each micro-batch: data order is checkable
        self._parts: dict[str, list[float]] = {"diffusion_loss": [], "ar_loss": []}

    # compute_loss divides by the optimizer step's counted tokens over every micro-batch and process: Trainer must
    # not divide by the accumulation steps again
    loss_is_scaled_for_ga = True

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step, each with its noise drawn per global sample (`draw_noise`), and
        the step's loss denominators summed over micro-batches and processes."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        args = self.args
        per_process = args.per_device_train_batch_size
        done = len(self.step_losses)  # global micro-batches trained so far (restored on resume)
        vocab = base_of(self.model).config.text_config.vocab_size
        counts = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(batches):
            # accelerate deals the sampler's batches round-robin: process p's i-th micro-batch is global batch
            # (done + i) * world_size + p, the same samples a single process with world_size x the batch sees
            first = ((done + i) * args.world_size + args.process_index) * per_process
            ids = [first + j for j in range(len(batch["rows"]))]
            batch["noise"] = draw_noise(batch, self.objective, self.canvas_length, vocab, ids, args.seed)
            counts += loss_counts(batch, batch["noise"], self.objective, self.canvas_length)
        counts = counts.to(device)
        if args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return batches, counts

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step (forward and backward) with half-precision products through fp32 on a CPU that has no
        native bf16/fp16 matmul (finetune.emulated): ~60x faster products there, the same rounding. Nowhere else."""
        with emulated.fp32_products(self.fp32_products):
            return super().training_step(model, inputs, num_items_in_batch)

    @property
    def fp32_products(self) -> bool:
        if not hasattr(self, "_fp32_products"):
            dtypes = {base_of(self.model).dtype}
            dtypes |= {torch.bfloat16} if self.args.bf16 else set()
            dtypes |= {torch.float16} if self.args.fp16 else set()
            self._fp32_products = emulated.wanted(self.args.device, dtypes)
        return self._fp32_products

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        noise = inputs.pop("noise", None)
        # accelerate puts mixed precision around model.forward, which the objective does not call (it runs the
        # encoder and decoder itself): without this, hardware.bf16 would leave the fp32 LoRA layers running in fp32
        with self.accelerator.autocast():
            out = self._loss_forward(model, inputs, noise)
        loss = out.loss
        if noise is not None and num_items_in_batch is not None:
            # this micro-batch's share of the step's loss: sums over the step's counted tokens of every process,
            # times the processes, as DDP and FSDP average gradients (not a mean of per-process means)
            den = num_items_in_batch.clamp_min(1)
            loss = (out.diffusion_sum + self.objective.certainty_weight * out.certainty_sum) / den[0]
            if self.objective.encoder_ar_weight > 0:
                loss = loss + self.objective.encoder_ar_weight * out.ar_sum / den[1]
            loss = loss * self.accelerator.num_processes
        if model.training:
            self._record(out, inputs["rows"])
        return (loss, out) if return_outputs else loss

    def _loss_forward(self, model, inputs, noise):
        """The objective as the model's forward: through DDP's (or FSDP's) own forward, so that its gradient
        reduction (or parameter gathering) is set up for this step. The base's forward stands in for the objective
        during the call."""
        base = base_of(self.accelerator.unwrap_model(model))
        fixed = {} if noise is None else {"t": noise.t, "canvas_index": noise.canvas_index, "noisy": noise.noisy,
                                          "self_conditioning": noise.self_conditioning,
                                          "temperature": noise.temperature}

        def objective(**batch):
            return diffusion_loss(base, batch, self.objective, self.canvas_length, **fixed)

        previous = base.__dict__.get("forward")
        base.forward = objective
        try:
            return model(**inputs)
        finally:
            if previous is None:
                del base.forward
            else:
                base.forward = previous

    def _record(self, out, rows):
        """One global micro-batch in the trace: its loss over every process's tokens, its rows in global order."""
        weight = self.objective.encoder_ar_weight
        sums = torch.stack([out.diffusion_sum.detach().double(), out.ar_sum.detach().double()])
        certainty = out.certainty_sum.detach().double().reshape(1).to(sums.device)
        stats = torch.cat([sums, out.counts.to(sums.device), certainty])
        if self.args.world_size > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
            rows = self.accelerator.gather(rows)
        diffusion = float(stats[0] / stats[2].clamp_min(1))
        ar = float(stats[1] / stats[3].clamp_min(1))
        loss = diffusion + weight * ar if weight > 0 else diffusion
        if self.objective.certainty_weight > 0:  # the penalty's part of the loss, before its weight
            certain = float(stats[4] / stats[2].clamp_min(1))
            loss += self.objective.certainty_weight * certain
            self._parts.setdefault("certainty_loss", []).append(certain)
        if not math.isfinite(loss):  # before backward: nothing of it reaches the weights (on every process alike)
            raise GuardTripped(f"step {self.state.global_step + 1}: the loss is {loss} (training rows "
                               f"{rows.tolist()})")
        self.seen_rows.append(rows.tolist())
        self.step_losses.append(loss)
        self._parts["diffusion_loss"].append(diffusion)
        self._parts["ar_loss"].append(ar)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """A checkpoint's optimizer and schedule state carry its learning rate, betas and weight decay; a resumed run
        uses this run's (a lower train.lr after a NaN is the point of resuming with it), with the moments and the
        step count from the checkpoint. With unchanged settings this is exactly what was saved."""
        fresh = [{k: g[k] for k in ("weight_decay", "betas", "eps")}  # built from this run's args
                 for g in self.optimizer.param_groups]
        fresh_base = list(self.lr_scheduler.base_lrs)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        groups = self.optimizer.param_groups  # the loaded ones: load_state_dict replaces the group dicts
        for group, settings, base in zip(groups, fresh, fresh_base):
            group.update(settings, initial_lr=base)
        self.lr_scheduler.base_lrs = fresh_base
        lrs = self.lr_scheduler.get_lr()  # this run's schedule at the checkpoint's step
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        self.lr_scheduler._last_lr = list(lrs)

    @property
    def checkpoint_root(self) -> str:
        return os.path.dirname(self.args.output_dir)  # args.output_dir is <checkpoints>/.staging

    def _save_checkpoint(self, model, trial):
        """Trainer's files into the staging directory, sealed and renamed into place. A full disk removes the staging
        and stops the run with one line (finetune.disk.DiskFull, exit 1); the last sealed checkpoint is untouched."""
        staged = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        with disk.guard(staged, needed_bytes=self._checkpoint_bytes, staging=staged, kept=self._last_sealed):
            super()._save_checkpoint(model, trial)
            distributed.barrier()  # every process has written its part (its RNG state) before process 0 seals
            if self.args.should_save:
                self._seal_checkpoint(model)
        distributed.barrier()  # and none goes on before the checkpoint is in place

    def _checkpoint_bytes(self) -> int | None:
        """What a checkpoint takes: the size of the newest one written (None before the first)."""
        found = checkpoints.listed(self.checkpoint_root)
        return disk.size(found[0][1]) if found else None

    def _last_sealed(self) -> str:
        last = checkpoints.newest_complete(self.checkpoint_root)
        return (f"the last sealed checkpoint, {last}, is intact (the same command continues from it)" if last else
                "no checkpoint had been sealed before it")

    def _seal_checkpoint(self, model):
        name = f"checkpoint-{self.state.global_step}"
        staged = os.path.join(self.args.output_dir, name)
        checkpoints.write_json(os.path.join(staged, checkpoints.TRACE),
                               {"losses": self.step_losses, "rows": self.seen_rows})
        OmegaConf.save(OmegaConf.create(self.run_config), os.path.join(staged, checkpoints.CONFIG))
        args = self.args
        checkpoints.seal(staged, {
            "step": self.state.global_step,
            "epoch": self.state.epoch,
            "samples_seen": self.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
            * args.world_size,
            "base_commit": base_commit(self.model),  # a resume loads the base at this commit
            "base_identity": base_identity(self.model),  # a local base: a resume refuses a directory that changed
        })
        checkpoints.commit(staged, os.path.join(self.checkpoint_root, name))
        checkpoints.rotate(self.checkpoint_root, self.checkpoint.keep if self.checkpoint else 1)

    def log(self, logs, *args, **kwargs):
        for key, values in self._parts.items():
            if values and "loss" in logs:
                logs[key] = round(sum(values) / len(values), 4)
                values.clear()
        super().log(logs, *args, **kwargs)


class Guards(TrainerCallback):
    """Before each optimizer step: a non-finite gradient stops the run (it would turn the adapter into NaN). Before
    the first: exactly the LoRA parameters must have gradients: one without a gradient would never train (a broken
    placement or tie), anything else with one would train what the recipe says is frozen (router, experts, base
    weights, embeddings)."""

    def __init__(self, scaler_in_use: bool = False):
        self.scaler_in_use = scaler_in_use  # float16 loss scaling skips steps with inf gradients on purpose
        self.trainable = None  # set at the first optimizer step of this process (a fresh run's or a resumed one's)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.trainable is None:
            named = list(model.named_parameters())
            if hasattr(model, "peft_config"):
                _check_gradient_flow(named, state.global_step + 1)
            # what can hold a gradient from here on: the whole model is not walked again each step
            self.trainable = [p for _, p in named if p.requires_grad]
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if grads and not self.scaler_in_use:
            norm = float(torch.nn.utils.get_total_norm(grads))
            if not math.isfinite(norm):
                raise GuardTripped(f"step {state.global_step + 1}: the gradient norm is {norm} (the loss was finite)")


def _check_gradient_flow(named, step: int) -> None:
    def some(names):
        return f"{len(names)}, e.g. {names[0]}"

    no_grad = [n for n, p in named if "lora_" in n and p.grad is None]
    if no_grad:
        raise GuardTripped(f"step {step}: LoRA parameters that received no gradient ({some(no_grad)}): they would "
                           "never train; check lora.placement and lora.targets against the objective")
    stray = [n for n, p in named if "lora_" not in n and (p.requires_grad or p.grad is not None)]
    if stray:
        raise GuardTripped(f"step {step}: parameters outside LoRA are set to train ({some(stray)}): the router, "
                           "experts, base weights and embeddings must stay frozen")


class StopOnSignal(TrainerCallback):
    """SIGINT (Ctrl-C) and SIGTERM (kill, a scheduler's pre-emption): finish the step, write a checkpoint, stop.
    A second signal stops at once (the checkpoint being written is then left unsealed, and ignored)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"\n{name}: finishing this step and writing a checkpoint, then stopping ({name} again stops at once)",
              file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.any_true(self.signum is not None):  # all processes stop at the same step
            self.signum = self.signum or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True


def training_arguments(settings: TrainSettings, output_dir: str, bf16: bool, use_cpu: bool,
                       checkpoint: CheckpointSettings | None = None) -> TrainingArguments:
    every = checkpoint.every if checkpoint else 0
    return TrainingArguments(
        output_dir=os.path.join(output_dir, checkpoints.STAGING),
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
        save_strategy="steps" if every else "no",  # a signal saves either way (StopOnSignal)
        save_steps=every or 500,
        save_total_limit=None,  # we rotate: only sealed checkpoints count (checkpoints.rotate)
        # (Trainer's gradient_checkpointing stays off: ours covers the encoder too, see prepare())
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=bf16,
        use_cpu=use_cpu,
        report_to=[name for name in settings.report_to_list() if name != "tensorboard"],  # ours: see fit()
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=settings.disable_tqdm,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a nan is the guard's to stop on, not to be averaged away in the log
        ddp_find_unused_parameters=False,  # every LoRA parameter gets a gradient each step (Guards checks it)
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
        output_dir: str, bf16: bool = False, use_cpu: bool = True, callbacks=None, log_dir: str | None = None,
        checkpoint: CheckpointSettings | None = None, resume_from: str | None = None,
        run_config: dict | None = None, strategy: str = "none") -> DiffusionTrainer:
    """Train ``model`` in place on ``examples``; returns the trainer (its state holds the log history).

    ``strategy`` (finetune.distributed.strategy) is how several launched processes share the work: ddp, or fsdp
    (the frozen base sharded, LoRA as with DDP); "none" for one process.
    ``output_dir`` is where checkpoints go (<run>/checkpoints). With ``checkpoint`` settings the run is a user's run:
    sealed checkpoints every ``checkpoint.every`` steps, one on SIGINT/SIGTERM (then ``trainer.stopped_by`` holds
    the signal), and ``resume_from`` continues a checkpoint bit for bit (weights, optimizer, schedule, RNG, data
    position, loss trace). Without (the tiny base's pre-training, benchmarks) none of that. A guard that trips is a
    RunStopped naming the step and the last good checkpoint.
    With train.report_to naming tensorboard, the loss, its two parts, the learning rate and the grad norm go live
    to ``log_dir`` (the run directory's tensorboard/, not Trainer's default checkpoints/runs/<time>_<host>).
    """
    callbacks = list(callbacks or [])
    prepare(model, settings)
    if strategy != "none":  # accelerate wraps the model in DDP, which syncs only what trains
        model._ddp_params_and_buffers_to_ignore = distributed.frozen_names(model)
        if strategy == "fsdp":
            distributed.shard_frozen(model)
    if "tensorboard" in settings.report_to_list():
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=log_dir or os.path.join(output_dir, "tensorboard"))))
    stop = StopOnSignal()
    if checkpoint is not None:
        callbacks.append(stop)
        if distributed.is_main():
            checkpoints.clean_staging(output_dir)
        distributed.barrier()
    trainer = DiffusionTrainer(
        model=model,
        args=training_arguments(settings, output_dir, bf16, use_cpu, checkpoint),
        train_dataset=ExampleDataset(examples),
        data_collator=lambda batch: collate(batch, pad_id),
        objective=objective,
        canvas_length=canvas_length,
        callbacks=callbacks,
        checkpoint=checkpoint,
        run_config=run_config,
    )
    trainer.add_callback(Guards(scaler_in_use=getattr(trainer.accelerator, "scaler", None) is not None))
    if resume_from:
        with open(os.path.join(resume_from, checkpoints.TRACE)) as f:
            trace = json.load(f)
        trainer.step_losses, trainer.seen_rows = trace["losses"], trace["rows"]
    trained = False
    try:
        if checkpoint is None:
            trainer.train()
        else:
            with stop:
                trainer.train(resume_from_checkpoint=resume_from)
        trained = True
    except GuardTripped as e:
        last = checkpoints.newest_complete(output_dir)
        kept = (f"the last good checkpoint is {last} (intact: the same command with output_dir="
                f"{os.path.dirname(os.path.abspath(output_dir))} continues from it, and adding a lower train.lr may "
                "help)") if last else "no checkpoint was written before it (checkpoint.every sets how often)"
        raise RunStopped(f"{e}; training stopped before the optimizer step, so nothing was updated with it; {kept}",
                         code=1) from None
    finally:
        if checkpoint is not None:
            if trained:  # the end of Trainer.train globs the staging directory on every process: process 0 removing
                distributed.barrier()  # it meanwhile failed another's scandir (FileNotFoundError: .../.staging)
            if distributed.is_main():
                checkpoints.clean_staging(output_dir)
    if distributed.any_true(stop.signum is not None):  # a signal one process alone caught stops them all
        stop.signum = stop.signum or signal.SIGTERM
    trainer.stopped_by = stop.signum
    if stop.signum and trainer.state.global_step < settings.max_steps and not distributed.any_true(os.path.isdir(
            os.path.join(output_dir, f"checkpoint-{trainer.state.global_step}"))):
        trainer._save_checkpoint(model, None)  # the signal came between the last step's end and train()'s return
    return trainer
