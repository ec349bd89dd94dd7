"""The tiny recipe on 2 CPU processes (gloo) through `accelerate launch`: the loss trace of a single process with the
same global batch (DDP, and FSDP2 sharding the base), one set of run files written by rank 0, a resume on the same
number of processes that ends where the straight run ends, and a resume on another number refused with the reason."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from finetune import checkpoints

from conftest import ROOT

pytestmark = pytest.mark.slow

# 4 steps of 16 rows (8 per process); the chat recipes' encoder loss, self-conditioning and uniform noise all run
ARGS = ["train.max_steps=4", "train.logging_steps=1", "train.warmup_steps=1", "checkpoint.every=2",
        "train.report_to=none", "train.disable_tqdm=true", "eval.enabled=false", "export.format=none"]
LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "finetune"]


# a small evaluation: generation on 8 held-out rows, one batch per noise level, no benchmark or sweep
EVALUATE = ["eval.max_examples=8", "eval.loss_batches=1", "eval.benchmark=null", "eval.sweep=null"]


def launch(env, run, *extra, processes=2, evaluate=False):
    head = LAUNCH if processes == 2 else ["-m", "finetune"]
    args = [a for a in ARGS if a != "eval.enabled=false"] + EVALUATE if evaluate else ARGS
    return subprocess.run([sys.executable, *head, f"output_dir={run}", *args, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def trace(run):
    with open(os.path.join(run, checkpoints.TRACE)) as f:
        return json.load(f)


def logged(run, key):
    with open(os.path.join(run, "metrics.json")) as f:
        return [e[key] for e in json.load(f)["training"]["log_history"] if key in e and "loss" in e]


def adapter(run):
    return load_file(os.path.join(run, "adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(default_run, tmp_path_factory):
    """One process with batch 16, and two processes with 8 each: the same global batch."""
    _, env, _ = default_run  # its cache holds the tiny base: several processes refuse to pre-train it each
    tmp = tmp_path_factory.mktemp("distributed")
    env = {**env, "OMP_NUM_THREADS": "1"}
    single = launch(env, tmp / "single", "train.batch_size=16", processes=1)
    assert single.returncode == 0, single.stderr[-3000:]
    # process 1 held inside the end of Trainer.train's glob of the staging directory (tests/hooks/sitecustomize.py):
    # process 0 must wait for it before removing that directory
    hooked = {**env, "PYTHONPATH": os.path.join(ROOT, "tests", "hooks")}
    two = launch(hooked, tmp / "two", "train.batch_size=8")
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp, env, two


def test_two_processes_give_the_single_process_loss_trace_and_adapter(runs):
    tmp, _, _ = runs
    one, two = trace(tmp / "single"), trace(tmp / "two")
    assert two["rows"] == one["rows"]  # the same samples in the same global order (the data sharded per process)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)  # same noise per sample, loss over all tokens
    assert logged(tmp / "two", "loss") == pytest.approx(logged(tmp / "single", "loss"), rel=1e-4)
    # the gradients DDP reduced: the shared LoRA (each encoder module is its decoder twin's) counted once, as in one
    # process (Adam would hide a gradient doubled everywhere; its norm, before clipping, does not)
    assert logged(tmp / "two", "grad_norm") == pytest.approx(logged(tmp / "single", "grad_norm"), rel=1e-4)
    a, b = adapter(tmp / "single"), adapter(tmp / "two")
    assert a.keys() == b.keys()
    for name in a:  # Adam turns float rounding in tiny gradients into ~3e-5 on weights of ~0.09 after 4 steps
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)


def test_rank_zero_alone_writes_one_checkpoint_and_one_adapter(runs):
    tmp, _, result = runs
    run = tmp / "two"
    root = run / checkpoints.CHECKPOINTS
    assert sorted(os.listdir(root)) == ["checkpoint-2", "checkpoint-4"]  # no staging left, no per-process copies
    for name in os.listdir(root):
        assert checkpoints.verify(str(root / name)) is None
        assert checkpoints.manifest(str(root / name))["step"] == int(name.split("-")[1])
        files = os.listdir(root / name)
        assert files.count("adapter_model.safetensors") == 1
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(files)  # each process's random state, sealed with it
    with open(root / "checkpoint-4" / checkpoints.CONFIG) as f:
        assert "world_size: 2" in f.read()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(os.listdir(run / ".hydra")) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert result.stdout.count("run directory:") == 1  # rank 0 prints; the other process trains silently
    assert "2 processes, ddp" in result.stdout


def test_a_resume_on_two_processes_ends_where_the_straight_run_ends(runs):
    tmp, env, _ = runs
    resumed = tmp / "resumed"
    result = launch(env, resumed, f"resume={tmp / 'two' / 'checkpoints' / 'checkpoint-2'}", "train.batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert trace(resumed) == trace(tmp / "two")
    a, b = adapter(tmp / "two"), adapter(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_a_resume_on_another_number_of_processes_is_refused_with_the_reason(runs, monkeypatch, capsys):
    from finetune.__main__ import check

    tmp, env, _ = runs
    monkeypatch.setenv("FINETUNE_CACHE", env["FINETUNE_CACHE"])
    # one process (this one), the check a launch runs before anything loads
    code = check([f"output_dir={tmp / 'one'}", f"resume={tmp / 'two' / 'checkpoints' / 'checkpoint-2'}", *ARGS,
                  "train.batch_size=8"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert "distributed.world_size=2" in line and "same number of processes" in line, line


def test_fsdp_sharding_the_base_gives_the_single_process_trace(runs):
    """FSDP2 over the frozen base (LoRA replicated, reduced by DDP); self-conditioning off, which FSDP refuses with
    the encoder's LoRA (tests/finetune/test_launch.py). Then the evaluation at the end of the run, on rank 0, and a
    resume of the sharded run."""
    tmp, env, _ = runs
    off = "objective.self_conditioning_p=0"
    single = launch(env, tmp / "single-nosc", "train.batch_size=16", off, processes=1)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = launch(env, tmp / "fsdp", "train.batch_size=8", off, "distributed=fsdp", evaluate=True)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "2 processes, fsdp" in sharded.stdout
    # evaluated on rank 0 alone, from the base and the saved adapter (the sharded model needs every process)
    assert "loading the base and" in sharded.stdout and (tmp / "fsdp" / "report.md").is_file()
    # its checkpoints are a DDP run's files (LoRA and its optimizer state whole): a resume ends where it ended
    resumed = launch(env, tmp / "fsdp-resumed", "train.batch_size=8", off, "distributed=fsdp",
                     f"resume={tmp / 'fsdp' / 'checkpoints' / 'checkpoint-2'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trace(tmp / "fsdp-resumed") == trace(tmp / "fsdp")
    a, b = adapter(tmp / "fsdp"), adapter(tmp / "fsdp-resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)
    one, two = trace(tmp / "single-nosc"), trace(tmp / "fsdp")
    assert two["rows"] == one["rows"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert logged(tmp / "fsdp", "grad_norm") == pytest.approx(logged(tmp / "single-nosc", "grad_norm"), rel=1e-4)


def descendants(pid):
    """Every process under ``pid`` (the launcher's agent and its workers)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            children = [int(c) for c in f.read().split()]
        found += children
        todo += children
    return found


def rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
    return int(env.get(b"RANK", b"-1"))


def test_a_signal_to_one_process_stops_all_at_one_step_with_a_checkpoint(runs):
    """SIGTERM to rank 1 alone (a node's own kill): the processes agree at the step's end, rank 0 writes the
    checkpoint of that step and both stop, nobody left waiting in a collective."""
    tmp, env, _ = runs
    run = tmp / "signalled"
    args = [a for a in ARGS if not a.startswith(("train.max_steps", "checkpoint.every"))]
    command = [sys.executable, *LAUNCH, f"output_dir={run}", *args, "train.max_steps=200", "checkpoint.every=0",
               "train.batch_size=8"]
    proc = subprocess.Popen(command, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "'loss'" in line and len([x for x in lines if "'loss'" in x]) == 2:
            break
    workers = [p for p in descendants(proc.pid) if rank_of(p) == 1]
    assert len(workers) == 1, lines
    os.kill(workers[0], signal.SIGTERM)
    started = time.monotonic()
    out = "".join(lines) + proc.stdout.read()
    proc.wait(timeout=300)
    assert time.monotonic() - started < 120, out[-2000:]  # not a collective timeout
    assert proc.returncode != 0
    assert "SIGTERM at step" in out, out[-2000:]
    step = int(out.split("SIGTERM at step ")[1].split(":")[0])
    assert 1 <= step < 200
    written = run / checkpoints.CHECKPOINTS / f"checkpoint-{step}"
    assert checkpoints.verify(str(written)) is None and checkpoints.manifest(str(written))["step"] == step
