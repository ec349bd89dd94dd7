"""The README's own-task line on every seed: does the tiny demo learn the reversal whatever the seed and the machine?

    python bench/demo_seeds.py                              # 5 training seeds x 2 base seeds (about 40 min, 2 cores)
    python bench/demo_seeds.py --seeds 0 1 --base-seeds 0   # a smaller grid

Each run is the README's command, `python -m finetune data.train=tests/data/reverse.jsonl train.max_steps=300`,
with `seed=S` (the LoRA initialisation, the data order, the noise) and `model.tiny.seed=B` (the pre-training of the
tiny base: another base, cached beside the first), plus settings that change nothing of what is trained or scored
(no benchmark, no export, no TensorBoard). One thread per run (--workers runs side by side: on 2 cores two
1-thread runs finish sooner than two 2-thread runs in turn, whose OpenMP threads spin against each other). The
table goes to bench/ABLATION.md between its markers, with the command, the machine and the versions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_LINE = "python -m finetune data.train=tests/data/reverse.jsonl train.max_steps=300"
QUIET = ["eval.benchmark=null", "export.format=none", "train.report_to=none"]
BEGIN, END = "<!-- demo seeds: written by bench/demo_seeds.py -->", "<!-- end of demo seeds -->"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def one_run(out: str, seed: int, base_seed: int) -> dict:
    run = os.path.join(out, f"base{base_seed}-seed{seed}")
    metrics = os.path.join(run, "metrics.json")
    if not os.path.isfile(metrics):  # a rerun reuses finished runs
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, *README_LINE.split()[1:], f"seed={seed}", f"model.tiny.seed={base_seed}",
                   f"output_dir={run}", "resume=false", *QUIET]
        started = time.monotonic()
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        with open(os.path.join(run, "wall_seconds"), "w") as f:
            f.write(f"{time.monotonic() - started:.1f}")
    with open(metrics) as f:
        m = json.load(f)
    base, adapter = m["eval"]["base"], m["eval"]["adapter"]
    return {"seed": seed, "base_seed": base_seed, "adapter_exact_match": adapter["exact_match"],
            "base_exact_match": base["exact_match"], "adapter_heldout_loss": adapter["heldout_loss_mean"],
            "base_heldout_loss": base["heldout_loss_mean"], "train_loss_last": m["training"]["loss_last"],
            "held_out": adapter.get("n", None)}


def table(rows: list[dict]) -> str:
    lines = ["| base seed | seed | adapter exact match | base exact match | adapter held-out loss "
             "| base held-out loss |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["base_seed"], r["seed"])):
        lines.append(f"| {r['base_seed']} | {r['seed']} | {r['adapter_exact_match']:.1%} | {r['base_exact_match']:.1%} "
                     f"| {r['adapter_heldout_loss']:.4f} | {r['base_heldout_loss']:.4f} |")
    scores = [r["adapter_exact_match"] for r in rows]
    lines.append("")
    lines.append(f"adapter exact match: min {min(scores):.1%}, mean {statistics.mean(scores):.1%} over {len(rows)} "
                 f"runs; runs at or above 80%: {sum(s >= 0.8 for s in scores)} of {len(rows)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--base-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "demo_seeds"))
    parser.add_argument("--no-write", action="store_true", help="print the table, leave bench/ABLATION.md alone")
    args = parser.parse_args(argv)
    command = "python bench/demo_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    # each base is pre-trained once, before the runs that share it start side by side
    for base_seed in args.base_seeds:
        one_run(args.out, args.seeds[0], base_seed)
    jobs = [(s, b) for b in args.base_seeds for s in args.seeds[1:]]
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        rows = [one_run(args.out, args.seeds[0], b) for b in args.base_seeds]
        rows += list(pool.map(lambda job: one_run(args.out, *job), jobs))
    text = table(rows)
    print(text)
    if not args.no_write:
        import importlib.metadata as md

        versions = ", ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "peft", "accelerate"))
        block = (f"{BEGIN}\n`{command.strip()}` ({time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} cores, "
                 f"{versions}; each run: `{README_LINE} seed=S model.tiny.seed=B` + {' '.join(QUIET)}, one thread)\n\n"
                 f"{text}\n{END}")
        path = os.path.join(ROOT, "bench", "ABLATION.md")
        doc = open(path).read()
        if BEGIN in doc:
            doc = doc.split(BEGIN)[0] + block + doc.split(END, 1)[1]
        else:
            doc = doc.rstrip() + "\n\n## The README's reversal line on every seed (issue 20)\n\n" + block + "\n"
        with open(path, "w") as f:
            f.write(doc)
    return 0 if all(r["adapter_exact_match"] >= 0.8 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
