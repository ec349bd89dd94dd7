"""What a run leaves behind for a person: the loss-curve PNG and the end-of-run summary.

The summary prints the evaluation's verdict with `eval.report.console_verdict`, the function `python -m eval` prints
it with, so the two never disagree (the report stage comes after eval in the flow: importing it is no back-edge).
"""

from __future__ import annotations

from eval.report import console_verdict
from finetune import disk


def plot_loss(step_losses: list[float], logged: list[dict], path: str, grad_accum: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = [(i + 1) / grad_accum for i in range(len(step_losses))]
    ax.plot(x, step_losses, alpha=0.3, label="loss per micro-batch")
    steps = [e["step"] for e in logged if "loss" in e]
    if steps:
        ax.plot(steps, [e["loss"] for e in logged if "loss" in e], marker="o", label="logged (mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        disk.write_whole(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def summary(metrics: dict, run_dir: str) -> str:
    lines = ["", "=" * 64, f" Run finished: {metrics['run_name']}", "=" * 64]
    t = metrics["training"]
    lines.append(f" steps {t['steps']}   time {t['seconds']:.0f}s   trainable params {t['trainable_params']:,}")
    lines.append(f" training loss   first {t['loss_first']:.4f}  ->  last {t['loss_last']:.4f}")
    ev = metrics.get("eval")
    if ev:
        lines.append(f" held-out ({ev['examples']} examples)        base      adapter")
        b, a = ev["base"], ev["adapter"]
        lines.append(f"   denoising loss (mean of t) {b['heldout_loss_mean']:9.4f}  {a['heldout_loss_mean']:9.4f}")
        lines.append(f"   {ev['scorers'][0]:<26} {b['score']:9.1%}  {a['score']:9.1%}")  # what the verdict judges
        lines.append(f"   answers cut (no EOS)       {b['answers_cut']:9.1%}  {a['answers_cut']:9.1%}")
        lines.append(f"   tokens per forward         {b['tokens_per_forward']:9.2f}  {a['tokens_per_forward']:9.2f}")
        lines += console_verdict(ev)  # the one verdict, as python -m eval prints it
        lines += [f"   !  {warning}" for warning in ev.get("adapter_check", {}).get("warnings", [])]
        for s in a["samples"][:3]:
            lines.append(f"   e.g. {s['input'][:40]!r} -> {s['output'][:40]!r} (want {s['reference'][:40]!r})")
    lines.append(f" artifacts in {run_dir}")
    for name in ("adapter/", "metrics.json", "loss_curve.png", "config.yaml") + tuple((ev or {}).get("files", ())):
        lines.append(f"   {name}")
    lines.append("=" * 64)
    return "\n".join(lines)
