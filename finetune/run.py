"""One fine-tuning run: config -> model + tokenizer -> data -> LoRA training -> evaluation -> saved adapter."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import torch
from omegaconf import DictConfig, OmegaConf

from finetune import preflight
from finetune.data import DataSettings, eval_prompts
from finetune.errors import UserError
from finetune.model import (
    LoraSettings, attach_lora, count_parameters, dtype_for, load_model, load_tokenizer, resolve_device,
    resolve_model_path, target_regex,
)
from finetune.objective import ObjectiveConfig
from finetune.report import plot_loss, summary
from finetune.train import TrainSettings, fit

log = logging.getLogger("finetune")


def base_model_path(cfg: DictConfig) -> str:
    if cfg.model.name_or_path == "tiny":
        from finetune.tiny import TinyBaseSettings, ensure_base

        return ensure_base(cfg.cache_dir, TinyBaseSettings(**cfg.model.tiny))
    return resolve_model_path(cfg.model.name_or_path)


def objective_settings(cfg: DictConfig, tokenizer=None) -> ObjectiveConfig:
    """Validated objective settings; without a tokenizer (an early check) a mask token id is not resolved yet."""
    settings = dict(cfg.objective)
    if settings["corruption"] == "mask" and settings["mask_token_id"] is None:
        settings["mask_token_id"] = tokenizer.mask_token_id if tokenizer is not None else -1
    try:
        objective = ObjectiveConfig(**settings)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.lora.placement == "decoder" and objective.encoder_ar_weight > 0:
        raise UserError(
            "lora.placement=decoder leaves the encoder frozen, so objective.encoder_ar_weight has nothing to train: "
            "set objective.encoder_ar_weight=0 or lora.placement=shared"
        )
    return objective


def make_run_dir(cfg: DictConfig) -> str:
    path = cfg.output_dir or os.path.join("outputs", f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(os.path.join(path, "adapter")):
        raise UserError(f"output_dir {path} already holds an adapter: choose another output_dir (nothing overwritten)")
    os.makedirs(path, exist_ok=True)
    return os.path.abspath(path)


def save_adapter(peft_model, tokenizer, path: str):
    """Write the adapter next to its final place, then rename: an interrupted save leaves no half adapter."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    peft_model.get_base_model().generation_config.save_pretrained(tmp)
    os.replace(tmp, path)


def run(cfg: DictConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.time()
    device = resolve_device(cfg.hardware.device)
    torch.manual_seed(cfg.seed)
    objective_settings(cfg)  # settings errors before any download or pre-training
    data_settings = DataSettings(**OmegaConf.to_container(cfg.data))
    target_regex(LoraSettings(**cfg.lora))
    if cfg.eval.enabled:  # a typo in eval.* must not wait for the end of training to show
        from eval.compare import validate

        validate(OmegaConf.to_container(cfg.eval))
    path = base_model_path(cfg)  # first: a wrong model path fails before anything is written
    run_dir = make_run_dir(cfg)
    OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"))
    print(f"run directory: {run_dir}")

    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype_for(cfg.model.dtype, device), device, cfg.model.load_in_4bit,
                       cfg.model.attn_implementation)
    canvas_length = model.config.canvas_length
    objective = objective_settings(cfg, tokenizer)

    text, preflight_data, splits = preflight.report(data_settings, tokenizer, canvas_length)
    preflight.write(run_dir, text, preflight_data)
    train_rows, train_ex, train_stats, eval_rows, eval_ex, eval_stats = splits
    print(f"data: train {train_stats.kept}/{train_stats.read} rows kept ({train_stats.targets} turns), "
          f"eval {eval_stats.kept}/{eval_stats.read} (details: {run_dir}/preflight.txt)")

    peft_model = attach_lora(model, LoraSettings(**cfg.lora))
    trainable, total = count_parameters(peft_model)
    print(f"model: {path} | canvas {canvas_length} | LoRA trainable {trainable:,} of {total:,} parameters")

    train_settings = TrainSettings(**cfg.train)
    t0 = time.time()
    trainer = fit(peft_model, train_ex, train_settings, objective, canvas_length, tokenizer.pad_token_id,
                  os.path.join(run_dir, "checkpoints"), bf16=cfg.hardware.bf16, use_cpu=device == "cpu")
    train_seconds = time.time() - t0
    save_adapter(peft_model, tokenizer, os.path.join(run_dir, "adapter"))

    logged = [e for e in trainer.state.log_history if "loss" in e]
    losses = trainer.step_losses
    metrics = {
        "run_name": cfg.run_name,
        "base_model": path,
        "training": {
            "steps": trainer.state.global_step,
            "seconds": train_seconds,
            "trainable_params": trainable,
            "loss_first": losses[0],
            "loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "log_history": trainer.state.log_history,
        },
        "data": {"train": train_stats.summary(), "eval": eval_stats.summary()},
    }
    plot_loss(losses, logged, os.path.join(run_dir, "loss_curve.png"), train_settings.grad_accum)

    if cfg.eval.enabled:
        from eval.compare import compare

        pairs = eval_prompts(eval_rows, tokenizer, data_settings)
        metrics["eval"] = compare(peft_model, tokenizer, pairs, eval_ex, objective, canvas_length,
                                  OmegaConf.to_container(cfg.eval), out_dir=run_dir, data_settings=data_settings)
    metrics["seconds_total"] = time.time() - started
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(summary(metrics, run_dir))
    if cfg.export.format != "none":  # after metrics: a refused or failed export leaves the finished run intact
        from finetune.export import export_at_end_of_run

        metrics["export"] = export_at_end_of_run(run_dir, cfg, peft_model, tokenizer, device)
    return metrics
