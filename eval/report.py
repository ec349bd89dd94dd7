"""The comparison report a person reads: report.json (every number), report.md (the answers, the tables, the
generations side by side) and PNG plots (loss per t, scores, the speed/quality sweep and the speed curve)."""

from __future__ import annotations

import os

from finetune import disk


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sides(block: dict) -> list[str]:
    return [s for s in ("base", "adapter") if s in block]


def plot_loss_by_t(report: dict, path: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    blocks = [("held-out", report, "-", "o")]
    if report.get("benchmark") and "heldout_loss_by_t" in report["benchmark"]["base"]:
        blocks.append((report["benchmark"]["name"], report["benchmark"], "--", "s"))
    colors = {"base": "tab:gray", "adapter": "tab:blue"}
    for label, block, style, marker in blocks:
        for side in _sides(block):
            curve = block[side].get("heldout_loss_by_t")
            if curve:
                ts = sorted(float(t) for t in curve)
                values = [curve[t] if t in curve else curve[str(t)] for t in ts]
                ax.plot(ts, values, style, marker=marker, color=colors[side], label=f"{label}: {side}")
    ax.set_xlabel("noise level t (fraction of canvas tokens replaced)")
    ax.set_ylabel("denoising loss (fixed noise, log scale)")
    ax.set_yscale("log")  # a fine-tune moves the loss by orders of magnitude on its task
    ax.set_title("Held-out denoising loss by noise level")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(report: dict, path: str):
    plt = _plt()
    groups = [("held-out", report)] + ([(report["benchmark"]["name"], report["benchmark"])]
                                       if report.get("benchmark") else [])
    labels, bars = [], {"base": [], "adapter": []}
    for label, block in groups:
        for scorer in block.get("scorers") or report["scorers"]:
            labels.append(f"{label}\n{scorer}")
            for side in bars:
                bars[side].append(block[side]["scores"][scorer] if side in block else 0.0)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.8 * len(labels) + 1), 4))
    width = 0.38
    for k, (side, color) in enumerate((("base", "tab:gray"), ("adapter", "tab:blue"))):
        if side not in report:
            continue
        xs = [i + (k - 0.5) * width for i in range(len(labels))]
        ax.bar(xs, bars[side], width, label=side, color=color)
        for x, v in zip(xs, bars[side]):
            ax.text(x, v + 0.01, f"{v:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("score")
    ax.set_title("Scores")
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(report: dict, path: str):
    plt = _plt()
    sweep = report["sweep"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for side, color in (("base", "tab:gray"), ("adapter", "tab:blue")):
        points = sweep.get(side)
        if not points:
            continue
        xs, ys = [p["tokens_per_forward"] for p in points], [p["score"] for p in points]
        ax.plot(xs, ys, marker="o", color=color, label=side)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(f"{p['value']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("tokens per forward (higher = faster)")
    ax.set_ylabel(f"{report['scorers'][0]} (held-out)")
    ax.set_ylim(-0.05, 1.1)
    ax.set_title(f"Speed vs quality over {sweep['param']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _point_label(p: dict) -> str:
    return f"{p['max_denoising_steps']}/{p['entropy_bound']:g}"


def plot_speed_curve(report: dict, path: str):
    """Score against tokens per forward (every forward) at each grid point, the frontier whose area is reported
    as a step line, the default sampler and the adapter's best training-free point marked."""
    plt = _plt()
    curve = report["speed_curve"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for side, color in (("base", "tab:gray"), ("adapter", "tab:blue")):
        if side not in curve:
            continue
        points = curve[side]["points"]
        ax.scatter([p["tokens_per_forward"] for p in points], [p["score"] for p in points], color=color, s=18,
                   label=f"{side} (area {curve[side]['area']:.3g})")
        labels = {}  # points that land on the same spot share one label
        for p in points:
            labels.setdefault((round(p["tokens_per_forward"], 3), round(p["score"], 3)), []).append(_point_label(p))
        for (x, y), names in labels.items():
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        front = sorted((f["tokens_per_forward"], f["score"]) for f in curve[side]["frontier"])
        xs = [0.0] + [x for x, _ in front]
        ys = [front[0][1]] + [y for _, y in front]
        ax.step(xs, ys, where="pre", color=color, alpha=0.6)  # F(x): the best score at >= x tokens per forward
        default = curve[side]["best_training_free"]["default"]
        ax.scatter([default["tokens_per_forward"]], [default["score"]], marker="s", facecolors="none",
                   edgecolors=color, s=70)
        best = curve[side]["best_training_free"]["point"]
        ax.scatter([best["tokens_per_forward"]], [best["score"]], marker="*", color=color, s=120)
    ax.set_xlabel("tokens per forward, every encoder and decoder forward (higher = faster)")
    ax.set_ylabel(f"{curve['scorer']} (held-out)")
    ax.set_xlim(left=0)
    ax.set_ylim(-0.05, 1.1)
    ax.set_title("Score vs parallelism (labels: max steps/entropy bound; □ default, ★ best)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed_curve_lines(report: dict) -> list[str]:
    """report.md's section for eval.speed_curve: the table, the areas, the best training-free points, definitions."""
    curve = report["speed_curve"]
    sides = _sides(curve)
    out = ["## Score vs parallelism: speed curve over max_denoising_steps x entropy_bound", ""]
    header = ["max steps", "entropy bound"] + [f"{s} {curve['scorer']}" for s in sides] + \
             [f"{s} tokens/forward" for s in sides] + [f"{s} s/answer (batch 1)" for s in sides]
    rows = []
    for i, p in enumerate(curve[sides[0]]["points"]):
        mark = " (default)" if p["default"] else ""
        rows.append([f"{p['max_denoising_steps']}{mark}", f"{p['entropy_bound']:g}"]
                    + [_fmt(curve[s]["points"][i]["score"], "%") for s in sides]
                    + [_fmt(curve[s]["points"][i]["tokens_per_forward"], "g") for s in sides]
                    + [_fmt(curve[s]["points"][i]["seconds_per_answer"], "g") for s in sides])
    out += _table(header, rows) + [""]
    out += ["- area under the score-vs-parallelism curve: "
            + ", ".join(f"{s} **{curve[s]['area']:.4g}**" for s in sides)]
    for s in sides:
        b = curve[s]["best_training_free"]
        p, d = b["point"], b["default"]
        speed = f"x{b['speedup_tokens_per_forward']:.2f} tokens per forward" if b["speedup_tokens_per_forward"] \
            else "tokens per forward not comparable"
        secs = f", x{b['speedup_seconds']:.2f} seconds per answer" if b["speedup_seconds"] else ""
        out.append(f"- {s}, best training-free point: max steps {p['max_denoising_steps']}, entropy bound "
                   f"{p['entropy_bound']:g}: {_fmt(p['score'], '%')} at {_fmt(p['tokens_per_forward'], 'g')} tokens "
                   f"per forward vs the default sampler ({d['max_denoising_steps']}, {d['entropy_bound']:g}) "
                   f"{_fmt(d['score'], '%')} at {_fmt(d['tokens_per_forward'], 'g')}: {speed}{secs}, score "
                   f"{b['score_change']:+.1%} (noise {b['noise']:.1%})")
    out += ["", "![speed curve](speed_curve.png)", "",
            f"- **area**: {curve['definition']}", f"- **tokens per forward**: {curve['forwards']}",
            f"- **{curve['best_definition'].split(':')[0]}**:{curve['best_definition'].split(':', 1)[1]}",
            f"- **timing**: {curve['timing']}"]
    if curve.get("default_added"):
        out.append("- the default sampler's point is not on the grid: it was run as one extra point")
    return out + [""]


def _cell(text, limit: int = 160) -> str:
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", "⏎")


def _fmt(value, kind: str = "f") -> str:
    if value is None:
        return "–"
    if kind == "%":
        return f"{value:.1%}"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if kind == "g" else f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"


def _limit(tokens: dict) -> str:
    """Where the answers' length limit came from, in words."""
    needed = tokens.get("reference_canvases")
    def canvases(n):
        return "? canvases" if n is None else f"{n} canvas" + ("" if n == 1 else "es")

    return (f"max_new_tokens {tokens['max_new_tokens']} ({canvases(tokens['canvases'])}, from {tokens['sized_from']}; "
            f"longest reference: {canvases(needed)})")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _metric_rows(block: dict) -> list[list[str]]:
    sides = _sides(block)
    rows = []
    for scorer in block.get("scorers", []):
        rows.append([scorer] + [_fmt(block[s]["scores"][scorer], "%") for s in sides])
    if "heldout_loss_mean" in block[sides[0]]:
        rows.append(["denoising loss (mean over t)"] + [_fmt(block[s]["heldout_loss_mean"]) for s in sides])
        curve = block[sides[0]]["heldout_loss_by_t"]
        for t in curve:
            rows.append([f"denoising loss at t={float(t):g}"] + [_fmt(block[s]["heldout_loss_by_t"][t]) for s in sides])
    return rows


SPEED_ROWS = [
    ("tokens per forward (mean of examples)", "tokens_per_forward", "g"),
    ("tokens per forward (pooled)", "tokens_per_forward_pooled", "g"),
    ("decoder forward passes per example", "decoder_forward_passes_mean", "g"),
    ("denoising steps per canvas", "steps_per_canvas", "g"),
    ("generated tokens per example", "generated_tokens_mean", "g"),
    ("generated tokens per second", "tokens_per_second", "g"),
    ("answers that ended (EOS)", "finished_fraction", "%"),
]

# the "better at the task?" cell of report.md for each outcome of `eval.compare.outcome`
ANSWER = {"better": "**yes**", "worse": "**no, worse**", "not shown": "**not shown**"}
HEADLINE = {
    "better": "better: adapter beats base on the task",
    "worse": "worse: adapter is WORSE than base on the task",
    "not shown": "not shown: no task difference beyond the noise",
}


def verdict_lines(report: dict) -> tuple[list[str], list[str]]:
    """The verdict as words, (outcome lines, caveats), for every place that prints it: the console, report.md and
    the end-of-run summary (`finetune.report.summary`). Reads only `report["verdict"]` (`eval.compare.verdict`)."""
    v = report.get("verdict") or {}
    caveats = list(v.get("caveats") or [])
    if "task" not in v:
        return [], caveats
    noise = "one example: no noise estimate" if report.get("examples", 2) < 2 else f"noise {v['noise']:.1%}"
    lines = [f"{HEADLINE[v['task']]}: {v['scorer']} {v['score_base']:.1%} -> {v['score_adapter']:.1%} "
             f"({v['score_delta']:+.1%} ± {v['score_delta_se']:.1%} paired s.e., {noise})"]
    loss = v.get("heldout_loss")
    if loss:
        lines.append(f"held-out denoising loss (mean over t) {loss['base']:.4g} -> {loss['adapter']:.4g}: a change "
                     "in loss, not a task result")
    ratio = v.get("tokens_per_forward_ratio")
    lines.append(("as fast" if v["still_fast"] else "SLOWER")
                 + (f" (tokens per forward x{ratio:.2f})" if ratio is not None else "")
                 + ("; nothing else broke" if v["nothing_else_broke"] else "; BROKE: " + "; ".join(v["regressions"])))
    return lines, caveats


def markdown(report: dict) -> str:
    sides = _sides(report)
    gen = report["generation_settings"]
    out = ["# Evaluation: " + (" vs ".join(sides)), ""]
    for key, label in (("recipe", "recipe"), ("base_model", "base model"), ("base_commit", "base commit"),
                       ("base_identity", "base files (sha256 of config and index)"), ("base_weights", "base weights"), ("adapter_path", "adapter")):
        if report.get(key):
            out.append(f"- {label}: `{report[key]}`")
    out.append(f"- held-out examples: {report['examples']}; sampler: max_denoising_steps {gen['max_denoising_steps']}, "
               f"entropy_bound {gen['entropy_bound']}, temperature {gen['t_max']} -> {gen['t_min']}, "
               f"seed {gen['seed']}")
    if report.get("max_new_tokens"):
        out.append(f"- {_limit(report['max_new_tokens'])}")
    out.append("")
    v = report.get("verdict") or {}
    check = report.get("adapter_check")
    if check and check["warnings"]:
        out += ["> **WARNING: the adapter may change nothing.** " + " ".join(check["warnings"]), ""]
    outcome, caveats = verdict_lines(report)
    if outcome or caveats:
        out += ["## Verdict", ""] + [f"- {line}" for line in outcome] + [""]
        for caveat in caveats:  # part of the verdict: a score of cut answers says little about the task
            out += [f"> **Caveat:** {caveat}", ""]
    if "task" in v:
        b, a = report["base"], report["adapter"]
        out += ["## Answers", ""]
        out += _table(["question", "base", "adapter", "answer"], [
            [f"better at the task? ({report['scorers'][0]})", _fmt(b["score"], "%"), _fmt(a["score"], "%"),
             ANSWER[v["task"]] + f" ({v['score_delta']:+.1%} ± {v['score_delta_se']:.1%} paired s.e.)"],
            ["still fast? (tokens per forward)", _fmt(b["tokens_per_forward"], "g"),
             _fmt(a["tokens_per_forward"], "g"), "**yes**" if v["still_fast"] else "**no, slower**"],
            ["anything else broken?", "", "",
             ("**no**" if v["nothing_else_broke"] else "**yes**: " + "; ".join(v["regressions"]))
             + ("" if v["benchmark_checked"] else " (benchmark not run: see below)" if report.get("benchmark_error")
                else " (no benchmark configured)")],
            ["does the adapter change outputs?", "", _fmt(check["changed_generations_fraction"], "%") + " changed",
             "**NO: adapter changed nothing**" if v["adapter_changed_nothing"] else "yes"],
        ])
        out.append("")
    out += [f"## Task: held-out ({report['examples']} examples)", ""]
    out += _table(["metric"] + sides, _metric_rows(report)) + ["", "![loss by t](loss_by_t.png)",
                                                               "![scores](scores.png)", ""]
    out += ["## Speed", ""]
    out += _table(["metric"] + sides, [[label] + [_fmt(report[s]["speed"][key], kind) for s in sides]
                                       for label, key, kind in SPEED_ROWS])
    out += ["", f"Max denoising steps per canvas: {gen['max_denoising_steps']}. Definitions:", ""]
    out += [f"- **{k}**: {d}" for k, d in report["definitions"].items()] + [""]
    bench = report.get("benchmark")
    if bench:
        out += [f"## Benchmark: {bench['name']} (`{bench['source']}`, {bench['examples']} examples)", ""]
        out += _table(["metric"] + _sides(bench), _metric_rows(bench) + [
            ["tokens per forward"] + [_fmt(bench[s]["tokens_per_forward"], "g") for s in _sides(bench)]])
        if "changed_generations_fraction" in bench:
            out += ["", f"Generations changed by the adapter: {_fmt(bench['changed_generations_fraction'], '%')}"]
        out.append("")
    if report.get("benchmark_error"):
        out += ["## Benchmark: not run", "", f"{report['benchmark_error']}", ""]
    if check:
        out += ["## Does the adapter change anything?", ""]
        out += [f"- changed generations (held-out): {_fmt(check['changed_generations_fraction'], '%')}",
                f"- LoRA modules: {check['lora_modules']}, with a ~0 delta: {check['zero_delta_modules']}",
                f"- ||ΔW|| total {check['delta_norm_total']:.4g}, largest {check['delta_norm_max']:.4g}, largest "
                f"relative to ||W||: {_fmt(check['relative_delta_max'], 'g')}",
                f"- adapter_changed_nothing: **{str(check['adapter_changed_nothing']).lower()}**", ""]
    if report.get("sweep"):
        sw = report["sweep"]
        out += [f"## Speed vs quality: sweep over {sw['param']}", ""]
        header = [sw["param"]] + [f"{s} {report['scorers'][0]}" for s in _sides(sw)] + \
                 [f"{s} tokens/forward" for s in _sides(sw)] + [f"{s} steps/canvas" for s in _sides(sw)]
        rows = []
        for i, value in enumerate(sw["values"]):
            rows.append([f"{value:g}"] + [_fmt(sw[s][i]["score"], "%") for s in _sides(sw)]
                        + [_fmt(sw[s][i]["tokens_per_forward"], "g") for s in _sides(sw)]
                        + [_fmt(sw[s][i]["steps_per_canvas"], "g") for s in _sides(sw)])
        out += _table(header, rows) + ["", "![sweep](sweep.png)", ""]
    if report.get("speed_curve"):
        out += speed_curve_lines(report)
    out += [f"## Generations side by side (first {min(report.get('samples_shown', 10), len(report['generations']))})",
            ""]
    header = ["input", "reference"] + sides + (["changed"] if "adapter" in sides else [])
    rows = []
    for g in report["generations"][: report.get("samples_shown", 10)]:
        row = [_cell(g["input"]), _cell(g["reference"])]
        for s in sides:
            mark = "✓" if g[s].get(report["scorers"][0]) else "✗"
            row.append(f"{mark} {_cell(g[s]['output'])}")
        if "adapter" in sides:
            row.append("yes" if g["changed"] else "no")
        rows.append(row)
    out += _table(header, rows) + [""]
    return "\n".join(out)


def write_report(report: dict, out_dir: str) -> list[str]:
    """Write report.json, report.md and the plots into ``out_dir``; returns the file names written."""
    os.makedirs(out_dir, exist_ok=True)
    files = ["report.json", "report.md", "loss_by_t.png", "scores.png"] + (["sweep.png"] if report.get("sweep") else [])
    files += ["speed_curve.png"] if report.get("speed_curve") else []
    report["files"] = files
    plot_loss_by_t(report, os.path.join(out_dir, "loss_by_t.png"))
    plot_scores(report, os.path.join(out_dir, "scores.png"))
    if report.get("sweep"):
        plot_sweep(report, os.path.join(out_dir, "sweep.png"))
    if report.get("speed_curve"):
        plot_speed_curve(report, os.path.join(out_dir, "speed_curve.png"))
    disk.write_text(os.path.join(out_dir, "report.md"), markdown(report))  # whole or not at all: a full disk
    disk.write_json(os.path.join(out_dir, "report.json"), report, indent=2, ensure_ascii=False)  # is one line
    return files


def console_verdict(report: dict, indent: str = "   ") -> list[str]:
    """The verdict lines as the terminal shows them (here and at the end of a run)."""
    outcome, caveats = verdict_lines(report)
    lines = [f"{indent}-> {outcome[0]}"] + [f"{indent}   {line}" for line in outcome[1:]] if outcome else []
    return lines + [f"{indent}CAVEAT: {caveat}" for caveat in caveats]


def console_summary(report: dict, out_dir: str | None = None) -> str:
    """A few lines for the terminal; the full story is in report.md."""
    sides = _sides(report)
    lines = ["", "=" * 64, " Evaluation: " + " vs ".join(sides), "=" * 64,
             f"   {'held-out (%d examples)' % report['examples']:<26}" + "".join(f"{s:>12}" for s in sides)]
    rows = [(name, [report[s]["scores"][name] for s in sides], "%") for name in report["scorers"]]
    if "heldout_loss_mean" in report[sides[0]]:
        rows.append(("denoising loss (mean of t)", [report[s]["heldout_loss_mean"] for s in sides], "f"))
    rows.append(("tokens per forward", [report[s]["tokens_per_forward"] for s in sides], "g"))
    rows.append(("steps per canvas", [report[s]["speed"]["steps_per_canvas"] for s in sides], "g"))
    rows.append(("tokens per second", [report[s]["speed"]["tokens_per_second"] for s in sides], "g"))
    rows.append(("answers cut (no EOS)", [report[s].get("answers_cut") for s in sides], "%"))
    bench = report.get("benchmark")
    if bench:
        rows.append((f"{bench['name']} {bench['scorers'][0]}", [bench[s]["score"] for s in sides], "%"))
    if report.get("speed_curve"):
        rows.append(("speed curve area", [report["speed_curve"][s]["area"] for s in sides], "g"))
    for label, values, kind in rows:
        lines.append(f"   {label:<26}" + "".join(f"{_fmt(v, kind):>12}" for v in values))
    if report.get("max_new_tokens"):
        lines.append(f"   {_limit(report['max_new_tokens'])}")
    lines += console_verdict(report)
    for w in (report.get("adapter_check") or {}).get("warnings", []):
        lines.append(f"   WARNING: {w}")
    if out_dir:
        lines.append(f" report in {out_dir}: " + ", ".join(report.get("files", [])))
    lines.append("=" * 64)
    return "\n".join(lines)
