"""python -m finetune.chat [adapter=DIR] [recipe=NAME] [key=value ...]: talk to the base + adapter in the terminal.

The conversation is kept as messages and rendered every turn exactly as evaluation renders its prompts
(`finetune.data.Renderer.prompt_text`); the sampler is the config's eval.generation block (`generation_kwargs`), so
what you read here is what `python -m eval` scores. The answer appears canvas by canvas: transformers' generate()
hands each finished canvas to its streamer, which is all this module listens to (the sampler is transformers' own).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

USAGE = """usage: python -m finetune.chat [adapter=DIR] [recipe=NAME] [key=value ...] [--cfg job|hydra|all]

  adapter=DIR    a saved PEFT adapter for DiffusionGemma (ours: outputs/<run>/adapter, or any stock one); its base is
                 the one its adapter_config.json names. Without it you talk to the recipe's base alone.
  recipe=NAME    a file in recipes/ (default: tiny): the model settings, data.system_prompt / data.thinking (how the
                 conversation is rendered) and eval.generation (the sampler)
  key=value      any config key, e.g. model.quantization=experts4bit (4-bit experts: the 26B model on a 24/32 GB
                 card) eval.generation.max_denoising_steps=16 eval.generation.max_new_tokens=1024
  --cfg job      check the arguments, print the resolved config and exit (loads no model)

  Type a message and Enter. /reset forgets the conversation, /quit (or Ctrl-D) exits, Ctrl-C while an answer is
  being written abandons it. Piped, it reads one message per line and prints only the answers on stdout (the
  speed line after each answer, and notes, go to stderr).
"""

COMMANDS = {"/reset": "forgets the conversation", "/quit": "exits (so does Ctrl-D)"}


class Conversation:
    """The chat so far as messages; `prompt` renders it for generation the way evaluation renders a held-out prompt
    (the recipe's data.system_prompt first, the data.thinking flag, the model's turn opener at the end)."""

    def __init__(self, renderer, system_prompt: str | None = None):
        self.renderer = renderer
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.messages: list[dict] = []

    def prompt(self, text: str) -> str:
        """Add the user's turn and return the whole conversation rendered for the model's answer."""
        self.messages.append({"role": "user", "content": text})
        return self.renderer.prompt_text(self.system + self.messages)

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def abandon(self) -> None:
        """Forget an unanswered last turn (an answer abandoned with Ctrl-C): the next prompt follows the last answer."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def reset(self) -> None:
        self.messages.clear()


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def talk(lines: Iterable[str], conversation: Conversation, reply: Callable[[str], str]) -> int:
    """The chat loop: each line is a command or a message; ``reply(rendered prompt)`` shows and returns the answer.
    Ctrl-C inside ``reply`` abandons that answer only."""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            conversation.reset()
            note("(conversation cleared)")
            continue
        if re.fullmatch(r"/[A-Za-z]+", text):  # a mistyped command would otherwise go to the model as a message
            note(f"unknown command {text}: " + "; ".join(f"{c} {what}" for c, what in COMMANDS.items()))
            continue
        prompt = conversation.prompt(text)
        try:
            answer = reply(prompt)
        except KeyboardInterrupt:
            conversation.abandon()
            print(flush=True)
            note("(answer abandoned)")
            continue
        conversation.answered(answer)
    return 0


def typed_lines(stream=None) -> Iterator[str]:
    """What the user types. At a terminal: after a `> ` prompt, with line editing; Ctrl-C there clears the line.
    Piped: one message per line and no prompt, so the output holds only answers. Ends at end of input (Ctrl-D)."""
    stream = stream or sys.stdin
    if not stream.isatty():
        for line in stream:
            yield line.rstrip("\n")
        return
    try:
        import readline  # noqa: F401  (input() gains line editing and history)
    except ImportError:
        pass
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            note("(" + ", ".join(f"{c} {what}" for c, what in COMMANDS.items()) + ")")
            continue
        yield line


class CanvasPrinter:
    """generate()'s streamer (transformers' BaseStreamer protocol: put, end; not subclassed, so that --help need not
    import transformers). generate() puts the prompt first, then each canvas once denoised; the answer so far is
    printed as it grows, cut where evaluation cuts it, so the text shown is the answer kept in the conversation."""

    def __init__(self, tokenizer, stops, write: Callable[[str], None]):
        self.tokenizer, self.stops, self.write = tokenizer, [s for s in stops if s], write
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    @property
    def text(self) -> str:
        from eval.generation import cut  # the answer as evaluation keeps it: up to the first end of turn, stripped

        return cut(self.tokenizer.decode(self.ids, skip_special_tokens=False), self.stops)

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._show(self._settled(self.text))

    def end(self) -> None:
        text = self.text
        if not text.startswith(self.shown):  # a decoding that changed behind what was printed: show it whole
            self.write("\n")
            self.shown = ""
        self._show(text)

    def _settled(self, text: str) -> str:
        """Hold back what the next canvas may still change: a half-decoded character, or the start of a stop."""
        text = text.rstrip("\ufffd")
        for n in range(min(len(text), max(map(len, self.stops), default=0)), 0, -1):
            if any(stop.startswith(text[-n:]) for stop in self.stops):
                return text[:-n].rstrip()  # stripped as the final answer would be, were the stop to follow
        return text

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def chat_generation(gen, canvas_length: int, max_response_canvases: int):
    """eval.generation for a chat: max_new_tokens, when not set, holds data.max_response_canvases canvases (the
    longest answer training kept); evaluation sizes it from its references, which a chat does not have."""
    if gen.max_new_tokens:
        return gen
    return replace(gen, max_new_tokens=max_response_canvases * canvas_length)


def speed_line(tokens: int, seconds: float, canvases: int, passes: int | None, gen, finished: bool) -> str:
    """One line per answer, with eval.generation's definitions (tokens up to and including the end-of-sequence
    token, steps per canvas = decoder passes / canvases)."""
    steps = f"{passes / canvases:.1f}" if passes is not None and canvases else "-"
    line = (f"[{tokens} tokens | {tokens / seconds if seconds > 0 else 0.0:.1f} tokens/s | {canvases} canvases | "
            f"{steps} steps/canvas of at most {gen.max_denoising_steps}]")
    if not finished:
        line += f" cut at max_new_tokens={gen.max_new_tokens} (eval.generation.max_new_tokens)"
    return line


def replier(model, tokenizer, gen) -> Callable[[str], str]:
    """``reply(rendered prompt) -> answer``: generate with transformers' sampler, print the answer canvas by canvas
    on stdout, then the speed line on stderr."""
    import torch

    from eval.generation import generation_kwargs, row_speed, stops_of
    from finetune.model import base_of

    base = base_of(model)  # PEFT's LoRA layers sit inside it: generating from it uses the adapter
    device = next(base.parameters()).device
    eos_ids = base.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    pad_id = base.generation_config.pad_token_id
    canvas_length = base.config.canvas_length
    stops = stops_of(tokenizer)
    kwargs = generation_kwargs(gen)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def reply(prompt: str) -> str:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        printer = CanvasPrinter(tokenizer, stops, write)
        started = time.perf_counter()
        out = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=printer, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        write("\n")
        new = out.sequences[:, ids.shape[1]:]
        tokens, passes, canvases, finished = row_speed(new, out.tokens_per_forward, pad_id, eos_ids,
                                                       canvas_length)[0]
        note(speed_line(tokens, seconds, canvases, passes, gen, finished))
        return printer.text

    return reply


def load_for_chat(cfg, adapter: str | None):
    """The base (+ adapter) and tokenizer as `python -m eval` loads them, and one line saying what was loaded."""
    from finetune.config import settings
    from finetune.model import (adapter_base, adapter_revision, base_of, load, resolve_device, resolve_model_path,
                                weights_note)
    from finetune.pretrain import base_model_path

    # an adapter's base: the commit the adapter records, else model.revision when it names the recipe's base
    revision = adapter_revision(adapter, cfg.model.name_or_path, cfg.model.revision) if adapter else \
        cfg.model.revision
    path = resolve_model_path(adapter_base(adapter)) if adapter else \
        base_model_path(settings(cfg.model), cfg.cache_dir, log=note)
    model, tokenizer, placement = load(path, resolve_device(cfg.hardware.device), cfg.model.dtype, adapter=adapter,
                                       quantization=cfg.model.quantization, quant_type=cfg.model.quant_type,
                                       attn=cfg.model.attn_implementation, experts=cfg.model.experts_implementation,
                                       revision=revision, trust_remote_code=cfg.model.trust_remote_code)
    what = f"model: {path}" + (f" + adapter {adapter} ({placement} LoRA)" if adapter else " (no adapter: base only)")
    if cfg.model.quantization != "none":
        what += f" | {weights_note(cfg.model.quantization, cfg.model.quant_type, base_of(model).dtype)}"
    return model.eval(), tokenizer, what


def chat(overrides: list, cfg_mode: str | None, lines: Iterable[str] | None = None) -> int:
    import logging

    import torch
    from omegaconf import OmegaConf

    from eval.compare import validate
    from finetune import runlock
    from finetune.cli import show_config, take
    from finetune.config import GenerationSettings, check, compose, settings
    from finetune.data import Renderer
    from finetune.model import adapter_base, base_of

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    adapter = take(overrides, "adapter")
    cfg = compose(overrides)
    check(cfg)
    gen = GenerationSettings(**validate(OmegaConf.to_container(cfg.eval, resolve=True))["generation"])
    adapter = os.path.abspath(os.path.expanduser(adapter)) if adapter else None
    if adapter and not cfg_mode:  # the adapter of a run still training is a moving target
        runlock.refuse_if_training(adapter, "adapter=")
    base = adapter_base(adapter) if adapter else None  # refuses a directory that is no adapter, before any load
    if cfg_mode:
        show_config(overrides, cfg_mode)
        print(f"# adapter: {adapter}\n# base model: {base or cfg.model.name_or_path}")
        return 0
    data = settings(cfg.data)
    model, tokenizer, what = load_for_chat(cfg, adapter)
    canvas_length = base_of(model).config.canvas_length
    gen = chat_generation(gen, canvas_length, data.max_response_canvases)
    note(f"{what} | answers up to {gen.max_new_tokens} tokens ({-(-gen.max_new_tokens // canvas_length)} canvases "
         f"of {canvas_length}) | /reset forgets the conversation, /quit exits")
    conversation = Conversation(Renderer(tokenizer, data), data.system_prompt)
    torch.manual_seed(gen.seed)  # a piped session is reproducible: the same lines, the same answers
    return talk(typed_lines() if lines is None else lines, conversation, replier(model, tokenizer, gen))


def main(argv: list[str] | None = None) -> int:
    from finetune.cli import command

    return command(argv, USAGE, chat)


if __name__ == "__main__":
    sys.exit(main())
