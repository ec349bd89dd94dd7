"""Does certainty forcing buy parallelism? The default objective against objective.certainty_weight > 0 (objective=fast
is 0.5) on the cached tiny base, each adapter scored over a grid of training-free sampler settings (entropy bound x
maximum denoising steps per canvas), so that the speed objective is compared with the best the default objective
reaches by tuning the sampler alone. Writes <out>/SPEED.md (the tables between two markers: the conclusion around
them is kept on a rerun), <out>/speed.png (score against tokens per forward, one curve per setting and task) and the
raw results.

    python bench/speed_ablation.py                    # the full grid: bench/SPEED.md (about 16 minutes, 2 cores)
    python bench/speed_ablation.py --quick --out DIR   # one task, one seed, two settings, two sampler points (CI)

Training is bench/objective_ablation.py's (`run_one`: the tiny recipe's optimiser, batch 16, generated rows of the
task, one lr for every setting), so a run here is the same run as there with the certainty penalty added; finished
runs are appended to <out>/speed_results.jsonl and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import objective_ablation as ablation  # noqa: E402

from eval import speed_curve  # noqa: E402

SETTINGS = {
    "default": {},
    "certainty=0.5 (objective=fast)": {"certainty_weight": 0.5},
    "certainty=2": {"certainty_weight": 2.0},
}
TASKS = ablation.TASKS  # shift, reverse, sort (two canvases), followup (two turns)
BOUNDS = (0.1, 2.0)  # generate()'s entropy bound: the default 0.1 accepts only near-certain tokens each step
# maximum denoising steps per canvas: the default 48; the adaptive stop (argmax stable and mean entropy < 0.005) usually
# ends a canvas sooner, so the fast end of the curve is where the steps run out
STEPS = (48, 16, 8, 4, 2, 1)


def samplers(bounds, steps) -> list[tuple[str, dict]]:
    return [(f"b{b:g}_s{s}", {"entropy_bound": b, "max_denoising_steps": s}) for b in bounds for s in steps]


def points(result: dict, names: list[str]) -> list[tuple[float, float]]:
    """(tokens per forward, every encoder and decoder forward counted; exact match) of one run at every sampler
    point."""
    return [(result[f"tokens_per_any_forward_{n}"], result[f"exact_match_{n}"]) for n in names]


def curve(runs: list[dict], names: list[str]) -> list[tuple[float, float, float]]:
    """Per sampler point, over the seeds: (mean tokens per forward, mean exact match, half-width of its interval)."""
    out = []
    for n in names:
        score, half = ablation.interval([r[f"exact_match_{n}"] for r in runs])
        out.append((statistics.fmean(r[f"tokens_per_any_forward_{n}"] for r in runs), score, half))
    return out


def fastest_within(pts: list[tuple[float, float, float]], floor: float) -> tuple[float, float] | None:
    """The fastest (tokens per forward, score) point of a curve whose mean score is at least ``floor``."""
    ok = [(x, y) for x, y, _ in pts if y >= floor]
    return max(ok) if ok else None


def verdict(default: list[tuple[float, float, float]], other: list[tuple[float, float, float]], slack: float):
    """The issue's test, per task: the default objective's best point (the sampler point with the best mean exact
    match over seeds) sets a floor, its score minus the noise (the larger of its interval's half-width and
    ``slack``); each setting's fastest sampler point at or above that floor. Returns (floor, the default
    objective's fastest point there: its best training-free setting, the other setting's, their ratio)."""
    tx, top, half = max(default, key=lambda p: (p[1], p[0]))
    floor = top - max(slack, 0.0 if math.isnan(half) else half)
    if floor < slack:  # the default's best is within the noise of 0 (not learnt, or not on every seed): no test
        return floor, None, None, None
    mine, theirs = fastest_within(default, floor), fastest_within(other, floor)
    return floor, mine, theirs, (theirs[0] / mine[0] if theirs and mine and mine[0] else None)


def report(results: list[dict], args, seconds: float, names: list[str]) -> str:
    interval, fmt = ablation.interval, ablation.fmt
    lines = ["## How the numbers were made", "",
             f"Made by `{args.command}` on {args.machine}, {time.strftime('%Y-%m-%d')}: {len(results)} training "
             f"runs; this invocation trained {args.ran} of them in {seconds / 60:.0f} minutes (every score in "
             f"[{os.path.basename(args.results)}]({os.path.basename(args.results)})).", "",
             f"Each run: the cached tiny base, the tiny recipe's LoRA and optimiser, batch 16, lr {args.lr} for every "
             f"setting, {args.rows} generated rows, {args.steps} steps; then {args.heldout} held-out prompts answered "
             f"by generate() at every sampler point (entropy bound {', '.join(map(str, args.bounds))} x at most "
             f"{', '.join(map(str, args.max_steps))} steps per canvas), exact match and tokens per forward. "
             f"{speed_curve.FORWARDS_DEFINITION[0].upper()}{speed_curve.FORWARDS_DEFINITION[1:]}; pooled here: all "
             f"generated tokens over all forwards. Mean ± 95% t-interval over {len(args.seeds)} seeds.", "",
             f"Area: the {speed_curve.AREA_DEFINITION} (eval/speed_curve.py's `area`, the number `python -m eval "
             "eval.speed_curve=true` reports), per seed over that run's sampler points.", ""]
    lines += ["## Area under the score-parallelism frontier", "",
              "| setting | " + " | ".join(args.tasks) + " |", "|---|" + "---|" * len(args.tasks)]
    for s in args.settings:
        cells = []
        for t in args.tasks:
            runs = [r for r in results if r["setting"] == s and r["task"] == t]
            cells.append(fmt(*interval([speed_curve.area(points(r, names)) for r in runs])) if runs else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    default = args.settings[0]
    lines += ["", f"## The test: tokens per forward at a score within the noise of `{default}`'s best point", "",
              f"Per task, `{default}`'s best sampler point (best mean exact match over seeds) sets a floor: its mean "
              f"minus the larger of its 95% half-width and {args.slack}. Each cell: the fastest sampler point whose "
              f"mean exact match is at or above the floor, as tokens per forward (exact match), and its ratio to "
              f"`{default}`'s own fastest point there (the default objective with its best training-free sampler "
              "setting). `-`: no sampler point reaches the floor.", "",
              "| setting | " + " | ".join(args.tasks) + " |", "|---|" + "---|" * len(args.tasks)]
    tests = {}
    for s in args.settings:
        cells = []
        for t in args.tasks:
            base_runs = [r for r in results if r["setting"] == default and r["task"] == t]
            runs = [r for r in results if r["setting"] == s and r["task"] == t]
            if not (runs and base_runs):
                cells.append("")
                continue
            floor, mine, theirs, ratio = verdict(curve(base_runs, names), curve(runs, names), args.slack)
            tests[(s, t)] = ratio
            if floor < args.slack:
                top = max(curve(base_runs, names), key=lambda p: (p[1], p[0]))
                cells.append(f"no test: `{default}`'s best, {ablation.fmt(top[1], top[2])}, is within the noise of 0")
                continue
            cells.append("-" if theirs is None else
                         f"{theirs[0]:.2f} ({theirs[1]:.2f}) x{ratio:.2f}" + (f", floor {floor:.2f}" if s == default
                                                                               else ""))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    for s in args.settings[1:]:
        ratios = [tests.get((s, t)) for t in args.tasks]
        wins = sum(1 for r in ratios if r is not None and r >= 2)
        lines += ["", f"`{s}`: >= 2x tokens per forward within the noise of the default's best on {wins} of "
                      f"{len(args.tasks)} tasks."]
    lines += ["", "## Every sampler point: exact match / tokens per forward", ""]
    for t in args.tasks:
        lines += [f"### {t}", "", "| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for s in args.settings:
            runs = [r for r in results if r["setting"] == s and r["task"] == t]
            cells = [f"{fmt(*interval([r[f'exact_match_{n}'] for r in runs]))} / "
                     f"{statistics.fmean(r[f'tokens_per_any_forward_{n}'] for r in runs):.2f}" for n in names] \
                if runs else [""] * len(names)
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], args, names: list[str], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.tasks), figsize=(4.2 * len(args.tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], args.tasks):
        for s in args.settings:
            runs = [r for r in results if r["setting"] == s and r["task"] == task]
            if not runs:
                continue
            pts = [(x, y) for x, y, _ in curve(runs, names)]
            dots = ax.scatter(*zip(*pts), s=14, label=s)
            front = speed_curve.frontier(pts)  # fastest first: the best score at that speed or faster
            ax.step([x for x, _ in front], [y for _, y in front], where="pre", linewidth=1,
                    color=dots.get_facecolor()[0])
        ax.set_title(task)
        ax.set_xlabel("tokens per forward (every forward)")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("exact match")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BEGIN, END = "<!-- results: written by bench/speed_ablation.py -->", "<!-- end of results -->"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one task, one seed, two settings, two sampler points")
    parser.add_argument("--out", default=HERE, help="where SPEED.md, speed.png and the results go (default: bench/)")
    parser.add_argument("--settings", help="comma-separated names (default: all)")
    parser.add_argument("--tasks", help=f"comma-separated (default: {','.join(TASKS)})")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3, help="every setting's lr (the tiny recipe's)")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--slack", type=float, default=0.05, help="best training-free point: within this of the best")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    args.bounds, args.max_steps = BOUNDS, STEPS
    if args.quick:
        args.settings = args.settings or f"default,{list(SETTINGS)[1]}"
        args.tasks, args.seeds, args.steps = args.tasks or "reverse", 1, min(args.steps, 4)
        args.rows, args.heldout, args.bounds, args.max_steps = 200, 8, (0.1, 2.0), (8,)
    args.settings = args.settings.split(",") if args.settings else list(SETTINGS)
    args.tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    unknown = [s for s in args.settings if s not in SETTINGS] + [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown setting or task {unknown}: settings are {list(SETTINGS)}, tasks {list(TASKS)}")
    args.seeds = list(range(args.seeds))
    args.command = "python bench/speed_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import torch
    import transformers
    from demo_seeds import cpu_name

    args.machine = (f"{os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}, transformers "
                    f"{transformers.__version__}")
    os.makedirs(args.out, exist_ok=True)
    args.results = os.path.join(args.out, "speed_results.jsonl")

    from finetune.pretrain import ensure_base

    base = ensure_base(os.environ.get("FINETUNE_CACHE", os.path.expanduser("~/.cache/finetune")))
    grid = samplers(args.bounds, args.max_steps)
    names = [n for n, _ in grid]
    jobs = [{"base": base, "rows": args.rows, "heldout": args.heldout, "setting": s, "task": t, "steps": args.steps,
             "scored": [args.steps], "lr": args.lr, "seed": seed, "overrides": SETTINGS[s], "samplers": grid}
            for t in args.tasks for s in args.settings for seed in args.seeds]
    started = time.monotonic()
    results, args.ran = ablation.run_jobs(jobs, args.results, args.workers)
    markdown = report(results, args, time.monotonic() - started, names)
    plot(results, args, names, os.path.join(args.out, "speed.png"))
    path = os.path.join(args.out, "SPEED.md")
    before, after = "# Fine-tuning for speed: certainty forcing against the sampler alone\n\n", ""
    if os.path.exists(path):
        text = open(path).read()
        if BEGIN in text and END in text:
            before, after = text[: text.index(BEGIN)], text[text.index(END) + len(END):]
    with open(path + ".tmp", "w") as f:
        f.write(f"{before}{BEGIN}\n{markdown}\n\n![exact match against tokens per forward](speed.png)\n{END}{after}")
    os.replace(path + ".tmp", path)
    print(markdown)


if __name__ == "__main__":
    main()
