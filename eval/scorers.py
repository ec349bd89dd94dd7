"""Scorers: (prediction, reference) -> a score in [0, 1]. Built in: exact match and a numeric-answer match; any
other function is named by dotted path, ``my_package.my_module:my_scorer``."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from finetune.errors import UserError

Scorer = Callable[[str, str], "float | bool"]


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after collapsing runs of whitespace and trimming the ends."""
    return normalise_whitespace(prediction) == normalise_whitespace(reference)


# A number: optional sign (not after a letter, digit or closing bracket, so "5-3" yields 5 and 3), optional "$",
# then either comma-grouped thousands ("1,234,567") or plain digits, with an optional decimal part. A trailing
# sentence period is not a decimal point, because one needs a digit after it.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])(?P<sign>[-\u2212]))?\s?\$?\s?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\d,]*\d)"
)
ANSWER_MARKER = "####"  # GSM8K writes the final answer as "#### 72"


def _canonical(sign: str | None, digits: str) -> str | None:
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:
        return None
    if sign:
        value = -value
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    found = []
    for m in _NUMBER.finditer(text):
        value = _canonical(m.group("sign"), m.group("digits"))
        if value is not None:
            found.append(value)
    return found


def extract_number(text: str) -> str | None:
    """The answer number of a text as a canonical string ("1,234.50" -> "1234.5"), or None.

    The first number after the last "####" (GSM8K style) wins; without one, the last number in the text.
    Handles signs, "$", thousands commas, decimals and a trailing sentence period.
    """
    if ANSWER_MARKER in text:
        after = _numbers(text.rsplit(ANSWER_MARKER, 1)[1])
        if after:
            return after[0]
    found = _numbers(text)
    return found[-1] if found else None


def numeric_match(prediction: str, reference: str) -> bool:
    """Same answer number (as values: "72.0" == "72"); a reference with no number never matches."""
    want = extract_number(reference)
    return want is not None and extract_number(prediction) == want


SCORERS: dict[str, Scorer] = {"exact_match": exact_match, "numeric": numeric_match}


def resolve_scorer(name: str) -> Scorer:
    """A built-in scorer by name, or a function by dotted path ``module:function``."""
    if name in SCORERS:
        return SCORERS[name]
    if ":" not in name:
        raise UserError(
            f"unknown scorer {name!r}: use one of {', '.join(SCORERS)} or a dotted path module:function"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"scorer {name!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"scorer {name!r}: module {module_name!r} has no function {attr!r}")
    return fn


def score_all(names: list[str], predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-example scores for each scorer name, as floats in [0, 1]."""
    out = {}
    for name in names:
        fn = resolve_scorer(name)
        out[name] = [float(fn(p, r)) for p, r in zip(predictions, references)]
    return out
