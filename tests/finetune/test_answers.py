"""data.answers=base: the run trains on the base's own answers, generated once before LoRA and cached."""

import json

import pytest
from conftest import make_model

from finetune.errors import UserError
from finetune.tiny import generation_config


@pytest.fixture
def local_base(tmp_path, tokenizer):
    base = tmp_path / "base"
    model = make_model(tokenizer)
    model.generation_config = generation_config(tokenizer, model.config.canvas_length)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def args_for(base, run_dir, cache, *more):
    return [f"model.name_or_path={base}", "data.answers=base", "data.train_rows=12", "data.eval_rows=4",
            "train.batch_size=4", "train.max_steps=1", "eval.enabled=false", "export.format=none",
            "train.report_to=none", "eval.generation.batch_size=12", "eval.generation.max_denoising_steps=4",
            f"cache_dir={cache}", f"output_dir={run_dir}", *more]


def test_the_run_trains_on_the_bases_answers_generated_once_and_cached(local_base, tmp_path, tokenizer, capsys,
                                                                      monkeypatch):
    import eval.generation
    from eval.generation import GenerationSettings, generate
    from finetune.config import DataSettings, compose
    from finetune.data import eval_prompts
    from finetune.model import load
    from finetune.run import run
    from finetune.tiny import task_rows

    metrics = run(compose(args_for(local_base, tmp_path / "run", tmp_path / "cache")))
    answered = metrics["data"]["answers"]
    assert not answered["cached"] and answered["replaced"] + answered["kept_data_answer_empty"] == 12
    assert answered["replaced"] >= 6  # a random base still says something to most prompts
    assert "training answers are the base's own" in capsys.readouterr().out
    cached = json.loads(open(answered["cache"]).read())["answers"]

    # the cached answers are what the base alone says to the training prompts with eval.generation's sampler, not the
    # data's (the tiny task's right answers)
    rows = task_rows("shift", 12, 0)
    pairs = eval_prompts(rows, tokenizer, DataSettings())
    # loaded as the run loads it (finetune.model.load: the CPU's experts implementation and dtype), so the two
    # generate() calls run the same arithmetic and agree token for token on any CPU
    base, _, _ = load(str(local_base), "cpu")
    base.eval()
    settings = GenerationSettings(batch_size=12, max_denoising_steps=4, max_new_tokens=8 * 4)
    assert [g.text for g in generate(base, tokenizer, [p for p, _, _ in pairs], settings)] == cached
    assert sum(a.strip() == r.strip() for a, (_, r, _) in zip(cached, pairs)) < 3

    # another run on the same rows and base (another objective, a resume) reads the cache: no generation
    def refuse(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(eval.generation, "generate", refuse)
    again = run(compose(args_for(local_base, tmp_path / "run2", tmp_path / "cache", "objective=fast")))
    assert again["data"]["answers"]["cached"] and again["data"]["answers"]["cache"] == answered["cache"]

    # a cache file that is not what it should be is one error naming it, before anything is written
    with open(answered["cache"], "w") as f:
        f.write('{"answers": ["one"]}')
    with pytest.raises(UserError, match=f"{answered['cache']} does not hold 12 answers.*delete it"):
        run(compose(args_for(local_base, tmp_path / "run3", tmp_path / "cache")))
    assert not (tmp_path / "run3").exists()


def test_plain_text_rows_are_refused_with_their_place(local_base, tmp_path):
    from finetune.config import compose
    from finetune.run import run

    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {i} says something long enough"}) + "\n" for i in range(8)))
    args = args_for(local_base, tmp_path / "run", tmp_path / "cache", f"data.train={data}", "data.eval=null")
    with pytest.raises(UserError, match=r"data.answers=base: .*notes.jsonl line \d+ is a plain-text row.*"
                                        "data.answers=data"):
        run(compose(args))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_an_unknown_answers_value_is_one_error_naming_the_key():
    from finetune.config import DataSettings

    with pytest.raises(UserError, match="data.answers='model': use one of data, base"):
        DataSettings(answers="model")
