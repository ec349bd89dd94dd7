"""Malformed inputs: each gives one clear line naming the file and row (or key) and what to do, exit code 2,
no traceback, and nothing written. Run through `python -m finetune.preflight`, which reads data exactly as a
training run does but needs no model weights."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error


def jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = {"prompt": "hi", "completion": "there"}
U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}

# (name, file name, content or None for "do not create", extra overrides, expected message fragment)
CASES = [
    ("malformed JSON line", "d.jsonl", jsonl(GOOD, '{"prompt": "x", "completion": '),
     [], "d.jsonl line 2: not valid JSON"),
    ("line that is not an object", "d.jsonl", jsonl(GOOD, "[1, 2]"), [], "d.jsonl line 2: expected a JSON object"),
    ("missing column", "d.jsonl", jsonl({"question": "q", "answer": "a"}), [],
     "d.jsonl line 1: found columns ['answer', 'question']; expected 'messages', 'prompt' + 'completion', or 'text'"),
    ("empty assistant content", "d.jsonl", jsonl({"messages": [U, {"role": "assistant", "content": "  "}]}), [],
     "d.jsonl line 1: message 1: empty assistant content"),
    ("unknown role", "d.jsonl", jsonl({"messages": [{"role": "human", "content": "hi"}, A]}), [],
     "d.jsonl line 1: message 0 has role 'human', which the chat template does not know"),
    ("non-string content", "d.jsonl", jsonl({"messages": [U, {"role": "assistant", "content": 42}]}), [],
     "d.jsonl line 1: message 1 (assistant): content must be a string, got int"),
    ("no assistant turn", "d.jsonl", jsonl({"messages": [U]}), [],
     "d.jsonl line 1: the conversation has no assistant turn to supervise"),
    ("conversation ending with a user turn", "d.jsonl", jsonl({"messages": [U, A, U]}), [],
     "d.jsonl line 1: the conversation ends with a user turn"),
    ("empty user content", "d.jsonl", jsonl({"messages": [{"role": "user", "content": ""}, A]}), [],
     "d.jsonl line 1: message 0: empty user content"),
    ("system message not first", "d.jsonl", jsonl({"messages": [U, {"role": "system", "content": "x"}, A]}), [],
     "d.jsonl line 1: message 1: a system message must come first"),
    ("messages not a list", "d.jsonl", jsonl({"messages": "hi"}), [],
     "d.jsonl line 1: column 'messages' must be a list"),
    ("message without a role", "d.jsonl", jsonl({"messages": [{"content": "hi"}, A]}), [],
     "d.jsonl line 1: message 0 must be an object with 'role' and 'content'"),
    ("completion of the wrong type", "d.jsonl", jsonl({"prompt": "hi", "completion": 7}), [],
     "d.jsonl line 1: column 'completion' must be a string or a list of messages, got int"),
    ("empty text", "d.jsonl", jsonl({"text": ""}), [], "d.jsonl line 1: column 'text' is empty or not a string"),
    ("empty file", "d.jsonl", "", [], "data file {tmp}/d.jsonl is empty: it holds no rows"),
    ("file of blank lines", "d.jsonl", "\n\n", [], "data file {tmp}/d.jsonl holds no rows"),
    ("missing file", "nope.jsonl", None, [], "data file {tmp}/nope.jsonl does not exist"),
    ("directory with no data files", "dir", "DIR", [], "directory {tmp}/dir holds no .jsonl, .json, .parquet or .csv"),
    ("unsupported extension", "d.txt", "hello", [], "data file {tmp}/d.txt: unsupported extension .txt"),
    ("malformed JSON file", "d.json", '[{"prompt": "a"', [], "d.json line 1: not valid JSON"),
    ("JSON that is not a list of objects", "d.json", '"just a string"', [], "d.json: expected a JSON list of objects"),
    ("column mapping naming a missing column", "d.jsonl", jsonl(GOOD), ["data.columns={question: prompt}"],
     "data.columns renames ['question'] but {tmp}/d.jsonl has columns ['completion', 'prompt']"),
    ("too few rows to hold out an eval split", "d.jsonl", jsonl(GOOD), ["data.eval=null"],
     "data.train ({tmp}/d.jsonl) has 1 row(s): too few to hold out an eval split; give data.eval"),
    ("too few rows to hold out, data.eval left to auto", "d.jsonl", jsonl(GOOD), ["data.eval=auto"],
     "data.train ({tmp}/d.jsonl) has 1 row(s): too few to hold out an eval split; give data.eval"),
    ("a held-out fraction that is not one", "d.jsonl", jsonl(GOOD), ["data.eval_fraction=1.5"],
     "data.eval_fraction=1.5: must be between 0 and 1"),
    ("unknown bad-row policy", "d.jsonl", jsonl(GOOD), ["data.on_bad_row=ignore"],
     "data.on_bad_row='ignore': use one of error, skip"),
    ("every row bad under skip", "d.jsonl", jsonl({"messages": [U]}, {"messages": [U]}), ["data.on_bad_row=skip"],
     "no usable example (2 rows read"),
]


@pytest.mark.parametrize("name,filename,content,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_clear_line_and_exit_2(tmp_path, name, filename, content, extra, expected):
    path = tmp_path / filename
    if content == "DIR":
        path.mkdir()
        (path / "readme.txt").write_text("not data")
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "finetune.preflight", f"data.train={path}", f"data.eval={path}", f"output_dir={out}",
         *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, expected.format(tmp=tmp_path))
    assert not out.exists()


def test_the_table_covers_at_least_fifteen_kinds():
    assert len(CASES) >= 15
