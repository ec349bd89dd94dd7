"""The train/eval split: with no data.eval, a seeded fraction of train is held out, so reruns score the same rows."""

from __future__ import annotations

import random

from finetune.config import DataSettings
from finetune.data.render import build_examples
from finetune.data.sources import Stats, read_rows
from finetune.errors import UserError


def load_splits(settings: DataSettings, tokenizer, canvas_length: int):
    """Train and eval rows and examples. With data.eval null, a seeded eval_fraction of train is held out."""
    train_stats, eval_stats = Stats("train"), Stats("eval")
    train_rows = read_rows(settings.train, settings.train_split, settings, settings.train_rows, train_stats)
    if settings.eval:
        eval_rows = read_rows(settings.eval, settings.eval_split, settings, settings.eval_rows, eval_stats,
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
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]
    train, train_stats = build_examples(train_rows, tokenizer, settings, canvas_length,
                                        f"data.train ({settings.train})", train_stats)
    evals, eval_stats = build_examples(eval_rows, tokenizer, settings, canvas_length,
                                       f"data.eval ({settings.eval or 'held out of data.train'})", eval_stats)
    return train_rows, train, train_stats, eval_rows, evals, eval_stats
