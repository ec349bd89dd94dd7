"""Rows -> rendered, tokenised Examples: the chat template decides the text, the length policy what is kept.

Supervised tokens come from a variant of the model's template that marks assistant spans with
``{% generation %}`` (TRL ships one for DiffusionGemma), checked to render the same text, so training sees exactly
what generation will be given. Reading rows is `finetune.data.sources`; this module only consumes its types.
"""

from __future__ import annotations

import logging
import os

from finetune.canvas import Example, make_target
from finetune.config import DataSettings
from finetune.data.sources import BadRow, Row, Stats, reject
from finetune.errors import UserError

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool")


# --- shapes ------------------------------------------------------------------------------------------------------
def _as_messages(value, key: str) -> list:
    if isinstance(value, str):
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if isinstance(value, list):
        return value
    raise BadRow(f"column '{key}' must be a string or a list of messages, got {type(value).__name__}")


def conversation(row: dict, settings: DataSettings) -> list[dict] | None:
    """The row as chat messages, validated; None for a plain-text row."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise BadRow("column 'messages' must be a list of {role, content} objects, got "
                         f"{type(messages).__name__}")
    elif "prompt" in row and "completion" in row:
        messages = _as_messages(row["prompt"], "prompt") + _as_messages(row["completion"], "completion")
    elif "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise BadRow("column 'text' is empty or not a string")
        return None
    else:
        raise BadRow(f"found columns {sorted(row)}; expected 'messages', 'prompt' + 'completion', or 'text' "
                     "(map other names with data.columns)")
    if not messages:
        raise BadRow("the conversation has no messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise BadRow(f"message {i} must be an object with 'role' and 'content'")
        role = m["role"]
        if role not in ROLES:
            raise BadRow(f"message {i} has role {role!r}, which the chat template does not know; use one of "
                         f"{', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRow(f"message {i} ({role}): content parts must be {{type: text, text: ...}} (text only)")
        elif not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise BadRow(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        text = content if isinstance(content, str) else "".join(p["text"] for p in content or [])
        if role in ("system", "developer") and i != 0:
            raise BadRow(f"message {i}: a {role} message must come first")
        if role == "user" and not text.strip():
            raise BadRow(f"message {i}: empty user content")
        if role == "assistant" and not text.strip() and not m.get("tool_calls") and not (
                settings.thinking and (m.get("reasoning") or m.get("reasoning_content"))):
            raise BadRow(f"message {i}: empty assistant content; there is nothing to learn from this turn")
        checked.append(dict(m))
    if not any(m["role"] == "assistant" for m in checked):
        raise BadRow("the conversation has no assistant turn to supervise")
    if checked[-1]["role"] != "assistant":
        raise BadRow(f"the conversation ends with a {checked[-1]['role']} turn; it must end with the assistant turn "
                     "to supervise")
    if settings.system_prompt and checked[0]["role"] not in ("system", "developer"):
        checked.insert(0, {"role": "system", "content": settings.system_prompt})
    return checked


# --- rendering ---------------------------------------------------------------------------------------------------
class Renderer:
    """Renders conversations with the model's chat template and finds the assistant spans."""

    def __init__(self, tokenizer, settings: DataSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self.kwargs = {"enable_thinking": bool(settings.thinking)}
        self.template = tokenizer.chat_template
        if settings.training_template != "auto":
            path = os.path.expanduser(settings.training_template)
            if not os.path.isfile(path):
                raise UserError(f"data.training_template={settings.training_template!r} does not exist")
            self.training = open(path, encoding="utf-8").read()
        elif self.template is None:
            raise UserError("the tokenizer has no chat template; set data.training_template to a .jinja file")
        else:
            from trl.chat_template_utils import get_training_chat_template

            try:
                patched = get_training_chat_template(tokenizer)
            except Exception:
                raise UserError(
                    "the chat template has no {% generation %} markers and TRL knows no training variant of it: "
                    "set data.training_template to a copy of the template with those markers") from None
            self.training = patched or self.template
        self.checked = 0

    def prompt_text(self, messages: list[dict]) -> str:
        """What generation is given: the conversation up to the last assistant turn, then the model's turn opener."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **self.kwargs)

    def spans(self, messages: list[dict], where: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of the whole conversation and the (start, end) of every assistant span."""
        tok = self.tokenizer
        out = tok.apply_chat_template(messages, chat_template=self.training, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, **self.kwargs)
        if self.training is not self.template:
            text_model = tok.apply_chat_template(messages, tokenize=False, **self.kwargs)
            text_training = tok.apply_chat_template(messages, chat_template=self.training, tokenize=False,
                                                    **self.kwargs)
            if text_model != text_training:
                raise UserError(f"{where}: the training chat template renders this row differently from the model's "
                                "own template; use a training template that matches (data.training_template)")
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        spans, start = [], None
        for i, m in enumerate(mask + [0]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                spans.append((start, i))
                start = None
        if not spans:
            raise BadRow("the chat template marked no assistant tokens in this row")
        return ids, spans


def _strip_thinking(messages: list[dict]) -> bool:
    stripped = False
    for m in messages:
        for key in ("reasoning", "reasoning_content"):
            if m.pop(key, None):
                stripped = True
    return stripped


def split_text(tokenizer, text: str, fraction: float) -> tuple[list[int], list[int]]:
    """A plain-text row's tokens (no BOS) as (prompt, supervised tail): the one rule training and evaluation share.
    The prompt is ``fraction`` of the text's tokens, with at least one token on each side."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise BadRow("column 'text' is too short to split into a prompt and a continuation")
    cut = min(len(ids) - 1, max(1, round(len(ids) * fraction)))
    return ids[:cut], ids[cut:]


def build_example(row: Row, index: int, renderer: Renderer, settings: DataSettings, canvas_length: int,
                  stats: Stats) -> Example | None:
    """One row -> an Example with its targets under the length policy, or None when nothing is left of it."""
    tok = renderer.tokenizer
    eos = tok.eos_token_id
    messages = conversation(row.data, settings)
    if messages is None:  # plain text: the head is the prompt, the tail the response
        head, tail = split_text(tok, row.data["text"], settings.text_prompt_fraction)
        ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + head + tail
        spans, final = [(len(ids) - len(tail), len(ids))], [True]
    else:
        if not settings.thinking and _strip_thinking(messages):
            stats.thinking_stripped += 1
        ids, spans = renderer.spans(messages, row.where)
        if settings.supervise == "last":
            spans = spans[-1:]
        final = [i == len(spans) - 1 and spans[-1][1] == len(ids) for i in range(len(spans))]

    max_tokens = settings.max_response_canvases * canvas_length
    kept = []
    for (start, end), is_final in zip(spans, final):
        response = ids[start:end]
        needs = -(-(len(response) + 1) // canvas_length)
        add_eos = True
        if needs > settings.max_response_canvases:
            if settings.overlong == "drop":
                stats.drop_target("response longer than data.max_response_canvases")
                continue
            response, add_eos, is_final = response[:max_tokens], False, False
            stats.truncated += 1
        kept.append((start, response, add_eos, is_final))
    if kept and kept[-1][0] > settings.max_prompt_tokens:
        if settings.overlong == "drop":
            over = [k for k in kept if k[0] > settings.max_prompt_tokens]
            for _ in over:
                stats.drop_target("prompt longer than data.max_prompt_tokens")
            kept = [k for k in kept if k[0] <= settings.max_prompt_tokens]
            shift = 0
        else:  # cut the oldest context, keep BOS; turns whose prompt starts inside the cut are dropped
            shift = kept[-1][0] - settings.max_prompt_tokens
            for k in kept:
                if k[0] <= shift:
                    stats.drop_target("turn's context truncated away (data.overlong=truncate)")
            kept = [(s - shift, r, a, f) for s, r, a, f in kept if s > shift]
            ids = ids[:1] + ids[1 + shift:]
            stats.truncated += 1
    if not kept:
        return None
    last_start, last_resp, _, last_final = kept[-1]
    sequence = ids[: last_start + len(last_resp)] + ([eos] if last_final else [])
    targets = [make_target(s, r, canvas_length, eos, add_eos=a, final=f) for s, r, a, f in kept]
    example = Example(sequence, targets, index, meta={"where": row.where})
    stats.prompt_lengths.append(targets[-1].start)
    stats.response_lengths.extend(t.response_len for t in targets)
    stats.canvases.append(example.num_canvases)
    stats.targets += len(targets)
    return example


def build_examples(rows, tokenizer, settings: DataSettings, canvas_length: int, name: str,
                   stats: Stats | None = None):
    """Tokenise rows into Examples. Rows may be plain dicts (generated data) or `Row`s."""
    stats = stats or Stats(name)
    stats.name = name
    renderer = Renderer(tokenizer, settings)
    examples = []
    for i, row in enumerate(rows):
        if not isinstance(row, Row):
            row = Row(row, f"{name} row {i}")
        stats.read += 1
        try:
            example = build_example(row, i, renderer, settings, canvas_length, stats)
        except BadRow as e:
            reject(stats, settings, row.where, f"{e}; fix the row or set data.on_bad_row=skip")
            continue
        if example is None:
            stats.drop("no supervised turn left after the length limits")
            continue
        examples.append(example)
        stats.kept += 1
    first = "; ".join(f"{w}: {m}" for w, m in stats.bad_rows[:2])
    if not examples:
        raise UserError(f"{name}: no usable example ({stats.read} rows read, dropped {stats.dropped}, "
                        f"turns dropped {stats.targets_dropped}, bad {stats.bad_count}"
                        + (f", first: {first}" if first else "") + "); check the data and limits")
    if stats.bad_count:
        log.warning(f"{name}: skipped {stats.bad_count} bad rows (first: {first})")
    return examples, stats


def eval_prompts(rows, tokenizer, settings: DataSettings) -> list[tuple[str, str, str]]:
    """(prompt text for generation, reference answer, question) for each usable row, last assistant turn."""
    renderer = Renderer(tokenizer, settings)
    out = []
    for row in rows:
        data = row.data if isinstance(row, Row) else row
        try:
            messages = conversation(data, settings)
            if messages is None:
                head, tail = split_text(tokenizer, data["text"], settings.text_prompt_fraction)
        except BadRow:
            continue
        if messages is None:
            bos = tokenizer.bos_token or ""
            out.append((bos + tokenizer.decode(head), tokenizer.decode(tail), tokenizer.decode(head)))
            continue
        if not settings.thinking:
            _strip_thinking(messages)
        answer = messages[-1]["content"]
        answer = answer if isinstance(answer, str) else "".join(p["text"] for p in answer)
        question = [m for m in messages if m["role"] == "user"]
        question = question[-1]["content"] if question else ""
        question = question if isinstance(question, str) else "".join(p["text"] for p in question)
        out.append((renderer.prompt_text(messages[:-1]), answer, question))
    return out
