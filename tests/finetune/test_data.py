"""Data sources, shapes, chat templates, multi-turn supervision, thinking mode and length policies."""

import json

import pandas as pd
import pytest

from finetune.data import DataSettings, Stats, build_examples, load_splits, read_rows
from finetune.errors import UserError

C = 8
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "count"},
    {"role": "assistant", "content": "one two three"},
]


def settings(**kw):
    base = dict(train="x", eval=None, max_prompt_tokens=512, max_response_canvases=4)
    base.update(kw)
    return DataSettings(**base)


def decode_targets(tokenizer, example):
    return [tokenizer.decode(t.tokens[: t.response_len]) for t in example.targets]


def build(rows, tokenizer, **kw):
    return build_examples(rows, tokenizer, settings(**kw), C, "test")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"prompt": f"shift: {w}", "completion": w.upper()} for w in ("abc", "hello", "xyz")]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json_columns", "parquet", "csv"])
def test_each_local_file_format_reads_the_same_rows(tmp_path, tokenizer, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif fmt == "json_columns":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}))
    else:
        path = tmp_path / f"d.{fmt}"
        frame = pd.DataFrame(ROWS)
        frame.to_parquet(path) if fmt == "parquet" else frame.to_csv(path, index=False)
    rows = read_rows(str(path), "train", settings(), None, Stats())
    assert [r.data for r in rows] == ROWS
    assert str(path) in rows[1].where
    examples, stats = build(rows, tokenizer)
    assert stats.kept == 3 and decode_targets(tokenizer, examples[1]) == ["HELLO<turn|>\n"]


def test_a_directory_of_files_is_read_in_sorted_order(tmp_path, tokenizer):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:2])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    pd.DataFrame(ROWS[2:]).to_parquet(tmp_path / "sub" / "c.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    rows = read_rows(str(tmp_path), "train", settings(), None, Stats())
    assert [r.data["prompt"] for r in rows] == ["shift: abc", "shift: hello", "shift: xyz"]


def test_hub_dataset_is_loaded_through_datasets_with_subset_and_split(monkeypatch, tokenizer):
    import datasets

    calls = []

    def fake_load(name, subset=None, split=None, **kw):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = read_rows("org/chats", "train_sft", settings(subset="main"), 2, Stats())
    assert calls == [("org/chats", "main", "train_sft")]
    assert len(rows) == 2 and rows[0].where == "org/chats split train_sft row 0"


def test_held_out_fraction_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)])
    s = settings(train=path, eval=None, eval_fraction=0.25, eval_rows=None, seed=3)
    tr, _, _, ev, _, _ = load_splits(s, tokenizer, C)
    tr2, _, _, ev2, _, _ = load_splits(s, tokenizer, C)
    assert len(ev) == 10 and len(tr) == 30
    assert [r.data for r in ev] == [r.data for r in ev2]
    assert not {r.data["prompt"] for r in ev} & {r.data["prompt"] for r in tr}
    _, _, _, ev3, _, _ = load_splits(settings(train=path, eval=None, eval_fraction=0.25, eval_rows=None, seed=4),
                                     tokenizer, C)
    assert [r.data for r in ev3] != [r.data for r in ev]


def test_shapes_messages_prompt_completion_and_column_mapping(tmp_path, tokenizer):
    rows = [
        {"messages": CHAT},
        {"prompt": "hi", "completion": "there"},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "there"}]},
    ]
    examples, _ = build(rows, tokenizer)
    assert decode_targets(tokenizer, examples[0]) == ["one two three<turn|>\n"]
    assert decode_targets(tokenizer, examples[1]) == decode_targets(tokenizer, examples[2]) == ["there<turn|>\n"]
    assert examples[1].input_ids == examples[2].input_ids
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "4"}])
    rows = read_rows(path, "train", settings(columns={"question": "prompt", "answer": "completion"}), None, Stats())
    examples, _ = build(rows, tokenizer)
    assert decode_targets(tokenizer, examples[0]) == ["4<turn|>\n"]


def test_the_prompt_is_what_generation_is_given(tokenizer):
    """The context before the supervised turn is token for token the generation prompt."""
    examples, _ = build([{"messages": CHAT}], tokenizer)
    ex = examples[0]
    prompt = tokenizer.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    assert ex.input_ids[: ex.targets[0].start] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[-1] == tokenizer.eos_token_id  # the final turn is followed by EOS for the encoder loss


def test_plain_text_supervises_the_tail(tokenizer):
    examples, _ = build([{"text": "abcdefghij"}], tokenizer, text_prompt_fraction=0.5)
    ex = examples[0]
    assert tokenizer.decode(ex.input_ids[: ex.targets[0].start]) == "<bos>abcde"
    assert decode_targets(tokenizer, ex) == ["fghij"]


@pytest.mark.parametrize("text", ["ab", "abc", "abcdefg", "abcdefghi", "abcdefghijklm"])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_plain_text_is_split_the_same_for_training_and_evaluation(tokenizer, text, fraction):
    """The held-out prompt is what training puts before the supervised tail, and the reference is that tail."""
    from finetune.data import eval_prompts

    examples, _ = build([{"text": text}], tokenizer, text_prompt_fraction=fraction)
    ex = examples[0]
    [(prompt, answer, _)] = eval_prompts([{"text": text}], tokenizer, settings(text_prompt_fraction=fraction))
    assert (tokenizer.decode(ex.input_ids[: ex.targets[0].start]), decode_targets(tokenizer, ex)) == (prompt, [answer])


def test_supervise_all_makes_one_target_per_assistant_turn(tokenizer):
    last, _ = build([{"messages": CHAT}], tokenizer, supervise="last")
    every, _ = build([{"messages": CHAT}], tokenizer, supervise="all")
    assert decode_targets(tokenizer, every[0]) == ["hello<turn|>\n", "one two three<turn|>\n"]
    assert every[0].input_ids == last[0].input_ids  # one sequence, encoded once, serves both turns
    first = every[0].targets[0]
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert every[0].input_ids[: first.start] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert first.ar_len == first.response_len  # a middle turn is followed by the next user turn, not EOS
    assert every[0].targets[1].ar_len == every[0].targets[1].response_len + 1


THINKING = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "two plus two"}]


def test_thinking_mode_renders_the_flag_and_supervises_the_reasoning(tokenizer):
    examples, stats = build([{"messages": THINKING}], tokenizer, thinking=True)
    ex = examples[0]
    assert "<|think|>" in tokenizer.decode(ex.input_ids[: ex.targets[0].start])
    assert decode_targets(tokenizer, ex) == ["<|channel>thought\ntwo plus two\n<channel|>4<turn|>\n"]
    examples, stats = build([{"messages": THINKING}], tokenizer, thinking=False)
    assert decode_targets(tokenizer, examples[0]) == ["4<turn|>\n"]
    assert "<|think|>" not in tokenizer.decode(examples[0].input_ids)
    assert stats.thinking_stripped == 1


OLD_THEN_NEW = [{"role": "user", "content": "old " * 30}, {"role": "assistant", "content": "seen"},
                {"role": "user", "content": "newest question"}, {"role": "assistant", "content": "ok"}]


def generation_prompt_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_overlong_rows_are_dropped_or_truncated_and_counted(tokenizer):
    answer = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"  # distinct letters: which end was kept shows
    long_answer = {"prompt": "q", "completion": answer}  # 40 + 2 tokens + EOS: 6 canvases of 8
    long_prompt = {"messages": OLD_THEN_NEW}  # 171 prompt tokens, the oldest 120 of them one long user turn
    ok = {"prompt": "q", "completion": "fine"}
    examples, stats = build([long_answer, long_prompt, ok], tokenizer, max_response_canvases=2,
                            max_prompt_tokens=50)
    assert stats.kept == 1 and stats.read == 3
    assert stats.targets_dropped == {"response longer than data.max_response_canvases": 1,
                                     "prompt longer than data.max_prompt_tokens": 1}
    examples, stats = build([long_answer, long_prompt], tokenizer, max_response_canvases=2, max_prompt_tokens=50,
                            overlong="truncate")
    assert stats.kept == 2 and stats.truncated == 2
    cut = examples[0].targets[0]
    assert cut.num_canvases == 2 and cut.response_len == 16 and len(cut.tokens) == 16  # no EOS fill: cut, not ended
    assert tokenizer.decode(cut.tokens) == answer[:16]  # the answer's start, in whole canvases
    assert tokenizer.eos_token_id not in cut.tokens
    short = examples[1]
    full = generation_prompt_ids(tokenizer, OLD_THEN_NEW[:-1])
    kept = short.input_ids[: short.targets[0].start]
    assert len(full) > 50 and len(kept) == 50
    # The oldest context is what goes: BOS, then the newest 49 tokens, ending with the last user turn and the model's
    # turn opener; keeping the head (or dropping BOS) would give other tokens here.
    assert kept == full[:1] + full[-49:]
    assert kept[0] == tokenizer.bos_token_id
    assert tokenizer.decode(kept).endswith("newest question<turn|>\n<|turn>model\n")
    assert decode_targets(tokenizer, short) == ["ok<turn|>\n"]


def test_truncate_drops_a_turn_whose_context_was_cut_away(tokenizer):
    messages = OLD_THEN_NEW[:2] + [{"role": "user", "content": "recent " * 10 + "question"}, OLD_THEN_NEW[3]]
    examples, stats = build([{"messages": messages}], tokenizer, supervise="all", max_prompt_tokens=50,
                            overlong="truncate")
    assert decode_targets(tokenizer, examples[0]) == ["ok<turn|>\n"]  # "seen" started inside the cut
    assert stats.targets_dropped == {"turn's context truncated away (data.overlong=truncate)": 1}
    full = generation_prompt_ids(tokenizer, messages[:-1])
    assert examples[0].input_ids[: examples[0].targets[0].start] == full[:1] + full[-49:]


def test_skip_policy_counts_bad_rows_and_names_the_first(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{not json\n{"prompt": "c", "completion": ""}\n'
                    '{"prompt": "d", "completion": "e"}\n')
    s = settings(train=str(path), on_bad_row="skip")
    stats = Stats()
    rows = read_rows(str(path), "train", s, None, stats)
    examples, stats = build_examples(rows, tokenizer, s, C, "test", stats)
    assert len(examples) == 2 and stats.bad_count == 2
    assert [w for w, _ in stats.bad_rows] == [f"{path} line 2", f"{path} line 3"]
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        read_rows(str(path), "train", settings(train=str(path)), None, Stats())


def test_the_ablation_tasks_are_what_they_say(tokenizer):
    """tiny:reverse depends on the whole word, tiny:sort's answer spans two canvases (the boundary inside the third
    word), tiny:followup's second turn names no operation (the history does) and trains on both turns with
    supervise=all; shift's rows are unchanged by the new tasks (the tiny base and golden losses depend on them)."""
    from finetune.tiny import task_rows

    assert task_rows("shift", 2, 0) == [{"prompt": "shift: sjggw", "completion": "tkhhx"},
                                        {"prompt": "shift: nmhwv", "completion": "onixw"}]
    for row in task_rows("reverse", 20, 1):
        assert row["completion"] == row["prompt"].split(": ")[1][::-1]
    sort_rows = read_rows("tiny:sort", "train", settings(train="tiny:sort"), 20, Stats())
    examples, _ = build(sort_rows, tokenizer)
    for row, example in zip(sort_rows, examples):
        words = row.data["prompt"].split(": ")[1].split()
        assert row.data["completion"].split() == sorted(words) and len(row.data["completion"]) == 11
        assert example.targets[0].num_canvases == 2
    followup = task_rows("followup", 20, 2)
    ops = {row["messages"][0]["content"].split(":")[0] for row in followup}
    assert ops == {"shift", "reverse"} and all(row["messages"][2]["content"].startswith("again: ") for row in followup)
    examples, _ = build(followup, tokenizer, supervise="all")
    assert [len(e.targets) for e in examples] == [2] * 20
