"""The 26B path rehearsed at real width on a CPU: every entry point a user runs, on a local real-width checkpoint.

    python bench/rehearsal.py                        # 2 layers, 128 experts: ~25 minutes on 2 cores, ~12 GB peak
    python bench/rehearsal.py --keep --dir /tmp/rh   # keep the checkpoint, runs and exports (5-15 GB on disk)
    python bench/rehearsal.py --checkpoint DIR       # rehearse an existing local checkpoint (no writing)
    python bench/rehearsal.py --probes bf16,fp32     # fewer planner probes

What it does, each phase a subprocess of its own, timed, with its peak resident memory (the largest VmHWM of the
process and the children it waited for, from wait4):
  checkpoint  `bench/make_26b_config.py --checkpoint`: the shipped 26B-A4B config's first --layers layers (the
              last full-attention: head_dim 512, K=V, partial rotary), 128 experts of 704, the 262,144 vocabulary
              and the vision tower, random bf16 weights as sharded safetensors with an index, and a stand-in
              tokenizer of the real vocabulary size with Gemma 4's chat markup: what `hf download --local-dir` gives
  plan        `python -m finetune.plan recipe=chat_spark hardware=cpu model.name_or_path=DIR` (no revision override)
  preflight   `python -m finetune.preflight` on the same arguments
  train       `python -m finetune`, --steps steps with a checkpoint each step (the reference)
  killed      the same command into another directory, SIGKILLed once a checkpoint before the last step is sealed ...
  resumed     ... and continued with resume=auto: its loss trace and adapter must equal the reference's bit for bit
  eval        `python -m eval adapter=<run>/adapter` with a capped sampler (2 prompts, 4 denoising steps)
  export      `python -m finetune.export run_dir=<run> format=both dtype=float32` (its own fresh-process check runs)
  reload      a fresh process: the merged export with stock `from_pretrained`, then the base with stock
              `PeftModel.from_pretrained` of the exported adapter; max |logit diff| between them (float32), beside
              the adapter's effect (max |adapter - base|)
  probe:*     the planner against measurement, one process each (tests/finetune/plan_probe.py: peak RSS growth from
              before the model loads to the end of one optimizer step, against `finetune.plan`'s prediction), for
              bf16 and fp32 weights, model.quantization=experts4bit and all4bit (4-bit loads stream: their load
              peak is inside the measurement), and checkpointing on; the recipe's objective (encoder loss,
              self-conditioning on: the step that sets the peak), prompt --prompt, one canvas, batch 1
The training phases use --prompt tokens, one canvas, batch 1, and no encoder loss or self-conditioning (the
probes carry the full objective), with lr 1e-2 and no warm-up so that 3 steps move the logits well above float32
round-off. The step's rate: the bf16 probe's step time against its model FLOPs (bench/train_step.py's count) at
this machine's measured float32 matmul rate (1.0 = the step runs at matmul speed).

The last line:
  rehearsal: plan/measured bf16 A fp32 B experts4bit C all4bit D; resume bitwise: yes; export reload max|d| E;
  step s/FLOP-rate F
and the table above it goes into bench/RESULTS.md. A phase that fails stops the rehearsal with its output's tail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROBE = os.path.join(ROOT, "tests", "finetune", "plan_probe.py")
PROBES = {  # name -> overrides beyond the common ones
    "bf16": ["model.dtype=bfloat16"],
    "fp32": ["model.dtype=float32"],
    "experts4bit": ["model.dtype=bfloat16", "model.quantization=experts4bit"],
    "all4bit": ["model.dtype=bfloat16", "model.quantization=all4bit"],
    "bf16+checkpointing": ["model.dtype=bfloat16", "train.gradient_checkpointing=true"],
}
PHASES = ("plan", "preflight", "train", "eval", "export", "probes")  # train: the reference, killed and resumed
TOLERANCE = 0.15  # the bar for plan/measured at real width


class PhaseFailed(RuntimeError):
    pass


def run_phase(name: str, argv: list, env: dict, rows: list, timeout: float, kill_when=None) -> tuple[int, str]:
    """Run ``argv``; record (name, seconds, peak RSS); return (exit code, output). ``kill_when``: a callable polled
    every 0.1 s; when it returns true the process gets SIGKILL (the exit code is then -9)."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if kill_when is not None and kill_when():
                proc.send_signal(signal.SIGKILL)
                kill_when = None
            if time.monotonic() - started > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1 if kill_when is not None else 0.5)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    seconds = time.monotonic() - started
    rows.append({"phase": name, "seconds": round(seconds, 1), "peak_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
                 "code": code})
    print(f"  {name:22} {seconds:7.1f} s  peak RSS {usage.ru_maxrss * 1024 / 1e9:6.2f} GB  exit {code}", flush=True)
    if time.monotonic() - started > timeout:
        raise PhaseFailed(f"{name}: over its {timeout:.0f} s limit\n{output[-3000:]}")
    return code, output


def must(name, argv, env, rows, timeout=1800, **kw) -> str:
    code, output = run_phase(name, argv, env, rows, timeout, **kw)
    if code != 0:
        raise PhaseFailed(f"{name} exited {code}: {' '.join(argv)}\n{output[-4000:]}")
    return output


def sealed_before(run: str, last: int) -> bool:
    """Whether ``run`` holds a sealed checkpoint of a step before ``last``: any of them, as the run rotates older ones
    away (a fast tiny run kept checkpoint-1 for a tenth of a second, and a poll missed it until the run ended)."""
    root = os.path.join(run, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return any(re.fullmatch(r"checkpoint-(\d+)", n) and int(n.split("-")[1]) < last
               and os.path.isfile(os.path.join(root, n, "manifest.json")) for n in names)


def same_outcome(run: str, reference: str) -> list[str]:
    """What differs between two runs' loss traces and adapters (empty: bit for bit the same)."""
    import torch
    from safetensors.torch import load_file

    from finetune import checkpoints

    problems = []
    if open(os.path.join(run, checkpoints.TRACE)).read() != open(os.path.join(reference, checkpoints.TRACE)).read():
        problems.append("loss trace")
    a = load_file(os.path.join(run, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(reference, "adapter", "adapter_model.safetensors"))
    if a.keys() != b.keys():
        problems.append("adapter tensor names")
    else:
        problems += [k for k in a if not torch.equal(a[k], b[k])]
    return problems


def matmul_rate(threads: int) -> float:
    """This machine's float32 matmul rate (FLOP/s) at the hidden size, with the children's thread count."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 2816), torch.randn(2816, 2816)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 1024 * 2816 * 2816 / best


def step_flops(base: str, overrides: list) -> float:
    """bench/train_step.py's model FLOPs of the probe's step (its batch shape, self-conditioning on), on meta."""
    import torch

    sys.path.insert(0, HERE)
    from train_step import Workload, fixed_noise, lora_model, make_batch, model_flops
    from transformers import DiffusionGemmaConfig

    from finetune.config import compose, settings

    cfg = compose(overrides)
    config = DiffusionGemmaConfig.from_pretrained(base)
    text, c = config.text_config, config.canvas_length
    response = cfg.data.max_response_canvases * c - 1
    batch, tokens = make_batch(cfg.data.max_prompt_tokens, response, cfg.train.batch_size, c, text.vocab_size, 3,
                               text.eos_token_id, text.pad_token_id)
    noise = fixed_noise(batch, c, text.vocab_size, 1e-3)
    model = lora_model(config, "meta", torch.bfloat16)
    work = Workload("probe", batch, noise, tokens, c, "cpu")
    return float(model_flops(model, work, settings(cfg.objective))["model_flops"])


def reload_child(merged: str, adapter: str, base: str) -> None:
    """Fresh process: stock loads of the export, float32, compared on the export check's fixed inputs."""
    import ctypes
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    from finetune.export.verify import fixed_inputs, max_abs_diff, model_logits

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(merged, dtype=torch.float32)
    inputs = fixed_inputs(tokenizer, model.config.canvas_length)
    merged_logits = model_logits(model.eval(), inputs)
    del model
    gc.collect()
    # the merged copy's memory back before the base loads (stock float32 loads map the bf16 base file as well: the
    # phase peaked at 15.3 GB at 2 layers)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    model = PeftModel.from_pretrained(DiffusionGemmaForBlockDiffusion.from_pretrained(base, dtype=torch.float32),
                                      adapter).eval()
    adapted = model_logits(model, inputs)
    with model.disable_adapter():
        plain = model_logits(model, inputs)
    print(json.dumps({"max_diff": max_abs_diff(merged_logits, adapted), "effect": max_abs_diff(adapted, plain)}))


def table(rows: list, probes: list) -> str:
    lines = ["| phase | wall s | peak RSS GB |", "|---|---:|---:|"]
    lines += [f"| {r['phase']} | {r['seconds']:.1f} | {r['peak_gb']:.2f} |" for r in rows]
    if probes:
        lines += ["", "| probe | predicted GB | measured GB | plan/measured | step s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {p['name']} | {p['predicted'] / 1e9:.2f} | {p['measured'] / 1e9:.2f} | "
                  f"{p['predicted'] / p['measured']:.3f} | {p.get('seconds', float('nan')):.1f} |" for p in probes]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="working directory (default: a new temporary one, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint, runs and exports")
    parser.add_argument("--checkpoint", help="an existing local checkpoint to rehearse (default: write one)")
    parser.add_argument("--layers", type=int, default=2, help="layers of the written checkpoint (the last full)")
    parser.add_argument("--experts", type=int, default=None, help="experts of the written checkpoint (default 128)")
    parser.add_argument("--steps", type=int, default=3, help="training steps of the reference and resumed runs")
    parser.add_argument("--prompt", type=int, default=64, help="data.max_prompt_tokens of every phase")
    parser.add_argument("--canvases", type=int, default=1, help="data.max_response_canvases of every phase")
    parser.add_argument("--probes", default=",".join(PROBES), help=f"planner probes (of {', '.join(PROBES)})")
    parser.add_argument("--only", default=",".join(PHASES), help=f"phases to run (of {', '.join(PHASES)}): "
                        "eval and export read the reference run that train leaves in --dir")
    parser.add_argument("--recipe", default="chat_spark")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--reload-child", nargs=3, metavar=("MERGED", "ADAPTER", "BASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reload_child:
        reload_child(*args.reload_child)
        return 0
    only = set(args.only.split(","))
    if only - set(PHASES):
        parser.error(f"--only: unknown {sorted(only - set(PHASES))}; choose from {', '.join(PHASES)}")
    probes = [p for p in args.probes.split(",") if p] if "probes" in only else []
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        parser.error(f"--probes: unknown {unknown}; choose from {', '.join(PROBES)}")
    if "train" in only and args.steps < 2:
        parser.error("--steps: at least 2 (the killed run is stopped after a sealed checkpoint, before its last step)")

    work = os.path.abspath(args.dir) if args.dir else tempfile.mkdtemp(prefix="rehearsal-")
    os.makedirs(work, exist_ok=True)
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": ROOT}
    py = sys.executable
    rows, probe_rows, result = [], [], {}
    print(f"rehearsal in {work} ({threads} threads)", flush=True)
    try:
        base = os.path.abspath(args.checkpoint) if args.checkpoint else os.path.join(work, "dg")
        if not args.checkpoint:
            if os.path.isfile(os.path.join(base, "config.json")) and args.keep:
                print(f"  checkpoint             reused: {base}")
            else:
                extra = ["--experts", str(args.experts)] if args.experts else []
                must("checkpoint", [py, os.path.join(HERE, "make_26b_config.py"), "--checkpoint", base,
                                    "--layers", str(args.layers), *extra], env, rows)
        common = [f"recipe={args.recipe}", "hardware=cpu", f"model.name_or_path={base}",
                  "data.train=tests/data/chats.jsonl", f"data.max_prompt_tokens={args.prompt}",
                  f"data.max_response_canvases={args.canvases}", "train.batch_size=1", "train.grad_accum=1"]
        if "plan" in only:
            must("plan", [py, "-m", "finetune.plan", *common], env, rows, timeout=600)
        if "preflight" in only:
            must("preflight", [py, "-m", "finetune.preflight", *common], env, rows, timeout=600)

        training = [*common, "model.dtype=bfloat16", f"train.max_steps={args.steps}", "train.lr=1e-2",
                    "train.warmup_steps=0", "train.logging_steps=1", "checkpoint.every=1",
                    "objective.encoder_ar_weight=0", "objective.self_conditioning_p=0", "eval.enabled=false",
                    "export.format=none"]
        reference, killed = os.path.join(work, "run"), os.path.join(work, "run-killed")
        if "train" in only:
            for stale in (reference, killed):
                shutil.rmtree(stale, ignore_errors=True)
            must("train", [py, "-m", "finetune", *training, f"output_dir={reference}"], env, rows)
            code, output = run_phase("killed", [py, "-m", "finetune", *training, f"output_dir={killed}"], env, rows,
                                     1800, kill_when=lambda: sealed_before(killed, args.steps))
            if code != -signal.SIGKILL:
                raise PhaseFailed(f"killed: the run ended ({code}) before it was killed mid-run (after a sealed "
                                  f"checkpoint, before step {args.steps}): give more --steps\n{output[-3000:]}")
            must("resumed", [py, "-m", "finetune", *training, f"output_dir={killed}", "resume=auto"], env, rows)
            differs = same_outcome(killed, reference)
            result["resume_bitwise"] = not differs
            if differs:
                print(f"  resume differs from the uninterrupted run in: {', '.join(differs[:5])}")
        if only & {"eval", "export"} and not os.path.isdir(os.path.join(reference, "adapter")):
            raise PhaseFailed(f"eval and export read the reference run {reference}: run the train phase first")

        if "eval" in only:
            must("eval", [py, "-m", "eval", *common, "model.dtype=bfloat16", f"adapter={reference}/adapter",
                          f"out={work}/eval", "eval.benchmark=null", "eval.max_examples=2", "eval.samples.shown=2",
                          "eval.loss_t=[0.5]", "eval.loss_batches=1", "eval.generation.max_new_tokens=32",
                          "eval.generation.max_denoising_steps=4", "eval.generation.batch_size=2"], env, rows)
            report = json.load(open(os.path.join(work, "eval", "report.json")))
            result["eval_seconds"] = report.get("seconds")

        if "export" in only:
            export_dir = os.path.join(reference, "export")
            shutil.rmtree(export_dir, ignore_errors=True)
            output = must("export", [py, "-m", "finetune.export", f"run_dir={reference}", "format=both",
                                     "dtype=float32", "max_shard_size=2GB"], env, rows)
            found = re.search(r"merged reloads to max \|logit diff\| (\S+) \(tolerance (\S+); adapter effect "
                              r"(\S+)\)", output)
            if found:
                result["export_check"] = {"max_diff": float(found[1]), "tolerance": float(found[2]),
                                          "effect": float(found[3])}
            output = must("reload", [py, os.path.abspath(__file__), "--reload-child",
                                     os.path.join(export_dir, "merged"), os.path.join(export_dir, "adapter"), base],
                          env, rows)
            result["reload"] = json.loads(output.strip().splitlines()[-1])

        for name in probes:
            overrides = [*common, *PROBES[name]]
            output = must(f"probe:{name}", [py, PROBE, json.dumps(overrides)], env, rows)
            numbers = json.loads(output.strip().splitlines()[-1])
            numbers["name"] = name
            probe_rows.append(numbers)
            print(f"  {'':22} plan {numbers['predicted'] / 1e9:.2f} GB / measured {numbers['measured'] / 1e9:.2f} GB"
                  f" = {numbers['predicted'] / numbers['measured']:.3f}", flush=True)
        bf16 = next((p for p in probe_rows if p["name"] == "bf16"), None)
        if bf16 and "seconds" in bf16:
            flops = step_flops(base, [*common, *PROBES["bf16"]])
            rate = matmul_rate(threads)
            result["step"] = {"seconds": bf16["seconds"], "model_flops": flops, "fp32_matmul_flops_per_s": rate,
                              "ratio": bf16["seconds"] / (flops / rate)}
    except PhaseFailed as e:
        print(table(rows, probe_rows))
        print(f"rehearsal failed: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(table(rows, probe_rows))
    ratio = {p["name"]: p["predicted"] / p["measured"] for p in probe_rows}
    off = {k: v for k, v in ratio.items() if abs(v - 1) > TOLERANCE}
    if off:
        print(f"plan/measured outside 1 +- {TOLERANCE:.0%}: {off}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"phases": rows, "probes": probe_rows, **result}, f, indent=1)

    def r(name):
        return f"{ratio[name]:.2f}" if name in ratio else "n/a"

    step = f"{result['step']['ratio']:.2f}" if "step" in result else "n/a"
    bitwise = {True: "yes", False: "no", None: "n/a"}[result.get("resume_bitwise")]
    reload = f"{result['reload']['max_diff']:.2e}" if "reload" in result else "n/a"
    print(f"rehearsal: plan/measured bf16 {r('bf16')} fp32 {r('fp32')} experts4bit {r('experts4bit')} "
          f"all4bit {r('all4bit')}; resume bitwise: {bitwise}; export reload max|d| {reload}; step s/FLOP-rate {step}")
    return 1 if off or result.get("resume_bitwise") is False else 0


if __name__ == "__main__":
    sys.exit(main())
