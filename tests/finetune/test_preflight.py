"""`python -m finetune.preflight`: the report a user reads before training, checked line by line."""

import json
import os
import subprocess
import sys

from conftest import ROOT  # the repository root


def preflight(*args):
    return subprocess.run([sys.executable, "-m", "finetune.preflight", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})


TINY_EXPECTED = """\
preflight: data.train=tiny:shift data.eval=auto canvas_length=8 supervise=last thinking=False overlong=drop

[data.train (tiny:shift)]
rows read 3000   kept 3000   dropped 0   bad 0
targets (supervised turns) 3000   truncated 0
prompt tokens (before the last supervised turn)
      28-28     ######################################## 3000
response tokens per turn
       7-7      ######################################## 3000
canvases per example (canvas = 8 tokens)
       1-1      ######################################## 3000
"""

TINY_EXAMPLE = """\
--- example from tiny:shift row 0: 1 target(s), sequence 36 tokens, canvases [1]
<bos><|turn>user
shift: sjggw<turn|>
<|turn>model
⟦tkhhx<turn|>
⟧⟦<eos> x 1⟧
"""


def test_tiny_recipe_preflight_report(tmp_path):
    result = preflight(f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(TINY_EXPECTED), result.stdout[:1500]
    assert TINY_EXAMPLE in result.stdout
    assert "[data.eval (tiny:shift)]\nrows read 64   kept 64" in result.stdout
    text = (tmp_path / "preflight.txt").read_text()
    assert text.startswith(TINY_EXPECTED)
    data = json.loads((tmp_path / "preflight.json").read_text())
    assert data["train"]["kept"] == 3000 and data["canvas_length"] == 8
    assert set(data["histograms"]["canvases"]) == {1}


def test_your_file_on_the_tiny_recipe_is_scored_on_its_own_held_out_rows(tmp_path):
    """`data.train=FILE` alone: data.eval=auto holds out data.eval_fraction of your rows (at most data.eval_rows) and
    says so, instead of scoring your adapter on the recipe's built-in task."""
    result = preflight("recipe=tiny", "data.train=tests/data/reverse.jsonl", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    held = ("  held out of data.train: 64 of its 1500 rows (data.eval_fraction=0.05, at most data.eval_rows=64, seed 0); "
            "training uses the other 1436")
    assert "[data.eval (held out of data.train)]\nrows read 64   kept 64   dropped 0   bad 0\n" + held in result.stdout
    assert "[data.train (tests/data/reverse.jsonl)]\nrows read 1436" in result.stdout
    assert json.loads((tmp_path / "preflight.json").read_text())["eval"]["held_out"] == held.strip()


def test_preflight_reports_drops_bad_rows_and_multi_turn_targets(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "more"}, {"role": "assistant", "content": "sure thing"}]},
        {"messages": [{"role": "user", "content": "hi"}]},  # bad: no assistant turn
        {"prompt": "long", "completion": "x" * 60},  # dropped: 8 canvases > 4
        {"prompt": "ok", "completion": "fine"},
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = preflight(f"data.train={path}", f"data.eval={path}", "data.supervise=all", "data.on_bad_row=skip",
                       f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "rows read 4   kept 2   dropped 1   bad 1" in out
    assert "  dropped 1: no supervised turn left after the length limits" in out
    assert "turns dropped 1: response longer than data.max_response_canvases" in out
    assert f"bad row {path} line 2: the conversation has no assistant turn to supervise" in out
    assert "targets (supervised turns) 3" in out
    assert "2 target(s)" in out and "⟦hello<turn|>\n⟧⟦<eos> x 1⟧" in out
