"""The tied, soft-capped output head, evaluated a chunk of positions at a time.

At DiffusionGemma's vocabulary (262,144) the logits of 1,000 positions are 1 GB in fp32; a plain
``F.cross_entropy(lm_head(h))`` keeps them, their tanh soft-cap and their gradient alive at once. Here no more than
one chunk of logits exists at any time:

- `softcapped_cross_entropy`: per-position CE of ``cap * tanh(h W^T / cap)``; forward keeps only the log-sum-exp
  per position, backward recomputes each chunk's logits and turns them into that chunk's gradient.
- `soft_embeddings`: what the decoder's self-conditioning block reads, ``softmax(logits) @ E * embed_scale``,
  chunk by chunk (the pass that needs it runs without gradient).

Both do the same arithmetic in the same dtypes as the model's own head (`lm_head` in the weight's dtype, then fp32,
then the cap), so they agree with the full-logits path to float rounding (tests/finetune/test_head.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits of one chunk stay under this many bytes (fp32): 256 positions at the real vocabulary.
CHUNK_BYTES = 256 * 2**20


def chunk_rows(vocab: int, chunk_bytes: int | None = None) -> int:
    return max(1, (chunk_bytes or CHUNK_BYTES) // (4 * vocab))


def _capped(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(soft-capped fp32 logits, tanh(logits / cap) or None): the head's forward for one chunk, in place."""
    logits = F.linear(hidden, weight).float()
    if not cap:
        return logits, None
    tanh = logits.div_(cap).tanh_()
    return tanh * cap, tanh


class _SoftcappedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, cap, rows):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        for s in range(0, hidden.shape[0], rows):
            logits, _ = _capped(hidden[s : s + rows], weight, cap)
            lse[s : s + rows] = torch.logsumexp(logits, dim=-1)
            losses[s : s + rows] = lse[s : s + rows] - logits.gather(1, targets[s : s + rows, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.cap, ctx.rows = cap, rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets, lse = ctx.saved_tensors
        cap, rows = ctx.cap, ctx.rows
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s : s + rows]
            logits, tanh = _capped(h, weight, cap)
            # d CE / d capped = softmax - onehot, scaled by the upstream gradient; through the cap: * (1 - tanh^2)
            grad = logits.sub_(lse[s : s + rows, None]).exp_()
            grad[torch.arange(len(h), device=h.device), targets[s : s + rows]] -= 1
            grad.mul_(grad_losses[s : s + rows, None].float())
            if tanh is not None:
                grad.mul_(tanh.square_().neg_().add_(1))
            grad = grad.to(weight.dtype)  # what the head's .float() hands back to its linear
            if want_hidden:
                grad_hidden[s : s + rows] = grad @ weight
            if want_weight:
                grad_weight.addmm_(grad.t().float(), h.float())
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def lean_head(lm_head) -> bool:
    """The chunked path needs a plain bias-free linear head (a wrapped or quantised one takes the full path)."""
    return type(lm_head) is torch.nn.Linear and lm_head.bias is None


def softcapped_cross_entropy(lm_head, hidden: torch.Tensor, targets: torch.Tensor, cap: float | None,
                             chunk_bytes: int | None = None) -> torch.Tensor:
    """Per-position cross-entropy (fp32, shape (N,)) of the soft-capped logits of ``hidden`` (N, H)."""
    rows = chunk_rows(lm_head.weight.shape[0], chunk_bytes)
    return _SoftcappedCrossEntropy.apply(hidden, lm_head.weight, targets, cap, rows)


def _probabilities(hidden, head_weight, cap):
    """softmax of one chunk's logits as the decoder takes them: cast to the head's dtype, softmax in fp32."""
    logits, _ = _capped(hidden, head_weight, cap)
    return logits.to(head_weight.dtype).softmax(dim=-1, dtype=torch.float32)


class _SoftEmbeddings(torch.autograd.Function):
    """``softmax(logits(hidden)) @ E * scale`` with the logits a constant (they come from a pass without gradient)
    and E, when it trains, getting its gradient ``P^T @ grad`` with P recomputed a chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, head_weight, embed_weight, scale, cap, rows):
        out = torch.empty(hidden.shape, dtype=embed_weight.dtype, device=hidden.device)
        for s in range(0, hidden.shape[0], rows):
            probs = _probabilities(hidden[s : s + rows], head_weight, cap).to(embed_weight.dtype)
            out[s : s + rows] = probs @ embed_weight
        ctx.save_for_backward(hidden, head_weight, embed_weight, scale)
        ctx.cap, ctx.rows = cap, rows
        return out * scale

    @staticmethod
    def backward(ctx, grad_out):
        hidden, head_weight, embed_weight, scale = ctx.saved_tensors
        grad_embed = None
        if ctx.needs_input_grad[2]:
            grad = (grad_out * scale).float()
            grad_embed = torch.zeros(embed_weight.shape, dtype=torch.float32, device=embed_weight.device)
            for s in range(0, hidden.shape[0], ctx.rows):
                probs = _probabilities(hidden[s : s + ctx.rows], head_weight, ctx.cap).to(embed_weight.dtype)
                grad_embed.addmm_(probs.t().float(), grad[s : s + ctx.rows])
            grad_embed = grad_embed.to(embed_weight.dtype)
        return None, None, grad_embed, None, None, None


def soft_embeddings(lm_head, embed_tokens, hidden: torch.Tensor, cap: float | None,
                    chunk_bytes: int | None = None) -> torch.Tensor:
    """The decoder's self-conditioning input for ``hidden`` (..., H) of a pass without gradient, as
    `DiffusionGemmaDecoderModel` computes it from the logits it is given: logits cast to the head's dtype, softmax
    in fp32, cast, @ embeddings, * scale. Trained embeddings get the gradient the decoder would give them."""
    weight = embed_tokens.weight
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    scale = embed_tokens.embed_scale.to(device=weight.device, dtype=weight.dtype)
    out = _SoftEmbeddings.apply(flat, lm_head.weight.detach(), weight, scale, cap,
                                chunk_rows(weight.shape[0], chunk_bytes))
    return out.view(hidden.shape)
