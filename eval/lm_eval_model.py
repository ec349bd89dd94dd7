"""lm-evaluation-harness model `diffusiongemma`: a DiffusionGemma base plus an optional LoRA adapter, answering the
harness's `generate_until` tasks with transformers' own `generate()` (through `eval.generation.generate`).

    python -m eval.harness --model diffusiongemma --model_args adapter=outputs/<run>/adapter \\
        --tasks gsm8k --apply_chat_template --batch_size 4

Importing this module registers the model with the harness; `python -m eval.harness` is the harness's own command
line with that import done first. Needs the optional extra: pip install -e ".[lm-eval]".
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from eval.generation import GenerationSettings, generate

log = logging.getLogger(__name__)

NO_LIKELIHOOD = (
    "{} is not supported for DiffusionGemma: a block-diffusion model denoises whole canvases and has no "
    "left-to-right token likelihood to score a continuation with. Use tasks whose output_type is "
    "generate_until (e.g. gsm8k, not hellaswag or arc)."
)


SAMPLER_KEYS = tuple(f.name for f in fields(GenerationSettings) if f.name not in ("max_new_tokens", "batch_size"))


def sampler_settings(given: dict, batch_size=None) -> GenerationSettings:
    """The sampler from ``--model_args``: what is given, cast to the schema's types; the rest are the schema's
    defaults (finetune.config.GenerationSettings, the same as python -m eval). Unknown keys (the harness's
    temperature, do_sample, ...) are ignored: they mean nothing to this sampler."""
    values = {}
    for f in fields(GenerationSettings):
        if f.name in SAMPLER_KEYS and given.get(f.name) is not None:
            values[f.name] = (float if "float" in str(f.type) else int)(given[f.name])
    ignored = sorted(k for k, v in given.items() if k not in SAMPLER_KEYS and v is not None)
    if ignored:
        log.info("diffusiongemma ignores %s (not settings of its sampler)", ", ".join(ignored))
    try:  # the harness may pass "auto" or None
        values["batch_size"] = int(batch_size)
    except (TypeError, ValueError):
        pass
    return GenerationSettings(**values)


@register_model("diffusiongemma", "diffusion-gemma")
class DiffusionGemmaLM(LM):
    """``pretrained``: base model (hub id or directory; default: the adapter's base). ``adapter``: PEFT adapter
    directory (any saved PEFT adapter for DiffusionGemma; loaded by `finetune.model.load`). ``revision``: the hub
    base's branch, tag or commit (default: the commit the adapter records, else the default branch);
    ``trust_remote_code`` (the harness's --trust_remote_code) lets a checkpoint's own code run. Sampler settings
    (``max_denoising_steps``, ``entropy_bound``, ``t_max``, ``t_min``, ``seed``, ...) default to
    `finetune.config.GenerationSettings`, as in python -m eval; the harness's ``temperature``/``do_sample`` have no
    meaning for this sampler and are ignored.
    ``model``/``tokenizer`` take already-built objects (from Python)."""

    def __init__(self, pretrained: str | None = None, adapter: str | None = None, model=None, tokenizer=None,
                 batch_size=None, max_batch_size=None, device: str | None = None, dtype: str = "auto",
                 max_gen_toks: int = 256, revision: str | None = None, trust_remote_code=False, **settings):
        super().__init__()
        if model is None:
            trust = str(trust_remote_code).lower() in ("true", "1")  # model_args arrive as strings
            model, tokenizer = self._load(pretrained, adapter, device, dtype, revision, trust)
        elif tokenizer is None:
            raise ValueError("DiffusionGemmaLM(model=...) needs tokenizer= too")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.settings = sampler_settings(settings, batch_size)
        self.max_gen_toks = int(max_gen_toks)  # the harness's limit for requests that name none
        self._device = next(model.parameters()).device

    @staticmethod
    def _load(pretrained, adapter, device, dtype, revision=None, trust_remote_code=False):
        import torch

        from finetune.model import adapter_base, adapter_revision, load, resolve_model_path

        if pretrained is None and adapter is None:
            raise ValueError("diffusiongemma needs model_args pretrained=<base> and/or adapter=<adapter dir>")
        device = "cuda" if str(device or "cuda").startswith("cuda") else str(device)
        if device == "cuda" and not torch.cuda.is_available():  # the harness passes --device cuda by default
            log.warning("no CUDA device visible: running diffusiongemma on the CPU")
            device = "cpu"
        if revision is None and adapter is not None and pretrained in (None, adapter_base(adapter)):
            revision = adapter_revision(adapter)  # the commit the adapter was trained on, if it records one
        path = resolve_model_path(pretrained if pretrained is not None else adapter_base(adapter), revision)
        model, tokenizer, _ = load(path, device, dtype, adapter=adapter, revision=revision,
                                   trust_remote_code=trust_remote_code)
        return model, tokenizer

    # --- what the harness calls --------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's ``args`` is ``(context, gen_kwargs)``; gen_kwargs carries ``until`` (stop strings) and
        ``max_gen_toks``. Requests with equal length limits are generated together in batches."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            _, gen_kwargs = request.args
            groups.setdefault(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), []).append(i)
        for max_tokens, indices in groups.items():
            settings = replace(self.settings, max_new_tokens=max_tokens)
            prompts = [self._with_bos(requests[i].args[0]) for i in indices]
            gens = generate(self.model, self.tokenizer, prompts, settings, desc="lm-eval generate_until")
            for i, g in zip(indices, gens):
                answers[i] = self._until(g.text, requests[i].args[1].get("until"))
                self.cache_hook.add_partial("generate_until", requests[i].args, answers[i])
        return answers

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(NO_LIKELIHOOD.format("loglikelihood"))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(NO_LIKELIHOOD.format("loglikelihood_rolling"))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    # --- helpers ----------------------------------------------------------------------------------------------------
    def _with_bos(self, context: str) -> str:
        """Plain (non-chat) contexts get the BOS token that a chat-templated one starts with."""
        bos = self.tokenizer.bos_token
        return context if not bos or context.startswith(bos) else bos + context

    @staticmethod
    def _until(text: str, until) -> str:
        stops = [until] if isinstance(until, str) else list(until or [])
        for stop in stops:
            if stop:
                text = text.split(stop, 1)[0]
        return text
