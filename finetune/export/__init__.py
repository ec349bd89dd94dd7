"""Export a fine-tuned DiffusionGemma: the PEFT adapter and/or merged full weights in the released layout, each
reloaded in a fresh process and verified before it appears.

    python -m finetune.export run_dir=PATH | adapter=DIR [format=adapter|merged|both] [key=value ...]

The package, by job: ``source`` (a run directory, or any saved PEFT adapter), ``merge`` (which delta goes into which
tensor, the merged shards), ``verify`` (fixed inputs, logits, the verdict; ``reload`` is the fresh process),
``card`` (model card, usage snippet, serving command), ``staging`` (``<out>.tmp-XXXX`` and atomic writes), ``cli``.
This module puts them in order: every export is written to ``<out>.tmp-XXXX`` and renamed to ``<out>`` only after
everything, verification included, succeeded; a crash or a failed check leaves no directory that looks complete.
"""

from __future__ import annotations

import gc
import os
import shlex
import shutil
import sys
import tempfile
from contextlib import ExitStack

from finetune import disk, runlock
from finetune.config import EXPORT_DTYPES as DTYPES  # noqa: F401 (public)
from finetune.config import EXPORT_FORMATS as FORMATS  # noqa: F401 (public)
from finetune.config import DataSettings, ExportSettings
from finetune.errors import UserError
from finetune.export import merge, staging, verify
from finetune.export.card import export_command, model_card, usage_snippet, vllm_command  # noqa: F401 (public)
from finetune.export.merge import MergePlan, merge_plan  # noqa: F401 (public)
from finetune.export.source import Source, load_finetuned, read_adapter, read_run
from finetune.export.verify import MAX_EFFECT_LOST, TOLERANCE  # noqa: F401 (public)


def serving_generation_config(src, base):
    """The merged export's generation_config.json: the adapter's own when it has one, else the base's, with
    max_new_tokens raised to the longest answer the run trained on (data.max_response_canvases whole canvases).

    A server takes this file's max_new_tokens as its default answer length (vLLM's --generation-config auto, its
    default): the released checkpoint's 256 tokens, one canvas, would stop every answer of a run that trained answers
    of up to four canvases at the first. A limit the file already sets higher is kept."""
    import copy

    kind = type(base.generation_config)  # DiffusionGemmaGenerationConfig: its sampler fields survive the round trip
    own = os.path.join(src.adapter_dir, "generation_config.json")
    config = kind.from_pretrained(src.adapter_dir) if os.path.isfile(own) else copy.deepcopy(base.generation_config)
    canvases = (src.cfg.get("data") or {}).get("max_response_canvases") or DataSettings.max_response_canvases
    trained = int(canvases) * int(src.canvas_length)
    if config.max_new_tokens is None or config.max_new_tokens < trained:
        config.max_new_tokens = trained
    return config


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def export_run(run_dir: str | None, settings: ExportSettings, model=None, tokenizer=None, command: str | None = None,
               device: str | None = None, log=print, adapter: str | None = None) -> dict:
    """Write the exports ``settings.format`` asks for, of a run directory or (``run_dir=None, adapter=DIR``) of any
    saved PEFT adapter; returns ``{format: {"path": ..., "verification": ...}}``.

    ``model`` is the in-memory fine-tuned PeftModel (the end of a training run); without it the adapter is loaded
    onto its base. Nothing appears at an export's final path unless all of it was written and verified.
    """
    if (run_dir is None) == (adapter is None):
        raise UserError("give exactly one of run_dir=PATH (a run directory written by python -m finetune) and "
                        "adapter=DIR (any saved PEFT adapter for DiffusionGemma)")
    settings.validate()
    runlock.refuse_if_training(run_dir or adapter, "run_dir=" if run_dir else "adapter=")  # not a moving target
    src: Source = read_run(run_dir) if run_dir is not None else read_adapter(adapter)
    outs = staging.output_dirs(settings, src.export_dir)
    from finetune.model import base_commit, resolve_device, resolve_model_path, tokenizer_for

    device = device or resolve_device(settings.device, key="device")
    owned = model is None
    if owned:
        log(f"export: loading {src.base_model} with the adapter {src.adapter_dir}")
        model, tokenizer = load_finetuned(src, device)
    elif tokenizer is None:
        tokenizer = tokenizer_for(resolve_model_path(src.base_model, src.revision), src.adapter_dir, src.revision,
                                  src.trust_remote_code)
    model.eval()
    base = model.get_base_model()
    src.canvas_length = base.config.canvas_length
    base_revision = base_commit(base) or src.revision  # the reload checks against the commit this model came from
    ref_dtype = _dtype_name(base.dtype)

    plan = merge.merge_plan(model, settings.untie) if "merged" in outs else None  # refuses before anything is written
    inputs = verify.fixed_inputs(tokenizer, src.canvas_length)
    reference = verify.reference_logits(model, inputs)
    merged_precision = max(ref_dtype, settings.dtype, key=TOLERANCE.get)  # judged at the coarser precision
    cast_cost = None
    if plan is not None and ref_dtype == "float32" and settings.dtype != "float32":
        cast = verify.reference_logits(model, inputs, settings.dtype)  # a copy: small models only train in float32
        cast_cost = verify.max_abs_diff(cast["finetuned"], reference["finetuned"])
        log(f"export: casting the fine-tuned model to {settings.dtype} moves its logits by {cast_cost:.3g}")

    needed = _needed_bytes(src, plan, settings.dtype, outs)
    staging.refuse_if_it_cannot_fit(outs, needed)  # 52 GB merged: say so now, not when the disk fills
    results = {}
    with ExitStack() as stack:
        staged = {}
        for fmt, out in outs.items():
            staged[fmt] = staging.Staged(out)
            stack.callback(staged[fmt].cleanup)
        if "adapter" in staged:
            with disk.guard(staged["adapter"].out, needed["adapter"], staging=staged["adapter"].path, kept=KEPT):
                for name in src.adapter_files():
                    shutil.copy2(os.path.join(src.adapter_dir, name), staged["adapter"].path)
                if not os.path.isfile(os.path.join(staged["adapter"].path, "tokenizer_config.json")):
                    tokenizer.save_pretrained(staged["adapter"].path)  # the card's snippet loads it from the adapter
        if plan is not None:
            path = staged["merged"].path
            log(f"export: writing merged {settings.dtype} weights ({'untied' if plan.untied else 'tied'} layout)")
            with disk.guard(staged["merged"].out, needed["merged"], staging=path, kept=KEPT):
                merge.write_merged(plan, path, settings.dtype, settings.max_shard_size)
                tokenizer.save_pretrained(path)
                serving_generation_config(src, base).save_pretrained(path)
                # last: no config, no model
                merge.merged_config(base, settings.dtype, plan.untied).save_pretrained(path)
        merge_note, merge_untied = (plan.note, plan.untied) if plan is not None else (None, False)
        if owned:  # the check loads a second copy: free this one first (52 GB for the real model)
            del model, base, plan
            gc.collect()
            _empty_cache()
            model = base = None

        with tempfile.TemporaryDirectory() as work:
            for fmt, stage in staged.items():
                verification = None
                if settings.verify:
                    log(f"export: verifying the {fmt} export in a fresh process")
                    if fmt == "adapter":
                        got = verify.reload_logits(src.base_model, stage.path, ref_dtype, device, inputs, work,
                                                   base_revision)
                        verification = verify.check("adapter", got, reference, ref_dtype,
                                                    "transformers + stock peft PeftModel.from_pretrained")
                    else:
                        # a float32 export of a half-precision model: the reference carries its precision's
                        # rounding (at real width, bf16 against float32 logits differ by more than TOLERANCE alone),
                        # measured on the reloaded weights in the same process, as cast_cost is the other way round
                        finer = ref_dtype != "float32" and settings.dtype == "float32"
                        got = verify.reload_logits(stage.path, None, settings.dtype, device, inputs, work,
                                                   cast_to=ref_dtype if finer else None)
                        if finer:
                            got, cast = ({k: v for k, v in got.items() if k.startswith(p)} for p in ("logits", "cast_"))
                            cast_cost = verify.max_abs_diff(got, {k: cast[f"cast_{k}"] for k in got})
                            log(f"export: the reloaded float32 export computed in {ref_dtype} moves its logits by "
                                f"{cast_cost:.3g}")
                        verification = verify.check("merged", got, reference, merged_precision,
                                                    "DiffusionGemmaForBlockDiffusion.from_pretrained", cast_cost)
                        verification["cast_of"] = "reloaded" if finer else "fine-tuned"
                    v = verification
                    flips = (f"; {v['positions_over_tolerance']} of {v['positions']} positions over it (a router "
                             f"near-tie), {v['typical_abs_diff']:.3g} at the rest"
                             if v["positions_over_tolerance"] else "")
                    log(f"export: {fmt} reloads to max |logit diff| {v['max_abs_diff']:.3g} (tolerance "
                        f"{v['tolerance']:.3g}{flips}; adapter effect {v['adapter_effect']:.3g})")
                card = model_card(fmt, src, stage.out, verification, command,
                                  merge_note if fmt == "merged" else None, settings.dtype,
                                  untied=fmt == "merged" and merge_untied)
                with disk.guard(stage.out, staging=stage.path, kept=KEPT), \
                        open(os.path.join(stage.path, "README.md"), "w") as f:
                    f.write(card)
                results[fmt] = {"path": stage.out, "verification": verification}
        for stage in staged.values():
            stage.commit()
    for fmt, r in results.items():
        log(f"export: {fmt} -> {r['path']}")
    if settings.push_to_hub:
        _push(results, settings.push_to_hub)
    return results


KEPT = "the source and any earlier export are untouched"
MARGIN = 0.05, 64 << 20  # beyond an export's weights: tokenizer, configs, card, filesystem overhead


def _needed_bytes(src: Source, plan, dtype: str, outs: dict) -> dict:
    """{format: bytes} each export will take, a margin included: the merged weights at the export dtype
    (merge.merged_bytes), the adapter's files."""
    weights = {"adapter": sum(disk.size(os.path.join(src.adapter_dir, n)) for n in src.adapter_files())}
    if plan is not None:
        weights["merged"] = merge.merged_bytes(plan, dtype)
    return {fmt: int(weights[fmt] * (1 + MARGIN[0]) + MARGIN[1]) for fmt in outs}


def _empty_cache():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _push(results: dict, repo_id: str):
    from huggingface_hub import HfApi

    api = HfApi()
    for fmt, r in results.items():
        repo = repo_id + "-merged" if fmt == "merged" and len(results) > 1 else repo_id
        api.create_repo(repo, private=True, exist_ok=True)
        api.upload_folder(folder_path=r["path"], repo_id=repo, commit_message=f"finetune export ({fmt})")
        r["hub"] = repo


def _job_overrides() -> list:
    """This job's own overrides (one combination of a -m sweep), or the command line outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return sys.argv[1:]


def export_at_end_of_run(run_dir: str, cfg, peft_model, tokenizer, device: str) -> dict | None:
    """The run's ``export`` config group: the same export as the CLI, from the model still in memory (unless it ran
    on quantised weights)."""
    from finetune.config import settings as to_settings

    settings = to_settings(cfg.export).validate(allow_none=True)
    if settings.format == "none":
        return None
    if cfg.model.quantization != "none":
        # Trained on 4-bit weights, the adapter is the one the bf16 base takes: the export is built and checked on
        # the original bf16 weights (the run's base, loaded anew with the saved adapter), never on dequantised ones.
        print(f"export: the run trained on model.quantization={cfg.model.quantization}; the export is built on the "
              "original bf16 base with the saved adapter, and checked there")
        peft_model = tokenizer = None
    command = "python -m finetune " + shlex.join(_job_overrides())
    try:
        return export_run(run_dir, settings, peft_model, tokenizer, command=command, device=device)
    except UserError as e:  # a full disk stays one (exit code 1)
        raise type(e)(f"{e} (the run itself is complete: adapter and metrics are in {run_dir}; export again with "
                        f"python -m finetune.export run_dir={run_dir} ...)") from None
