"""Score against parallelism (`eval.speed_curve=true`): base and adapter at every point of a grid of the sampler's
entropy bound x maximum denoising steps per canvas, with every model forward counted, the wall time of one answer
at batch 1, the area under the score-vs-parallelism curve, and the fastest training-free sampler setting that keeps
the adapter's best score.

Which forwards DiffusionGemma's generate() runs (transformers 5.25, models/diffusion_gemma/
generation_diffusion_gemma.py, `DiffusionGemmaGenerationMixin.generate`), found by reading it and checked with
forward hooks in tests/eval/test_speed_curve.py:

- Canvas by canvas, one **encoder** call before the canvas is denoised: for the first canvas it is the prefill of
  the prompt; for each later canvas it encodes the previous canvas (its last argmax, "committed" into the KV cache
  at the same positions). The last canvas is never encoded: the loop ends after it. A row that produced C canvases
  therefore costs C encoder passes (1 prefill + C - 1 commits).
- One **decoder** call per denoising step (`self.forward` with the cache and no input_ids, so the encoder does not
  run again inside it), at most `max_denoising_steps` per canvas, fewer when the adaptive stop ends the canvas.
- Self-conditioning adds **no** pass at inference: each step hands its processed logits to the next step's single
  decoder call (softmax @ embeddings inside the decoder). (Training's self-conditioning runs a second decoder pass;
  generation does not.)
- transformers' `decoder_forward_passes` counts, per row, the denoising steps in which that row had neither stopped
  denoising nor finished its answer: the decoder calls the row would run alone (batch 1). It counts no encoder pass,
  and its `tokens_per_forward` is non-pad new tokens / decoder_forward_passes.

Here a row's forwards = decoder_forward_passes + canvases (canvases up to and including the one with its
end-of-sequence token, all of them when it never ended): every call of the encoder or decoder stack the row needs
alone, whatever the length of that call. In a batch, rows that already ended still ride along in the batch's later
encoder calls; as transformers does for the decoder, they are not counted.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from eval.generation import Generation, GenerationSettings, generate
from eval.sets import EvalSet
from eval.sides import paired, score_side, sides
from finetune.config import SpeedCurveSettings

AREA_DEFINITION = (
    "area under the score-vs-parallelism frontier: A = integral from 0 to infinity of F(x) dx, where x is tokens "
    "per forward (every encoder and decoder forward counted) and F(x) is the best score among the side's grid "
    "points whose tokens per forward is at least x (0 beyond the fastest point). F is the Pareto frontier as a step "
    "function: a point slower and worse than another adds nothing. Units: score x tokens per forward; a side that "
    "keeps its score at higher parallelism has the larger area; with one point it is score x tokens per forward")
FORWARDS_DEFINITION = (
    "forwards per answer = decoder forward passes (one per denoising step the row took part in; self-conditioning "
    "reuses the previous step's logits, no extra pass) + encoder passes (one per canvas generated: the prompt's "
    "prefill, then the commit of each canvas but the last, which generate() never encodes); tokens_per_forward = "
    "generated non-pad tokens / forwards, per answer as if alone (batch 1), averaged over answers")
BEST_DEFINITION = (
    "best training-free point: among the grid points whose score is within the noise of the side's best score "
    "(best - score <= max(eval.regression_tolerance, 2 paired standard errors over the same examples)), the one with "
    "the most tokens per forward; compared with the default sampler (eval.generation's max_denoising_steps and "
    "entropy_bound)")


def forwards(g: Generation) -> int | None:
    """Every encoder and decoder forward the answer took alone (see the module docstring); None when unknown (no
    generated token, so transformers' tokens_per_forward gives no pass count)."""
    if g.decoder_forward_passes is None:
        return None
    return g.decoder_forward_passes + g.canvases


def tokens_per_forward(gens: list[Generation]) -> dict:
    """Mean over answers of tokens / forwards (an answer with no token counts 0, as transformers' value does),
    pooled tokens / forwards, and the forwards per answer split into decoder and encoder passes."""
    n = max(len(gens), 1)
    counted = [g for g in gens if g.decoder_forward_passes is not None]
    total = sum(forwards(g) for g in counted)
    return {
        "tokens_per_forward": sum(g.tokens / forwards(g) if g in counted else 0.0 for g in gens) / n,
        "tokens_per_forward_pooled": sum(g.tokens for g in counted) / total if total else 0.0,
        "tokens_per_decoder_forward": sum(g.tokens_per_forward for g in gens) / n,  # transformers' value
        "forwards_per_answer": total / max(len(counted), 1),
        "decoder_forwards_per_answer": sum(g.decoder_forward_passes for g in counted) / max(len(counted), 1),
        "encoder_forwards_per_answer": sum(g.canvases for g in counted) / max(len(counted), 1),
    }


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier of (tokens per forward, score) points, fastest first: each kept point scores higher
    than every faster one."""
    out, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return out


def area(points: list[tuple[float, float]]) -> float:
    """The area under the frontier's step function, as AREA_DEFINITION states: F(x) = best score among points
    with tokens per forward >= x, integrated over x from 0."""
    total = 0.0
    front = frontier([(max(float(x), 0.0), float(y)) for x, y in points])
    for i, (x, y) in enumerate(front):  # fastest first: y holds on (next slower x, x]
        slower = front[i + 1][0] if i + 1 < len(front) else 0.0
        total += (x - slower) * y
    return total


def best_training_free(points: list[dict], per_example: list[list[float]], tolerance: float) -> dict | None:
    """BEST_DEFINITION: the index of the fastest point within the noise of the best score, with the noise used."""
    if not points:
        return None
    top = max(range(len(points)), key=lambda i: (points[i]["score"], points[i]["tokens_per_forward"]))
    within = []
    for i, p in enumerate(points):
        noise = max(tolerance, 2 * paired(per_example[top], per_example[i])[1])
        if points[top]["score"] - p["score"] <= noise:
            within.append((p["tokens_per_forward"], p["score"], i, noise))
    speed, score, index, noise = max(within)
    return {"index": index, "best_score_index": top, "noise": noise}


def grid(spec: SpeedCurveSettings, gen: GenerationSettings) -> list[tuple[int, float, bool]]:
    """(max_denoising_steps, entropy_bound, is the default sampler) for each point: the grid in order, plus
    eval.generation's own point when the grid lacks it (the reference the best point is compared with)."""
    points = [(int(s), float(e)) for s, e in itertools.product(spec.max_denoising_steps, spec.entropy_bound)]
    default = (int(gen.max_denoising_steps), float(gen.entropy_bound))
    if default not in points:
        points.append(default)
    return [(s, e, (s, e) == default) for s, e in points]


def speed_curve(peft_model, tokenizer, eval_set: EvalSet, gen: GenerationSettings, spec: SpeedCurveSettings,
                has_adapter: bool, tolerance: float) -> dict:
    """Score, tokens per forward (every forward) and seconds per answer at batch 1 at each grid point, per side;
    the area per side and the best training-free point vs the default sampler."""
    points = grid(spec, gen)
    timed = eval_set.prompts[: spec.timing_prompts]
    names = [name for name, _ in sides(peft_model, has_adapter)]
    out = {"definition": AREA_DEFINITION, "forwards": FORWARDS_DEFINITION, "best_definition": BEST_DEFINITION,
           "scorer": eval_set.scorers[0],
           "grid": {"max_denoising_steps": list(spec.max_denoising_steps), "entropy_bound": list(spec.entropy_bound)},
           "default": {"max_denoising_steps": int(gen.max_denoising_steps), "entropy_bound": float(gen.entropy_bound)},
           # the default sampler's point was not on the grid and was run as an extra point
           "default_added": len(points) > len(spec.max_denoising_steps) * len(spec.entropy_bound),
           "timing": f"seconds per answer: wall time of generate() for one prompt at a time (batch 1), the mean over "
                     f"the first {len(timed)} held-out prompts; scores and tokens per forward over all "
                     f"{len(eval_set.prompts)} at eval.generation.batch_size {gen.batch_size}",
           "examples": len(eval_set.prompts), "timed_answers": len(timed)}
    per_example = {name: [] for name in names}
    for name in names:
        out[name] = {"points": []}
    for steps, bound, is_default in points:
        settings = replace(gen, max_denoising_steps=steps, entropy_bound=bound)
        for name, ctx in sides(peft_model, has_adapter):
            with ctx:
                gens = generate(peft_model, tokenizer, eval_set.prompts, settings,
                                desc=f"speed curve steps={steps} bound={bound:g} {name}")
                one = generate(peft_model, tokenizer, timed, replace(settings, batch_size=1),
                               desc=f"speed curve batch 1 steps={steps} bound={bound:g} {name}") if timed else []
            side = score_side(eval_set, gens, settings, None)
            per_example[name].append([float(v) for v in side["_per_example"][eval_set.scorers[0]]])
            out[name]["points"].append({
                "max_denoising_steps": steps, "entropy_bound": bound, "default": is_default,
                "score": side["score"], **tokens_per_forward(gens),
                "steps_per_canvas": side["speed"]["steps_per_canvas"],
                "finished_fraction": side["speed"]["finished_fraction"],
                "seconds_per_answer": sum(g.seconds for g in one) / len(one) if one else None,
            })
    for name in names:
        pts = out[name]["points"]
        out[name]["area"] = area([(p["tokens_per_forward"], p["score"]) for p in pts])
        out[name]["frontier"] = [{"tokens_per_forward": x, "score": y}
                                 for x, y in frontier([(p["tokens_per_forward"], p["score"]) for p in pts])]
        best = best_training_free(pts, per_example[name], tolerance)
        default = next(p for p in pts if p["default"])
        chosen = pts[best["index"]]
        out[name]["best_training_free"] = {
            "point": chosen, "noise": best["noise"], "best_score": pts[best["best_score_index"]]["score"],
            "default": default,
            "speedup_tokens_per_forward": chosen["tokens_per_forward"] / default["tokens_per_forward"]
            if default["tokens_per_forward"] else None,
            "speedup_seconds": default["seconds_per_answer"] / chosen["seconds_per_answer"]
            if default["seconds_per_answer"] and chosen["seconds_per_answer"] else None,
            "score_change": chosen["score"] - default["score"],
        }
    return out
