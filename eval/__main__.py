"""python -m eval [recipe=NAME] [adapter=PATH] [out=DIR] [key=value ...]"""

from __future__ import annotations

import json
import os
import sys
import time

USAGE = """usage: python -m eval [recipe=NAME] [adapter=PATH] [out=DIR] [key=value ...] [--cfg job]

  recipe=NAME    a file in recipes/ (default: tiny): the model, held-out data and eval.* settings to use
  adapter=PATH   a PEFT adapter directory (e.g. outputs/<run>/adapter); its base model is the one it was trained
                 on (adapter_config.json). Without it the base model alone is evaluated.
  out=DIR        where report.json, report.md and the plots go (default: <adapter>/../eval-<time>, or
                 outputs/eval-<recipe>-<time>)
  key=value      any config key, e.g. eval.max_examples=32 eval.generation.max_denoising_steps=16
                 'eval.sweep={param:max_denoising_steps,values:[4,8,16,48]}'  eval.benchmark=null
  --cfg job      check the arguments, print the resolved config and exit (loads no model)
"""


def _take(argv: list[str], key: str) -> str | None:
    value = None
    for arg in list(argv):
        if arg.startswith(key + "="):
            value = arg.split("=", 1)[1]
            argv.remove(arg)
    return value


def adapter_base(adapter: str) -> str:
    """The base model an adapter was trained on, from its adapter_config.json."""
    from finetune.errors import UserError

    config_path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isdir(adapter):
        raise UserError(f"adapter={adapter!r} does not exist: give a directory saved by a run, "
                        "e.g. outputs/<run>/adapter")
    if not os.path.isfile(config_path):
        raise UserError(f"adapter={adapter!r} holds no adapter_config.json: point it at a PEFT adapter directory")
    try:
        with open(config_path) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {config_path}: {e}") from None
    if not base:
        raise UserError(f"{config_path} names no base_model_name_or_path: cannot tell which base to load")
    if os.path.isabs(base) and not os.path.exists(base):
        raise UserError(f"the adapter's base model {base} (adapter_config.json) no longer exists: rebuild it (the "
                        "tiny base: run python -m finetune with the same FINETUNE_CACHE) or edit that path")
    return base


def output_dir(out: str | None, adapter: str | None, recipe: str) -> str:
    from finetune.errors import UserError

    stamp = time.strftime("%Y%m%d-%H%M%S")
    if out is None:
        parent = os.path.dirname(os.path.abspath(adapter)) if adapter else "outputs"
        out = os.path.join(parent, f"eval-{stamp}" if adapter else f"eval-{recipe}-{stamp}")
    if os.path.exists(os.path.join(out, "report.json")):
        raise UserError(f"out={out} already holds a report.json: choose another out= (nothing overwritten)")
    return os.path.abspath(out)


def evaluate(argv: list[str], show_cfg: bool = False) -> dict | None:
    import logging

    import torch
    from omegaconf import OmegaConf

    from eval.compare import compare, validate
    from eval.report import console_summary
    from finetune.config import compose, recipe_choice
    from finetune.data import DataSettings, eval_prompts, load_splits
    from finetune.model import (
        dtype_for, load_adapter, load_model, load_tokenizer, resolve_device, resolve_model_path,
    )
    from finetune.run import base_model_path, objective_settings  # the training run's own choices

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    adapter, out = _take(argv, "adapter"), _take(argv, "out")
    cfg = compose(argv)
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    validate(eval_cfg)
    objective_settings(cfg)
    adapter = os.path.abspath(os.path.expanduser(adapter)) if adapter else None
    base = adapter_base(adapter) if adapter else None
    if show_cfg:
        print(OmegaConf.to_yaml(cfg), end="")
        print(f"# adapter: {adapter}\n# base model: {base or cfg.model.name_or_path}")
        return None
    out_dir = output_dir(out, adapter, recipe_choice(argv))
    device = resolve_device(cfg.hardware.device)
    torch.manual_seed(cfg.seed)
    path = resolve_model_path(base) if adapter else base_model_path(cfg)

    has_tokenizer = adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json"))
    tokenizer = load_tokenizer(adapter if has_tokenizer else path)
    model = load_model(path, dtype_for(cfg.model.dtype, device), device, cfg.model.load_in_4bit,
                       cfg.model.attn_implementation)
    canvas_length = model.config.canvas_length
    objective = objective_settings(cfg, tokenizer)
    data = DataSettings(**OmegaConf.to_container(cfg.data))
    _, _, _, rows, examples, stats = load_splits(data, tokenizer, canvas_length)
    pairs = eval_prompts(rows, tokenizer, data)
    if adapter:
        model = load_adapter(model, adapter)
    print(f"model: {path}" + (f" + adapter {adapter}" if adapter else " (no adapter: base only)")
          + f" | held-out {min(len(rows), eval_cfg['max_examples'])} of {stats.read} rows | report in {out_dir}")
    meta = {"recipe": recipe_choice(argv), "base_model": path, "adapter_path": adapter}
    report = compare(model, tokenizer, pairs, examples, objective, canvas_length, eval_cfg,
                     out_dir=out_dir, has_adapter=adapter is not None, data_settings=data, meta=meta)
    OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"))
    print(console_summary(report, out_dir))
    return report


def main(argv: list[str] | None = None) -> int:
    from finetune.errors import run_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    show_cfg = False
    if "--cfg" in argv:
        i = argv.index("--cfg")
        if argv[i + 1 : i + 2] != ["job"]:
            print("error: --cfg takes 'job'", file=sys.stderr)
            return 2
        del argv[i : i + 2]
        show_cfg = True
    return run_cli(lambda: evaluate(argv, show_cfg) and 0)


if __name__ == "__main__":
    sys.exit(main())
