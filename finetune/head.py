"""The tied, soft-capped output head, evaluated a chunk of positions at a time.

At DiffusionGemma's vocabulary (262,144) the logits of 1,000 positions are 1 GB in fp32; a plain
``F.cross_entropy(lm_head(h))`` keeps them, their tanh soft-cap and their gradient alive at once. Here no more than
one chunk of logits exists at any time:

- `softcapped_cross_entropy`: per-position CE of ``cap * tanh(h W^T / cap)``; forward keeps only the log-sum-exp
  per position, backward recomputes each chunk's logits and turns them into that chunk's gradient.
- `softcapped_entropy`: per-position entropy of the capped logits over a temperature and whether the top logit is
  the target (the certainty penalty, objective.certainty_weight), with the same tiles and recomputation.
- `soft_embeddings`: what the decoder's self-conditioning block reads, ``softmax(logits) @ E * embed_scale``,
  chunk by chunk (the pass that needs it runs without gradient).

Both do the same arithmetic in the same dtypes as the model's own head (`lm_head` in the weight's dtype, then fp32,
then the cap), so they agree with the full-logits path to float rounding (tests/finetune/test_head.py). On a CPU
whose bf16/fp16 matmul is the slow generic loop (`finetune.emulated.slow_half`) the tile products run in fp32 and are
rounded once to that dtype: what a native half matmul does, at the fp32 rate (the bf16 tile products were most of
the 657 s of a real-width step on 2 EPYC cores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.emulated import slow_half

# On a GPU a chunk is a band of rows over the whole vocabulary, its fp32 logits under CHUNK_BYTES (256 positions at
# the real vocabulary). On a CPU a chunk is a tile of CPU_TILE (rows, vocabulary columns), 1 MiB: the tanh, exp and
# products run on data in the core's cache instead of streaming gigabytes through memory (2 cores, the vocab case of
# bench/train_step.py with the encoder loss: 6.1 s a step in 256-row bands, 2.7 s in tiles).
CHUNK_BYTES = 256 * 2**20
CPU_TILE = (256, 1024)


# Backward recomputes the logits: under mixed precision it must do so in the dtype forward used (bf16 autocast
# around fp32 weights would otherwise recompute them in fp32, against a log-sum-exp taken from bf16 ones).
_same_autocast_forward = torch.amp.custom_fwd(device_type="cuda")
_same_autocast_backward = torch.amp.custom_bwd(device_type="cuda")


def geometry(vocab: int, device: torch.device) -> tuple[int, int]:
    """(rows, vocabulary columns) of one chunk."""
    if device.type == "cpu":
        return CPU_TILE[0], min(vocab, CPU_TILE[1])
    return max(1, CHUNK_BYTES // (4 * vocab)), vocab


def _linear(a, w):
    """F.linear(a, w) in the dtype the model's `lm_head` would give (autocast's where it is on); where that dtype's
    matmul is slow, from the operands rounded to it, multiplied in fp32 and rounded once."""
    device = a.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.promote_types(a.dtype,
                                                                                                        w.dtype)
    if not slow_half(a.device, dtype):
        return F.linear(a, w)
    with torch.autocast(device, enabled=False):
        return F.linear(a.to(dtype).float(), w.to(dtype).float()).to(dtype)


def _logits(hidden, weight, cap):
    """(soft-capped fp32 logits, tanh(logits / cap) or None) of one tile, as the model's head computes them:
    `lm_head` in the weight's dtype, then fp32, then the cap."""
    logits = _linear(hidden, weight).float()
    if not cap:
        return logits, None
    tanh = logits.div_(cap).tanh_()
    return tanh * cap, tanh


class _Exponentials:
    """Running sum of exp(logits - shift) per row over the vocabulary tiles. Soft-capped logits lie in [-cap, cap],
    so shift = cap needs no max pass; uncapped logits use the running max (and rescale what was summed)."""

    def __init__(self, rows, cap, device, carried=None):
        self.cap, self.carried = cap, carried  # carried: a (rows, H) sum rescaled with the total (soft embeddings)
        self.total = torch.zeros(rows, dtype=torch.float32, device=device)
        self.shift = torch.full((rows,), float(cap), device=device) if cap else None

    def add(self, logits):
        """exp(logits - shift), in place, after moving the shift to cover this tile."""
        if not self.cap:
            top = logits.amax(dim=-1)
            if self.shift is None:
                self.shift = top
            else:
                new = torch.maximum(self.shift, top)
                rescale = (self.shift - new).exp_()
                self.total.mul_(rescale)
                if self.carried is not None:
                    self.carried.mul_(rescale[:, None])
                self.shift = new
        exps = logits.sub_(self.shift[:, None]).exp_()
        self.total += exps.sum(dim=-1)
        return exps

    def log_sum(self):
        return self.shift + self.total.log()


def _accumulate(out, a, b):
    """out (fp32) += a @ b: in place when a and b are fp32, else through one product in their dtype. Where that
    dtype's matmul is slow, in place in fp32: the sum over tiles is then rounded once, by the caller, as the model's
    one product over the whole vocabulary is."""
    if a.dtype == torch.float32:
        out.addmm_(a, b)
    elif slow_half(a.device, a.dtype):
        out.addmm_(a.float(), b.float())
    else:
        out += (a @ b).float()


class _SoftcappedCrossEntropy(torch.autograd.Function):
    @staticmethod
    @_same_autocast_forward
    def forward(ctx, hidden, weight, targets, cap):
        rows, cols = geometry(weight.shape[0], hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        picked = torch.zeros_like(lse)  # each row's target logit, read from the same matmul as the others
        for r in range(0, hidden.shape[0], rows):
            h, t = hidden[r : r + rows], targets[r : r + rows]
            sums = _Exponentials(len(h), cap, h.device)
            for v in range(0, weight.shape[0], cols):
                logits = _logits(h, weight[v : v + cols], cap)[0]
                inside = (t >= v) & (t < v + logits.shape[1])
                column = (t - v).clamp(0, logits.shape[1] - 1)[:, None]
                picked[r : r + rows] += torch.where(inside, logits.gather(1, column).squeeze(1), 0.0)
                sums.add(logits)
            lse[r : r + rows] = sums.log_sum()
        ctx.save_for_backward(hidden, weight, targets, lse, picked)
        ctx.cap = cap
        return lse - picked

    @staticmethod
    @_same_autocast_backward
    def backward(ctx, grad_losses):
        """d CE / d capped logit = softmax - onehot; through the cap * (1 - tanh^2); times the upstream gradient.
        The softmax part is recomputed tile by tile; the onehot part is one row of the weight per position."""
        hidden, weight, targets, lse, picked = ctx.saved_tensors
        cap = ctx.cap
        rows, cols, want_hidden, want_weight, grad_hidden, grad_weight = _backward_buffers(ctx, hidden, weight)
        grad_losses = grad_losses.float()
        for r in range(0, hidden.shape[0], rows):
            h, upstream, shift = hidden[r : r + rows], grad_losses[r : r + rows, None], lse[r : r + rows, None]
            for v in range(0, weight.shape[0], cols):
                w = weight[v : v + cols]
                logits, tanh = _logits(h, w, cap)
                grad = logits.sub_(shift).exp_().mul_(upstream)
                if tanh is not None:
                    grad.mul_(tanh.square_().neg_().add_(1))
                grad = grad.to(weight.dtype)  # what the head's .float() hands back to its linear
                if want_hidden:
                    _accumulate(grad_hidden[r : r + rows], grad, w)
                if want_weight:
                    grad_weight[v : v + cols].addmm_(grad.t().float(), h.float())
        onehot = grad_losses if not cap else grad_losses * (1 - (picked / cap).square())
        grad_hidden.sub_(onehot[:, None] * weight[targets].float())
        if want_weight:
            grad_weight.index_add_(0, targets, -onehot[:, None] * hidden.float())
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden.to(hidden.dtype) if want_hidden else None, grad_weight, None, None


def lean_head(lm_head) -> bool:
    """The chunked path needs a plain bias-free linear head (a wrapped or quantised one takes the full path)."""
    return type(lm_head) is torch.nn.Linear and lm_head.bias is None


def softcapped_cross_entropy(lm_head, hidden: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Per-position cross-entropy (fp32, shape (N,)) of the soft-capped logits of ``hidden`` (N, H)."""
    return _SoftcappedCrossEntropy.apply(hidden, lm_head.weight, targets.to(hidden.device), cap)


def _backward_buffers(ctx, hidden, weight):
    """What a tiled backward fills: (tile rows, tile columns, whether hidden and weight want gradients, the fp32
    gradient of hidden, the fp32 gradient of weight or None)."""
    rows, cols = geometry(weight.shape[0], hidden.device)
    want_hidden, want_weight = ctx.needs_input_grad[:2]
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    return rows, cols, want_hidden, want_weight, grad_hidden, grad_weight


class _SoftcappedEntropy(torch.autograd.Function):
    """Per-position entropy of softmax(capped logits / tau), and whether the position's top logit is its target,
    a tile at a time. Forward keeps per row a running max, sum of exponentials and their logit-weighted sum (rescaled
    together when the max moves: small temperatures push exp(logit / tau - cap / tau) below float32), so
    H = lse - sum(p * y) with y = logits / tau. Backward recomputes each tile: dH/dy = -p (log p + H), over tau,
    through the cap."""

    @staticmethod
    @_same_autocast_forward
    def forward(ctx, hidden, weight, targets, cap, tau):
        rows, cols = geometry(weight.shape[0], hidden.device)
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(lse)
        top = torch.full((n,), -float("inf"), device=hidden.device)
        arg = torch.zeros(n, dtype=torch.long, device=hidden.device)
        for r in range(0, n, rows):
            h = hidden[r : r + rows]
            shift = torch.full((len(h),), -float("inf"), device=h.device)
            total, weighted = torch.zeros_like(shift), torch.zeros_like(shift)
            for v in range(0, weight.shape[0], cols):
                logits = _logits(h, weight[v : v + cols], cap)[0]
                best, where = logits.max(dim=-1)  # the first of equal maxima, as argmax over the whole row
                better = best > top[r : r + rows]
                top[r : r + rows] = torch.where(better, best, top[r : r + rows])
                arg[r : r + rows] = torch.where(better, where + v, arg[r : r + rows])
                y = logits.div_(tau)
                new = torch.maximum(shift, y.amax(dim=-1))
                rescale = (shift - new).exp_()
                exps = (y - new[:, None]).exp_()
                total = total * rescale + exps.sum(dim=-1)
                weighted = weighted * rescale + (exps * y).sum(dim=-1)
                shift = new
            lse[r : r + rows] = shift + total.log()
            entropy[r : r + rows] = lse[r : r + rows] - weighted / total
        correct = arg == targets
        ctx.save_for_backward(hidden, weight, lse, entropy)
        ctx.cap, ctx.tau = cap, tau
        ctx.mark_non_differentiable(correct)
        return entropy, correct

    @staticmethod
    @_same_autocast_backward
    def backward(ctx, grad_entropy, _grad_correct):
        hidden, weight, lse, entropy = ctx.saved_tensors
        cap, tau = ctx.cap, ctx.tau
        rows, cols, want_hidden, want_weight, grad_hidden, grad_weight = _backward_buffers(ctx, hidden, weight)
        grad_entropy = grad_entropy.float()
        for r in range(0, hidden.shape[0], rows):
            h = hidden[r : r + rows]
            upstream = grad_entropy[r : r + rows, None] / -tau
            shift, plus = lse[r : r + rows, None], entropy[r : r + rows, None]
            for v in range(0, weight.shape[0], cols):
                w = weight[v : v + cols]
                logits, tanh = _logits(h, w, cap)
                log_p = logits.div_(tau).sub_(shift)
                grad = log_p.exp().mul_(log_p.add_(plus)).mul_(upstream)
                if tanh is not None:
                    grad.mul_(tanh.square_().neg_().add_(1))
                grad = grad.to(weight.dtype)
                if want_hidden:
                    _accumulate(grad_hidden[r : r + rows], grad, w)
                if want_weight:
                    grad_weight[v : v + cols].addmm_(grad.t().float(), h.float())
        return (grad_hidden.to(hidden.dtype) if want_hidden else None,
                grad_weight.to(weight.dtype) if want_weight else None, None, None, None)


def softcapped_entropy(lm_head, hidden: torch.Tensor, targets: torch.Tensor, cap: float | None,
                       tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy (N,) fp32 with gradient, correct (N,) bool): the entropy of softmax(soft-capped logits / ``tau``) of
    ``hidden`` (N, H), and whether each position's argmax is its target (the certainty penalty's positions)."""
    return _SoftcappedEntropy.apply(hidden, lm_head.weight, targets.to(hidden.device), cap, float(tau))


def _decoder_logits(hidden, head_weight, cap, temperature=None):
    """One tile of logits as the decoder's self-conditioning reads them: over the rows' ``temperature`` (N, 1) when
    given (what generate() hands the next step), cast to the head's dtype, then fp32."""
    logits = _logits(hidden, head_weight, cap)[0]
    if temperature is not None:
        logits = logits / temperature
    return logits.to(head_weight.dtype).float()


class _SoftEmbeddings(torch.autograd.Function):
    """``softmax(logits(hidden)) @ E * scale`` with the logits a constant (they come from a pass without gradient):
    the exponentials of each tile times that tile's rows of E, summed, over the summed exponentials. E, when it
    trains, gets ``P^T @ grad`` with P recomputed tile by tile from the saved log-sum-exp."""

    @staticmethod
    @_same_autocast_forward
    def forward(ctx, hidden, head_weight, embed_weight, scale, cap, temperature):
        rows, cols = geometry(head_weight.shape[0], hidden.device)
        out = torch.empty(hidden.shape[0], embed_weight.shape[1], dtype=embed_weight.dtype, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for r in range(0, hidden.shape[0], rows):
            h, tau = hidden[r : r + rows], None if temperature is None else temperature[r : r + rows, None]
            acc = torch.zeros(len(h), embed_weight.shape[1], dtype=torch.float32, device=h.device)
            # the running max, not shift = cap: the exponentials are cast to E's dtype before the product, and
            # exp(z - cap) underflows in float16 for every logit below ~13
            sums = _Exponentials(len(h), None, h.device, carried=acc)
            for v in range(0, head_weight.shape[0], cols):
                exps = sums.add(_decoder_logits(h, head_weight[v : v + cols], cap, tau))
                _accumulate(acc, exps.to(embed_weight.dtype), embed_weight[v : v + cols])
            out[r : r + rows] = (acc / sums.total[:, None]).to(embed_weight.dtype)
            lse[r : r + rows] = sums.log_sum()
        ctx.save_for_backward(hidden, head_weight, embed_weight, scale, lse)
        ctx.cap, ctx.temperature = cap, temperature
        return out * scale

    @staticmethod
    @_same_autocast_backward
    def backward(ctx, grad_out):
        hidden, head_weight, embed_weight, scale, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[2]:
            return None, None, None, None, None, None
        rows, cols = geometry(head_weight.shape[0], hidden.device)
        grad = (grad_out * scale).float()
        grad_embed = torch.zeros(embed_weight.shape, dtype=torch.float32, device=embed_weight.device)
        for r in range(0, hidden.shape[0], rows):
            h, shift = hidden[r : r + rows], lse[r : r + rows, None]
            tau = None if ctx.temperature is None else ctx.temperature[r : r + rows, None]
            for v in range(0, head_weight.shape[0], cols):
                probs = _decoder_logits(h, head_weight[v : v + cols], ctx.cap, tau).sub_(shift).exp_()
                grad_embed[v : v + cols].addmm_(probs.to(embed_weight.dtype).t().float(), grad[r : r + rows])
        return None, None, grad_embed.to(embed_weight.dtype), None, None, None


def soft_embeddings(lm_head, embed_tokens, hidden: torch.Tensor, cap: float | None,
                    temperature: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's self-conditioning input for ``hidden`` (..., H) of a pass without gradient, as
    `DiffusionGemmaDecoderModel` computes it from the logits it is given: logits (over ``temperature``, shaped like
    ``hidden`` without its last dimension, when given) cast to the head's dtype, softmax in fp32, cast,
    @ embeddings, * scale. Trained embeddings get the gradient the decoder would give them."""
    weight = embed_tokens.weight
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    scale = embed_tokens.embed_scale.to(device=weight.device, dtype=weight.dtype)
    if temperature is not None:
        temperature = temperature.to(device=flat.device, dtype=torch.float32).reshape(-1)
    return _SoftEmbeddings.apply(flat, lm_head.weight.detach(), weight, scale, cap, temperature).view(hidden.shape)
