"""Base vs adapter on held-out rows: denoising loss at fixed t and generation exact match."""

from __future__ import annotations

from dataclasses import asdict

from eval.generation import GenerationSettings, generate
from eval.loss import heldout_loss


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def compare(peft_model, tokenizer, pairs, examples, objective, canvas_length, eval_cfg) -> dict:
    """Score the base (adapter disabled) and the adapter on the same inputs; returns a JSON-ready dict.

    ``pairs`` are (generation prompt, reference answer, question) from `finetune.data.eval_prompts`.
    """
    gen = GenerationSettings(**eval_cfg["generation"])
    pairs = pairs[: eval_cfg["max_examples"]]
    prompts = [p for p, _, _ in pairs]
    refs = [r for _, r, _ in pairs]
    loss_kwargs = dict(
        objective=objective, canvas_length=canvas_length, pad_id=tokenizer.pad_token_id,
        t_values=tuple(eval_cfg["loss_t"]), batches=eval_cfg["loss_batches"], seed=gen.seed,
    )
    peft_model.eval()
    report = {"generation_settings": asdict(gen), "examples": len(pairs)}
    for name in ("base", "adapter"):
        if name == "base":
            with peft_model.disable_adapter():
                losses = heldout_loss(peft_model, examples, **loss_kwargs)
                gens = generate(peft_model, tokenizer, prompts, gen, desc="eval base")
        else:
            losses = heldout_loss(peft_model, examples, **loss_kwargs)
            gens = generate(peft_model, tokenizer, prompts, gen, desc="eval adapter")
        hits = [exact_match(g.text, ref) for g, ref in zip(gens, refs)]
        report[name] = {
            "heldout_loss_by_t": losses,
            "heldout_loss_mean": sum(losses.values()) / len(losses),
            "exact_match": sum(hits) / max(len(hits), 1),
            "tokens_per_forward": sum(g.tokens_per_forward for g in gens) / max(len(gens), 1),
            "samples": [{"input": q, "reference": ref, "output": g.text}
                        for (_, ref, q), g in list(zip(pairs, gens))[:8]],
        }
    return report
