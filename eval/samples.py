"""Answers while training: with eval.samples.every=N, the adapter answers the first eval.samples.prompts held-out
prompts every N optimizer steps and at the last, so a user sees the model change before the run ends.

Each snapshot is one line of <run>/samples.jsonl ({"step", "seconds", "samples": [{input, reference, output,
tokens_per_forward, steps_per_canvas}]}), one text entry in TensorBoard (the run's tensorboard/, tab "Text") and one
console line. Every snapshot uses the same sampler settings and starting noise (eval.generation, sized from the
references as the evaluation sizes it), so two snapshots differ only by what training changed.

Sampling leaves training as it found it: the random generators' states are put back and the model returns to train
mode, so a run with samples takes the same steps, bit for bit, as one without (tests/eval/test_samples.py). A
resumed run first drops the snapshots of steps after its checkpoint (they were made by steps it trains again).
"""

from __future__ import annotations

import json
import os
import time

import torch
from transformers import TrainerCallback

from eval.generation import generate, sized
from eval.sets import EvalSet
from finetune import disk, distributed
from finetune.config import GenerationSettings

FILE = "samples.jsonl"


def trim(path: str, last_step: int) -> int:
    """Keep the snapshots of steps up to ``last_step`` (a resumed run's checkpoint); returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines):
        disk.write_text(path, "".join(kept))
    return len(lines) - len(kept)


class Samples(TrainerCallback):
    """The callback ``finetune.train.fit`` runs with; ``heldout`` holds the prompts (already cut to the number asked)."""

    def __init__(self, tokenizer, heldout: EvalSet, gen: GenerationSettings, every: int, run_dir: str,
                 canvas_length: int, max_response_canvases: int, model_limit: int | None = None,
                 resumed_step: int = 0, tensorboard: bool = True):
        self.tokenizer, self.heldout, self.every = tokenizer, heldout, int(every)
        self.gen, _ = sized(gen, heldout.examples, canvas_length, max_response_canvases, model_limit)
        self.path = os.path.join(run_dir, FILE)
        self.log_dir = os.path.join(run_dir, "tensorboard") if tensorboard else None
        self.writer = None
        self.main = distributed.is_main()
        if self.main:
            trim(self.path, resumed_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self.main and (step % self.every == 0 or step == state.max_steps):
            self.snapshot(model, step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def snapshot(self, model, step: int) -> dict:
        started = time.perf_counter()
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        training = model.training
        model.eval()
        try:
            gens = generate(model, self.tokenizer, self.heldout.prompts, self.gen, desc=f"samples at step {step}")
        finally:
            model.train(training)
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
        rows = [{"input": question, "reference": reference, "output": g.text,
                 "tokens_per_forward": g.tokens_per_forward, "steps_per_canvas": g.steps_per_canvas}
                for question, reference, g in zip(self.heldout.inputs, self.heldout.references, gens)]
        record = {"step": step, "seconds": round(time.perf_counter() - started, 3), "samples": rows}
        with disk.guard(self.path):
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self._tensorboard(record)
        first = rows[0] if rows else None
        shown = f": {first['input']!r} -> {first['output']!r}" if first else ""
        print(f"samples at step {step} ({len(rows)} prompts, {record['seconds']:.1f} s){shown} "
              f"(all: {self.path})", flush=True)
        return record

    def _tensorboard(self, record: dict) -> None:
        if self.log_dir is None:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir, filename_suffix=".samples")
        cell = lambda text: str(text).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731 (a Markdown table cell)
        table = ["| input | reference | output | tokens/forward |", "|---|---|---|---|"]
        table += [f"| {cell(r['input'])} | {cell(r['reference'])} | {cell(r['output'])} | "
                  f"{r['tokens_per_forward']:.2f} |" for r in record["samples"]]
        self.writer.add_text("samples", "\n".join(table), record["step"])
        self.writer.flush()
