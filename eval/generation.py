"""Batch generation with transformers' own DiffusionGemma `generate()`, and the answers it gives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class GenerationSettings:
    max_new_tokens: int | None = None  # null: the model's generation_config
    max_denoising_steps: int = 48  # the model's own default
    entropy_bound: float = 0.1  # higher accepts more tokens per step: faster, riskier
    t_max: float = 0.8  # temperature at the first denoising step
    t_min: float = 0.4  # temperature at the last
    batch_size: int = 16
    seed: int = 0


@dataclass
class Generation:
    prompt: str
    text: str  # decoded answer, cut at the end of the turn
    tokens_per_forward: float


def _cut(text: str, stops: list[str]) -> str:
    for stop in stops:
        i = text.find(stop)
        if i >= 0:
            text = text[:i]
    return text.strip()


def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings, desc: str = "generate"):
    """Generate an answer for each rendered prompt; left padding lets one batch hold prompts of any length."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    stops = [t for t in (tokenizer.eos_token, "<end_of_turn>", "<turn|>") if t]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results = []
    kwargs = dict(
        max_denoising_steps=settings.max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(settings.entropy_bound)),
        t_max=settings.t_max,
        t_min=settings.t_min,
    )
    if settings.max_new_tokens:
        kwargs["max_new_tokens"] = settings.max_new_tokens
    torch.manual_seed(settings.seed)
    try:
        for i in tqdm(range(0, len(prompts), settings.batch_size), desc=desc, leave=False):
            chunk = prompts[i : i + settings.batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = base.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
            new = out.sequences[:, enc["input_ids"].shape[1] :]
            for j, prompt in enumerate(chunk):
                text = tokenizer.decode(new[j], skip_special_tokens=False)
                results.append(Generation(prompt, _cut(text, stops), float(out.tokens_per_forward[j])))
    finally:
        tokenizer.padding_side = side
    return results
