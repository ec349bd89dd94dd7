"""The built-in tiny DiffusionGemma: a small config of the real class, a character tokenizer built locally, the
generated string tasks, and where its pre-trained base is cached. Pre-training it is `finetune.pretrain`.

Nothing here downloads anything, and nothing here trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from dataclasses import asdict

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import DiffusionGemmaConfig, PreTrainedTokenizerFast

from finetune.config import TinyBaseSettings

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<boi>", "<eoi>", "<image>"]
# The markup tokens of DiffusionGemma's (Gemma 4's) chat template, so the real template renders as-is.
MARKUP = [
    "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>",
    "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>', "<|image|>", "<|audio|>", "<|video|>",
]
END_OF_TURN = "<turn|>"
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]


def build_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with DiffusionGemma's special tokens (pad 0, eos 1, bos 2, as in Gemma) and
    its released chat template (the copy TRL ships), so the data path runs on the real markup. ``vocab_size``: pad
    the vocabulary with ``<unused_N>`` entries to that many ids (as Gemma's own vocabulary holds unused ones; no text
    encodes to them), for a stand-in of the real tokenizer's size."""
    from trl.chat_template_utils import diffusion_gemma_chat_template

    vocab = {tok: i for i, tok in enumerate(SPECIALS + MARKUP + CHARS)}
    vocab.update({f"<unused_{i}>": len(vocab) + i for i in range(max(0, (vocab_size or 0) - len(vocab)))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS + MARKUP)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        additional_special_tokens=MARKUP,
        chat_template=diffusion_gemma_chat_template,
        model_max_length=4096,
    )


def build_config(tokenizer, size: str = "tiny", canvas_length: int = 8) -> DiffusionGemmaConfig:
    """A small config of the real architecture: sliding and full layers (full ones with their own head_dim and
    K=V), experts with top-k routing, soft-capped tied head, and a 1-layer vision tower so nothing large is built."""
    dims = {
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, moe_intermediate_size=32),
        "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, moe_intermediate_size=64),
    }[size]
    n = dims["num_hidden_layers"]
    text = dict(
        vocab_size=len(tokenizer),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=dims["hidden_size"] // 4,
        global_head_dim=dims["hidden_size"] // 2,
        num_global_key_value_heads=1,
        layer_types=["full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(n)],
        sliding_window=16,  # small on purpose: prompts + canvases exceed it, so the sliding path is exercised
        num_experts=4,
        top_k_experts=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **dims,
    )
    vision = dict(
        model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=64,
    )
    ids = tokenizer.convert_tokens_to_ids
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=vision,
        canvas_length=canvas_length,
        boi_token_id=ids("<boi>"),
        eoi_token_id=ids("<eoi>"),
        image_token_id=ids("<image>"),
    )


# --- generated tasks -------------------------------------------------------------------------------------------
LETTERS = string.ascii_lowercase


def _word(rng: random.Random, lo: int = 5, hi: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


def _reverse(word: str) -> str:
    return word[::-1]


def _word_task(name: str, answer):
    """Rows "name: abcde" -> answer(word) for one 5-letter word."""
    def row(rng: random.Random) -> dict:
        word = _word(rng)
        return {"prompt": f"{name}: {word}", "completion": answer(word)}
    return row


def _sort_row(rng: random.Random) -> dict:
    """Three 3-letter words -> the same words in alphabetical order: 11 characters, so the answer spans two 8-token
    canvases and the boundary falls inside the third word; every output word depends on all three input words."""
    words = [_word(rng, 3, 3) for _ in range(3)]
    return {"prompt": f"sort: {' '.join(words)}", "completion": " ".join(sorted(words))}


FOLLOWUP_OPS = {"shift": _shift, "reverse": _reverse}


def _followup_row(rng: random.Random) -> dict:
    """Two turns: the first names the operation, the second ("again: ...") only gives the word, so its answer needs
    the history. Trained with data.supervise=all (both assistant turns), scored on the last one."""
    op = rng.choice(sorted(FOLLOWUP_OPS))
    first, second = _word(rng), _word(rng)
    return {"messages": [
        {"role": "user", "content": f"{op}: {first}"},
        {"role": "assistant", "content": FOLLOWUP_OPS[op](first)},
        {"role": "user", "content": f"again: {second}"},
        {"role": "assistant", "content": FOLLOWUP_OPS[op](second)},
    ]}


def _swap(word: str) -> str:
    pairs = "".join(word[i + 1] + word[i] for i in range(0, len(word) - 1, 2))
    return pairs + (word[-1] if len(word) % 2 else "")


TASKS = {
    # generic skills for the base pre-training: read the prompt, write characters back in place (copy, upper), or
    # from other places of the word (double, rotate, swap, skip), so the base has learnt to route by position
    "copy": _word_task("copy", lambda w: w),
    "upper": _word_task("upper", str.upper),
    "double": _word_task("double", lambda w: "".join(c + c for c in w)),
    "rotate": _word_task("rotate", lambda w: w[1:] + w[:1]),
    "swap": _word_task("swap", _swap),
    "skip": _word_task("skip", lambda w: w[::2]),
    # the word's letters from its end back, then the word: reading the prompt backwards, from the first position of
    # the answer, is a skill of the base, so an adapter learns a new whole-word task built on it (reverse: that half
    # alone) in 200 steps on every seed; without it, learning reverse was a coin flip of the machine's rounding, and
    # with the halves the other way round (the backward half across the canvas boundary) it still was on one base
    # seed of two (bench/ABLATION.md, issue 20)
    "mirror": _word_task("mirror", lambda w: w[::-1] + w),
    # the fine-tuning task: never seen by the base; each letter moves one step along the alphabet
    "shift": _word_task("shift", _shift),
    # new to the base too, of other kinds (bench/objective_ablation.py): the answer depends on the whole prompt
    "reverse": _word_task("reverse", _reverse),
    "sort": _sort_row,  # and spans two canvases
    "followup": _followup_row,  # multi-turn
}
PRETRAIN_TASKS = ("copy", "upper", "double", "rotate", "swap", "skip", "mirror")
FINETUNE_TASK = "shift"


def task_rows(task: str, n: int, seed: int) -> list[dict]:
    """``n`` rows of a generated task (prompt/completion, or messages for a multi-turn one), deterministic in
    ``seed``."""
    rng = random.Random(f"{task}-{seed}")
    return [TASKS[task](rng) for _ in range(n)]


def pretrain_rows(n: int, seed: int) -> list[dict]:
    per = -(-n // len(PRETRAIN_TASKS))
    rows = [r for task in PRETRAIN_TASKS for r in task_rows(task, per, seed)]
    random.Random(seed).shuffle(rows)
    return rows[:n]


# --- the cached tiny base ----------------------------------------------------------------------------------------
# bump when the tiny base recipe changes, so caches are rebuilt (3: noise drawn per sample; 4: six pre-training tasks;
# 5: mirror, the seventh)
BASE_VERSION = 5


def base_dir(cache_dir: str, settings: TinyBaseSettings) -> str:
    key = json.dumps({"v": BASE_VERSION, **asdict(settings)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser(cache_dir), f"tiny-base-{digest}")


def base_cached(path: str) -> bool:
    """Whether ``path`` (a `base_dir`) holds a complete base: it is written elsewhere and renamed into place."""
    return os.path.isfile(os.path.join(path, "model.safetensors"))


def generation_config(tokenizer, canvas_length: int):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    return DiffusionGemmaGenerationConfig(
        max_new_tokens=2 * canvas_length,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
