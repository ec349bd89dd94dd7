"""eval.samples.every: answers to fixed held-out prompts while training (eval/samples.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from eval.samples import FILE, Samples, trim
from eval.sets import heldout_set
from finetune.config import GenerationSettings
from finetune.data import DataSettings, build_examples, eval_prompts
from finetune.model import LoraSettings, attach_lora
from finetune.objective import ObjectiveConfig
from finetune.tiny import task_rows
from finetune.train import TrainSettings, fit

from conftest import ROOT, make_model

CANVAS = 8
GEN = GenerationSettings(max_denoising_steps=4, max_new_tokens=CANVAS, batch_size=4)


def train(tokenizer, run_dir, callbacks=()):
    model = attach_lora(make_model(tokenizer, seed=0, init=0.02), LoraSettings(r=4, alpha=8))
    examples, _ = build_examples(task_rows("shift", 32, 0), tokenizer, DataSettings(), CANVAS, "samples")
    settings = TrainSettings(max_steps=5, batch_size=4, grad_accum=1, lr=1e-2, warmup_steps=0, logging_steps=1,
                             seed=0, report_to="none", disable_tqdm=True)
    trainer = fit(model, examples, settings, ObjectiveConfig(), CANVAS, tokenizer.pad_token_id, str(run_dir),
                  callbacks=list(callbacks))
    return trainer, model


def samples(tokenizer, run_dir, every=2, resumed_step=0):
    rows = task_rows("shift", 3, 1)
    pairs = eval_prompts(rows, tokenizer, DataSettings())
    examples, _ = build_examples(rows, tokenizer, DataSettings(), CANVAS, "held-out")
    heldout = heldout_set(pairs, examples, {"max_examples": 3, "scorers": ["exact_match"]})
    return Samples(tokenizer, heldout, GEN, every, str(run_dir), CANVAS, 2, resumed_step=resumed_step,
                   tensorboard=False)


@pytest.fixture(scope="module")
def with_and_without(tokenizer, tmp_path_factory):
    plain = train(tokenizer, tmp_path_factory.mktemp("plain"))
    run_dir = tmp_path_factory.mktemp("sampled")
    sampled = train(tokenizer, run_dir / "checkpoints", [samples(tokenizer, run_dir)])
    return plain, sampled, run_dir


def test_snapshots_every_n_steps_and_at_the_last_each_answering_every_prompt(with_and_without):
    _, _, run_dir = with_and_without
    records = [json.loads(line) for line in (run_dir / FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    for record in records:
        assert len(record["samples"]) == 3
        assert all(set(s) >= {"input", "reference", "output", "tokens_per_forward"} for s in record["samples"])
        assert all(s["reference"] and s["input"] for s in record["samples"])


def test_sampling_leaves_training_bit_for_bit_as_without(with_and_without):
    (plain, plain_model), (sampled, sampled_model), _ = with_and_without
    assert sampled.step_losses == plain.step_losses
    assert sampled_model.training == plain_model.training
    for (name, a), (_, b) in zip(plain_model.named_parameters(), sampled_model.named_parameters()):
        if "lora_" in name:
            assert torch.equal(a, b), name


def test_a_resumed_run_drops_the_snapshots_after_its_checkpoint(tmp_path):
    path = tmp_path / FILE
    path.write_text("".join(json.dumps({"step": s, "samples": []}) + "\n" for s in (2, 4, 6)))
    assert trim(str(path), 4) == 1
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    assert trim(str(tmp_path / "none.jsonl"), 4) == 0  # a first start has nothing to trim


@pytest.mark.slow
def test_a_run_with_eval_samples_every_writes_its_snapshots_and_tensorboard_text(default_run):
    """The command a user runs (scaled down from the README's every=50 over the tiny recipe's 200 steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, env, _ = default_run
    run = tmp / "samples-run"
    result = subprocess.run([sys.executable, "-m", "finetune", f"output_dir={run}", "train.max_steps=8",
                             "eval.samples.every=2", "eval.enabled=false", "export.format=none"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (run / FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(len(r["samples"]) == 4 for r in records)  # eval.samples.prompts
    assert result.stdout.count("samples at step ") == 4
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    text = [t for t in events.Tags()["tensors"] if t.startswith("samples")]
    assert text and sorted(e.step for e in events.Tensors(text[0])) == [2, 4, 6, 8]


def test_bad_settings_are_refused_naming_the_key():
    from finetune.config import SampleSettings
    from finetune.errors import UserError

    for bad, key in ((dict(every=0), "eval.samples.every"), (dict(prompts=0), "eval.samples.prompts"),
                     (dict(shown=-1), "eval.samples.shown")):
        with pytest.raises(UserError, match=key):
            SampleSettings(**bad)
