"""python -m eval [recipe=NAME] [adapter=PATH] [out=DIR] [key=value ...]"""

from __future__ import annotations

import os
import sys
import time

USAGE = """usage: python -m eval [recipe=NAME] [adapter=PATH] [out=DIR] [key=value ...] [--cfg job|hydra|all]

  recipe=NAME    a file in recipes/ (default: tiny): the model, held-out data and eval.* settings to use
  adapter=PATH   any saved PEFT adapter directory for DiffusionGemma (ours: outputs/<run>/adapter; or one saved by
                 TRL, axolotl, Unsloth, stock peft); its base model is the one in its adapter_config.json and its
                 placement (shared, separate or decoder-only LoRA) is read from its weights. Without it the base
                 model alone is evaluated.
  out=DIR        where report.json, report.md and the plots go (default: <adapter>/../eval-<time>, or
                 outputs/eval-<recipe>-<time>)
  key=value      any config key, e.g. eval.max_examples=32 eval.generation.max_denoising_steps=16
                 'eval.sweep={param:max_denoising_steps,values:[4,8,16,48]}'  eval.benchmark=null
                 eval.speed_curve=true (score vs tokens per forward over max_denoising_steps x entropy_bound)
  --cfg job      check the arguments, print the resolved config and exit (loads no model); hydra|all: Hydra's too
"""


def output_dir(out: str | None, adapter: str | None, recipe: str) -> str:
    from finetune.errors import UserError

    stamp = time.strftime("%Y%m%d-%H%M%S")
    if out is None:
        parent = os.path.dirname(os.path.abspath(adapter)) if adapter else "outputs"
        out = os.path.join(parent, f"eval-{stamp}" if adapter else f"eval-{recipe}-{stamp}")
    if os.path.exists(os.path.join(out, "report.json")):
        raise UserError(f"out={out} already holds a report.json: choose another out= (nothing overwritten)")
    return os.path.abspath(out)


def evaluate(overrides: list, cfg_mode: str | None) -> dict | None:
    import logging

    import torch
    from omegaconf import OmegaConf

    from eval.compare import compare, validate
    from eval.report import console_summary
    from finetune import runlock
    from finetune.cli import show_config, take
    from finetune.config import check, compose, recipe_choice, settings
    from finetune.data import eval_prompts, load_splits
    from finetune.model import (adapter_base, adapter_revision, base_commit, base_identity, base_of, load,
                                resolve_device, resolve_model_path, weights_note)
    from finetune.objective import objective_settings
    from finetune.pretrain import base_model_path

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    adapter, out = take(overrides, "adapter"), take(overrides, "out")
    cfg = compose(overrides)
    check(cfg)
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    validate(eval_cfg)
    objective_settings(cfg.objective)
    adapter = os.path.abspath(os.path.expanduser(adapter)) if adapter else None
    if adapter and not cfg_mode:  # the adapter of a run still training is a moving target
        runlock.refuse_if_training(adapter, "adapter=")
    base = adapter_base(adapter) if adapter else None
    if cfg_mode:
        show_config(overrides, cfg_mode)
        print(f"# adapter: {adapter}\n# base model: {base or cfg.model.name_or_path}")
        return None
    out_dir = output_dir(out, adapter, recipe_choice(overrides))
    device = resolve_device(cfg.hardware.device)
    torch.manual_seed(cfg.seed)
    # an adapter's base: the commit the adapter records, else model.revision when it names the recipe's base
    revision = adapter_revision(adapter, cfg.model.name_or_path, cfg.model.revision) if adapter else \
        cfg.model.revision
    path = resolve_model_path(base) if adapter else base_model_path(settings(cfg.model), cfg.cache_dir)
    model, tokenizer, placement = load(path, device, cfg.model.dtype, adapter=adapter,
                                       quantization=cfg.model.quantization, quant_type=cfg.model.quant_type,
                                       attn=cfg.model.attn_implementation, experts=cfg.model.experts_implementation,
                                       revision=revision, trust_remote_code=cfg.model.trust_remote_code)
    canvas_length = (model.get_base_model() if adapter else model).config.canvas_length
    objective = objective_settings(cfg.objective, tokenizer)
    data = settings(cfg.data)
    _, _, _, rows, examples, stats = load_splits(data, tokenizer, canvas_length)
    pairs = eval_prompts(rows, tokenizer, data)
    print(f"model: {path}" + (f" + adapter {adapter} ({placement} LoRA)" if adapter else " (no adapter: base only)")
          + f" | held-out {min(len(rows), eval_cfg['max_examples'])} of {stats.read} rows | report in {out_dir}")
    meta = {"recipe": recipe_choice(overrides), "base_model": path, "base_commit": base_commit(model),
            "base_identity": base_identity(model),
            "base_weights": weights_note(cfg.model.quantization, cfg.model.quant_type, base_of(model).dtype),
            "adapter_path": adapter, "adapter_placement": placement}
    report = compare(model, tokenizer, pairs, examples, objective, canvas_length, eval_cfg,
                     out_dir=out_dir, has_adapter=adapter is not None, data_settings=data, meta=meta)
    OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"))
    print(console_summary(report, out_dir))
    return report


def main(argv: list[str] | None = None) -> int:
    from finetune.cli import command

    return command(argv, USAGE, lambda overrides, mode: evaluate(overrides, mode) and 0)


if __name__ == "__main__":
    sys.exit(main())
