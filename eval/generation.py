"""Batch generation with transformers' own DiffusionGemma `generate()`, the answers it gives and how fast.

Speed definitions (per example; `speed_summary` pools them):
- tokens: generated tokens that are not padding, i.e. up to and including the first end-of-sequence token
  (transformers' own count).
- tokens_per_forward: transformers' `tokens_per_forward`, tokens / decoder_forward_passes.
- decoder_forward_passes: denoising steps this row took part in over all its canvases; a row that stopped early
  (adaptive stopping) or finished its answer is not counted for the batch's later steps, as if run alone.
  Recovered exactly as tokens / tokens_per_forward.
- canvases: canvases the row generated up to its end-of-sequence token.
- steps_per_canvas: decoder_forward_passes / canvases, at most max_denoising_steps; lower means adaptive
  stopping ended canvases early.
- seconds: wall time of the batched generate() call the row was part of; tokens_per_second = tokens / seconds
  (with batch_size 1 that is the row's own speed; pooled, it is the throughput at that batch size).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from finetune.config import GenerationSettings
from finetune.model import base_of


@dataclass
class Generation:
    prompt: str
    text: str  # decoded answer, cut at the end of the turn
    tokens_per_forward: float
    tokens: int = 0
    decoder_forward_passes: int | None = None  # None when the row produced no token (tokens_per_forward 0)
    canvases: int = 0
    steps_per_canvas: float | None = None
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    finished: bool = False  # an end-of-sequence token came before max_new_tokens
    batch: int = 0  # index of the generate() call (rows of one batch share its seconds)


def stops_of(tokenizer) -> list[str]:
    """Where an answer ends in the decoded text: the tokenizer's end of sequence and the end-of-turn markers."""
    return [t for t in (tokenizer.eos_token, "<end_of_turn>", "<turn|>") if t]


def cut(text: str, stops: list[str]) -> str:
    """The answer as the evaluation keeps it: up to the first of ``stops``, stripped."""
    for stop in stops:
        i = text.find(stop)
        if i >= 0:
            text = text[:i]
    return text.strip()


def generation_kwargs(settings: GenerationSettings) -> dict:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    kwargs = dict(
        max_denoising_steps=int(settings.max_denoising_steps),
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(settings.entropy_bound)),
        t_max=float(settings.t_max),
        t_min=float(settings.t_min),
    )
    if settings.max_new_tokens:
        kwargs["max_new_tokens"] = int(settings.max_new_tokens)
    if settings.stability_threshold is not None:
        kwargs["stability_threshold"] = int(settings.stability_threshold)
    if settings.confidence_threshold is not None:
        kwargs["confidence_threshold"] = float(settings.confidence_threshold)
    return kwargs


def reference_canvases(examples) -> int | None:
    """Canvases the longest reference answer fills as the data layer lays it out (response + EOS, whole canvases):
    the answer generate() has to produce is each example's last supervised turn."""
    return max((e.targets[-1].num_canvases for e in examples if e.targets), default=None)


def sized(settings: GenerationSettings, examples, canvas_length: int, max_response_canvases: int,
          model_default: int | None = None) -> tuple[GenerationSettings, dict]:
    """Settings whose max_new_tokens can hold the set's answers, and where that number came from.

    A value the user set wins. Otherwise: the longest reference's canvases plus one (room for an answer a little
    longer than the reference), within data.max_response_canvases; a set with no examples keeps the model's own
    generation_config limit (``model_default``). That limit alone would cut any longer answer (the tiny base's
    stops at 2 canvases), and a cut answer scores 0 for base and adapter alike.
    """
    needed = reference_canvases(examples)
    info = {"reference_canvases": needed, "reference_tokens": needed * canvas_length if needed else None}
    if settings.max_new_tokens is not None:
        tokens, source = int(settings.max_new_tokens), "eval.generation.max_new_tokens"
    elif needed is not None:
        canvases = min(needed + 1, max(max_response_canvases, needed))
        tokens, source = canvases * canvas_length, "the references"
        settings = replace(settings, max_new_tokens=tokens)
    else:
        tokens, source = model_default, "the model's generation_config"
    canvases = -(-tokens // canvas_length) if tokens else None
    return settings, {"max_new_tokens": tokens, "canvases": canvases, "sized_from": source, **info}


def row_speed(new_tokens: torch.Tensor, tokens_per_forward: torch.Tensor, pad_id, eos_ids, canvas_length: int):
    """Per-row (tokens, decoder passes, canvases, finished) from generate()'s output, as the module docstring says."""
    if pad_id is None:
        tokens = torch.full((new_tokens.shape[0],), new_tokens.shape[1])
    else:
        tokens = (new_tokens != pad_id).sum(-1)
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device)) if eos_ids else \
        torch.zeros_like(new_tokens, dtype=torch.bool)
    total_canvases = -(-new_tokens.shape[1] // canvas_length)
    rows = []
    for j in range(new_tokens.shape[0]):
        n, tpf = int(tokens[j]), float(tokens_per_forward[j])
        passes = round(n / tpf) if tpf > 0 else None
        hits = is_eos[j].nonzero()
        finished = len(hits) > 0
        canvases = int(hits[0]) // canvas_length + 1 if finished else total_canvases
        rows.append((n, passes, canvases, finished))
    return rows


def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings, desc: str = "generate"):
    """Generate an answer for each rendered prompt; left padding lets one batch hold prompts of any length.

    The random canvases depend only on ``settings.seed`` and the batch order, so base and adapter start from the
    same noise and a difference in their answers is the adapter's doing.
    """
    base = base_of(model)
    device = next(base.parameters()).device
    stops = stops_of(tokenizer)
    eos_ids = base.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    pad_id = base.generation_config.pad_token_id
    canvas_length = base.config.canvas_length
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results = []
    kwargs = generation_kwargs(settings)
    torch.manual_seed(settings.seed)
    try:
        for batch, i in enumerate(tqdm(range(0, len(prompts), settings.batch_size), desc=desc, leave=False)):
            chunk = prompts[i : i + settings.batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            started = time.perf_counter()
            with torch.no_grad():
                out = base.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            new = out.sequences[:, enc["input_ids"].shape[1] :]
            speeds = row_speed(new, out.tokens_per_forward, pad_id, eos_ids, canvas_length)
            for j, prompt in enumerate(chunk):
                text = tokenizer.decode(new[j], skip_special_tokens=False)
                tokens, passes, canvases, finished = speeds[j]
                results.append(Generation(
                    prompt, cut(text, stops), float(out.tokens_per_forward[j]), tokens=tokens,
                    decoder_forward_passes=passes, canvases=canvases,
                    steps_per_canvas=passes / canvases if passes is not None else None,
                    seconds=seconds, tokens_per_second=tokens / seconds if seconds > 0 else 0.0, finished=finished,
                    batch=batch,
                ))
    finally:
        tokenizer.padding_side = side
    return results


def speed_summary(gens: list[Generation], max_denoising_steps: int) -> dict:
    """Aggregate speed of a list of generations (definitions in the module docstring)."""
    n = max(len(gens), 1)
    tokens = sum(g.tokens for g in gens)
    counted = [g for g in gens if g.decoder_forward_passes is not None]
    passes = sum(g.decoder_forward_passes for g in counted)
    canvases = sum(g.canvases for g in counted)
    seconds = sum({g.batch: g.seconds for g in gens}.values())  # each batch's wall time once
    return {
        "tokens_per_forward": sum(g.tokens_per_forward for g in gens) / n,  # mean of transformers' per-row value
        "tokens_per_forward_pooled": sum(g.tokens for g in counted) / passes if passes else 0.0,
        "decoder_forward_passes_mean": passes / max(len(counted), 1),
        "decoder_forward_passes_total": passes,
        "steps_per_canvas": canvases and passes / canvases,
        "max_denoising_steps": max_denoising_steps,
        "generated_tokens_total": tokens,
        "generated_tokens_mean": tokens / n,
        "generate_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "finished_fraction": sum(g.finished for g in gens) / n,
    }

