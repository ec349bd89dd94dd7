"""Export a run: the PEFT adapter and/or merged full weights in the released layout, each reloaded and verified.

python -m finetune.export run_dir=PATH [format=adapter|merged|both] [out=DIR] [dtype=bfloat16|float32|float16]
                          [verify=true] [untie=false] [max_shard_size=5GB] [push_to_hub=null|ORG/NAME] [device=auto]

Every export is written to ``<out>.tmp-XXXX`` and renamed to ``<out>`` only after everything, verification
included, succeeded: a crash or a failed check leaves no directory that looks complete.
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field

from finetune.config import EXPORT_DTYPES as DTYPES
from finetune.config import EXPORT_FORMATS as FORMATS
from finetune.config import ExportSettings
from finetune.errors import UserError, run_cli

# Largest max-abs logit difference (logits are soft-capped at 30) accepted between the reloaded export and the
# in-memory fine-tuned model, by the coarser precision of the two. float32 differs only by summation order
# (x @ (W + BA) vs x @ W + x @ A @ B, ~1e-5 here). Half precisions round every weight: casting the trained tiny
# model to bfloat16 alone moves its logits by ~0.5 (8 bf16 steps at 30 are 1.0); when the fine-tuned model is
# float32 the tolerance also grows to 1.5x what that cast costs, measured on the same inputs.
TOLERANCE = {"float32": 1e-3, "bfloat16": 1.0, "float16": 0.25}
# And the export must keep the adapter's effect: its error stays below this fraction of max |fine-tuned - base|.
# This is the check that catches merge bugs at any precision: a missing or doubled delta costs ~100% of the
# effect, a decoder-only delta leaking into the encoder through the tie ~100% on the tiny model.
MAX_EFFECT_LOST = 0.25
VERIFY_TEXTS = (
    "Export check: the quick brown fox jumps over the lazy dog.",
    "shift: hello. Copy 12345, then count to ten!",
)

USAGE = """usage: python -m finetune.export run_dir=PATH [format=adapter|merged|both] [key=value ...]

  run_dir=PATH        a run directory written by python -m finetune (config.yaml, metrics.json, adapter/)
  format=adapter      adapter: the PEFT adapter (transformers + peft load it); merged: full weights with the
                      adapter folded in, in the released layout (vLLM serves it); both
  out=DIR             where the export goes (default <run_dir>/export/<format>); with format=both, DIR/adapter
                      and DIR/merged
  dtype=bfloat16      merged weights: bfloat16 (as released) | float32 | float16
  verify=true         reload the export in a fresh process and compare logits with the fine-tuned model
  untie=false         merged, when encoder and decoder got different deltas: true writes them untied
                      (twice the text weights; vLLM cannot serve that); false refuses
  max_shard_size=5GB  merged safetensors shard size
  push_to_hub=null    a hub repo id (org/name) to upload the verified export to (format=both: the merged one
                      goes to org/name-merged)
  device=auto         where the model runs for the merge and the check: auto | cpu | cuda
"""


# --- command line ------------------------------------------------------------------------------------------------
def _bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise UserError(f"{key}={value!r}: use true or false")


def parse_args(argv: list[str]) -> tuple[str, ExportSettings]:
    """``key=value`` arguments -> (run_dir, settings); anything unknown or malformed is a UserError."""
    values: dict[str, str] = {}
    keys = ["run_dir"] + [f for f in ExportSettings.__dataclass_fields__]
    for arg in argv:
        if "=" not in arg:
            raise UserError(f"argument {arg!r} is not key=value (python -m finetune.export --help lists the keys)")
        key, value = arg.split("=", 1)
        if key not in keys:
            raise UserError(f"unknown key {key!r}: use {', '.join(keys)}")
        values[key] = value
    if not values.get("run_dir"):
        raise UserError("run_dir=PATH is required: a run directory written by python -m finetune")
    settings = ExportSettings()
    for key, value in values.items():
        if key == "run_dir":
            continue
        if key in ("verify", "untie"):
            setattr(settings, key, _bool(key, value))
        elif key in ("push_to_hub", "out"):
            setattr(settings, key, None if value in ("", "null", "none", "None") else value)
        else:
            setattr(settings, key, value)
    return values["run_dir"], settings.validate()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0

    def body():
        run_dir, settings = parse_args(argv)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own log lines say what happens; errors stay one line
        warnings.simplefilter("ignore", FutureWarning)  # library deprecation notices, not the user's concern
        export_run(run_dir, settings, command="python -m finetune.export " + shlex.join(argv))

    return run_cli(body)


# --- the run being exported --------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    run_dir: str
    cfg: dict
    metrics: dict | None
    adapter_dir: str
    base_model: str  # what adapter_config.json names: a hub id or a local directory
    canvas_length: int = 256


def read_run(run_dir: str) -> RunInfo:
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    adapter_dir = os.path.join(run_dir, "adapter")
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise UserError(f"run_dir={run_dir} is not a finished run: it needs config.yaml and adapter/ "
                        "(written by python -m finetune)")
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(config_path))
    metrics = None
    if os.path.isfile(os.path.join(run_dir, "metrics.json")):
        with open(os.path.join(run_dir, "metrics.json")) as f:
            metrics = json.load(f)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path") or (metrics or {}).get("base_model")
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    return RunInfo(run_dir, cfg, metrics, adapter_dir, base)


def load_finetuned(info: RunInfo, device: str):
    """Base + the run's adapter, as training left it (shared encoder/decoder LoRA re-tied)."""
    from finetune.model import dtype_for, load_adapter, load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(info.base_model)
    model = load_model(path, dtype_for(info.cfg.get("model", {}).get("dtype", "auto"), device), device)
    peft_model = load_adapter(model, info.adapter_dir, info.cfg.get("lora", {}).get("placement"))
    return peft_model.eval(), load_tokenizer(info.adapter_dir)


# --- fixed inputs and logits -------------------------------------------------------------------------------------
def fixed_inputs(tokenizer, canvas_length: int) -> dict:
    """Two prompts and a fixed canvas each (at most 32 tokens, so the saved logits stay small at 262k vocab)."""
    import torch

    n = min(canvas_length, 32)
    out = {}
    for i, text in enumerate(VERIFY_TEXTS):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        other = tokenizer(VERIFY_TEXTS[1 - i] * 8, add_special_tokens=False)["input_ids"][:n]
        out[f"ids_{i}"] = ids.to(torch.long).contiguous()
        out[f"canvas_{i}"] = torch.tensor([other], dtype=torch.long)
    return out


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


# The check runs in a fresh interpreter with stock classes only: what a user (or vLLM's loader) gets from the
# files on disk, not what this process happens to hold in memory.
_RELOAD = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import DiffusionGemmaForBlockDiffusion
a = json.loads(sys.argv[1])
kwargs = {"dtype": getattr(torch, a["dtype"])}
if a["device"] == "cuda":
    kwargs["device_map"] = {"": 0}
model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(a["model"], output_loading_info=True, **kwargs)
bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
if bad:
    sys.exit("loading " + a["model"] + " is incomplete: " + json.dumps(bad)[:2000])
if a["adapter"]:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, a["adapter"])
model.eval()
inputs = load_file(a["inputs"])
device = next(model.parameters()).device
out = {}
with torch.no_grad():
    for i in range(len(inputs) // 2):
        ids, canvas = inputs[f"ids_{i}"].to(device), inputs[f"canvas_{i}"].to(device)
        logits = model(input_ids=ids, decoder_input_ids=canvas).logits
        out[f"logits_{i}"] = logits.float().cpu()
save_file(out, a["out"])
"""


def reload_logits(model_path: str, adapter: str | None, dtype: str, device: str, inputs: dict, workdir: str) -> dict:
    """Logits of the written export, loaded in a fresh process with stock transformers (and peft)."""
    from safetensors.torch import load_file, save_file

    in_path, out_path = os.path.join(workdir, "inputs.safetensors"), os.path.join(workdir, "logits.safetensors")
    save_file(inputs, in_path)
    args = dict(model=model_path, adapter=adapter, dtype=dtype, device=device, inputs=in_path, out=out_path)
    result = subprocess.run([sys.executable, "-c", _RELOAD, json.dumps(args)], capture_output=True, text=True)
    if result.returncode != 0:
        tail = [line for line in result.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise UserError(f"verification could not reload {adapter or model_path}: {tail[0]}")
    return load_file(out_path)


# --- merging -----------------------------------------------------------------------------------------------------
@dataclass
class MergePlan:
    tensors: dict  # output key -> base tensor (in the model, not copied)
    lora: dict  # output key -> the LoRA module whose delta is folded in
    untied: bool
    note: str  # how the tie was handled, for the log and the model card
    differing: list = field(default_factory=list)


def _lora_modules(base) -> dict:
    """``<weight key> -> LoRA layer`` for every LoRA-wrapped module of the base model."""
    from peft.tuners.lora import Linear, LoraLayer

    found = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module) is not Linear:
            raise UserError(f"{name} carries a {type(module).__name__} LoRA layer: export merges LoRA on linear "
                            "layers only (export format=adapter instead)")
        if any(module.use_dora.get(a) for a in module.active_adapters):
            raise UserError(f"{name} uses DoRA: export merges plain LoRA only (export format=adapter instead)")
        found[name + ".weight"] = module
    return found


def delta_of(module):
    """The module's weight delta (B @ A * scale, summed over active adapters), fp32, on the module's device."""
    import torch

    with torch.no_grad():
        return sum(module.get_delta_weight(a).float() for a in module.active_adapters)


def _base_state(base) -> dict:
    """The base model's state dict under its own names: LoRA wrappers' ``.base_layer.`` dropped, LoRA removed."""
    state = {}
    for key, tensor in base.state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = tensor.detach()
    return state


def merge_plan(peft_model, untie: bool = False) -> MergePlan:
    """What to write, and whether the released (tied) layout can hold it.

    Encoder and decoder text weights are one tensor (the decoder's name is the one saved). The tied layout can hold
    the merge only when every encoder/decoder pair received the same delta (``lora.placement=shared``, or
    ``separate`` that happens to agree); otherwise refuse, or with ``untie`` write every tensor under its own name
    with its own delta and set ``tie_word_embeddings=false``, which transformers reads as "no ties at all".
    Deltas are computed explicitly: peft's merge_and_unload on a decoder-only adapter adds the delta to the shared
    tensor and so silently changes the encoder too.
    """
    base = peft_model.get_base_model()
    state = _base_state(base)
    loras = _lora_modules(base)
    missing = sorted(set(loras) - set(state))
    if missing:
        raise UserError(f"LoRA layers without a base weight in the state dict: {missing[:3]}")
    tied = dict(getattr(base, "all_tied_weights_keys", None) or {})  # tied copy -> the key that is saved
    members: dict[str, list[str]] = {}
    for key in state:
        members.setdefault(tied.get(key, key), []).append(key)

    differing = []
    chosen = {}  # saved key -> LoRA module carrying the (common) delta
    for source, keys in members.items():
        with_lora = [k for k in keys if k in loras]
        if not with_lora:
            continue
        deltas = {k: delta_of(loras[k]) if k in loras else None for k in keys}
        ref_key = source if source in loras else with_lora[0]
        ref = deltas[ref_key]
        scale = float(ref.abs().max())
        for k, d in deltas.items():
            other = float(d.abs().max()) if d is not None else 0.0
            diff = float((d - ref).abs().max()) if d is not None else scale
            if diff > 1e-5 * max(scale, other) + 1e-12:
                differing.append((k, ref_key, diff, max(scale, other)))
        chosen[source] = loras[ref_key]

    if not differing:
        tensors = {k: t for k, t in state.items() if k not in tied}
        note = (f"Encoder and decoder received identical LoRA deltas on all {len(chosen)} adapted tensors, so each "
                "delta was folded once into the tensor they share; the checkpoint keeps the released tied layout.")
        if untie:
            note += " (untie=true was not needed.)"
        return MergePlan(tensors, chosen, untied=False, note=note)

    pairs = sorted({(k, r) for k, r, _, _ in differing})
    example = differing[0]
    explain = (f"encoder and decoder share one tensor per layer in the released checkpoint, but this adapter gives "
               f"them different deltas on {len(pairs)} tensors (e.g. {example[0]} vs {example[1]}: max difference "
               f"{example[2]:.3g}, delta size {example[3]:.3g})")
    if not untie:
        placement = "decoder-only LoRA leaves the encoder on the base weights" if all(
            ".encoder." in k and k not in loras for k, _, _, _ in differing) else "the deltas differ"
        raise UserError(
            f"cannot merge into the tied layout: {explain}; {placement}, and one tensor cannot hold both (peft's "
            "merge_and_unload would leak the decoder delta into the encoder). Train with lora.placement=shared, "
            "export format=adapter (transformers + peft serve it exactly), or pass untie=true to write separate "
            "encoder and decoder weights (about twice the text weights; vLLM cannot serve that)")
    note = (f"UNTIED: {explain}. The checkpoint therefore stores every encoder and decoder tensor (and lm_head) "
            "under its own name, each with its own delta, and sets tie_word_embeddings=false, which makes "
            "transformers load them untied. It is about twice the size of the released checkpoint, and vLLM cannot "
            "serve it: its DiffusionGemma runs one backbone for both passes and maps model.encoder.language_model.* "
            "and model.decoder.* onto the same weights, so one delta would silently overwrite the other.")
    return MergePlan(dict(state), dict(loras), untied=True, note=note, differing=differing)


def _write_shard(tensors: dict, path: str):
    """One shard under a temporary name, then renamed: a shard file that exists is whole."""
    from safetensors.torch import save_file

    partial = path + ".partial"
    save_file(tensors, partial, metadata={"format": "pt"})
    os.replace(partial, path)


def _write_json(obj, path: str):
    with open(path + ".partial", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".partial", path)


def write_merged(plan: MergePlan, directory: str, dtype: str, max_shard_size="5GB") -> dict:
    """Shards of merged weights (one shard in memory at a time), then the index. Returns the index."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    out_dtype = getattr(torch, dtype)

    def target_dtype(t):
        return out_dtype if t.is_floating_point() else t.dtype

    meta = {k: torch.empty(t.shape, dtype=target_dtype(t), device="meta") for k, t in plan.tensors.items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        shard, seen = {}, set()
        for name in names:
            t = plan.tensors[name]
            if name in plan.lora:
                delta = delta_of(plan.lora[name])
                t = (t.float() + delta.to(t.device)).to(out_dtype)
            else:
                t = t.to(target_dtype(t))
            t = t.contiguous().cpu()
            if t.data_ptr() in seen:  # untied copies of one base tensor: safetensors refuses aliases
                t = t.clone()
            seen.add(t.data_ptr())
            shard[name] = t
        _write_shard(shard, os.path.join(directory, filename))
        del shard
    index = None
    if split.is_sharded:
        total = sum(t.numel() for t in meta.values())
        index = {"metadata": {"total_parameters": total, **split.metadata}, "weight_map": split.tensor_to_filename}
        _write_json(index, os.path.join(directory, "model.safetensors.index.json"))
    return index


def merged_config(base, dtype: str, untied: bool):
    import copy

    import torch

    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.dtype = getattr(torch, dtype)
    if untied:
        config.tie_word_embeddings = False  # DiffusionGemmaConfig: False undoes every tie, encoder/decoder included
    return config


# --- staging directories -----------------------------------------------------------------------------------------
class Staged:
    """``<out>.tmp-XXXX`` next to ``out``: renamed into place by ``commit``, removed on any failure."""

    def __init__(self, out: str):
        self.out = out
        self.parent = os.path.dirname(out)
        self.created_parent = not os.path.isdir(self.parent)
        os.makedirs(self.parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=self.parent)
        self.done = False

    def commit(self):
        if os.path.exists(self.out):
            raise UserError(f"{self.out} appeared while exporting: nothing overwritten")
        os.rename(self.path, self.out)
        self.done = True

    def cleanup(self):
        if not self.done:
            shutil.rmtree(self.path, ignore_errors=True)
            if self.created_parent:
                try:
                    os.rmdir(self.parent)
                except OSError:
                    pass


def output_dirs(run_dir: str, settings: ExportSettings) -> dict:
    formats = ["adapter", "merged"] if settings.format == "both" else [settings.format]
    if settings.out is None:
        dirs = {f: os.path.join(run_dir, "export", f) for f in formats}
    elif settings.format == "both":
        dirs = {f: os.path.join(settings.out, f) for f in formats}
    else:
        dirs = {settings.format: settings.out}
    dirs = {f: os.path.abspath(os.path.expanduser(d)) for f, d in dirs.items()}
    for d in dirs.values():
        if os.path.exists(d):
            raise UserError(f"{d} already exists: export never overwrites; remove it or pass out=<another dir>")
    return dirs


# --- model card --------------------------------------------------------------------------------------------------
def vllm_command(path: str, canvas_length: int) -> str:
    return f"vllm serve {path} --diffusion-config '{{\"canvas_length\":{canvas_length}}}' --max-num-seqs 4"


def export_command(run_dir: str, fmt: str) -> str:
    return f"python -m finetune.export run_dir={run_dir} format={fmt}"


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


def model_card(kind: str, info: RunInfo, path: str, verification: dict | None, command: str | None,
               plan_note: str | None = None, dtype: str = "bfloat16", untied: bool = False) -> str:
    cfg, metrics = info.cfg, info.metrics or {}
    lora, train, data, obj = (cfg.get(k, {}) for k in ("lora", "train", "data", "objective"))
    training = metrics.get("training", {})
    run_name = cfg.get("run_name") or os.path.basename(info.run_dir)
    title = "LoRA adapter" if kind == "adapter" else "merged weights (LoRA folded in)"
    parts = [_front_matter(info.base_model, "peft" if kind == "adapter" else "transformers"),
             f"# {run_name}: DiffusionGemma {title}\n",
             f"Fine-tuned with the finetune toolkit; run directory `{info.run_dir}`.\n",
             "## Base model\n", f"`{info.base_model}` (`DiffusionGemmaForBlockDiffusion`, canvas length "
             f"{info.canvas_length}).\n"]
    parts += ["## Recipe\n",
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
    if plan_note:
        parts += ["### Encoder/decoder tie\n", plan_note + "\n"]
    parts += ["## Evaluation\n", _eval_table(metrics)]
    if verification:
        parts += ["## Export verification\n",
                  f"Reloaded from these files in a fresh process ({verification['loader']}) and compared with the "
                  f"in-memory fine-tuned model on fixed inputs: max |logit difference| "
                  f"{verification['max_abs_diff']:.3g} (tolerance {verification['tolerance']:.3g}, "
                  f"{verification['precision']}); the adapter itself moves those logits by up to "
                  f"{verification['adapter_effect']:.3g} from the base."
                  + (f" Casting the fine-tuned model to {verification['precision']} alone moves them by "
                     f"{verification['cast_cost']:.3g}." if verification.get("cast_cost") is not None else "")
                  + "\n"]
    else:
        parts += ["## Export verification\n", "Not verified (exported with verify=false).\n"]
    parts += ["## How it was made\n", "```bash\n" + (command or "(command not recorded)") + "\n```\n"]
    parts += ["## Use it\n", "With transformers" + (" and peft" if kind == "adapter" else "") + ":\n",
              "```python\n" + usage_snippet(kind, path, info.base_model, dtype if kind == "merged" else "bfloat16")
              + "```\n"]
    if kind == "adapter":
        parts.append("vLLM cannot load LoRA adapters for DiffusionGemma: serve the merged export "
                     f"(`{export_command(info.run_dir, 'merged')}`).\n")
    elif untied:
        parts.append("Do not serve this checkpoint with vLLM: it is untied (see above) and vLLM would load one "
                     "backbone for both passes. transformers loads it as shown.\n")
    else:
        parts += ["With vLLM (>= 0.24), which reads this layout and these key names as it reads the released "
                  "checkpoint's:\n",
                  "```bash\n" + vllm_command(path, info.canvas_length) + "\n```\n"]
    return "\n".join(parts)


# --- the export --------------------------------------------------------------------------------------------------
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


def _check(name: str, got: dict, reference: dict, precision: str, loader: str, cast_cost: float | None = None):
    """Fail unless the reloaded logits match the fine-tuned model's and keep the adapter's effect.

    ``cast_cost``: how far casting the fine-tuned model to the export's precision moves its logits by itself.
    Rounding may cost up to 1.5x that; the check then asks only that the rest stays a small part of the effect.
    """
    allowance = 1.5 * cast_cost if cast_cost is not None else 0.0
    tol = max(TOLERANCE[precision], allowance)
    diff = max_abs_diff(got, reference["finetuned"])
    effect = max_abs_diff(reference["base"], reference["finetuned"])
    result = dict(max_abs_diff=diff, adapter_effect=effect, tolerance=tol, precision=precision, loader=loader,
                  cast_cost=cast_cost)
    if diff > tol:
        raise UserError(f"{name} export failed verification: reloaded logits differ from the fine-tuned model by "
                        f"{diff:.3g} (tolerance {tol:.3g} in {precision}; the adapter's own effect is {effect:.3g}); "
                        "nothing was written")
    if diff - allowance > MAX_EFFECT_LOST * effect:
        raise UserError(f"{name} export failed verification: reloaded logits differ from the fine-tuned model by "
                        f"{diff:.3g}, {(diff - allowance) / effect:.0%} of the adapter's own effect ({effect:.3g}) "
                        f"beyond what {precision} rounding explains: the delta is partly lost or misplaced; "
                        "nothing was written")
    return result


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def export_run(run_dir: str, settings: ExportSettings, model=None, tokenizer=None, command: str | None = None,
               device: str | None = None, log=print) -> dict:
    """Write the exports ``settings.format`` asks for; returns ``{format: {"path": ..., "verification": ...}}``.

    ``model`` is the in-memory fine-tuned PeftModel (the end of a training run); without it the run's adapter is
    loaded onto its base. Nothing appears at an export's final path unless all of it was written and verified.
    """
    settings.validate()
    info = read_run(run_dir)
    outs = output_dirs(info.run_dir, settings)
    from finetune.model import resolve_device

    device = device or resolve_device(settings.device, key="device")
    owned = model is None
    if owned:
        log(f"export: loading {info.base_model} with the adapter of {info.run_dir}")
        model, tokenizer = load_finetuned(info, device)
    elif tokenizer is None:
        from finetune.model import load_tokenizer

        tokenizer = load_tokenizer(info.adapter_dir)
    model.eval()
    base = model.get_base_model()
    info.canvas_length = base.config.canvas_length
    ref_dtype = _dtype_name(base.dtype)

    plan = merge_plan(model, settings.untie) if "merged" in outs else None  # refuses before anything is written
    inputs = fixed_inputs(tokenizer, info.canvas_length)
    reference = reference_logits(model, inputs)
    merged_precision = max(ref_dtype, settings.dtype, key=TOLERANCE.get)  # judged at the coarser precision
    cast_cost = None
    if plan is not None and ref_dtype == "float32" and settings.dtype != "float32":
        cast = reference_logits(model, inputs, settings.dtype)  # a copy: small models only train in float32
        cast_cost = max_abs_diff(cast["finetuned"], reference["finetuned"])
        log(f"export: casting the fine-tuned model to {settings.dtype} moves its logits by {cast_cost:.3g}")

    results = {}
    with ExitStack() as stack:
        staged = {}
        for fmt, out in outs.items():
            staged[fmt] = Staged(out)
            stack.callback(staged[fmt].cleanup)
        if "adapter" in staged:
            for name in os.listdir(info.adapter_dir):
                if name != "README.md" and os.path.isfile(os.path.join(info.adapter_dir, name)):
                    shutil.copy2(os.path.join(info.adapter_dir, name), staged["adapter"].path)
        if plan is not None:
            path = staged["merged"].path
            log(f"export: writing merged {settings.dtype} weights ({'untied' if plan.untied else 'tied'} layout)")
            write_merged(plan, path, settings.dtype, settings.max_shard_size)
            tokenizer.save_pretrained(path)
            if os.path.isfile(os.path.join(info.adapter_dir, "generation_config.json")):
                shutil.copy2(os.path.join(info.adapter_dir, "generation_config.json"), path)
            else:
                base.generation_config.save_pretrained(path)
            merged_config(base, settings.dtype, plan.untied).save_pretrained(path)  # last: no config, no model
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
                        got = reload_logits(info.base_model, stage.path, ref_dtype, device, inputs, work)
                        verification = _check("adapter", got, reference, ref_dtype,
                                              "transformers + stock peft PeftModel.from_pretrained")
                    else:
                        got = reload_logits(stage.path, None, settings.dtype, device, inputs, work)
                        verification = _check("merged", got, reference, merged_precision,
                                              "DiffusionGemmaForBlockDiffusion.from_pretrained", cast_cost)
                    v = verification
                    log(f"export: {fmt} reloads to max |logit diff| {v['max_abs_diff']:.3g} (tolerance "
                        f"{v['tolerance']:.3g}; adapter effect {v['adapter_effect']:.3g})")
                card = model_card(fmt, info, stage.out, verification, command,
                                  merge_note if fmt == "merged" else None, settings.dtype,
                                  untied=fmt == "merged" and merge_untied)
                with open(os.path.join(stage.path, "README.md"), "w") as f:
                    f.write(card)
                results[fmt] = {"path": stage.out, "verification": verification}
        for stage in staged.values():
            stage.commit()
    for fmt, r in results.items():
        log(f"export: {fmt} -> {r['path']}")
    if settings.push_to_hub:
        _push(results, settings.push_to_hub)
    return results


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


def export_at_end_of_run(run_dir: str, cfg, peft_model, tokenizer, device: str) -> dict | None:
    """The run's ``export`` config group: the same export as the CLI, from the model still in memory."""
    from omegaconf import OmegaConf

    settings = ExportSettings(**OmegaConf.to_container(cfg.export)).validate(allow_none=True)
    if settings.format == "none":
        return None
    command = "python -m finetune " + shlex.join(sys.argv[1:])
    try:
        return export_run(run_dir, settings, peft_model, tokenizer, command=command, device=device)
    except UserError as e:
        raise UserError(f"{e} (the run itself is complete: adapter and metrics are in {run_dir}; export again with "
                        f"python -m finetune.export run_dir={run_dir} ...)") from None


if __name__ == "__main__":
    sys.exit(main())
