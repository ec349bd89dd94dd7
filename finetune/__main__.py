"""python -m finetune [recipe=NAME] [key=value ...] [-m] [--cfg job|hydra|all] [--info] [--help]

Hydra as its users know it (`@hydra.main`): `-m` sweeps into `multirun/<run_name>-<time>/<job>/`, `hydra.run.dir`
(or `output_dir`) places a run, `--cfg`, `--info`, `--hydra-help` and tab completion work. Hydra alone would print a
stack of lines and exit 1 on a typo, and create the run directory first; so every job's overrides are composed and
checked here before Hydra starts: bad input is one `error:` line, exit code 2, and nothing is written. A run then
takes its directory's lock (finetune.runlock) before Hydra writes there: a second start on a directory that another
process trains in is refused the same way, naming the holder; a sweep's jobs each lock their own directory.
"""

from __future__ import annotations

import os
import sys

import hydra

from finetune.config import register


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def job(cfg) -> None:
    """One run, in the directory Hydra made for it; a failure before training leaves no directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from finetune import runlock
    from finetune.distributed import is_main
    from finetune.errors import run_cli
    from finetune.run import remove_if_unused, run

    run_dir = HydraConfig.get().runtime.output_dir
    code = 1

    def body():
        if is_main():  # a sweep's job locks its own directory here; a single run holds it already (main)
            runlock.acquire(run_dir)
        return run(cfg, run_dir) and 0

    try:
        code = run_cli(body)
    finally:
        if code and is_main():
            remove_if_unused(run_dir)  # while still locked: nobody starts in a directory being removed
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            runlock.release(run_dir)  # the next job of the sweep is another directory; a single run holds to its end
    if code:
        sys.exit(code)


def check(argv: list, claim: bool = False, claimed: list | None = None) -> int:
    """Compose and check every job this command line would start; 0, or 2 after a one-line error. A run directory
    that another process trains in is refused (nothing is written to check that); with ``claim`` a single run (not
    -m, not --cfg) then takes its lock, on rank 0 of several processes, and appends the directory as the command
    line would name it to ``claimed``."""
    from finetune import runlock
    from finetune.cli import HYDRA_ANSWERS, hydra_flags, jobs, take_cfg
    from finetune.config import compose
    from finetune.distributed import is_main, world_size
    from finetune.errors import UserError, run_cli

    def body():
        args = list(argv)
        cfg_mode = take_cfg(args)  # a bad --cfg value is our one-line error, not argparse's usage block
        overrides, multirun = hydra_flags(args)
        if cfg_mode and multirun:
            raise UserError("give -m (run a sweep) or --cfg (print the config), not both")
        given = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
        if world_size() > 1 and (multirun or not given & {"output_dir", "hydra.run.dir"}):
            raise UserError(f"this launch started {world_size()} processes: give output_dir=DIR, the same on every "
                            "node (the default names the run by the time each process reads the clock), and no -m")
        if multirun and any(o.split("=", 1)[0].lstrip("+~") in ("output_dir", "resume") for o in overrides):
            raise UserError("output_dir and resume name one run; a -m sweep puts each job in "
                            "hydra.sweep.dir/<job number>: give hydra.sweep.dir=DIR instead")
        from omegaconf import OmegaConf, open_dict

        from finetune.run import check as check_run

        for overrides_of_job in jobs(overrides, multirun):
            cfg = compose(overrides_of_job, return_hydra_config=True)
            named = str(cfg.hydra.run.dir)  # output_dir as resolved now (its ${now:...} read once)
            run_dir = None if multirun else os.path.abspath(named)
            sweep_dir = os.path.abspath(str(cfg.hydra.sweep.dir))
            if multirun and os.path.isdir(sweep_dir) and os.listdir(sweep_dir):
                raise UserError(f"hydra.sweep.dir={sweep_dir} already holds runs: choose another (nothing "
                                "overwritten)")
            with open_dict(cfg):
                del cfg["hydra"]
            OmegaConf.resolve(cfg)
            locking = run_dir is not None and not cfg_mode and is_main()
            if locking:  # before the resume decision reads a directory another process is writing
                runlock.refuse_if_held(run_dir)
            check_run(cfg, run_dir)
            if locking and claim:
                runlock.acquire(run_dir)  # held until this process ends: Hydra writes .hydra/ after this
                if claimed is not None:
                    claimed.append(named)

    if any(a in HYDRA_ANSWERS or a.startswith(("--shell-completion", "-sc")) for a in argv):
        return 0
    return run_cli(body)


def in_place(argv: list) -> list:
    """resume=PATH continues the run PATH belongs to: in its own directory (unless output_dir names another: a new
    run branched from it) and with the overrides of that run's last launch (Hydra's <run>/.hydra/overrides.yaml)
    beneath the ones given now, so that `python -m finetune resume=PATH` alone is the run's own command."""
    from omegaconf import OmegaConf

    from finetune.checkpoints import resume_value, run_of

    def key(override):
        return override.split("=", 1)[0].lstrip("+~")

    values = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not values or resume_value(values[-1]) in ("auto", "false") or "-m" in argv or "--multirun" in argv:
        return argv
    run = run_of(values[-1])
    given = {key(a) for a in argv if "=" in a}
    launched = os.path.join(run, ".hydra", "overrides.yaml")
    earlier = list(OmegaConf.load(launched)) if os.path.isfile(launched) else []
    argv = [o for o in earlier if key(o) not in given | {"output_dir", "hydra.run.dir", "resume"}] + argv
    return argv if given & {"output_dir", "hydra.run.dir"} else argv + [f"output_dir={run}"]


def hydra_value(text: str) -> str:
    """``text`` as one value of a Hydra override: as it is when Hydra reads it back unchanged, quoted otherwise."""
    import re

    if re.fullmatch(r"[\w./\-]+", text):
        return text
    return "'" + text.replace("'", "\\'") + "'"


def main(argv: list | None = None) -> int:
    argv = in_place(list(sys.argv[1:] if argv is None else argv))
    claimed = []
    code = check(argv, claim=True, claimed=claimed)
    if code:
        return code
    if claimed and not any(a.split("=", 1)[0].lstrip("+~") in ("output_dir", "hydra.run.dir") for a in argv):
        # the default directory is named by the clock (${now:...}), which Hydra reads again: a second later the run
        # would go to another directory than the one locked, and leave that one behind with only its lock
        argv = argv + [f"output_dir={hydra_value(claimed[0])}"]
    register()
    modes = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--cfg", "-c")]
    if modes and modes[-1] in ("job", "all") and "--resolve" not in argv:  # hydra alone cannot resolve ${output_dir}
        argv = argv + ["--resolve"]  # what the run will use, as python -m eval and preflight print it
    from finetune.distributed import is_main

    if not is_main():  # one process of several: rank 0 alone writes Hydra's files and prints; errors still show
        argv = argv + ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]"]
        sys.stdout = open(os.devnull, "w")
    sys.argv = [sys.argv[0]] + argv
    job()
    return 0


if __name__ == "__main__":
    sys.exit(main())
