"""`data.answers=base`: train on the base model's own answers instead of the data's (self-distillation, as dParallel's
certainty forcing trains on the model's own outputs): what the model already says, made sharper (objective=fast)
rather than changed.

The answers are generated once, by the base before any LoRA is attached (so no second copy of the weights is
held), with the evaluation's sampler (`eval.generation`: seed, temperatures, steps, entropy bound), and cached in
``<cache_dir>/answers/<key>.json``; the key hashes what decides them: the base (hub id and commit, or a local
directory's identity), the tokenizer's vocabulary, the rendered prompts and the sampler. A second run, a resume or
another objective on the same rows reads the cache. Only the last assistant turn of each row is replaced (the
earlier turns are the conversation's context); the held-out rows keep the data's references, so the evaluation
still scores against the task's right answers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, replace

from finetune import disk
from finetune.config import GenerationSettings
from finetune.data.render import Renderer, _strip_thinking, conversation
from finetune.data.sources import BadRow, Row
from finetune.errors import UserError

ANSWERS = ("data", "base")


def _prompt_of(row: Row, renderer: Renderer, settings) -> str | None:
    """The rendered prompt of a row's last assistant turn; None for a row the data layer will reject anyway."""
    try:
        messages = conversation(row.data, settings)
    except BadRow:
        return None  # build_examples reports it with the row's place, as for any other bad row
    if messages is None:
        raise UserError(f"data.answers=base: {row.where} is a plain-text row; the base's own answers need chat rows "
                        "(messages, or prompt + completion). Use data.answers=data for plain text")
    if not settings.thinking:
        _strip_thinking(messages)
    return renderer.prompt_text(messages[:-1])


def cache_key(model_id: str, tokenizer, prompts: list[str], generation) -> str:
    digest = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items())
    for part in (model_id, json.dumps(vocab), json.dumps(prompts), json.dumps(asdict(generation), sort_keys=True)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def with_base_answers(rows: list, answer, tokenizer, settings, generation: GenerationSettings, canvas_length: int,
                      cache_dir: str, model_id: str, writer: bool = True) -> tuple[list[Row], dict]:
    """``rows`` with each usable row's last assistant turn replaced by the base's answer to it, and a summary (cache
    file, rows replaced, rows that kept the data's answer because the base gave no text). ``answer(prompts,
    generation)``: the base's answer texts (the caller's sampler: evaluation comes after the data layer);
    ``generation``: eval.generation's settings, max_new_tokens unset meaning data.max_response_canvases canvases.
    ``writer``: this process generates and writes the cache when it is missing (the others of a launch read it)."""
    rows = [r if isinstance(r, Row) else Row(r, f"data.train row {i}") for i, r in enumerate(rows)]
    renderer = Renderer(tokenizer, settings)
    prompts = [_prompt_of(r, renderer, settings) for r in rows]
    asked = [p for p in prompts if p is not None]
    if generation.max_new_tokens is None:
        generation = replace(generation, max_new_tokens=canvas_length * settings.max_response_canvases)
    path = os.path.join(os.path.expanduser(cache_dir), "answers",
                        cache_key(model_id, tokenizer, asked, generation) + ".json")
    cached = os.path.exists(path)
    if not cached:
        if not writer:
            raise UserError(f"data.answers=base: {path} is missing on this process; the first process writes it")
        print(f"data.answers=base: the base answers {len(asked)} training prompts once (cached in {path})")
        texts = list(answer(asked, generation))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        disk.write_json(path, {"model": model_id, "generation": asdict(generation), "answers": texts})
    try:
        with open(path) as f:
            answers = json.load(f)["answers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"data.answers=base: cannot read {path} ({e}): delete it to generate the answers again") \
            from None
    if not isinstance(answers, list) or len(answers) != len(asked):
        raise UserError(f"data.answers=base: {path} does not hold {len(asked)} answers, one per training prompt: "
                        "delete it to generate them again")
    out, replaced, empty, it = [], 0, 0, iter(answers)
    for row, prompt in zip(rows, prompts):
        if prompt is None:
            out.append(row)
            continue
        text = next(it).strip()
        if not text:  # nothing to learn from an empty turn: the data's answer stays, counted
            empty += 1
            out.append(row)
            continue
        messages = conversation(row.data, settings)
        messages[-1] = {"role": "assistant", "content": text}
        out.append(Row({"messages": messages}, f"{row.where} (the base's answer)"))
        replaced += 1
    summary = {"cache": path, "cached": cached, "replaced": replaced, "kept_data_answer_empty": empty,
               "model": model_id}
    return out, summary
