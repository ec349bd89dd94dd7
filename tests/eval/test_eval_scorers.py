"""Scorers: the numeric-answer extractor on tricky strings, exact match, and custom scorers by dotted path."""

import pytest

from eval.scorers import exact_match, extract_number, numeric_match, resolve_scorer, score_all
from finetune.errors import UserError


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),  # GSM8K reference
        ("#### 1,234", "1234"),  # thousands comma
        ("#### $1,234.50", "1234.5"),  # dollar sign, decimals, trailing zero
        ("####  -12", "-12"),  # negative after the marker
        ("#### 18\nThe answer above is final. 99", "18"),  # marker wins over the last number
        ("So she has 5 apples, then 6 apples.", "6"),  # no marker: last number
        ("The answer is 42.", "42"),  # trailing sentence period is not a decimal point
        ("It costs $3.", "3"),
        ("It drops to -7 degrees", "-7"),
        ("The change is \u22123", "-3"),  # unicode minus
        ("5-3", "3"),  # a minus after a digit is subtraction, not a sign
        ("x-5", "5"),  # nor after a letter
        ("about 0.5 of it", "0.5"),
        ("72.0", "72"),  # value, not spelling
        ("100", "100"),  # no "1E+2"
        ("1,000,000 people", "1000000"),
        ("12,34", "34"),  # not a thousands grouping: two numbers
        ("-0", "0"),
        ("#### no number here, but 7 before", "7"),  # marker without a number: fall back to the last number
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_number_on_tricky_strings(text, expected):
    assert extract_number(text) == expected


def test_numeric_match_compares_values():
    assert numeric_match("Total: $1,234.00.", "work...\n#### 1234")
    assert numeric_match("#### 72", "#### 72.0")
    assert not numeric_match("#### 71", "#### 72")
    assert not numeric_match("anything", "no number in the reference")


def test_exact_match_normalises_whitespace_only():
    assert exact_match("  ifmmp \n", "ifmmp")
    assert exact_match("a  b\tc", "a b c")
    assert not exact_match("Ifmmp", "ifmmp")


def test_custom_scorer_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text("def starts(pred, ref):\n    return pred[:1] == ref[:1]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scores = score_all(["exact_match", "my_scorers:starts"], ["abc", "xyz"], ["abd", "xyz"])
    assert scores == {"exact_match": [0.0, 1.0], "my_scorers:starts": [1.0, 1.0]}


@pytest.mark.parametrize("name,message", [
    ("exactmatch", "unknown scorer 'exactmatch'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("eval.scorers:nope", "has no function 'nope'"),
])
def test_bad_scorer_names_are_user_errors(name, message):
    with pytest.raises(UserError, match=message):
        resolve_scorer(name)
