"""Responses -> canvases (EOS block-fill), batch padding, and the attention masks that make one training
forward see exactly what `generate()` sees.

An example is one clean token sequence (what the encoder reads) plus one or more targets: assistant turns whose
tokens start at ``start``. A target's response is padded with EOS to whole canvases of ``canvas_length``; its
canvas k starts at ``start + k * canvas_length``. Only the last canvas holds fill, so every earlier canvas is a
slice of the clean sequence, and the context any canvas needs (``sequence[:start + k * C]``) is a prefix of it:
one causal encoder pass serves every target of a conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Target:
    """One supervised response inside an example."""

    start: int  # position of its first token in the example's sequence
    tokens: list[int]  # response + EOS fill: num_canvases * canvas_length tokens
    response_len: int  # real response tokens (before the fill)
    num_canvases: int
    ar_len: int  # tokens from `start` that the encoder's next-token loss reads (response, + EOS when last)


@dataclass
class Example:
    """One tokenised example, ready to collate."""

    input_ids: list[int]  # the clean sequence the encoder reads
    targets: list[Target]
    row: int = -1  # source row, for reports and for checking data order
    meta: dict = field(default_factory=dict)

    # single-target conveniences (most data has one target)
    @property
    def prompt_len(self) -> int:
        return self.targets[0].start

    @property
    def num_canvases(self) -> int:
        return sum(t.num_canvases for t in self.targets)


def make_target(start: int, response_ids: list[int], canvas_length: int, eos_id: int, add_eos: bool = True,
                final: bool = True) -> Target:
    """Pad a response with EOS to whole canvases.

    At least one EOS always follows the response: generation stops on a canvas that holds EOS, so a response
    that exactly fills its canvases would otherwise never teach the model to end. ``add_eos=False`` is for a
    response cut by truncation, which must not learn to stop where it was cut.
    """
    n = len(response_ids) + (1 if add_eos else 0)
    num_canvases = max(1, -(-n // canvas_length))
    tokens = list(response_ids) + [eos_id] * (num_canvases * canvas_length - len(response_ids))
    ar_len = len(response_ids) + (1 if add_eos and final else 0)
    return Target(start, tokens, len(response_ids), num_canvases, ar_len)


def fill_response(prompt_ids: list[int], response_ids: list[int], canvas_length: int, eos_id: int,
                  row: int = -1) -> Example:
    """A single-turn example: ``prompt + response + EOS`` with one target."""
    target = make_target(len(prompt_ids), response_ids, canvas_length, eos_id)
    return Example(list(prompt_ids) + list(response_ids) + [eos_id], [target], row)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sequences (positions stay 0..L-1, as in generation) and flatten targets in example order."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    ar_mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        for t in e.targets:
            ar_mask[i, t.start : t.start + t.ar_len] = True
    targets = [(i, t) for i, e in enumerate(examples) for t in e.targets]
    width = max(len(t.tokens) for _, t in targets)
    tokens = torch.full((len(targets), width), pad_id, dtype=torch.long)
    for j, (_, t) in enumerate(targets):
        tokens[j, : len(t.tokens)] = torch.tensor(t.tokens, dtype=torch.long)
    return {
        "input_ids": ids,
        "ar_mask": ar_mask,  # positions whose token the encoder's next-token loss predicts
        "rows": torch.tensor([e.row for e in examples], dtype=torch.long),
        "target_example": torch.tensor([i for i, _ in targets], dtype=torch.long),
        "target_start": torch.tensor([t.start for _, t in targets], dtype=torch.long),
        "target_tokens": tokens,
        "num_canvases": torch.tensor([t.num_canvases for _, t in targets], dtype=torch.long),
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
    """Boolean 4-D masks for a decoder pass over K canvases per example (``canvas_starts`` is (B, K)).

    Keys are ``[encoder cache (cache_len) | the K canvases]``. A canvas starting at position s sees the cached
    positions ``< s`` (its prompt and the clean canvases before it) and, bidirectionally, its own canvas only.
    A sliding layer sees only the last ``sliding_window - 1`` cached positions: that is all transformers' sliding
    cache keeps, so generation sees no more (ignoring it moves logits by ~0.7 on the tiny model).
    """
    if canvas_starts.dim() == 1:
        canvas_starts = canvas_starts[:, None]
    device = canvas_starts.device
    batch, k_canvases = canvas_starts.shape
    keys = torch.arange(cache_len, device=device)[None, None, :]
    s = canvas_starts[:, :, None]  # (B, K, 1)
    seen = keys < s  # (B, K, cache_len)
    own = torch.eye(k_canvases, dtype=torch.bool, device=device).repeat_interleave(canvas_length, 0)
    own = own.repeat_interleave(canvas_length, 1)[None].expand(batch, -1, -1)  # (B, K*C, K*C)

    def build(cache_visible: torch.Tensor) -> torch.Tensor:
        rows = cache_visible.repeat_interleave(canvas_length, dim=1)  # (B, K*C, cache_len)
        return torch.cat([rows, own], dim=2)[:, None]

    masks = {"full_attention": build(seen)}
    if sliding_window is not None:
        masks["sliding_attention"] = build(seen & (keys >= s - (sliding_window - 1)))
    return masks
