"""python -m finetune.preflight recipe=NAME [data.train=...]: what the data will look like to training, without
training. Prints rows read / kept / dropped with reasons, bad rows, length histograms, canvases per example, and
a few rendered examples with the supervised span and the EOS fill marked."""

from __future__ import annotations

import os
import sys
import time

from finetune import disk
from finetune.data import DataSettings, Stats, load_splits

SPAN_OPEN, SPAN_CLOSE = "⟦", "⟧"


def histogram(values: list[int], bins: int = 8, width: int = 40) -> list[str]:
    if not values:
        return ["  (none)"]
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    edges = list(range(lo, hi + 1, step))
    counts = [sum(1 for v in values if e <= v < e + step) for e in edges]
    top = max(counts)
    return [f"  {e:>6}-{e + step - 1:<6} {'#' * max(1 if c else 0, round(width * c / top)):<{width}} {c}"
            for e, c in zip(edges, counts)]


def show_example(example, tokenizer) -> str:
    """The sequence with each supervised span in ⟦ ⟧ and its EOS fill as ⟦<eos> x N⟧."""
    ids = example.input_ids
    pieces, pos = [], 0
    for t in example.targets:
        pieces.append(tokenizer.decode(ids[pos : t.start]))
        pieces.append(SPAN_OPEN + tokenizer.decode(t.tokens[: t.response_len]) + SPAN_CLOSE)
        fill = len(t.tokens) - t.response_len
        if fill:
            pieces.append(f"{SPAN_OPEN}{tokenizer.eos_token} x {fill}{SPAN_CLOSE}")
        pos = t.start + t.response_len
    head = (f"--- example from {example.meta.get('where', example.row)}: {len(example.targets)} target(s), "
            f"sequence {len(ids)} tokens, canvases {[t.num_canvases for t in example.targets]}")
    return head + "\n" + "".join(pieces)


def stats_lines(stats: Stats, canvas_length: int) -> list[str]:
    lines = [f"[{stats.name}]", f"rows read {stats.read}   kept {stats.kept}   "
             f"dropped {sum(stats.dropped.values())}   bad {stats.bad_count}"]
    if stats.held_out:
        lines.append(f"  {stats.held_out}")
    for reason, n in sorted(stats.dropped.items()):
        lines.append(f"  dropped {n}: {reason}")
    lines.append(f"targets (supervised turns) {stats.targets}   truncated {stats.truncated}")
    for reason, n in sorted(stats.targets_dropped.items()):
        lines.append(f"  turns dropped {n}: {reason}")
    if stats.thinking_stripped:
        lines.append(f"  reasoning removed from {stats.thinking_stripped} rows (data.thinking=false)")
    for where, message in stats.bad_rows:
        lines.append(f"  bad row {where}: {message}")
    if stats.bad_count > len(stats.bad_rows):
        lines.append(f"  ... and {stats.bad_count - len(stats.bad_rows)} more bad rows")
    lines.append("prompt tokens (before the last supervised turn)")
    lines += histogram(stats.prompt_lengths)
    lines.append("response tokens per turn")
    lines += histogram(stats.response_lengths)
    lines.append(f"canvases per example (canvas = {canvas_length} tokens)")
    lines += histogram(stats.canvases, bins=max(1, min(8, len(set(stats.canvases)))))
    return lines


def report(settings: DataSettings, train: list, train_stats: Stats, eval_stats: Stats, tokenizer, canvas_length: int,
           examples_shown: int = 3) -> tuple[str, dict]:
    """(text report, JSON-ready dict) for data already loaded (`finetune.data.load_splits`)."""
    lines = [f"preflight: data.train={settings.train} data.eval={settings.eval} canvas_length={canvas_length} "
             f"supervise={settings.supervise} thinking={settings.thinking} overlong={settings.overlong}", ""]
    lines += stats_lines(train_stats, canvas_length) + [""] + stats_lines(eval_stats, canvas_length) + [""]
    lines.append(f"rendered examples ({SPAN_OPEN}supervised{SPAN_CLOSE}, then the EOS fill):")
    for example in train[:examples_shown]:
        lines.append(show_example(example, tokenizer))
    data = {"train": train_stats.summary(), "eval": eval_stats.summary(), "canvas_length": canvas_length,
            "histograms": {"prompt_tokens": train_stats.prompt_lengths, "response_tokens": train_stats.response_lengths,
                           "canvases": train_stats.canvases}}
    return "\n".join(lines), data


def write(run_dir: str, text: str, data: dict):
    disk.write_text(os.path.join(run_dir, "preflight.txt"), text + "\n")
    disk.write_json(os.path.join(run_dir, "preflight.json"), data, indent=2)


def tokenizer_and_canvas(cfg):
    """The tokenizer and canvas length, without loading weights (or building the tiny base)."""
    if cfg.model.name_or_path == "tiny":
        from finetune.tiny import build_tokenizer

        return build_tokenizer(), cfg.model.tiny.canvas_length
    from finetune.model import check_architecture, load_tokenizer, pin_revision, resolve_model_path

    model = cfg.model
    path = resolve_model_path(model.name_or_path, model.revision)
    revision = pin_revision(path, model.revision)  # the config and the tokenizer of one commit
    canvas_length = check_architecture(path, revision, model.trust_remote_code).canvas_length
    return load_tokenizer(path, revision, model.trust_remote_code), canvas_length


USAGE = """usage: python -m finetune.preflight [recipe=NAME] [key=value ...] [--cfg job|hydra|all]

  recipe=NAME   a file in recipes/ (default: tiny); its tokenizer and data.* settings are used (no weights loaded)
  key=value     any config key, e.g. data.train=my.jsonl data.eval=null data.supervise=all
  output_dir=DIR  where preflight.txt and preflight.json go (default outputs/preflight-<run_name>-<time>)
"""


def main(argv: list[str] | None = None) -> int:
    from finetune.cli import command, show_config
    from finetune.config import compose, settings

    def body(overrides, cfg_mode):
        if cfg_mode:
            return show_config(overrides, cfg_mode)
        cfg = compose(overrides)
        data = settings(cfg.data)
        tokenizer, canvas_length = tokenizer_and_canvas(cfg)
        _, train, train_stats, _, _, eval_stats = load_splits(data, tokenizer, canvas_length)
        text, report_data = report(data, train, train_stats, eval_stats, tokenizer, canvas_length)
        explicit = any(o.startswith(("output_dir=", "+output_dir=")) for o in overrides)
        out = cfg.output_dir if explicit else os.path.join("outputs", f"preflight-{cfg.run_name}-"
                                                                       f"{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(out, exist_ok=True)
        write(out, text, report_data)
        print(text)
        print(f"\nwritten to {os.path.abspath(out)}/preflight.txt and preflight.json")

    return command(argv, USAGE, body)


if __name__ == "__main__":
    sys.exit(main())
