"""The command line of ``python -m finetune.export``, through the shared prologue (``finetune.cli.command``: help,
``--cfg``, one-line errors). Its keys are the ``ExportSettings`` schema's (finetune/config.py), type-checked by
OmegaConf exactly as the ``export`` group of a run is; ``run_dir=`` or ``adapter=`` names what is exported."""

from __future__ import annotations

import os
import shlex
import warnings

from omegaconf import OmegaConf

from finetune.cli import command, take
from finetune.config import ExportSettings, explain, settings
from finetune.errors import UserError
from finetune.export import export_run
from finetune.export.source import export_dir
from finetune.export.staging import output_dirs

SOURCE_KEYS = ("run_dir", "adapter")

USAGE = """usage: python -m finetune.export run_dir=PATH | adapter=DIR [format=adapter|merged|both] [key=value ...]
                                [--cfg job]

  run_dir=PATH        a run directory written by python -m finetune (config.yaml, metrics.json, adapter/)
  adapter=DIR         or any saved PEFT adapter for DiffusionGemma (stock peft, TRL, axolotl, Unsloth's
                      DiffusionTrainer); its base is the one its adapter_config.json names
  format=adapter      adapter: the PEFT adapter (transformers + peft load it); merged: full weights with the
                      adapter folded in, in the released layout (vLLM serves it); both
  out=DIR             where the export goes (default <run_dir>/export/<format>, or <DIR>-export/<format> beside
                      an adapter); with format=both, DIR/adapter and DIR/merged
  dtype=bfloat16      merged weights: bfloat16 (as released) | float32 | float16
  verify=true         reload the export in a fresh process and compare logits with the fine-tuned model
  untie=false         merged, when encoder and decoder got different deltas (decoder-only, or separate adapters
                      that differ): true writes them untied (twice the text weights; vLLM cannot serve that);
                      false refuses and says why
  max_shard_size=5GB  merged safetensors shard size
  push_to_hub=null    a hub repo id (org/name) to upload the verified export to (format=both: the merged one
                      goes to org/name-merged)
  device=auto         where the model runs for the merge and the check: auto | cpu | cuda
  --cfg job           check the arguments, print the resolved export settings and exit (loads nothing)
"""


def parse(overrides: list) -> tuple[str | None, str | None, ExportSettings]:
    """``key=value`` arguments -> (run_dir, adapter, settings); exactly one of run_dir and adapter is given.
    An unknown key, a value of the wrong type or a bad value is a UserError naming the key."""
    args = list(overrides)
    run_dir, adapter = take(args, "run_dir") or None, take(args, "adapter") or None
    keys = list(ExportSettings.__dataclass_fields__)
    for arg in args:
        if "=" not in arg:
            raise UserError(f"argument {arg!r} is not key=value (python -m finetune.export --help lists the keys)")
        key = arg.split("=", 1)[0]
        if key not in keys:
            raise UserError(f"unknown key {key!r}: use {', '.join(SOURCE_KEYS + tuple(keys))}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(ExportSettings), OmegaConf.from_dotlist(args))
    except Exception as e:  # OmegaConf's type errors name the key
        raise UserError(explain(e)) from None
    export = settings(node).validate()
    if run_dir and adapter:
        raise UserError("run_dir= and adapter= are both given: export one (run_dir= for a run of python -m finetune, "
                        "adapter= for any saved PEFT adapter)")
    if not run_dir and not adapter:
        raise UserError("run_dir=PATH or adapter=DIR is required: a run directory written by python -m finetune, "
                        "or a saved PEFT adapter for DiffusionGemma")
    return run_dir, adapter, export


def show(run_dir: str | None, adapter: str | None, export: ExportSettings) -> None:
    """``--cfg job``: the resolved settings, what is exported and where it would go; nothing is read or loaded."""
    source = f"run_dir: {os.path.abspath(run_dir)}" if run_dir else f"adapter: {os.path.abspath(adapter)}"
    outs = output_dirs(export, export_dir(run_dir, adapter))
    print(f"# {source}")
    for fmt, path in outs.items():
        print(f"# writes {fmt}: {path}")
    print(OmegaConf.to_yaml(OmegaConf.structured(export)), end="")


def main(argv: list[str] | None = None) -> int:
    def body(overrides: list, cfg_mode: str | None):
        run_dir, adapter, export = parse(overrides)
        if cfg_mode == "hydra":
            raise UserError("python -m finetune.export has no Hydra settings: use --cfg job")
        if cfg_mode:
            return show(run_dir, adapter, export)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own log lines say what happens; errors stay one line
        warnings.simplefilter("ignore", FutureWarning)  # library deprecation notices, not the user's concern
        export_run(run_dir, export, adapter=adapter, command="python -m finetune.export " + shlex.join(overrides))

    return command(argv, USAGE, body)
