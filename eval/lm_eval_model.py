"""lm-evaluation-harness model `diffusiongemma`: a DiffusionGemma base plus an optional LoRA adapter, answering the
harness's `generate_until` tasks with transformers' own `generate()` (through `eval.generation.generate`).

    python -m eval.harness --model diffusiongemma --model_args adapter=outputs/<run>/adapter \\
        --tasks gsm8k --apply_chat_template --batch_size 4

Importing this module registers the model with the harness; `python -m eval.harness` is the harness's own command
line with that import done first. Needs the optional extra: pip install -e ".[lm-eval]".
"""

from __future__ import annotations

import json
import logging
import os

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from eval.generation import GenerationSettings, generate

log = logging.getLogger(__name__)

NO_LIKELIHOOD = (
    "{} is not supported for DiffusionGemma: a block-diffusion model denoises whole canvases and has no "
    "left-to-right token likelihood to score a continuation with. Use tasks whose output_type is "
    "generate_until (e.g. gsm8k, not hellaswag or arc)."
)


def _int_or_default(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):  # the harness may pass "auto" or None
        return default


@register_model("diffusiongemma", "diffusion-gemma")
class DiffusionGemmaLM(LM):
    """``pretrained``: base model (hub id or directory; default: the adapter's base). ``adapter``: PEFT adapter
    directory. Sampler settings (``max_denoising_steps``, ``entropy_bound``, ``t_max``, ``t_min``, ``seed``) are
    the model's own; the harness's ``temperature``/``do_sample`` have no meaning for this sampler and are ignored.
    ``model``/``tokenizer`` take already-built objects (from Python)."""

    def __init__(self, pretrained: str | None = None, adapter: str | None = None, model=None, tokenizer=None,
                 batch_size=8, max_batch_size=None, device: str | None = None, dtype: str = "auto",
                 max_denoising_steps: int = 48, entropy_bound: float = 0.1, t_max: float = 0.8, t_min: float = 0.4,
                 max_gen_toks: int = 256, seed: int = 0, **unused):
        super().__init__()
        if model is None:
            model, tokenizer = self._load(pretrained, adapter, device, dtype)
        elif tokenizer is None:
            raise ValueError("DiffusionGemmaLM(model=...) needs tokenizer= too")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.settings = GenerationSettings(
            max_denoising_steps=int(max_denoising_steps), entropy_bound=float(entropy_bound), t_max=float(t_max),
            t_min=float(t_min), batch_size=_int_or_default(batch_size, 8), seed=int(seed),
        )
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(model.parameters()).device

    @staticmethod
    def _load(pretrained, adapter, device, dtype):
        import torch

        from finetune.model import dtype_for, load_adapter, load_model, load_tokenizer

        if pretrained is None and adapter is None:
            raise ValueError("diffusiongemma needs model_args pretrained=<base> and/or adapter=<adapter dir>")
        if pretrained is None:
            with open(os.path.join(adapter, "adapter_config.json")) as f:
                pretrained = json.load(f)["base_model_name_or_path"]
        device = "cuda" if str(device or "cuda").startswith("cuda") else str(device)
        if device == "cuda" and not torch.cuda.is_available():  # the harness passes --device cuda by default
            log.warning("no CUDA device visible: running diffusiongemma on the CPU")
            device = "cpu"
        has_tokenizer = adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json"))
        tokenizer = load_tokenizer(adapter if has_tokenizer else pretrained)
        model = load_model(pretrained, dtype_for(dtype, device), device)
        if adapter:
            model = load_adapter(model, adapter)
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
            settings = GenerationSettings(**{**self.settings.__dict__, "max_new_tokens": max_tokens})
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
