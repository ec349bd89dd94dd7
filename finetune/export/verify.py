"""The export check: fixed inputs, the fine-tuned model's logits (and the base's), the written export's logits from a
fresh process (``python -m finetune.export.reload``), and the verdict."""

from __future__ import annotations

import os
import subprocess
import sys

from finetune.errors import UserError

# Largest max-abs logit difference (logits are soft-capped at 30) accepted between the reloaded export and the
# in-memory fine-tuned model, by the coarser precision of the two. float32 differs only by summation order
# (x @ (W + BA) vs x @ W + x @ A @ B, ~1e-5 here). Half precisions round every weight: casting the trained tiny
# model to bfloat16 alone moves its logits by ~0.5 (bf16 steps near 30 are 0.125, so 8 steps are 1.0); a bfloat16
# tolerance of 0.5 would reject correct merges, so it is 1.0, and when the fine-tuned model is float32 the
# tolerance also grows to 1.5x what that cast costs, measured on the same inputs. README.md states these numbers
# (tests/finetune/test_export.py compares them).
TOLERANCE = {"float32": 1e-3, "bfloat16": 1.0, "float16": 0.25}
# And the export must keep the adapter's effect: its error stays below this fraction of max |fine-tuned - base|.
# This is the check that catches merge bugs at any precision: a missing or doubled delta costs ~100% of the
# effect, a decoder-only delta leaking into the encoder through the tie ~100% on the tiny model.
MAX_EFFECT_LOST = 0.25
VERIFY_TEXTS = (
    "Export check: the quick brown fox jumps over the lazy dog.",
    "shift: hello. Copy 12345, then count to ten!",
)
# The directory that holds this copy of the `finetune` package: the fresh process must run this code, not whichever
# `finetune` happens to be installed.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fixed_inputs(tokenizer, canvas_length: int) -> dict:
    """Two prompts and a fixed canvas each (at most 32 tokens, so the saved logits stay small at 262k vocab), as one
    batch of two: the prompts cut to the shorter one's length, so that no padding enters either side of the check.
    One batched forward reads the weights once where two read them twice; on a CPU, where the 262k head is bound by
    memory, that halves the check's forwards."""
    import torch

    n = min(canvas_length, 32)
    prompts = [tokenizer(text, return_tensors="pt")["input_ids"][0] for text in VERIFY_TEXTS]
    length = min(len(ids) for ids in prompts)
    canvases = [tokenizer(VERIFY_TEXTS[1 - i] * 8, add_special_tokens=False)["input_ids"][:n]
                for i in range(len(VERIFY_TEXTS))]
    return {"ids_0": torch.stack([ids[:length] for ids in prompts]).to(torch.long).contiguous(),
            "canvas_0": torch.tensor(canvases, dtype=torch.long)}


def model_logits(model, inputs: dict) -> dict:
    import torch

    device = next(model.parameters()).device
    out = {}
    with torch.no_grad():
        for i in range(len(inputs) // 2):
            logits = model(input_ids=inputs[f"ids_{i}"].to(device),
                           decoder_input_ids=inputs[f"canvas_{i}"].to(device)).logits
            out[f"logits_{i}"] = logits.float().cpu()
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def reference_logits(model, inputs: dict, dtype: str | None = None) -> dict:
    """Fine-tuned and base logits of the in-memory model; with ``dtype``, of a copy whose base weights are cast
    to it (LoRA stays float32, as peft keeps it): what that precision costs by itself."""
    import copy

    import torch

    if dtype is not None:
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        model = copy.deepcopy(model).to(getattr(torch, dtype))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in lora:
                    p.data = lora[n]
    out = {"finetuned": model_logits(model, inputs)}
    with model.disable_adapter():
        out["base"] = model_logits(model, inputs)
    return out


def reload_logits(model_path: str, adapter: str | None, dtype: str, device: str, inputs: dict, workdir: str,
                  revision: str | None = None, cast_to: str | None = None) -> dict:
    """Logits of the written export, loaded in a fresh process with stock transformers (and peft); ``revision``:
    the hub base's (an adapter export's base loads at the commit the fine-tuned model used). ``cast_to``: also the
    logits of the reloaded model cast to that precision (keys cast_logits_<i>)."""
    from safetensors.torch import load_file, save_file

    in_path, out_path = os.path.join(workdir, "inputs.safetensors"), os.path.join(workdir, "logits.safetensors")
    save_file(inputs, in_path)
    cmd = [sys.executable, "-m", "finetune.export.reload", "--model", model_path, "--dtype", dtype,
           "--device", device, "--inputs", in_path, "--out", out_path]
    if adapter:
        cmd += ["--adapter", adapter]
    if revision:
        cmd += ["--revision", str(revision)]
    if cast_to:
        cmd += ["--cast-to", cast_to]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = [line for line in result.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise UserError(f"verification could not reload {adapter or model_path}: {tail[0]}")
    return load_file(out_path)


# Positions (one canvas position's logits) allowed over the tolerance, per ten: a position whose token sat at a
# near-tie in a router's top-k takes other experts once its input is rounded differently (a merged tensor rounds
# W + delta where the in-memory model rounds W), and with expert LoRA the experts differ by their deltas, so that
# one position moves by up to about half the adapter's effect while every other stays at rounding's size (measured
# on the tiny model: 2.09 at one of 16 positions, 0.21 at most elsewhere, bfloat16). A lost, doubled or misplaced
# delta moves every position.
ROUTE_FLIPS_PER_TEN = 1


def position_diffs(a: dict, b: dict):
    """Max |a - b| over the vocabulary, per position, all inputs' positions in one vector."""
    import torch

    return torch.cat([(a[k] - b[k]).abs().amax(-1).flatten() for k in sorted(a)])


def check(name: str, got: dict, reference: dict, precision: str, loader: str, cast_cost: float | None = None):
    """Fail unless the reloaded logits match the fine-tuned model's and keep the adapter's effect.

    ``cast_cost``: how far casting the fine-tuned model to the export's precision moves its logits by itself.
    Rounding may cost up to 1.5x that; the check then asks only that the rest stays a small part of the effect.
    Judged at all positions but the worst ROUTE_FLIPS_PER_TEN in ten (router near-ties: see there); those must
    still stay closer to the fine-tuned model than the base is at that position.
    """
    allowance = 1.5 * cast_cost if cast_cost is not None else 0.0
    tol = max(TOLERANCE[precision], allowance)
    diffs = position_diffs(got, reference["finetuned"])
    effects = position_diffs(reference["base"], reference["finetuned"])
    diff, effect = float(diffs.max()), float(effects.max())
    flips = len(diffs) * ROUTE_FLIPS_PER_TEN // 10
    typical = float(diffs.sort(descending=True).values[flips])  # the largest once the allowed outliers are set aside
    outliers = [(float(d), float(e)) for d, e in zip(diffs, effects) if d > tol]
    result = dict(max_abs_diff=diff, adapter_effect=effect, tolerance=tol, precision=precision, loader=loader,
                  cast_cost=cast_cost, typical_abs_diff=typical, positions=len(diffs),
                  positions_over_tolerance=len(outliers))
    if typical > tol or any(d >= e for d, e in outliers):
        where = (f" at {len(outliers)} of {len(diffs)} positions" if outliers else "")
        raise UserError(f"{name} export failed verification: reloaded logits differ from the fine-tuned model by "
                        f"{diff:.3g}{where} (tolerance {tol:.3g} in {precision}; the adapter's own effect is "
                        f"{effect:.3g}); nothing was written")
    if typical - allowance > MAX_EFFECT_LOST * effect:
        raise UserError(f"{name} export failed verification: reloaded logits differ from the fine-tuned model by "
                        f"{typical:.3g}, {(typical - allowance) / effect:.0%} of the adapter's own effect ({effect:.3g}) "
                        f"beyond what {precision} rounding explains: the delta is partly lost or misplaced; "
                        "nothing was written")
    return result
