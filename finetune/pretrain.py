"""Pre-training the built-in tiny base: a small pipeline of its own (tiny model -> data -> objective -> train).

A random tiny model cannot be LoRA-tuned into anything (the frozen tied head caps its logits), so the base is first
fully trained on generic string tasks (copy, upper, double, rotate, swap, skip, mirror); the fine-tuning tasks
(shift, and reverse, sort, followup for bench/objective_ablation.py) are new to it.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
from transformers import DiffusionGemmaForBlockDiffusion

from finetune.config import DataSettings, ModelSettings, ObjectiveConfig, TinyBaseSettings, TrainSettings
from finetune.data import build_examples
from finetune.model import resolve_model_path
from finetune.tiny import base_cached, base_dir, build_config, build_tokenizer, generation_config, pretrain_rows
from finetune.train import fit


def ensure_base(cache_dir: str, settings: TinyBaseSettings | None = None, log=print) -> str:
    """Path of the pre-trained tiny base, training and caching it on first use (about 4 minutes on 2 CPU cores).

    Written to a temporary directory and renamed, so an interrupted run never leaves a half-written base.
    """
    settings = settings or TinyBaseSettings()
    path = base_dir(cache_dir, settings)
    if base_cached(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log(f"Pre-training the tiny base once ({settings.steps} steps, about 4 minutes on 2 CPU cores); cached at {path}")
    started = time.monotonic()
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, settings.size, settings.canvas_length)
    torch.manual_seed(settings.seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    examples, _ = build_examples(
        pretrain_rows(settings.rows, settings.seed), tokenizer, DataSettings(), settings.canvas_length, "tiny base"
    )
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path), prefix=".tmp-tiny-base-") as tmp:
        train = TrainSettings(
            max_steps=settings.steps, batch_size=settings.batch_size, grad_accum=1, lr=settings.lr, min_lr_ratio=0.1,
            warmup_steps=50, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0, logging_steps=100,
            seed=settings.seed, report_to="none",
        )
        fit(model, examples, train, ObjectiveConfig(), settings.canvas_length, tokenizer.pad_token_id,
            os.path.join(tmp, "trainer"))
        out = os.path.join(tmp, "base")
        model.generation_config = generation_config(tokenizer, settings.canvas_length)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            os.rename(out, path)
        except OSError:
            if not base_cached(path):  # another process won the race
                raise
    log(f"Pre-trained the tiny base in {time.monotonic() - started:.0f} s")
    return path


def base_model_path(model: ModelSettings, cache_dir: str, log=print) -> str:
    """The base a run starts from: the built-in tiny one (pre-trained and cached on first use), or
    model.name_or_path checked (a local directory must exist and takes no model.revision; a hub id passes through)."""
    if model.name_or_path == "tiny":
        return ensure_base(cache_dir, model.tiny, log=log)
    return resolve_model_path(model.name_or_path, model.revision)



USAGE = """usage: python -m finetune.pretrain [key=value ...] [--cfg job|hydra|all]

Pre-train and cache the tiny base now (the first tiny run does it on its own; a launch of several processes needs it
cached first). Reads cache_dir and model.tiny.* from the config; prints the cached path. --cfg prints the config
and does nothing else."""


def main(argv: list | None = None) -> int:
    from omegaconf import OmegaConf

    from finetune.cli import command, show_config
    from finetune.config import compose, settings

    def body(overrides, mode):
        if mode:
            return show_config(overrides, mode)
        cfg = compose(overrides)
        OmegaConf.resolve(cfg)
        print(ensure_base(cfg.cache_dir, settings(cfg.model).tiny))

    return command(argv, USAGE, body)


if __name__ == "__main__":
    raise SystemExit(main())
