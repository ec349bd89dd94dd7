"""The train/eval split: data.eval's rows, or a seeded fraction of train held out, so reruns score the same rows."""

from __future__ import annotations

import random

from finetune.config import DataSettings
from finetune.data.render import build_examples
from finetune.data.sources import Stats, is_local, read_rows
from finetune.errors import UserError


def eval_source(settings: DataSettings) -> str | None:
    """Where the held-out rows come from: a source to read, or None when they are held out of data.train.

    data.eval=auto: a generated tiny:<task> gives new rows of its task, a hub data set its data.eval_split, and a file
    or directory of yours a seeded data.eval_fraction of its rows (never the tiny recipe's built-in task, which would
    score your adapter on the wrong task)."""
    return _eval_source(settings.eval, settings.train)


def _eval_source(eval_: str | None, train: str) -> str | None:
    if eval_ != "auto":
        return eval_ or None
    return None if is_local(train) else train


def holds_out_of_train(data: dict) -> bool:
    """Whether a config's ``data`` block (a plain mapping, as a checkpoint keeps it) has no eval source, so its eval
    rows come out of data.train and data.eval_rows and data.eval_fraction decide which rows train (the resume
    decision, finetune.checkpoints.compare)."""
    return _eval_source(data.get("eval"), str(data.get("train"))) is None


def load_splits(settings: DataSettings, tokenizer, canvas_length: int):
    """Train and eval rows and examples. With no eval source (`eval_source`), a seeded eval_fraction of train is held
    out, and the eval Stats' ``held_out`` says so."""
    train_stats, eval_stats = Stats("train"), Stats("eval")
    train_rows = read_rows(settings.train, settings.train_split, settings, settings.train_rows, train_stats)
    source = eval_source(settings)
    if source:
        eval_rows = read_rows(source, settings.eval_split, settings, settings.eval_rows, eval_stats,
                              seed_offset=10_000)
    else:
        if len(train_rows) < 2:
            raise UserError(f"data.train ({settings.train}) has {len(train_rows)} row(s): too few to hold out an "
                            "eval split; give data.eval")
        order = list(range(len(train_rows)))
        random.Random(settings.seed).shuffle(order)
        n_eval = max(1, int(len(order) * settings.eval_fraction))
        if settings.eval_rows:
            n_eval = min(n_eval, settings.eval_rows)
        held = set(order[:n_eval])
        eval_rows = [train_rows[i] for i in sorted(held)]
        eval_stats.held_out = (f"held out of data.train: {n_eval} of its {len(train_rows)} rows (data.eval_fraction="
                               f"{settings.eval_fraction}" + (f", at most data.eval_rows={settings.eval_rows}"
                                                              if settings.eval_rows else "")
                               + f", seed {settings.seed}); training uses the other {len(train_rows) - n_eval}")
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]
    train, train_stats = build_examples(train_rows, tokenizer, settings, canvas_length,
                                        f"data.train ({settings.train})", train_stats)
    evals, eval_stats = build_examples(eval_rows, tokenizer, settings, canvas_length,
                                       f"data.eval ({source or 'held out of data.train'})", eval_stats)
    return train_rows, train, train_stats, eval_rows, evals, eval_stats
