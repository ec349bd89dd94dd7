"""What gets evaluated: the held-out rows of the recipe's data, and an optional named benchmark (GSM8K for the
chat recipes, the tiny base's own `copy` task for the tiny one) that shows whether the adapter broke anything
outside its task."""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.data import DataSettings, Row, Stats, build_examples, eval_prompts, read_rows
from finetune.errors import UserError


@dataclass
class EvalSet:
    name: str
    prompts: list[str]  # rendered with the chat template, ready for generate()
    references: list[str]
    inputs: list[str]  # the user's question, for the report
    examples: list = field(default_factory=list)  # tokenised `Example`s for the held-out loss
    scorers: list[str] = field(default_factory=lambda: ["exact_match"])
    source: str | None = None


def heldout_set(pairs, examples, eval_cfg: dict, source: str | None = None) -> EvalSet:
    """The held-out rows as (prompt, reference, question) pairs from `finetune.data.eval_prompts`."""
    pairs = pairs[: eval_cfg["max_examples"]]
    return EvalSet("held-out", [p for p, _, _ in pairs], [r for _, r, _ in pairs], [q for _, _, q in pairs],
                   list(examples), list(eval_cfg["scorers"]), source)


def _with_instruction(row: dict, instruction: str | None) -> dict:
    if not instruction:
        return row
    row = dict(row)
    if "messages" in row:
        messages = [dict(m) for m in row["messages"]]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] += instruction
        row["messages"] = messages
    else:
        row["prompt"] = row["prompt"] + instruction
    return row


def benchmark_set(bench: dict, tokenizer, canvas_length: int, data: DataSettings | None = None) -> EvalSet:
    """Read, render and tokenise a benchmark described by an `eval.benchmark` config block."""
    data = data or DataSettings()
    settings = DataSettings(
        train=bench["source"], eval=bench["source"], subset=bench["subset"], seed=data.seed,
        columns=dict(bench["columns"] or {}), system_prompt=data.system_prompt,
        max_prompt_tokens=data.max_prompt_tokens, max_response_canvases=data.max_response_canvases,
    )
    # seed offset: a tiny task benchmark draws rows unlike the training rows of the same task
    rows = read_rows(bench["source"], bench["split"], settings, bench["max_examples"], Stats(),
                     seed_offset=20_000)
    if not rows:
        raise UserError(f"eval.benchmark {bench['name']!r}: {bench['source']!r} gave no rows")
    name = bench["name"] or bench["source"]
    originals = eval_prompts(rows, tokenizer, settings)  # references and questions without the instruction
    rows = [Row(_with_instruction(r.data, bench["instruction"]), r.where) for r in rows]
    pairs = eval_prompts(rows, tokenizer, settings)
    if len(pairs) != len(rows):
        raise UserError(f"eval.benchmark {name!r}: {len(rows) - len(pairs)} rows cannot be rendered")
    examples, _ = build_examples(rows, tokenizer, settings, canvas_length, f"eval.benchmark ({name})")
    return EvalSet(name, [p for p, _, _ in pairs], [r for _, r, _ in originals], [q for _, _, q in originals],
                   examples, list(bench["scorers"]), bench["source"])
