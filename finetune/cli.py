"""The one command-line prologue of `python -m finetune`, `python -m eval`, `python -m finetune.preflight` and
`python -m finetune.export`: `-h/--help`, `--cfg job|hydra|all` (print the config, load nothing), command keys such
as `adapter=` taken out of the overrides, and every error as one line with exit code 2 (`finetune.errors.run_cli`).

`python -m finetune` itself then runs through `@hydra.main` (see `finetune.__main__`); this module checks every job
of it first with `compose`, so a typo is one line before Hydra creates any run directory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from omegaconf import OmegaConf

from finetune.config import compose
from finetune.errors import UserError, run_cli

CFG_MODES = ("job", "hydra", "all")
# Hydra's own flags that take a value, and those that do not; -m / --multirun is handled on its own
HYDRA_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun")
HYDRA_FLAGS = ("--resolve", "--run", "-r")
# flags Hydra answers by itself without running a job: nothing of ours to check
HYDRA_ANSWERS = ("--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc")


def take(args: list, key: str) -> str | None:
    """Remove ``key=value`` from ``args`` and return the value (the last one given), or None."""
    value = None
    for arg in list(args):
        if arg.startswith(key + "="):
            value = arg.split("=", 1)[1]
            args.remove(arg)
    return value


def take_cfg(args: list) -> str | None:
    """Remove ``--cfg MODE`` (or ``-c MODE``) from ``args``; MODE must be job, hydra or all."""
    mode = None
    for flag in ("--cfg", "-c"):
        while flag in args:
            i = args.index(flag)
            value = args[i + 1] if i + 1 < len(args) else None
            if value not in CFG_MODES:
                raise UserError(f"--cfg takes {', '.join(CFG_MODES)} (got {value or 'nothing'})")
            del args[i : i + 2]
            mode = value
    return mode


def show_config(overrides: list, mode: str) -> None:
    """Print the composed config: job (resolved, what the run uses), hydra (Hydra's own settings) or all."""
    if mode == "job":
        print(OmegaConf.to_yaml(compose(overrides)), end="")
        return
    cfg = compose(overrides, return_hydra_config=True)
    print(OmegaConf.to_yaml(cfg.hydra if mode == "hydra" else cfg), end="")


def command(argv: list | None, usage: str, body: Callable[[list, str | None], object]) -> int:
    """Run a command: help, then ``body(overrides, cfg_mode)`` under one-line errors. ``body`` prints the config
    itself when ``cfg_mode`` is set (it may need to check its own keys first) and loads nothing then."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(usage)
        return 0

    def run():
        mode = take_cfg(args)
        result = body(args, mode)
        return result if isinstance(result, int) else 0

    return run_cli(run)


def hydra_flags(args: list) -> tuple[list, bool]:
    """(the overrides without Hydra's flags, whether -m/--multirun was given)."""
    rest, multirun, skip = [], False, False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_VALUE_FLAGS:
            skip = True
        elif arg in HYDRA_FLAGS or arg.split("=", 1)[0] in HYDRA_VALUE_FLAGS:
            continue
        else:
            rest.append(arg)
    return rest, multirun


def jobs(overrides: list, multirun: bool) -> list:
    """The override list of every job a command line starts: one, or with -m one per sweep combination."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise UserError(str(e).strip().splitlines()[0]) from None
    batches = BasicSweeper.split_arguments(parsed, None)
    return [job for batch in batches for job in batch]
