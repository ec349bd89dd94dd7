"""The model card an export carries (README.md): what is known about it, the check's numbers, the command that made
it, and how to use or serve it. The usage snippet and the serving command are printed as is by the playbooks too."""

from __future__ import annotations

from finetune.export.source import Source


def vllm_command(path: str, canvas_length: int) -> str:
    return f"vllm serve {path} --diffusion-config '{{\"canvas_length\":{canvas_length}}}' --max-num-seqs 4"


def export_command(source: str, fmt: str, key: str = "run_dir") -> str:
    """The export command for a run directory (``key=run_dir``) or a saved adapter (``key=adapter``)."""
    return f"python -m finetune.export {key}={source} format={fmt}"


def usage_snippet(kind: str, path: str, base_model: str, dtype: str = "bfloat16", max_new_tokens: int = 512) -> str:
    """The Python that loads and uses an export; the model card and the playbooks print exactly this."""
    if kind == "adapter":
        load = (f'adapter = "{path}"\n'
                f'base = DiffusionGemmaForBlockDiffusion.from_pretrained("{base_model}", dtype="{dtype}",\n'
                + " " * 55 + 'device_map="auto")\n'
                'model = PeftModel.from_pretrained(base, adapter).eval()\n'
                'tok = AutoTokenizer.from_pretrained(adapter)\n')
        head = "from peft import PeftModel\n"
        gen = "model.get_base_model().generate"
    else:
        load = (f'path = "{path}"\n'
                f'model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype="{dtype}", '
                'device_map="auto").eval()\n'
                'tok = AutoTokenizer.from_pretrained(path)\n')
        head = ""
        gen = "model.generate"
    return (
        head + "from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion\n\n" + load
        + 'ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,\n'
        + '                              return_tensors="pt", return_dict=True)["input_ids"].to(model.device)\n'
        + f"out = {gen}(input_ids=ids, max_new_tokens={max_new_tokens})\n"
        + "print(tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))\n"
    )


def _front_matter(base_model: str, library: str) -> str:
    import yaml

    meta = {"base_model": base_model, "library_name": library, "tags": ["diffusiongemma", "lora", "block-diffusion"],
            "pipeline_tag": "text-generation"}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _eval_table(metrics: dict | None) -> str:
    ev = (metrics or {}).get("eval")
    if not ev:
        return "No evaluation was recorded for this run (eval.enabled=false or metrics.json missing).\n"
    b, a = ev["base"], ev["adapter"]
    rows = [("held-out denoising loss (mean over t)", f"{b['heldout_loss_mean']:.4f}", f"{a['heldout_loss_mean']:.4f}"),
            ("generation exact match", f"{b['exact_match']:.1%}", f"{a['exact_match']:.1%}"),
            ("tokens per forward", f"{b['tokens_per_forward']:.2f}", f"{a['tokens_per_forward']:.2f}")]
    for t in sorted(a.get("heldout_loss_by_t", {}), key=float):
        bt, at = b["heldout_loss_by_t"][t], a["heldout_loss_by_t"][t]
        rows.append((f"denoising loss at t={t}", f"{bt:.4f}", f"{at:.4f}"))
    lines = [f"Held-out rows: {ev.get('examples', '?')} (the run's eval split).", "",
             "| metric | base | fine-tuned |", "|---|---|---|"]
    lines += [f"| {m} | {x} | {y} |" for m, x, y in rows]
    return "\n".join(lines) + "\n"


def _run_sections(src: Source) -> list:
    """Recipe, data, LoRA settings and evaluation, as the run recorded them."""
    cfg, metrics = src.cfg, src.metrics or {}
    lora, train, data, obj = (cfg.get(k, {}) for k in ("lora", "train", "data", "objective"))
    training = metrics.get("training", {})
    parts = ["## Recipe\n",
             f"Block-diffusion SFT: corruption `{obj.get('corruption')}`, loss on `{obj.get('loss_on')}`, weighting "
             f"`{obj.get('weighting')}`, t_min {obj.get('t_min')}, self-conditioning p "
             f"{obj.get('self_conditioning_p')}, encoder next-token loss weight {obj.get('encoder_ar_weight')}.\n",
             f"Training: {training.get('steps', train.get('max_steps'))} optimizer steps, batch "
             f"{train.get('batch_size')} x {train.get('grad_accum')} accumulation, lr {train.get('lr')} (warmup "
             f"{train.get('warmup_steps')}, cosine to x{train.get('min_lr_ratio')}), AdamW "
             f"({train.get('adam_beta1')}, {train.get('adam_beta2')}), weight decay {train.get('weight_decay')}, "
             f"grad clip {train.get('max_grad_norm')}, seed {cfg.get('seed')}."
             + (f" Training loss {training['loss_first']:.4f} -> {training['loss_last']:.4f}."
                if "loss_first" in training else "") + "\n"]
    counts = metrics.get("data", {})
    parts += ["## Data\n",
              f"Train: `{data.get('train')}` (split `{data.get('train_split')}`"
              + (f", {counts['train']['kept']} of {counts['train']['read']} rows kept" if "train" in counts else "")
              + f"). Eval: `{data.get('eval')}`"
              + (f" ({counts['eval']['kept']} rows)" if "eval" in counts else "") + ".\n"]
    parts += ["## LoRA settings\n",
              f"r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, targets "
              f"`{lora.get('targets')}` (attention q/k/v/o and/or dense MLP gate/up/down of the text stack; router, "
              f"experts, embeddings and head frozen), placement `{lora.get('placement')}`.\n"]
    return parts


def _adapter_sections(src: Source) -> list:
    """What a saved adapter from elsewhere tells about itself: its adapter_config.json and where its LoRA sits."""
    lora = src.lora
    targets = lora.get("target_modules")
    return ["## Source\n",
            f"Exported from the PEFT adapter `{src.adapter_dir}`, saved outside a finetune run: how it was trained "
            "(recipe, data, metrics) is not recorded here.\n",
            "## LoRA settings\n",
            f"From its adapter_config.json: r {lora.get('r')}, alpha {lora.get('lora_alpha')}, dropout "
            f"{lora.get('lora_dropout')}, targets `{targets}`"
            + (f", target parameters `{lora['target_parameters']}`" if lora.get("target_parameters") else "")
            + f". Placement read from its weights: `{src.placement}`.\n"]


def model_card(kind: str, src: Source, path: str, verification: dict | None, command: str | None,
               plan_note: str | None = None, dtype: str = "bfloat16", untied: bool = False) -> str:
    title = "LoRA adapter" if kind == "adapter" else "merged weights (LoRA folded in)"
    intro = (f"Fine-tuned with the finetune toolkit; run directory `{src.run_dir}`.\n" if src.run_dir else
             "Exported with the finetune toolkit from a PEFT adapter trained elsewhere.\n")
    parts = [_front_matter(src.base_model, "peft" if kind == "adapter" else "transformers"),
             f"# {src.name}: DiffusionGemma {title}\n", intro,
             "## Base model\n", f"`{src.base_model}` (`DiffusionGemmaForBlockDiffusion`, canvas length "
             f"{src.canvas_length}).\n"]
    parts += _run_sections(src) if src.run_dir else _adapter_sections(src)
    if plan_note:
        parts += ["### Encoder/decoder tie\n", plan_note + "\n"]
    if src.run_dir:
        parts += ["## Evaluation\n", _eval_table(src.metrics)]
    else:
        parts += ["## Evaluation\n", "None recorded with this adapter. `python -m eval adapter=<this adapter>` "
                  "compares it with its base on held-out rows.\n"]
    if verification:
        parts += ["## Export verification\n",
                  f"Reloaded from these files in a fresh process ({verification['loader']}) and compared with the "
                  f"in-memory fine-tuned model on fixed inputs: max |logit difference| "
                  f"{verification['max_abs_diff']:.3g} (tolerance {verification['tolerance']:.3g}, "
                  f"{verification['precision']}); the adapter itself moves those logits by up to "
                  f"{verification['adapter_effect']:.3g} from the base."
                  + (f" {_cast_subject(verification)} alone moves them by {verification['cast_cost']:.3g}."
                     if verification.get("cast_cost") is not None else "")
                  + "\n"]
    else:
        parts += ["## Export verification\n", "Not verified (exported with verify=false).\n"]
    parts += ["## How it was made\n", "```bash\n" + (command or "(command not recorded)") + "\n```\n"]
    parts += ["## Use it\n", "With transformers" + (" and peft" if kind == "adapter" else "") + ":\n",
              "```python\n" + usage_snippet(kind, path, src.base_model, dtype if kind == "merged" else "bfloat16")
              + "```\n"]
    if kind == "adapter":
        key, value = src.argument.split("=", 1)
        parts.append("vLLM cannot load LoRA adapters for DiffusionGemma: serve the merged export "
                     f"(`{export_command(value, 'merged', key)}`).\n")
    elif untied:
        parts.append("Do not serve this checkpoint with vLLM: it is untied (see above) and vLLM would load one "
                     "backbone for both passes. transformers loads it as shown.\n")
    else:
        parts += ["With vLLM (>= 0.24), which reads this layout and these key names as it reads the released "
                  "checkpoint's:\n",
                  "```bash\n" + vllm_command(path, src.canvas_length) + "\n```\n",
                  "A request without `max_tokens` is answered up to `max_new_tokens` of this export's "
                  "`generation_config.json`: the longest answer the run trained on (an adapter from elsewhere: 4 "
                  "canvases), not the base's one canvas. A request's own `max_tokens` wins; `--generation-config "
                  "vllm` makes vLLM ignore the file.\n"]
    return "\n".join(parts)


def _cast_subject(verification: dict) -> str:
    """What the check's precision allowance was measured on (finetune.export: one side or the other)."""
    if verification.get("cast_of") == "reloaded":
        return f"Computing these float32 weights in {verification['precision']} (the fine-tuned model's precision)"
    return f"Casting the fine-tuned model to {verification['precision']}"
