"""Base and adapter as the two sides of every comparison: the same model with its adapter switched off and on, and
one side's scores from its generations, and paired differences between sides or settings (used by the comparison,
the sweep and the speed curve)."""

from __future__ import annotations

import contextlib

from eval.generation import Generation, GenerationSettings, speed_summary
from eval.scorers import exact_match, score_all
from eval.sets import EvalSet


def sides(peft_model, has_adapter: bool):
    """(name, context) pairs: the base is the same model with its adapter switched off."""
    if has_adapter:
        yield "base", peft_model.disable_adapter()
        yield "adapter", contextlib.nullcontext()
    else:
        yield "base", contextlib.nullcontext()


def score_side(eval_set: EvalSet, gens: list[Generation], gen: GenerationSettings, losses: dict | None) -> dict:
    """One side's scores (the set's scorers, exact match always), speed and, when given, held-out losses; the
    per-example scores under ``_per_example`` for paired comparisons."""
    texts = [g.text for g in gens]
    per_example = score_all(eval_set.scorers, texts, eval_set.references)
    scores = {name: sum(v) / max(len(v), 1) for name, v in per_example.items()}
    speed = speed_summary(gens, gen.max_denoising_steps)
    side = {
        "score": scores[eval_set.scorers[0]],
        "scores": scores,
        # always present: the end-of-run summary and older metrics.json readers use it
        "exact_match": sum(exact_match(t, r) for t, r in zip(texts, eval_set.references)) / max(len(texts), 1),
        "answers_cut": 1.0 - speed["finished_fraction"] if gens else 0.0,  # did not end within max_new_tokens
        "tokens_per_forward": speed["tokens_per_forward"],
        "speed": speed,
    }
    if losses is not None:
        side["heldout_loss_by_t"] = losses
        side["heldout_loss_mean"] = sum(losses.values()) / len(losses)
    side["_per_example"] = per_example
    return side


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same examples and its standard error (paired, so the noise of which examples were drawn
    cancels); one example or none: its difference (or 0) and no error."""
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return (d[0] if d else 0.0), 0.0
    mean = sum(d) / n
    return mean, (sum((x - mean) ** 2 for x in d) / (n - 1) / n) ** 0.5
