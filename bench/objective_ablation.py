"""Which objective teaches DiffusionGemma best per step? The objective settings side by side on the cached tiny base:
the same data, step budget and seeds for each, the learning rate picked per setting by a small sweep, scored with
the model's own generate() (exact match at the default sampler and at a fast one, tokens per forward, steps per
canvas) and the held-out denoising loss at fixed t. Writes <out>/ABLATION.md (tables of the mean and 95% interval
over seeds per setting, task and budget, between two markers: the text around them, the conclusion, is kept on a
rerun), <out>/ablation.png (score against budget) and the raw results.

    python bench/objective_ablation.py                  # the full grid: bench/ABLATION.md (about an hour, 2 cores)
    python bench/objective_ablation.py --quick --out DIR   # one task, two seeds, two settings: a smoke test (CI)
    python bench/objective_ablation.py --lora-targets attn_mlp,attn_mlp_experts,experts --extra-budget 800 \
        --extra-tasks sort                              # where LoRA sits, the default objective: ABLATION.md's
                                                        # second part (its own markers and plot)

Every finished run's scores are appended to <out>/ablation_results.jsonl at once (train_seconds: wall time since
its training began, the 50-step scoring included) and the run is skipped when the same command runs again, so an
interrupted grid continues where it stopped. Runs go to --workers processes of one thread each (the tiny model does
not speed up with a second thread, two runs side by side do).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the settings compared: overrides of the schema's objective defaults (finetune/config.py ObjectiveConfig); the
# presets are read from their files (finetune/conf/objective/), so the bench runs what objective=<name> runs
SAMPLER_TEMPERATURES = [0.4, 0.8]  # generate()'s schedule: eval.generation.t_min .. t_max
SETTINGS = {
    "default": {},
    "objective=unsloth": "unsloth",
    "objective=axolotl": "axolotl",
    "corruption=mask": {"corruption": "mask"},
    "self_conditioning_p=0": {"self_conditioning_p": 0.0},
    "self_conditioning_p=1": {"self_conditioning_p": 1.0},
    "encoder_ar_weight=0": {"encoder_ar_weight": 0.0},
    "t_min=0.1": {"t_min": 0.1},
    "sc temperature=sampler": {"self_conditioning_temperature": SAMPLER_TEMPERATURES},
}
# tasks new to the tiny base (finetune/tiny.py): a per-letter map, a whole-prompt one, a two-canvas one, a two-turn
# one (trained on both assistant turns: data.supervise=all; scored on the last)
TASKS = {"shift": "last", "reverse": "last", "sort": "last", "followup": "all"}
FAST = {"max_denoising_steps": 8, "entropy_bound": 1.0}  # the fast sampler setting (default: 48 steps, bound 0.1)
HELDOUT_T = (0.25, 0.5, 0.75)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


LORA_TARGETS = ("attn_mlp", "attn_mlp_experts", "experts")  # --lora-targets: settings named "lora.targets=<t>"


def objective_overrides(setting: str) -> dict:
    if setting.startswith("lora."):  # a LoRA setting trains with the default objective
        return {}
    spec = SETTINGS[setting]
    if isinstance(spec, str):
        from omegaconf import OmegaConf

        return dict(OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "finetune", "conf", "objective",
                                                                       f"{spec}.yaml"))))
    return dict(spec)


def run_one(job: dict) -> list[dict]:
    """Train one LoRA adapter on the cached tiny base for job["steps"] steps and score it at each of job["scored"]
    steps (the last one is the end); ``job`` also names the setting, task, lr and seed."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion, TrainerCallback

    from finetune.config import DataSettings, LoraSettings, ObjectiveConfig, TrainSettings
    from finetune.data import build_examples
    from finetune.model import attach_lora
    from finetune.tiny import build_tokenizer, task_rows
    from finetune.train import fit

    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    torch.manual_seed(job["seed"])
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(job["base"])
    canvas = model.config.canvas_length
    model = attach_lora(model, LoraSettings(**job.get("lora", {})))
    data = DataSettings(supervise=TASKS[job["task"]], seed=job["seed"])
    examples, _ = build_examples(task_rows(job["task"], job["rows"], job["seed"]), tokenizer, data, canvas, "train")
    overrides = dict(job["overrides"]) if "overrides" in job else objective_overrides(job["setting"])
    if overrides.get("corruption") == "mask":
        overrides["mask_token_id"] = tokenizer.mask_token_id
    objective = ObjectiveConfig(**overrides)
    heldout_rows = task_rows(job["task"], job["heldout"], 20_000 + job["seed"])
    results, started = [], time.monotonic()

    def score(step):
        state = torch.get_rng_state()  # generate() seeds the global RNG; training goes on as if it had not run
        was_training = model.training
        results.append({**{k: job[k] for k in ("setting", "task", "lr", "seed", "scored")}, "steps": step,
                        "train_seconds": round(time.monotonic() - started, 1),
                        **evaluate(model.eval(), tokenizer, heldout_rows, data, canvas, job)})
        model.train(was_training)
        torch.set_rng_state(state)

    class Score(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in job["scored"][:-1]:
                score(state.global_step)

    # the tiny recipe's optimiser (recipes/tiny.yaml), this job's lr and budget
    train = TrainSettings(max_steps=job["steps"], batch_size=16, grad_accum=1, lr=job["lr"], warmup_steps=10,
                          logging_steps=max(job["steps"], 1), seed=job["seed"], report_to="none", disable_tqdm=True)
    with tempfile.TemporaryDirectory() as out:
        trainer = fit(model, examples, train, objective, canvas, tokenizer.pad_token_id, out, callbacks=[Score()])
    score(job["steps"])
    for r in results:  # one loss per step (grad_accum 1): the mean of the ten before the score
        last = trainer.step_losses[: r["steps"]][-10:]
        r["train_loss_last10"] = sum(last) / len(last)
    return results


def evaluate(model, tokenizer, rows, data, canvas: int, job: dict) -> dict:
    from eval.generation import generate, sized, speed_summary
    from eval.loss import heldout_loss
    from eval.scorers import exact_match
    from eval.speed_curve import tokens_per_forward
    from finetune.config import GenerationSettings, ObjectiveConfig
    from finetune.data import build_examples, eval_prompts

    pairs = eval_prompts(rows, tokenizer, data)
    examples, _ = build_examples(rows, tokenizer, data, canvas, "held-out")
    result = {}
    for name, sampler in job.get("samplers") or (("default", {}), ("fast", FAST)):
        # max_new_tokens: the references' canvases plus one, as the run's evaluation sizes them
        settings, _ = sized(GenerationSettings(seed=job["seed"], **sampler), examples, canvas,
                            data.max_response_canvases)
        gens = generate(model, tokenizer, [p for p, _, _ in pairs], settings, desc=name)
        speed = speed_summary(gens, settings.max_denoising_steps)
        result[f"exact_match_{name}"] = sum(exact_match(g.text, r) for g, (_, r, _) in zip(gens, pairs)) / len(pairs)
        result[f"tokens_per_forward_{name}"] = speed["tokens_per_forward_pooled"]
        # every encoder and decoder forward counted (eval/speed_curve.py), as the speed curve counts them
        result[f"tokens_per_any_forward_{name}"] = tokens_per_forward(gens)["tokens_per_forward_pooled"]
        result[f"steps_per_canvas_{name}"] = speed["steps_per_canvas"]
    losses = heldout_loss(model, examples, ObjectiveConfig(), canvas, tokenizer.pad_token_id, t_values=HELDOUT_T,
                          batches=2, seed=0)
    result["heldout_loss"] = sum(losses.values()) / len(losses)
    return result


def key(job: dict) -> tuple:
    return (job["setting"], job["task"], tuple(job["scored"]), float(job["lr"]), job["seed"])


def run_jobs(jobs: list[dict], results_path: str, workers: int) -> tuple[list[dict], int]:
    """Run the jobs not yet in ``results_path`` (a JSON line per score, appended as each job finishes); returns
    every score of ``jobs`` and how many jobs this call trained."""
    done = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done.setdefault(key(r), []).append(r)
    todo = [j for j in jobs if key(j) not in done]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already in {results_path}", flush=True)
    if todo:
        started = time.monotonic()
        with open(results_path, "a") as f:
            for i, scores in enumerate(_map(todo, workers)):
                f.write("".join(json.dumps(r) + "\n" for r in scores))
                f.flush()
                done[key(scores[0])] = scores
                print(f"[{i + 1}/{len(todo)} {time.monotonic() - started:.0f}s] {scores[0]['setting']} "
                      f"{scores[0]['task']} lr={scores[0]['lr']} seed={scores[0]['seed']}: exact match " + ", ".join(
                          " ".join(f"{k[len('exact_match_'):]} {v:.2f}" for k, v in r.items()
                                   if k.startswith("exact_match_")) + f" at {r['steps']}"
                          for r in scores) + f"; held-out loss {scores[-1]['heldout_loss']:.3f}", flush=True)
    return [r for j in jobs for r in done[key(j)]], len(todo)


def _map(jobs, workers):
    if workers <= 1:
        yield from map(run_one, jobs)
        return
    import multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers before torch starts its pool
    with mp.get_context("spawn").Pool(workers, maxtasksperchild=4) as pool:
        yield from pool.imap_unordered(run_one, jobs)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def best_lrs(results: list[dict], settings: list[str], long: int, short: int) -> dict:
    """Per setting, the swept lr with the best exact match at the long budget; ties (all 100%, or all 0%) go to the
    better exact match at the short budget, then to the lower held-out loss at the long one."""
    def score(setting, lr):
        at = {r["steps"]: r for r in results if r["setting"] == setting and r["lr"] == lr}
        return at[long]["exact_match_default"], at[short]["exact_match_default"], -at[long]["heldout_loss"]

    return {s: max(sorted({r["lr"] for r in results if r["setting"] == s}), key=lambda lr: score(s, lr))
            for s in settings}


def fmt(mean: float, half: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def task_budgets(results: list[dict], task: str) -> list[int]:
    return sorted({r["steps"] for r in results if r["task"] == task})


def report(results: list[dict], sweep: list[dict], lrs: dict, args, seconds: float) -> str:
    short, long = args.budget, 4 * args.budget
    extra = (f" The {', '.join(f'`{t}`' for t in args.extra_tasks)} runs go on to {args.extra_budget} steps (their cosine "
             f"over {args.extra_budget}), scored also at {short} and {long} on the way." if args.extra_tasks else "")
    lora = ("LoRA as the tiny recipe sets it (r 16, alpha 32, shared by encoder and decoder) on the targets the "
            "setting names (finetune/expert_lora.py for the experts: one LoRA per expert, rank 16)"
            if args.lora_targets else "LoRA as the tiny recipe sets it")
    runs = len({key(r) for r in sweep + results})
    lines = ["## How the numbers were made", "",
             f"Made by `{args.command}` on {args.machine}, {time.strftime('%Y-%m-%d')}: {runs} training runs "
             f"({len({key(r) for r in sweep})} in the lr sweep); this invocation trained {args.ran} of them in "
             f"{seconds / 60:.0f} minutes, the others' scores came from [{os.path.basename(args.results)}]"
             f"({os.path.basename(args.results)}) (every score of every run, one JSON line each).", "",
             f"Each grid run: the cached tiny base (finetune/tiny.py), {lora}, batch 16, "
             f"{args.rows} generated training rows, warmup 10 then cosine to lr/10 over {long} steps, "
             f"scored at step {short} (the short budget: the same run a quarter of the way, its lr still "
             f"high) and at step {long} (the long one), on {args.heldout} held-out rows: generate()'s "
             f"exact match at the default sampler (48 steps, entropy bound 0.1) and at a fast one "
             f"({FAST['max_denoising_steps']} steps, bound {FAST['entropy_bound']}), its tokens per forward and "
             f"steps per canvas, and the held-out denoising loss (the default objective's loss at t = "
             f"{', '.join(map(str, HELDOUT_T))}, no self-conditioning, fixed noise; mean), the same measure for "
             f"every setting. Mean ± 95% t-interval over {len(args.seeds)} seeds (a seed sets the LoRA init, the "
             f"data, the noise and the sampler's).{extra}", "",
             "## Learning rate per setting", ""]
    if not sweep:
        lines += [f"No sweep: one lr for every setting, {args.lrs[0]}.", ""]
    else:
        lines += [f"Swept on `{args.sweep_task}`, seed 0, over lr {', '.join(map(str, args.lrs))}, with the grid's "
                  f"runs ({long} steps): the lr with the best exact match at {long} steps (ties: at {short}, then the "
                  f"lower held-out loss) is the setting's lr in the grid, whose seed-0 `{args.sweep_task}` run is the "
                  "sweep's.", "",
                  "| setting | " + " | ".join(f"lr {lr}" for lr in args.lrs) + " | chosen |",
                  "|---|" + "---|" * (len(args.lrs) + 1)]
        for s in args.settings:
            cells = []
            for lr in args.lrs:
                at = {x["steps"]: x for x in sweep if x["setting"] == s and x["lr"] == lr}
                cells.append(f"{at[long]['exact_match_default']:.2f} ({at[short]['exact_match_default']:.2f}) / "
                             f"{at[long]['heldout_loss']:.3f}" if at else "")
            lines.append(f"| {s} | " + " | ".join(cells) + f" | {lrs[s]} |")
        lines += ["", f"(exact match at {long} steps (at {short}) / held-out loss at {long})", ""]
    for metric, title, digits in (("exact_match_default", "Exact match, default sampler", 2),
                                  ("exact_match_fast", "Exact match, fast sampler", 2),
                                  ("heldout_loss", "Held-out denoising loss (lower is better)", 3),
                                  ("tokens_per_forward_default", "Tokens per forward, default sampler", 2),
                                  ("steps_per_canvas_default", "Steps per canvas, default sampler", 1)):
        columns = [(t, b) for t in args.tasks for b in task_budgets(results, t)]
        lines += [f"## {title}", "", "| setting | " + " | ".join(
            f"{t} @{b}" for t, b in columns) + " |", "|---|" + "---|" * len(columns)]
        for s in args.settings:
            cells = []
            for t, b in columns:
                values = [r[metric] for r in results if r["setting"] == s and r["task"] == t and r["steps"] == b
                          and r[metric] is not None]
                cells.append(fmt(*interval(values), digits) if values else "")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    if args.lora_targets:  # the second part of ABLATION.md: its sections one level down, under its own title
        lines = ["#" + line if line.startswith("## ") else line for line in lines]
    return "\n".join(lines)


def plot(results: list[dict], args, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.tasks), figsize=(4.2 * len(args.tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], args.tasks):
        budgets = task_budgets(results, task)
        for s in args.settings:
            means, halves = zip(*[interval([r["exact_match_default"] for r in results if r["setting"] == s
                                            and r["task"] == task and r["steps"] == b] or [float("nan")])
                                  for b in budgets])
            ax.errorbar(budgets, means, yerr=[0 if math.isnan(h) else h for h in halves], marker="o", capsize=3,
                        label=s)
        ax.set_title(task)
        ax.set_xlabel("training steps")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("exact match (default sampler)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one task, two seeds, two settings, few steps")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench"), help="where ABLATION.md, the plot and "
                        "the results go (default: bench/)")
    parser.add_argument("--settings", help="comma-separated names (default: all)")
    parser.add_argument("--tasks", help=f"comma-separated (default: {','.join(TASKS)})")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=50, help="the short budget in steps; the long one is 4x")
    parser.add_argument("--lrs", default="2e-3,4e-3,8e-3", help="the lr sweep (one value: no sweep)")
    parser.add_argument("--rows", type=int, default=3000, help="generated training rows")
    parser.add_argument("--heldout", type=int, default=32, help="held-out rows scored")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lora-targets", help=f"compare where LoRA sits instead of objectives: comma-separated "
                        f"lora.targets ({', '.join(LORA_TARGETS)}), the default objective; written to its own part "
                        "of ABLATION.md")
    parser.add_argument("--extra-budget", type=int, help="train --extra-tasks this many steps (also scored at the "
                        "short and long budgets on the way)")
    parser.add_argument("--extra-tasks", default="", help="comma-separated tasks that get --extra-budget")
    args = parser.parse_args(argv)
    args.extra_tasks = [t for t in args.extra_tasks.split(",") if t] if args.extra_budget else []
    if args.quick:
        args.settings = args.settings or "default,objective=unsloth"
        args.tasks, args.seeds, args.budget = args.tasks or "reverse", 2, min(args.budget, 4)
        args.lrs, args.rows, args.heldout = "2e-3", 200, 8
    if args.lora_targets:
        targets = args.lora_targets.split(",")
        if [t for t in targets if t not in LORA_TARGETS]:
            parser.error(f"--lora-targets {args.lora_targets}: use some of {', '.join(LORA_TARGETS)}")
        args.settings = [f"lora.targets={t}" for t in targets]
        SETTINGS.update({s: {} for s in args.settings})
    args.settings = args.settings.split(",") if isinstance(args.settings, str) else args.settings or list(SETTINGS)
    args.tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    unknown = [s for s in args.settings if s not in SETTINGS] + [t for t in args.tasks if t not in TASKS]
    unknown += [t for t in args.extra_tasks if t not in args.tasks]
    if unknown:
        parser.error(f"unknown setting or task {unknown}: settings are {list(SETTINGS)}, tasks {list(TASKS)}")
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.seeds = list(range(args.seeds))
    args.sweep_task = "reverse" if "reverse" in args.tasks else args.tasks[0]
    args.command = "python bench/objective_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.machine = f"{os.cpu_count()} CPU cores"
    os.makedirs(args.out, exist_ok=True)
    args.results = os.path.join(args.out, "ablation_results.jsonl")

    from finetune.pretrain import ensure_base

    args.base = ensure_base(os.environ.get("FINETUNE_CACHE", os.path.expanduser("~/.cache/finetune")))
    started = time.monotonic()
    common = {"base": args.base, "rows": args.rows, "heldout": args.heldout}
    # one run per setting, task, lr and seed over the long budget, scored at the short budget on the way
    long = 4 * args.budget

    def job(setting, task, lr, seed):
        steps = args.extra_budget if task in args.extra_tasks else long
        lora = {"targets": setting.split("=", 1)[1]} if setting.startswith("lora.targets=") else {}
        return {**common, "setting": setting, "task": task, "steps": steps,
                "scored": sorted({args.budget, long, steps}), "lr": lr, "seed": seed, "lora": lora}

    # the lr sweep: every lr on one task, seed 0 (the chosen lr's run is also the grid's)
    sweep = [job(s, args.sweep_task, lr, 0) for s in args.settings for lr in args.lrs] if len(args.lrs) > 1 else []
    sweep, args.ran = run_jobs(sweep, args.results, args.workers)
    lrs = best_lrs(sweep, args.settings, long, args.budget) if sweep else {s: args.lrs[0] for s in args.settings}
    grid = [job(s, t, lrs[s], seed) for t in args.tasks for s in args.settings for seed in args.seeds]
    results, ran = run_jobs(grid, args.results, args.workers)
    args.ran += ran
    seconds = time.monotonic() - started
    markdown = report(results, sweep, lrs, args, seconds)
    picture = "ablation_targets.png" if args.lora_targets else "ablation.png"
    plot(results, args, os.path.join(args.out, picture))
    markers = TARGET_MARKERS if args.lora_targets else MARKERS
    write_report(os.path.join(args.out, "ABLATION.md"), markdown + f"\n![exact match against budget]({picture})\n",
                 markers)
    print(markdown)


MARKERS = ("<!-- results: written by bench/objective_ablation.py -->", "<!-- end of results -->")
TARGET_MARKERS = ("<!-- lora targets: written by bench/objective_ablation.py --lora-targets -->",
                  "<!-- end of lora targets -->")


def write_report(path: str, results: str, markers: tuple[str, str] = MARKERS):
    """The generated part goes between the markers (a new part goes at the end); the prose around them (the
    conclusions) is kept on a rerun."""
    begin, end = markers
    before, after = "# Objective ablation: which recipe teaches DiffusionGemma best per step\n\n", ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        if begin in text and end in text:
            before, after = text[: text.index(begin)], text[text.index(end) + len(end):]
        else:
            before = text.rstrip("\n") + "\n\n"
    with open(path + ".tmp", "w") as f:
        f.write(f"{before}{begin}\n{results}\n{end}{after}")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
