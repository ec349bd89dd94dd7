"""Base vs adapter on the same inputs: held-out denoising loss at fixed t, task scores, speed, whether the adapter
changed anything, a benchmark for what it may have broken, and an optional speed/quality sweep."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace

from eval.adapter_check import adapter_check, changed_fraction
from eval.generation import GenerationSettings, generate, generation_kwargs, sized
from eval.loss import heldout_loss
from eval.scorers import resolve_scorer
from eval.sets import EvalSet, benchmark_set, heldout_set
from eval.sides import paired, score_side, sides
from eval.speed_curve import speed_curve
from finetune.config import DataSettings, SpeedCurveSettings, eval_settings
from finetune.errors import UserError
from finetune.model import base_of

log = logging.getLogger(__name__)

SWEEP_PARAMS = ("max_denoising_steps", "entropy_bound")
SIDES = ("base", "adapter")

DEFINITIONS = {
    "heldout_loss_by_t": "denoising cross-entropy with every example corrupted at exactly this t, fixed canvases "
                         "and noise (seed), no self-conditioning; same seed and data give the same number",
    "score": "mean over examples of the first scorer in eval.scorers (1 = every answer right)",
    "tokens": "generated tokens that are not padding: up to and including the first end-of-sequence token",
    "tokens_per_forward": "transformers' value per example, tokens / decoder_forward_passes, averaged over examples",
    "tokens_per_forward_pooled": "all tokens / all decoder forward passes",
    "decoder_forward_passes": "denoising steps an example took part in, over all its canvases (a row that stopped "
                              "early is not counted for later steps of its batch, as if it ran alone)",
    "steps_per_canvas": "decoder forward passes / canvases generated: denoising steps used before the adaptive stop "
                        "(at most max_denoising_steps)",
    "tokens_per_second": "generated tokens / wall time of the batched generate() calls (throughput at batch_size)",
    "finished_fraction": "examples whose answer ended (end-of-sequence) within max_new_tokens",
    "answers_cut": "examples whose answer did not end within max_new_tokens (1 - finished_fraction): their score is "
                   "of a cut answer",
    "max_new_tokens": "eval.generation.max_new_tokens when set; null: the longest reference's canvases plus one, "
                      "within data.max_response_canvases (each set sized from its own references)",
    "verdict": "better / worse when the paired change of the first scorer exceeds max(eval.regression_tolerance, "
               "2 paired standard errors); otherwise not shown (ties, 0% vs 0% included)",
    "changed_generations_fraction": "examples whose adapter output differs from the base output, same prompt and "
                                    "same starting noise",
}


def _check_sampler(settings: GenerationSettings, where: str):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    try:  # transformers' own validation, now rather than at the first generate() after training
        DiffusionGemmaGenerationConfig(**generation_kwargs(settings))
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {str(e).splitlines()[0]}") from None


def active_benchmark(eval_cfg: dict) -> dict | None:
    bench = eval_cfg.get("benchmark")
    return bench if bench and bench.get("source") else None


def active_sweep(eval_cfg: dict) -> dict | None:
    sweep = eval_cfg.get("sweep")
    return sweep if sweep and sweep.get("values") else None


def active_speed_curve(eval_cfg: dict) -> SpeedCurveSettings | None:
    """The speed curve's settings when eval.speed_curve is on (true, or a block with enabled: true), else None."""
    spec = SpeedCurveSettings.of(eval_cfg.get("speed_curve"))
    return spec if spec.enabled else None


def validate(eval_cfg) -> dict:
    """Config errors before any model is loaded; returns the block completed with the schema's defaults."""
    eval_cfg = eval_settings(eval_cfg)
    gen = GenerationSettings(**eval_cfg["generation"])
    _check_sampler(gen, "eval.generation")
    bench = active_benchmark(eval_cfg)
    for name in list(eval_cfg["scorers"]) + list(bench["scorers"] if bench else []):
        resolve_scorer(name)
    sweep = active_sweep(eval_cfg)
    if sweep:
        if sweep["param"] not in SWEEP_PARAMS:
            raise UserError(f"eval.sweep.param={sweep['param']!r}: use one of {', '.join(SWEEP_PARAMS)}")
        cast = int if sweep["param"] == "max_denoising_steps" else float
        for value in sweep["values"]:
            where = f"eval.sweep {sweep['param']}={value}"
            try:
                value = cast(value)
            except (TypeError, ValueError):
                raise UserError(f"{where}: not a number") from None
            _check_sampler(replace(gen, **{sweep["param"]: value}), where)
    curve = active_speed_curve(eval_cfg)
    if curve:
        for steps in curve.max_denoising_steps:
            _check_sampler(replace(gen, max_denoising_steps=steps), f"eval.speed_curve max_denoising_steps={steps}")
        for bound in curve.entropy_bound:
            _check_sampler(replace(gen, entropy_bound=bound), f"eval.speed_curve entropy_bound={bound:g}")
    return eval_cfg


def evaluate_set(peft_model, tokenizer, eval_set: EvalSet, gen: GenerationSettings, loss_kwargs: dict | None,
                 has_adapter: bool, n_samples: int = 8) -> dict:
    """Loss, generations, scores and speed for base (and adapter) on one set; generations side by side."""
    result, gens = {"name": eval_set.name, "source": eval_set.source, "examples": len(eval_set.prompts),
                    "scorers": eval_set.scorers}, {}
    for name, ctx in sides(peft_model, has_adapter):
        with ctx:
            losses = heldout_loss(peft_model, eval_set.examples, **loss_kwargs) if loss_kwargs and eval_set.examples \
                else None
            gens[name] = generate(peft_model, tokenizer, eval_set.prompts, gen, desc=f"{eval_set.name}: {name}")
        result[name] = score_side(eval_set, gens[name], gen, losses)
    rows = []
    for i, (inp, ref) in enumerate(zip(eval_set.inputs, eval_set.references)):
        row = {"input": inp, "reference": ref}
        for name in gens:
            g = gens[name][i]
            row[name] = {"output": g.text, **{k: result[name]["_per_example"][k][i] for k in eval_set.scorers},
                         "tokens": g.tokens, "tokens_per_forward": g.tokens_per_forward,
                         "decoder_forward_passes": g.decoder_forward_passes, "canvases": g.canvases,
                         "steps_per_canvas": g.steps_per_canvas, "seconds": g.seconds,
                         "tokens_per_second": g.tokens_per_second, "finished": g.finished}
        if has_adapter:
            row["changed"] = gens["base"][i].text != gens["adapter"][i].text
        rows.append(row)
    result["generations"] = rows
    for name in gens:  # compatible with the first metrics.json: input/reference/output per side
        result[name]["samples"] = [{"input": r["input"], "reference": r["reference"], "output": r[name]["output"]}
                                   for r in rows[:n_samples]]
        del result[name]["_per_example"]
    if has_adapter:
        result["changed_generations_fraction"] = changed_fraction([g.text for g in gens["base"]],
                                                                  [g.text for g in gens["adapter"]])
    return result


def sweep(peft_model, tokenizer, eval_set: EvalSet, gen: GenerationSettings, spec: dict, has_adapter: bool) -> dict:
    """Score and speed at each value of one sampler setting: the speed/quality trade-off of the sampler."""
    param = spec["param"]
    cast = int if param == "max_denoising_steps" else float
    out = {"param": param, "values": [cast(v) for v in spec["values"]], **{name: [] for name, _ in
                                                                            sides(peft_model, has_adapter)}}
    for value in out["values"]:
        settings = replace(gen, **{param: value})
        for name, ctx in sides(peft_model, has_adapter):
            with ctx:
                gens = generate(peft_model, tokenizer, eval_set.prompts, settings, desc=f"sweep {param}={value} {name}")
            side = score_side(eval_set, gens, settings, None)
            out[name].append({"value": value, "score": side["score"], **side["speed"]})
    return out


def paired_delta(generations: list[dict], scorer: str) -> tuple[float, float]:
    """Mean adapter-minus-base score over the same examples, and its standard error (paired, so the noise of
    which examples were drawn cancels)."""
    return paired([g["adapter"][scorer] for g in generations], [g["base"][scorer] for g in generations])


def outcome(delta: float, delta_se: float, examples: int, tolerance: float) -> str:
    """The one verdict on a task score: "better" or "worse" when the paired change is larger than its noise
    (max(tolerance, 2 paired standard errors)), else "not shown": a tie, 0% vs 0% included, is no evidence
    either way. One example has no measurable noise, so it shows nothing."""
    if examples < 2:
        return "not shown"
    noise = max(tolerance, 2 * delta_se)
    return "better" if delta > noise else "worse" if -delta > noise else "not shown"


def _canvases(n) -> str:
    return f"{n} canvas" if n == 1 else f"{n} canvases"


def cut_caveats(block: dict, tokens: dict, where: str) -> list[str]:
    """The answers-cut caveat of a set: a score of answers cut at max_new_tokens says little about the task."""
    present = [s for s in SIDES if s in block]
    limit, canvases, needed = tokens.get("max_new_tokens"), tokens.get("canvases"), tokens.get("reference_canvases")
    too_small = bool(limit and needed and limit < tokens["reference_tokens"])
    out = []
    cut = {s: block[s]["answers_cut"] for s in present}
    if any(v > 0 for v in cut.values()):
        who = " and ".join(f"{v:.0%} of {s}" for s, v in cut.items())
        why = (f"the longest reference needs {_canvases(needed)}, so raise eval.generation.max_new_tokens (null sizes "
               "it from the references)") if too_small else \
            "the references fit, so these answers ran on without ending"
        out.append(f"answers cut ({where}): {who} answers did not end within max_new_tokens={limit} "
                   f"({_canvases(canvases)}, from {tokens['sized_from']}); their scores are of cut answers: {why}")
    elif too_small:
        out.append(f"max_new_tokens={limit} ({where}) is shorter than the longest reference ({_canvases(needed)}): "
                   "an answer that long cannot be produced; raise eval.generation.max_new_tokens")
    return out


def verdict(report: dict, tolerance: float, speed_tolerance: float) -> dict:
    """The one verdict of an evaluation (the end-of-run summary, the console and report.md all print this):
    ``task`` is better / worse / not shown on the first scorer (see `outcome`); the held-out loss change is
    stated as a loss change, never as a win; ``caveats`` say when the scores are of cut answers; a benchmark drop
    counts as a regression when it is larger than the tolerance and than two paired standard errors."""
    caveats = cut_caveats(report, report.get("max_new_tokens") or {}, "held-out")
    bench = report.get("benchmark")
    if bench:
        caveats += cut_caveats(bench, bench.get("max_new_tokens") or {}, f"benchmark {bench['name']}")
    if "adapter" not in report:
        return {"caveats": caveats}
    b, a = report["base"], report["adapter"]
    scorer = report["scorers"][0]
    delta, delta_se = paired_delta(report["generations"], scorer)
    task = outcome(delta, delta_se, len(report["generations"]), tolerance)
    loss = None
    if "heldout_loss_mean" in b and "heldout_loss_mean" in a:
        loss = {"base": b["heldout_loss_mean"], "adapter": a["heldout_loss_mean"],
                "change": a["heldout_loss_mean"] - b["heldout_loss_mean"]}
    speed_ratio = a["tokens_per_forward"] / b["tokens_per_forward"] if b["tokens_per_forward"] else None
    broke = []
    if a["speed"]["finished_fraction"] < b["speed"]["finished_fraction"] - tolerance:
        broke.append(f"fewer held-out answers end within max_new_tokens ({b['speed']['finished_fraction']:.0%} -> "
                     f"{a['speed']['finished_fraction']:.0%})")
    if bench:
        bb, ba = bench["base"], bench["adapter"]
        bench_delta, bench_se = paired_delta(bench["generations"], bench["scorers"][0])
        if -bench_delta > max(tolerance, 2 * bench_se):
            broke.append(f"benchmark {bench['name']}: {bench['scorers'][0]} {bb['score']:.1%} -> {ba['score']:.1%}")
        if "heldout_loss_mean" in bb and ba["heldout_loss_mean"] > bb["heldout_loss_mean"] * (1 + tolerance):
            broke.append(f"benchmark {bench['name']}: denoising loss {bb['heldout_loss_mean']:.4f} -> "
                         f"{ba['heldout_loss_mean']:.4f}")
    return {
        "task": task,
        "better_on_task": task == "better",  # the same outcome as a flag, for readers of older reports
        "scorer": scorer,
        "score_base": b["score"],
        "score_adapter": a["score"],
        "score_delta": delta,
        "score_delta_se": delta_se,
        "noise": max(tolerance, 2 * delta_se),
        "heldout_loss": loss,
        "caveats": caveats,
        "tokens_per_forward_ratio": speed_ratio,
        "still_fast": speed_ratio is None or speed_ratio >= 1 - speed_tolerance,
        "regressions": broke,
        "nothing_else_broke": not broke,
        "benchmark_checked": bool(bench),
        "adapter_changed_nothing": report["adapter_check"]["adapter_changed_nothing"],
    }


def compare(peft_model, tokenizer, pairs, examples, objective, canvas_length, eval_cfg, out_dir=None,
            has_adapter: bool = True, data_settings=None, meta: dict | None = None) -> dict:
    """Score the base (adapter disabled) and the adapter on the same inputs; returns a JSON-ready dict and, with
    ``out_dir``, writes report.json, report.md and the plots there. ``pairs`` are (generation prompt, reference,
    question) from `finetune.data.eval_prompts`. Half-precision weights on a CPU without native half matmul run
    their products through fp32 (finetune.emulated), as training does: the 26B model's bf16 experts there ran at
    ~1 GFLOP/s otherwise."""
    from finetune import emulated

    device = next(peft_model.parameters()).device
    with emulated.fp32_products(emulated.wanted(device, {base_of(peft_model).dtype})):
        return _compare(peft_model, tokenizer, pairs, examples, objective, canvas_length, eval_cfg, out_dir,
                        has_adapter, data_settings, meta)


def _compare(peft_model, tokenizer, pairs, examples, objective, canvas_length, eval_cfg, out_dir, has_adapter,
             data_settings, meta) -> dict:
    started = time.perf_counter()
    eval_cfg = validate(eval_cfg)
    gen = GenerationSettings(**eval_cfg["generation"])
    base_model = base_of(peft_model)
    model_limit = getattr(base_model.generation_config, "max_new_tokens", None)
    max_canvases = (data_settings or DataSettings()).max_response_canvases
    loss_kwargs = dict(
        objective=objective, canvas_length=canvas_length, pad_id=tokenizer.pad_token_id,
        t_values=tuple(eval_cfg["loss_t"]), batches=eval_cfg["loss_batches"], seed=gen.seed,
    )
    n_samples = eval_cfg["samples"]["shown"]
    peft_model.eval()
    heldout = heldout_set(pairs, examples, eval_cfg)
    gen, limit = sized(gen, heldout.examples, canvas_length, max_canvases, model_limit)
    task = evaluate_set(peft_model, tokenizer, heldout, gen, loss_kwargs, has_adapter, n_samples)
    report = {
        "schema_version": 1,
        **(meta or {}),
        "generation_settings": {**asdict(gen), "max_new_tokens": limit["max_new_tokens"]},
        "max_new_tokens": limit,
        "scorers": heldout.scorers,
        "examples": task["examples"],
        "samples_shown": n_samples,
        "definitions": DEFINITIONS,
    }
    for name in SIDES:
        if name in task:
            report[name] = task[name]
    report["generations"] = task["generations"]
    if has_adapter:
        report["adapter_check"] = adapter_check(peft_model, [r["base"]["output"] for r in task["generations"]],
                                                [r["adapter"]["output"] for r in task["generations"]],
                                                tolerance=float(eval_cfg["zero_delta_tolerance"]))
    bench_cfg = active_benchmark(eval_cfg)
    if bench_cfg:
        try:
            bench_set = benchmark_set(bench_cfg, tokenizer, canvas_length, data_settings)
        except UserError as e:  # e.g. offline: the task's numbers still count, the report says what is missing
            report["benchmark_error"] = str(e)
            log.warning("benchmark skipped: %s", e)
        else:  # sized from its own references when eval.generation.max_new_tokens is null
            bench_gen, bench_limit = sized(replace(gen, max_new_tokens=eval_cfg["generation"]["max_new_tokens"]),
                                           bench_set.examples, canvas_length, max_canvases, model_limit)
            report["benchmark"] = evaluate_set(peft_model, tokenizer, bench_set, bench_gen, loss_kwargs, has_adapter,
                                               n_samples)
            report["benchmark"]["max_new_tokens"] = bench_limit
    if active_sweep(eval_cfg):
        report["sweep"] = sweep(peft_model, tokenizer, heldout, gen, eval_cfg["sweep"], has_adapter)
    curve = active_speed_curve(eval_cfg)
    if curve:
        report["speed_curve"] = speed_curve(peft_model, tokenizer, heldout, gen, curve, has_adapter,
                                            float(eval_cfg["regression_tolerance"]))
    report["verdict"] = verdict(report, float(eval_cfg["regression_tolerance"]), float(eval_cfg["speed_tolerance"]))
    report["seconds"] = time.perf_counter() - started  # the whole evaluation, for planning the next one
    if out_dir:
        from eval.report import write_report

        report["files"] = write_report(report, out_dir)
    return report
