"""Load the base model, tokenizer and a saved adapter (`load`: the one loader every command uses); attach LoRA.

The built-in tiny base is a path like any other here: `finetune.pretrain` builds it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from finetune.config import QUANTIZATIONS, LoraSettings, is_local_model
from finetune.errors import UserError

log = logging.getLogger(__name__)

# Module-name regexes for the text stack. Plain names like "q_proj" would also hit the vision tower's clippable
# linears (which peft cannot wrap) and the self-conditioning MLP; anchoring on `layers.N.` avoids both.
TARGET_PRESETS = {
    "attn_mlp": r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",  # what every public recipe adapts
    "attn": r"self_attn\.(q|k|v|o)_proj",
    "mlp": r"mlp\.(gate|up|down)_proj",
    "attn_mlp_experts": r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",  # + the experts' parameters
    "experts": None,  # the experts' parameters only (finetune.expert_lora)
}
STACK_PREFIXES = {"encoder": "model.encoder.language_model.layers.", "decoder": "model.decoder.layers."}
STACKS = {
    "encoder": r"model\.encoder\.language_model\.layers\.\d+\.",
    "decoder": r"model\.decoder\.layers\.\d+\.",
}
ENCODER_LAYERS, DECODER_LAYERS = ".encoder.language_model.layers.", ".decoder.layers."


def resolve_device(name: str, key: str = "hardware.device") -> str:
    """auto | cpu | cuda -> the device to use; asking for cuda without one is the user's error, named by ``key``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}=cuda but no CUDA device is visible: use {key}=cpu (or auto), or check the driver")
    return name


def dtype_for(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise UserError(f"model.dtype={name!r}: use auto, float32, bfloat16 or float16") from None


def resolve_model_path(name: str, revision: str | None = None) -> str:
    """A hub id (``org/name``) passes through; anything that looks like a path must exist (and takes no revision)."""
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise UserError(f"model.name_or_path={name!r} exists but holds no config.json: point it at a saved model")
        _refuse_local_revision(expanded, revision)
        return expanded
    if is_local_model(name):
        raise UserError(
            f"model.name_or_path={name!r} does not exist: give a local directory saved with save_pretrained, "
            "a hub id such as google/diffusiongemma-26B-A4B-it, or 'tiny' for the built-in model"
        )
    return name


def _refuse_local_revision(path: str, revision: str | None) -> None:
    if revision is not None and os.path.isdir(path):
        raise UserError(f"model.revision={revision!r} is set but {path} is a local directory: a revision pins a hub id "
                        "(transformers would silently ignore it here) and a run records the directory by a hash of "
                        "its config and index instead; drop model.revision (or set it to null)")


def local_identity(path: str) -> str:
    """What a hub commit is to a hub id, for a local base directory: ``sha256:`` + 16 hex digits over its
    config.json and safetensors index (a single-file checkpoint: that file's header, i.e. every tensor's name, dtype,
    shape and offset), so a run, its checkpoints and its adapter name the files they were trained on, and a resume
    can tell that the directory changed since. Hashing the weights themselves would read 52 GB."""
    import hashlib
    import struct

    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")) and os.path.isfile(single):
        with open(single, "rb") as f:
            header = f.read(8)
            digest.update(header + f.read(struct.unpack("<Q", header)[0]) if len(header) == 8 else header)
    return "sha256:" + digest.hexdigest()[:16]


def pin_revision(path: str, revision: str | None = None):
    """A hub id's revision (branch, tag, commit; None: the default branch) resolved once to the commit it points to
    now (huggingface_hub's ResolvedRevision: a str equal to what was asked, ``.resolved`` the hash; offline, from the
    cache's refs/), so the config, tokenizer and weights of one load all come from that commit and ``base_commit``
    can name it. A local directory gives None; with a revision it is refused."""
    _refuse_local_revision(path, revision)
    if os.path.isdir(path):
        return None
    if hasattr(revision, "resolved"):  # pinned already (load pins once, then hands it to load_model)
        return revision
    from transformers.utils.hub import resolve_revision

    return resolve_revision(path, revision)  # fails open: the load itself then says what is missing


def _commit_of(revision) -> str | None:
    commit = getattr(revision, "resolved", revision)
    return commit if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def base_commit(model) -> str | None:
    """The hub commit the base's files were loaded from (set by `load_model`); None for a local directory."""
    return getattr(base_of(model).config, "_commit_hash", None)


def base_identity(model) -> str | None:
    """A local base directory's `local_identity` (set by `load_model`); None for a hub id (its commit says it)."""
    return getattr(base_of(model), "local_identity", None)


def _refuse_remote_code(path: str, revision, trust_remote_code: bool, filename: str) -> None:
    """DiffusionGemma is native in transformers: a config or tokenizer that maps itself to its own Python classes
    (``auto_map``) asks to run code from the checkpoint. transformers runs it only with trust_remote_code and otherwise
    quietly falls back to a built-in class, which may not be what the files were saved for: refuse instead."""
    if trust_remote_code:
        return
    from transformers.utils.hub import cached_file

    try:
        found = cached_file(path, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False, _raise_exceptions_for_gated_repo=False)
        if found is None:
            return
        with open(found) as f:
            auto_map = json.load(f).get("auto_map")
    except (OSError, ValueError):
        return  # unreadable or absent: from_pretrained reports it with its own reason
    if auto_map:
        raise UserError(f"{path} asks to run its own code ({filename} maps {', '.join(auto_map)} to classes shipped "
                        "with the checkpoint), which only model.trust_remote_code=true allows: DiffusionGemma needs "
                        "none, so use files saved by stock transformers, or read that code and set "
                        "model.trust_remote_code=true")


def _remote_code_error(path: str, e: Exception) -> UserError:
    if "trust_remote_code" in str(e):
        return UserError(f"{path} needs code shipped with the checkpoint, which only model.trust_remote_code=true "
                         "allows: use files saved by stock transformers, or read that code and set it")
    return UserError(f"could not read the config of {path!r}: {str(e).splitlines()[0]}")


def check_architecture(path: str, revision=None, trust_remote_code: bool = False):
    """Refuse a checkpoint of another architecture before its weights load (they would fail deep inside
    from_pretrained, or load into the wrong shapes); returns its config."""
    from transformers import AutoConfig, DiffusionGemmaConfig

    _refuse_local_revision(path, revision)
    _refuse_remote_code(path, revision, trust_remote_code, "config.json")
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _remote_code_error(path, e) from None
    if config.model_type != DiffusionGemmaConfig.model_type:
        raise UserError(f"{path} is a {config.model_type!r} checkpoint, not DiffusionGemma "
                        f"({DiffusionGemmaConfig.model_type!r}): give a DiffusionGemma base (or an adapter trained "
                        "on one)")
    return config


def experts_for(requested: str, device: str) -> str:
    """``auto``: the fastest implementation of the frozen experts for LoRA training on the device, measured by
    bench/experts.py (forward + backward to the tokens): eager on CPU (grouped_mm 1.2x and batched_mm 80x slower
    there, bench/RESULTS.md), grouped_mm on CUDA (one kernel for all experts; transformers' own default there, to be
    confirmed on a lent GPU with bench/train_step.py --experts)."""
    if requested != "auto":
        return requested
    return "grouped_mm" if device == "cuda" else "eager"


def weights_note(quantization: str, quant_type: str, dtype) -> str:
    """Which weights a model runs on, for reports: the evaluation states whether it ran on a quantised base."""
    dtype = str(dtype).replace("torch.", "")
    if quantization == "none":
        return f"{dtype} (as loaded)"
    what = "experts" if quantization == "experts4bit" else "experts and dense text linears"
    return f"{what} in 4-bit {quant_type.upper()} (model.quantization={quantization}), the rest {dtype}"


def base_of(model):
    """The DiffusionGemma model itself, whether or not PEFT wraps it."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_layers(model) -> list:
    """Every text layer the step runs: the encoder's, then the decoder's (weight-tied twins, separate modules)."""
    base = base_of(model)
    return [*base.model.encoder.language_model.layers, *base.model.decoder.layers]


PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _refuse_pickled(path: str) -> None:
    """Weights load only through safetensors: unpickling a .bin can run code. A local base that has only pickles is
    refused with the way to convert it once (transformers reads them with weights_only and writes safetensors)."""
    if not os.path.isdir(path) or any(os.path.isfile(os.path.join(path, n)) for n in SAFE_WEIGHTS):
        return
    pickled = [n for n in PICKLED_WEIGHTS if os.path.isfile(os.path.join(path, n))]
    if pickled:
        raise UserError(
            f"{path} holds only pickled weights ({pickled[0]}), which this toolkit does not load (unpickling can run "
            "code): convert them once to safetensors, if you trust their source: python -c \"from transformers import "
            f"AutoTokenizer, DiffusionGemmaForBlockDiffusion as M; p, o = '{path}', '{path}-safetensors'; "
            "M.from_pretrained(p).save_pretrained(o); AutoTokenizer.from_pretrained(p).save_pretrained(o)\" "
            "and point model.name_or_path at the -safetensors directory")


def check_quantization(quantization: str) -> None:
    """model.quantization is known and, when it quantises, bitsandbytes is installed (before anything loads)."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"model.quantization={quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.quantization={quantization} needs bitsandbytes: pip install -e \".[quant]\"")


def load_model(path: str, dtype: torch.dtype, device: str, quantization: str = "none", attn: str = "sdpa",
               experts: str = "auto", revision=None, trust_remote_code: bool = False, quant_type: str = "nf4"):
    """The base's weights, from safetensors only; a hub id at ``revision`` (pinned to one commit: `pin_revision`).
    ``trust_remote_code`` reaches transformers only so that a repository's custom generate code stays off unless
    the config allows it; the model class itself is native. ``quantization`` (experts4bit | all4bit) quantises as
    the weights stream in (finetune.quantized_load), so the bf16 model is never in memory at once."""
    check_quantization(quantization)
    revision = pin_revision(path, revision)
    _refuse_pickled(path)
    kwargs = dict(dtype=dtype, attn_implementation=attn, experts_implementation=experts_for(experts, device),
                  use_safetensors=True, revision=revision, trust_remote_code=trust_remote_code)
    from finetune.quantized_load import quantization_config, streamed

    # Every tensor read into memory of its own, not through transformers' memory maps, whose pages stay resident
    # for the whole load: loading the rehearsal's 4.9 GB bf16 checkpoint as float32 peaked at 15.4 GB (the whole
    # file mapped beside the 9.8 GB of float32 weights) where one tensor in flight costs 1 GB (finetune.plan counts
    # it); on a Spark's unified memory those pages are the GPU's too.
    reading = streamed()
    if quantization != "none":  # each expert tensor quantised as it is read: the bf16 model never exists at once
        kwargs["quantization_config"] = quantization_config(quant_type)
    if device == "cuda":
        kwargs["device_map"] = {"": 0}
    try:
        with reading:
            model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, **kwargs)
    except OSError as e:
        if "named model.safetensors" in str(e):  # a hub repo (a local one is refused above) without safetensors
            at = f" at revision {revision}" if revision is not None else ""
            raise UserError(f"{path}{at} has no safetensors weights (model.safetensors), and this toolkit does not "
                            "load pickled .bin weights (unpickling can run code): pick a revision that has them, or "
                            f"download it (hf download {path} --local-dir DIR) and give "
                            "model.name_or_path=DIR to be shown the one-line conversion") from None
        raise UserError(f"could not load model {path!r}: {str(e).splitlines()[0]}") from None
    if quantization == "all4bit":  # the dense linears are 3.3 of the 26B's 52 GB: quantised once loaded
        from finetune.quantize import quantize_dense

        quantize_dense(model, quant_type)
    model.config._commit_hash = _commit_of(revision)  # not written by save_pretrained (transformers drops the key)
    model.local_identity = local_identity(path) if os.path.isdir(path) else None  # on the model: a config would save it
    return model


def load_tokenizer(path: str, revision=None, trust_remote_code: bool = False):
    _refuse_local_revision(path, revision)
    _refuse_remote_code(path, revision, trust_remote_code, "tokenizer_config.json")
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise _remote_code_error(path, e) from None
    except OSError as e:
        raise UserError(f"could not load the tokenizer of {path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _stacks(settings: LoraSettings) -> list[str]:
    return ["decoder"] if settings.placement == "decoder" else ["encoder", "decoder"]


def target_regex(settings: LoraSettings) -> str | None:
    """The linears LoRA wraps, as a regex over module names (None: no linear, for lora.targets=experts)."""
    preset = TARGET_PRESETS[settings.targets]
    if preset is None:
        return None
    return "(" + "|".join(STACKS[s] for s in _stacks(settings)) + ")" + preset


def lora_config(model, settings: LoraSettings) -> LoraConfig:
    """peft's config for ``settings`` on ``model``: the linears by regex, the experts (lora.targets=*experts) by
    their parameters' full names, each expert at lora.expert_r."""
    from finetune import expert_lora

    extra = {}
    if settings.on_experts:
        extra["target_parameters"] = expert_lora.expert_parameter_names(model, [STACK_PREFIXES[s]
                                                                                for s in _stacks(settings)])
        if settings.expert_r is not None:
            extra["rank_pattern"] = {r"experts\.(gate_up|down)_proj": settings.expert_r}
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=target_regex(settings), bias="none", **extra)


@contextlib.contextmanager
def _rank_pattern_applies():
    """peft checks rank_pattern against the modules it wrapped, not the parameters: lora.expert_r is applied
    (tests/finetune/test_expert_lora.py checks the ranks), but peft would warn that it matched nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The following rank_pattern keys did not match", RuntimeWarning)
        yield


def attach_lora(model, settings: LoraSettings) -> PeftModel:
    """Wrap the text stack's linears with LoRA (and, with lora.targets=*experts, each routed expert's fused gate/up
    and down projections: finetune.expert_lora); the router, embeddings and head stay frozen."""
    from finetune import expert_lora

    if settings.on_experts:
        from finetune.quantize import expose_expert_shapes

        expose_expert_shapes(model)  # 4-bit experts: peft reads their shapes from stand-in Parameters
    config = lora_config(model, settings)
    # the base's hub commit goes into adapter_config.json as peft's own `revision`: stock loaders and our eval and
    # export load the base the adapter was trained on, not whatever the branch holds by then. A local base records
    # its identity there (`local_identity`): transformers ignores a revision for a local directory, and our loads
    # compare it with the directory's (`load`)
    with _rank_pattern_applies():
        peft_model = get_peft_model(model, config, revision=base_commit(model) or base_identity(model))
    if settings.placement == "shared":
        tie_encoder_lora(peft_model)
    expert_lora.install(peft_model)
    return peft_model


def tie_encoder_lora(peft_model) -> int:
    """Make each encoder LoRA layer use its decoder twin's A/B matrices.

    The base model runs one weight-tied stack twice (encoder, then decoder). Sharing the LoRA matrices keeps that
    tie: training updates one delta, both passes use it, and a merge folds one delta into the one shared tensor.
    Saved adapters still carry both names, with equal values, so stock ``PeftModel.from_pretrained`` rebuilds the
    same function.
    """
    from peft.tuners.lora import LoraLayer

    modules = dict(peft_model.named_modules())
    tied = 0
    for name, module in modules.items():
        if not isinstance(module, LoraLayer) or ENCODER_LAYERS not in name:
            continue
        twin = modules.get(name.replace(ENCODER_LAYERS, DECODER_LAYERS))
        if not isinstance(twin, LoraLayer):
            raise RuntimeError(f"encoder LoRA layer {name} has no decoder twin")
        for key in module.lora_A:
            module.lora_A[key] = twin.lora_A[key]
            module.lora_B[key] = twin.lora_B[key]
            module.lora_dropout[key] = twin.lora_dropout[key]
        tied += 1
    if tied == 0:
        raise RuntimeError("lora.placement=shared found no encoder LoRA layers to tie")
    return tied


def adapter_base(adapter: str) -> str:
    """The base model a saved PEFT adapter belongs to, from its adapter_config.json (ours, or any stock peft one)."""
    config_path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isdir(adapter):
        raise UserError(f"adapter={adapter!r} does not exist: give a PEFT adapter directory, e.g. "
                        "outputs/<run>/adapter")
    if not os.path.isfile(config_path):
        raise UserError(f"adapter={adapter!r} holds no adapter_config.json: point it at a PEFT adapter directory")
    try:
        with open(config_path) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {config_path}: {e}") from None
    if not base:
        raise UserError(f"{config_path} names no base_model_name_or_path: cannot tell which base to load")
    if os.path.isabs(base) and not os.path.exists(base):
        raise UserError(f"the adapter's base model {base} (adapter_config.json) no longer exists: rebuild it (the "
                        "tiny base: run python -m finetune with the same FINETUNE_CACHE) or edit that path")
    return base


def adapter_revision(adapter: str, name_or_path: str | None = None, revision: str | None = None) -> str | None:
    """The revision an adapter's hub base loads at: the commit its adapter_config.json records (peft's `revision`,
    written by `attach_lora`: the base it was trained on), else ``revision`` (model.revision) when that base is
    ``name_or_path``. None for a base in a local directory."""
    base = adapter_base(adapter)
    if os.path.isdir(os.path.expanduser(base)):
        return None
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        recorded = json.load(f).get("revision")
    return recorded or (revision if base == name_or_path else None)


def _adapter_weights(adapter: str) -> dict:
    from safetensors.torch import load_file

    path = os.path.join(adapter, "adapter_model.safetensors")
    if os.path.isfile(path):
        return load_file(path)
    legacy = os.path.join(adapter, "adapter_model.bin")
    if os.path.isfile(legacy):  # peft would unpickle it: refused like a pickled base
        raise UserError(f"adapter={adapter!r} holds only pickled weights (adapter_model.bin), which this toolkit does "
                        "not load (unpickling can run code): convert them once, if you trust their source: python -c "
                        "\"import torch; from safetensors.torch import save_file; "
                        f"save_file(torch.load('{legacy}', weights_only=True), "
                        f"'{os.path.join(adapter, 'adapter_model.safetensors')}')\"")
    raise UserError(f"adapter={adapter!r} holds no adapter_model.safetensors: point it at a saved PEFT adapter")


def adapter_placement(adapter: str) -> str:
    """Where a saved adapter's LoRA sits, read from its weights: ``shared`` (encoder and decoder modules with equal
    values: ours, or any adapter whose two sides agree), ``separate`` (both, differing: e.g. Unsloth's
    DiffusionTrainer), ``decoder`` or ``encoder`` (one side only: e.g. a denoiser-only adapter)."""
    weights = _adapter_weights(adapter)
    enc = {k: v for k, v in weights.items() if ENCODER_LAYERS in k}
    dec = {k: v for k, v in weights.items() if DECODER_LAYERS in k}
    if enc and not dec:
        return "encoder"
    if dec and not enc:
        return "decoder"
    if not enc:
        raise UserError(f"adapter={adapter!r} adapts no DiffusionGemma text layer (no model.decoder.layers.* or "
                        "model.encoder.language_model.layers.* weights): is it an adapter for this model?")
    twins = {k.replace(ENCODER_LAYERS, DECODER_LAYERS): v for k, v in enc.items()}
    same = twins.keys() == dec.keys() and all(torch.equal(v, dec[k]) for k, v in twins.items())
    return "shared" if same else "separate"


def tokenizer_for(path: str, adapter: str | None = None, revision=None, trust_remote_code: bool = False):
    """The adapter's tokenizer when it carries one (ours do), else the base's (at ``revision``)."""
    if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")):
        return load_tokenizer(adapter, trust_remote_code=trust_remote_code)
    return load_tokenizer(path, revision, trust_remote_code)


def load(path: str, device: str, dtype: str = "auto", adapter: str | None = None, quantization: str = "none",
         attn: str = "sdpa", experts: str = "auto", revision: str | None = None, trust_remote_code: bool = False,
         quant_type: str = "nf4"):
    """The one way to load a base model, optionally with a saved adapter, and the tokenizer that goes with them.

    Every command uses it: training (no adapter), evaluation, export, the lm-eval model. ``path`` is a resolved
    base (a local directory or a hub id). The tokenizer is the adapter's when it carries one (ours do), else the
    base's. An adapter whose encoder and decoder LoRA are equal is re-tied (one set of matrices for both passes,
    as `lora.placement=shared` trains it), which changes nothing in its outputs.
    A hub id loads at ``revision`` (model.revision; None: the default branch), resolved once so that every file
    comes from one commit, which `base_commit(model)` names. Weights load only from safetensors; code shipped with
    a checkpoint runs only with ``trust_remote_code`` (model.trust_remote_code).
    Returns (model, tokenizer, placement): placement is None without an adapter.
    """
    revision = pin_revision(path, revision)
    check_architecture(path, revision, trust_remote_code)  # a wrong base or adapter fails before 52 GB load
    placement = adapter_placement(adapter) if adapter else None
    tokenizer = tokenizer_for(path, adapter, revision, trust_remote_code)
    model = load_model(path, dtype_for(dtype, device), device, quantization, attn, experts, revision,
                       trust_remote_code, quant_type)
    if adapter:
        _warn_if_base_changed(path, adapter)
        from finetune import expert_lora

        if _targets_parameters(adapter):
            from finetune.quantize import expose_expert_shapes

            expose_expert_shapes(model)
        with _rank_pattern_applies():
            model = PeftModel.from_pretrained(model, adapter)
        if placement == "shared":
            tie_encoder_lora(model)
        expert_lora.install(model)
    return model, tokenizer, placement


def _targets_parameters(adapter: str) -> bool:
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        return bool(json.load(f).get("target_parameters"))


def _warn_if_base_changed(path: str, adapter: str) -> None:
    """An adapter trained on a local base records that directory's `local_identity`; a base that hashes otherwise
    now (other config, other index: other files) may not be the model the adapter learnt on. Said, not refused:
    the user may mean another copy of it."""
    if not os.path.isdir(path):
        return
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        recorded = json.load(f).get("revision")
    if isinstance(recorded, str) and recorded.startswith("sha256:") and recorded != local_identity(path):
        log.warning(f"warning: {adapter} was trained on a base whose config and index hashed {recorded}; {path} now "
                    f"hashes {local_identity(path)}: it may not hold the weights the adapter learnt on")


def count_parameters(model) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def router_parameters(model):
    return [(n, p) for n, p in model.named_parameters() if re.search(r"\.router\.", n)]
