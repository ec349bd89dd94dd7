"""Response -> canvases (EOS block-fill), batch padding, and the attention masks that make one training
forward see exactly what `generate()` sees.

Layout of one example: ``[prompt | response + EOS fill]``. The response region is a whole number of
canvases of ``canvas_length`` tokens; canvas k starts at ``prompt_len + k * canvas_length``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Example:
    """One tokenised example, ready to collate."""

    input_ids: list[int]  # prompt + response + EOS fill
    prompt_len: int  # tokens before the first canvas
    response_len: int  # real response tokens (before the fill)
    num_canvases: int


def fill_response(prompt_ids: list[int], response_ids: list[int], canvas_length: int, eos_id: int) -> Example:
    """Append at least one EOS to the response and pad with EOS to whole canvases.

    At least one EOS always follows the response: generation stops on a canvas that holds EOS, so a response
    that exactly fills its canvases would otherwise never teach the model to end.
    """
    n = len(response_ids) + 1
    num_canvases = -(-n // canvas_length)
    filled = list(response_ids) + [eos_id] * (num_canvases * canvas_length - len(response_ids))
    return Example(list(prompt_ids) + filled, len(prompt_ids), len(response_ids), num_canvases)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples. Right padding keeps every example's positions at 0..L-1, as in generation."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
    return {
        "input_ids": ids,
        "seq_lens": torch.tensor([len(e.input_ids) for e in examples], dtype=torch.long),
        "prompt_lens": torch.tensor([e.prompt_len for e in examples], dtype=torch.long),
        "response_lens": torch.tensor([e.response_len for e in examples], dtype=torch.long),
        "num_canvases": torch.tensor([e.num_canvases for e in examples], dtype=torch.long),
    }


def encoder_masks(length: int, sliding_window: int | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Boolean 4-D masks (True = attend) for the causal encoder pass over ``length`` tokens.

    Sliding layers see the last ``sliding_window`` tokens including their own, as transformers'
    `sliding_window_overlay` does. Right padding needs no extra masking: no real token sits after a pad.
    """
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    causal = k <= q
    masks = {"full_attention": causal[None, None]}
    if sliding_window is not None:
        masks["sliding_attention"] = (causal & (k > q - sliding_window))[None, None]
    return masks


def decoder_masks(
    canvas_starts: torch.Tensor, cache_len: int, canvas_length: int, sliding_window: int | None
) -> dict[str, torch.Tensor]:
    """Boolean 4-D masks for a decoder pass over one canvas per example.

    Keys are ``[encoder cache (cache_len) | canvas (canvas_length)]``. The canvas starting at position s sees the
    cached positions ``< s`` (the prompt and the clean canvases before it) and its whole own canvas. A sliding
    layer sees only the last ``sliding_window - 1`` cached positions: that is all transformers' sliding cache
    keeps, so generation sees no more (ignoring it moves logits by ~0.7 on the tiny model).
    """
    device = canvas_starts.device
    batch = canvas_starts.shape[0]
    k = torch.arange(cache_len, device=device)[None, :]
    s = canvas_starts[:, None]
    seen = k < s
    own = torch.ones(batch, canvas_length, dtype=torch.bool, device=device)

    def build(cache_visible: torch.Tensor) -> torch.Tensor:
        row = torch.cat([cache_visible, own], dim=1)  # (B, cache_len + C)
        return row[:, None, None, :].expand(batch, 1, canvas_length, cache_len + canvas_length)

    masks = {"full_attention": build(seen)}
    if sliding_window is not None:
        masks["sliding_attention"] = build(seen & (k >= s - (sliding_window - 1)))
    return masks
