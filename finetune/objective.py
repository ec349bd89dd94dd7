"""The block-diffusion SFT objective: corruption, self-conditioning, and the loss.

One training forward per batch:
  1. encoder: one causal pass over the clean ``prompt + response`` fills a KV cache (what generation builds by
     prefilling the prompt and then appending each finished canvas);
  2. one canvas per example, chosen uniformly, is corrupted with rate t ~ U(t_min, 1);
  3. decoder: the noisy canvas attends to the cache before it and bidirectionally to itself
     (optionally twice: a no-grad pass whose logits self-condition the second);
  4. cross-entropy on the positions the settings select, plus an optional next-token loss on the encoder.

Logits are computed only at the positions a loss reads, and then a chunk at a time (`finetune.head`): for the real
model one canvas of logits is 256 x 262,144 floats (268 MB in fp32) per example, the encoder loss's 1,000 responses
tokens 1 GB. ``lean=False`` is the stock path a plain ``model(...).logits`` recipe runs (full logits for every canvas
position of both passes and every encoder position): the benchmark's baseline and the tests' reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import DynamicCache

from finetune.canvas import decoder_masks, encoder_masks
from finetune.config import ObjectiveConfig
from finetune.errors import UserError
from finetune.head import lean_head, soft_embeddings, softcapped_cross_entropy, softcapped_entropy

@dataclass
class LossOutput:
    loss: torch.Tensor  # what backward() is called on
    diffusion_loss: torch.Tensor  # detached parts, for logging
    ar_loss: torch.Tensor
    counted_tokens: int  # positions the diffusion loss read
    t: torch.Tensor  # (T,) noise level per target
    canvas_index: torch.Tensor  # (T,) canvas chosen per target
    corrupted: torch.Tensor  # (T, C) bool, positions replaced by noise
    noisy: torch.Tensor  # (T, C) the decoder's input canvas per target
    per_target_loss: torch.Tensor  # (T,) summed (weighted) CE of each target's counted tokens
    targets: torch.Tensor  # (T, C) the clean canvas each target was scored against
    diffusion_sum: torch.Tensor | None = None  # with gradient: the diffusion loss's numerator (summed weighted CE)
    ar_sum: torch.Tensor | None = None  # with gradient: the encoder loss's summed CE
    counts: torch.Tensor | None = None  # (2,) the two denominators: tokens the diffusion loss and the encoder loss read
    # with gradient: the certainty penalty's numerator, the summed entropy at counted positions already predicted
    # right (normalised by the diffusion loss's denominator); zero when objective.certainty_weight is 0
    certainty_sum: torch.Tensor | None = None
    certain_tokens: int = 0  # counted positions whose top prediction was the clean token


@dataclass
class Noise:
    """What the objective samples for one batch, fixed beforehand (see `draw_noise`)."""

    t: torch.Tensor  # (T,)
    canvas_index: torch.Tensor  # (T,)
    noisy: torch.Tensor  # (T, C)
    self_conditioning: torch.Tensor  # (B,) bool
    temperature: torch.Tensor | None = None  # (B,) the self-conditioning logits' divisor; None: raw logits


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of the global sample ``index`` of a run seeded ``seed``: independent streams for every pair."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def draw_noise(batch: dict[str, torch.Tensor], cfg: ObjectiveConfig, canvas_length: int, vocab: int,
               sample_ids: list[int] | None = None, seed: int = 0, generator: torch.Generator | None = None,
               t: torch.Tensor | None = None, canvas_index: torch.Tensor | None = None,
               self_conditioning: torch.Tensor | None = None, temperature: torch.Tensor | None = None) -> Noise:
    """The noise of a batch, the one sampler of training and evaluation: per example the self-conditioning coin,
    then per target its canvas, t, corrupted positions and noise tokens, then (objective.self_conditioning_temperature
    set) the temperature of its self-conditioning logits. A corrupted position keeps its noise token even when the
    draw hits the clean one: the loss counts as corrupted what differs from the clean canvas (`diffusion_loss`).

    Training gives ``sample_ids``: each example draws from its own generator, keyed by (``seed``, its index in the
    run's global stream of samples), so what an example gets depends only on which sample it is, not on the batch it
    shares, the process it lands on or the number of processes: a run on N processes draws exactly the noise of the
    same run on one. Without them the examples draw in turn from one CPU ``generator`` (None: torch's global one),
    so a batch split in chunks draws what it draws whole. ``t``, ``canvas_index`` (per target),
    ``self_conditioning`` and ``temperature`` (per example) fix those values; they are still drawn, so fixing one
    moves nothing else.
    """
    target_example = batch["target_example"].cpu()
    num_canvases = batch["num_canvases"].cpu()
    tokens = batch["target_tokens"].cpu()
    examples = len(sample_ids) if sample_ids is not None else batch["input_ids"].shape[0]
    levels, index, noisy, coin, temperatures = [], [], [], [], []
    scaled = cfg.self_conditioning_temperature
    offsets = torch.arange(canvas_length)
    for example in range(examples):
        g = generator if sample_ids is None else sample_generator(seed, sample_ids[example])
        coin.append(bool(torch.rand(1, generator=g) < cfg.self_conditioning_p))
        for target in (target_example == example).nonzero().flatten().tolist():
            k = min(int(torch.rand(1, generator=g) * num_canvases[target]), int(num_canvases[target]) - 1)
            k = k if canvas_index is None else int(canvas_index[target])
            level = cfg.t_min + (1.0 - cfg.t_min) * float(torch.rand(1, generator=g))
            level = level if t is None else float(t[target])
            clean = tokens[target, k * canvas_length + offsets]
            corrupted = torch.rand(canvas_length, generator=g) < level
            if cfg.corruption == "uniform":
                noise = torch.randint(0, vocab, (canvas_length,), generator=g)
            else:
                noise = torch.full_like(clean, cfg.mask_token_id)
            index.append(k)
            levels.append(level)
            noisy.append(torch.where(corrupted, noise, clean))
        if scaled:
            temperatures.append(scaled[0] + (scaled[1] - scaled[0]) * float(torch.rand(1, generator=g)))
    coin = torch.tensor(coin, dtype=torch.bool) if self_conditioning is None else self_conditioning.cpu().bool()
    if scaled and temperature is None:
        temperature = torch.tensor(temperatures, dtype=torch.float32)
    return Noise(torch.tensor(levels, dtype=torch.float32), torch.tensor(index, dtype=torch.long), torch.stack(noisy),
                 coin, temperature.cpu().float() if scaled else None)


def loss_counts(batch: dict[str, torch.Tensor], noise: Noise, cfg: ObjectiveConfig, canvas_length: int) -> torch.Tensor:
    """(2,) the tokens the diffusion loss and the encoder loss of this batch are normalised by, known before the
    forward (what `diffusion_loss` divides by): summed over micro-batches and processes, one step's denominators."""
    offsets = torch.arange(canvas_length)
    targets = batch["target_tokens"].cpu().gather(1, noise.canvas_index.cpu()[:, None] * canvas_length + offsets)
    if cfg.loss_on == "corrupted" and cfg.weighting != "inverse_t":
        diffusion = int((noise.noisy.cpu() != targets).sum())
    else:
        diffusion = targets.numel()
    return torch.tensor([diffusion, int(batch["ar_mask"][:, 1:].sum())], dtype=torch.float64)


def objective_settings(objective, tokenizer=None) -> ObjectiveConfig:
    """The `objective` config block as validated settings (a UserError names the key); corruption=mask without a
    mask_token_id takes the tokenizer's mask token. Without a tokenizer (the checks before anything loads) a
    placeholder stands in for it."""
    values = OmegaConf.to_container(objective) if OmegaConf.is_config(objective) else dict(objective)
    if values["corruption"] == "mask" and values["mask_token_id"] is None:
        values["mask_token_id"] = tokenizer.mask_token_id if tokenizer is not None else -1
    try:
        return ObjectiveConfig(**values)
    except ValueError as e:
        raise UserError(str(e)) from None


def project(model, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head + soft-capping, as `DiffusionGemmaForBlockDiffusion.forward` does, in fp32."""
    logits = model.lm_head(hidden).float()
    cap = model.final_logit_softcapping
    return torch.tanh(logits / cap) * cap if cap else logits


def certainty(model, hidden: torch.Tensor, targets: torch.Tensor, tau: float, lean: bool = True):
    """(entropy of softmax(soft-capped logits / ``tau``) per position of ``hidden`` (N, H), whether each position's
    top logit is its target): chunked on the lean path, from full logits on the stock one."""
    if lean and lean_head(model.lm_head):
        return softcapped_entropy(model.lm_head, hidden, targets, model.final_logit_softcapping, tau)
    logits = project(model, hidden)
    log_p = F.log_softmax(logits / tau, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1), logits.detach().argmax(dim=-1) == targets


def cross_entropy(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position CE of the soft-capped head at ``hidden`` (N, H): chunked when the head allows it."""
    if lean_head(model.lm_head):
        return softcapped_cross_entropy(model.lm_head, hidden, targets, model.final_logit_softcapping)
    return F.cross_entropy(project(model, hidden), targets, reduction="none")


class _SelfConditioning:
    """Hands the decoder precomputed self-conditioning embeddings (instead of full logits for it to turn into
    them): a pre-hook on its self-conditioning block replaces the zero signal it builds when given no logits."""

    def __init__(self, model, embeddings: torch.Tensor, mask: torch.Tensor):
        self.block = model.model.decoder.self_conditioning
        self.signal = embeddings * mask.to(embeddings.dtype)[:, None, None]

    def __enter__(self):
        self.handle = self.block.register_forward_pre_hook(lambda module, args: (args[0], self.signal))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _layers_sliding_window(text_config) -> int | None:
    return text_config.sliding_window if "sliding_attention" in text_config.layer_types else None


def _as_attention_reads(model, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our boolean masks (True = attend) as the model's attention reads them: sdpa takes booleans; eager adds its
    mask to the scores, so it gets 0 where a key is seen and the dtype's lowest value where not (a boolean mask
    would add 1 and 0: every key seen, silently)."""
    if model.config.get_text_config()._attn_implementation == "sdpa":
        return masks
    low = torch.finfo(model.dtype).min
    return {kind: torch.zeros(m.shape, dtype=model.dtype, device=m.device).masked_fill(~m, low)
            for kind, m in masks.items()}


def encode(model, input_ids: torch.Tensor):
    """Causal encoder pass over clean sequences; returns (last hidden state, KV cache of every position).

    The cache is a plain DynamicCache without the config, so sliding layers keep all positions: the decoder
    masks choose which ones each canvas sees.
    """
    batch, length = input_ids.shape
    sliding = _layers_sliding_window(model.config.text_config)
    cache = DynamicCache()
    positions = torch.arange(length, device=input_ids.device)[None].expand(batch, length)
    out = model.model.encoder(
        input_ids=input_ids,
        attention_mask=_as_attention_reads(model, encoder_masks(length, sliding, input_ids.device)),
        cache=cache,
        position_ids=positions,
    )
    return out.last_hidden_state, cache


def decode(model, canvas, cache, canvas_starts, self_conditioning_logits=None, self_conditioning_mask=None):
    """Decoder pass over K canvases per example: ``canvas`` is (B, K*C), ``canvas_starts`` (B, K) or (B,).

    Canvas k of row b sits at positions ``canvas_starts[b, k] + 0..C-1`` and sees the cache before it and itself.
    """
    if canvas_starts.dim() == 1:
        canvas_starts = canvas_starts[:, None]
    text_config = model.config.text_config
    canvas_length = canvas.shape[1] // canvas_starts.shape[1]
    cache_len = cache.get_seq_length()
    masks = _as_attention_reads(model, decoder_masks(canvas_starts, cache_len, canvas_length,
                                                     _layers_sliding_window(text_config)))
    offsets = torch.arange(canvas_length, device=canvas.device)
    positions = (canvas_starts[:, :, None] + offsets).flatten(1)
    return model.model.decoder(
        decoder_input_ids=canvas,
        cache=cache,
        self_conditioning_logits=self_conditioning_logits,
        self_conditioning_mask=self_conditioning_mask,
        decoder_attention_mask=masks,
        decoder_position_ids=positions,
    ).last_hidden_state


def _layout(target_example: torch.Tensor, batch_size: int):
    """Slot of each target in its example's row of canvases: (slot (T,), K = most targets in one example)."""
    counts = torch.bincount(target_example, minlength=batch_size)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(target_example), device=target_example.device) - first[target_example]
    return slot, int(counts.max())


def diffusion_loss(
    model,
    batch: dict[str, torch.Tensor],
    cfg: ObjectiveConfig,
    canvas_length: int,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    canvas_index: torch.Tensor | None = None,
    self_conditioning: torch.Tensor | None = None,
    noisy: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    lean: bool = True,
) -> LossOutput:
    """Compute the block-diffusion loss for a collated batch (see `finetune.canvas.collate`).

    Every target (assistant turn) gets one canvas, chosen uniformly among its canvases, its own t and noise;
    all targets of an example share one encoder pass and go through one decoder call. ``t``, ``canvas_index``,
    ``self_conditioning`` (per example) and ``noisy`` (the corrupted canvases) fix what is otherwise sampled, for
    evaluation at fixed noise levels and for tests, as ``temperature`` (per example) fixes the self-conditioning
    logits' divisor when objective.self_conditioning_temperature is set. Training fixes them all (`draw_noise`, per
    global sample); what is not fixed is drawn here by the same `draw_noise` from ``generator`` (a CPU generator; None:
    torch's global one). ``lean=False`` runs the stock full-logits path (same loss and gradients, far more memory).
    """
    ids = batch["input_ids"]
    device = ids.device
    bsz = ids.shape[0]
    vocab = model.config.text_config.vocab_size
    target_example = batch["target_example"].to(device)
    n_targets = len(target_example)

    encoder_trains = any(p.requires_grad for p in model.model.encoder.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
        enc_hidden, cache = encode(model, ids)

    if any(value is None for value in (t, canvas_index, noisy, self_conditioning)) or (
            temperature is None and cfg.self_conditioning_temperature is not None):
        drawn = draw_noise(batch, cfg, canvas_length, vocab, generator=generator, t=t, canvas_index=canvas_index,
                           self_conditioning=self_conditioning, temperature=temperature)
        t, canvas_index, self_conditioning, temperature = drawn.t, drawn.canvas_index, drawn.self_conditioning, \
            drawn.temperature
        noisy = drawn.noisy if noisy is None else noisy
    canvas_index = canvas_index.to(device)
    offsets = torch.arange(canvas_length, device=device)[None]
    targets = batch["target_tokens"].to(device).gather(1, canvas_index[:, None] * canvas_length + offsets)
    supervised = torch.ones_like(targets, dtype=torch.bool)  # a canvas is response or supervised EOS fill
    starts = batch["target_start"].to(device) + canvas_index * canvas_length
    t = t.to(device=device, dtype=torch.float32)
    noisy = noisy.to(device)
    corrupted = noisy != targets  # a noise token that hit the clean one corrupted nothing

    # Lay the targets out as K canvas slots per example (unused slots: a pad canvas that sees only itself).
    slot, k_slots = _layout(target_example, bsz)
    row_canvas = torch.full((bsz, k_slots, canvas_length), 0, dtype=torch.long, device=device)
    row_canvas[target_example, slot] = noisy
    row_starts = torch.zeros((bsz, k_slots), dtype=torch.long, device=device)
    row_starts[target_example, slot] = starts
    row_canvas = row_canvas.flatten(1)

    self_conditioning = self_conditioning.to(device)
    if cfg.self_conditioning_temperature is None:
        temperature = None
    if temperature is not None:
        temperature = temperature.to(device=device, dtype=torch.float32)
    if not bool(self_conditioning.any()):
        hidden = decode(model, row_canvas, cache, row_starts)
    elif lean and lean_head(model.lm_head):
        # First pass without gradient, exactly like generation's first denoising step (zero SC signal); the second
        # pass gets the embeddings its self-conditioning block reads, built a chunk of logits at a time.
        with torch.no_grad():
            first = decode(model, row_canvas, cache, row_starts)
        tau = None if temperature is None else temperature[:, None].expand(first.shape[:2])
        signal = soft_embeddings(model.lm_head, model.model.decoder.embed_tokens, first, model.final_logit_softcapping,
                                 tau)
        del first
        with _SelfConditioning(model, signal, self_conditioning):
            hidden = decode(model, row_canvas, cache, row_starts)
    else:
        with torch.no_grad():  # as generate() hands its next step the logits over the step's temperature
            sc_logits = project(model, decode(model, row_canvas, cache, row_starts))
            if temperature is not None:
                sc_logits = sc_logits / temperature[:, None, None]
            sc_logits = sc_logits.to(model.lm_head.weight.dtype)
        hidden = decode(model, row_canvas, cache, row_starts, sc_logits, self_conditioning)
        del sc_logits
    hidden = hidden.view(bsz, k_slots, canvas_length, -1)[target_example, slot]  # (T, C, H), target order

    counted = corrupted if cfg.loss_on == "corrupted" else supervised
    scored, scored_targets = hidden[counted], targets[counted]  # gathered once: the loss and the penalty share them
    if lean:
        ce = cross_entropy(model, scored, scored_targets)
    else:  # stock: logits of every canvas position, then the counted ones
        ce = F.cross_entropy(project(model, hidden)[counted], targets[counted], reduction="none")
    weights = (1.0 / t)[:, None].expand_as(counted)[counted] if cfg.weighting == "inverse_t" else torch.ones_like(ce)
    per_target = torch.zeros(n_targets, device=device).index_add(
        0, torch.arange(n_targets, device=device)[:, None].expand_as(counted)[counted], ce * weights
    )
    # flat: mean CE over counted tokens. inverse_t: an unbiased ELBO-style estimate, the sum of CE/t over
    # corrupted tokens normalised by all supervised tokens.
    denominator = supervised.sum() if cfg.weighting == "inverse_t" else counted.sum()
    diff_sum = per_target.sum()
    if counted.sum() == 0:
        diff_sum = hidden.sum() * 0.0  # keeps the graph; nothing to score in this batch
    diff = diff_sum / denominator.clamp_min(1)
    certainty_sum, certain = torch.zeros((), device=device), 0
    if cfg.certainty_weight > 0 and bool(counted.any()):
        entropy, right = certainty(model, scored, scored_targets, cfg.certainty_temperature, lean)
        certainty_sum, certain = (entropy * right).sum(), int(right.sum())

    reads = batch["ar_mask"].to(device)[:, 1:]
    ar_sum = torch.zeros((), device=device)
    if cfg.encoder_ar_weight > 0:
        # Next-token loss on each target's response (and the final EOS), read from the encoder's hidden states.
        if lean:
            ar_sum = cross_entropy(model, enc_hidden[:, :-1][reads], ids[:, 1:][reads]).sum()
        else:  # stock: logits of every encoder position
            ar_sum = F.cross_entropy(project(model, enc_hidden)[:, :-1][reads], ids[:, 1:][reads], reduction="sum")
    ar = ar_sum / reads.sum().clamp_min(1)
    loss = diff + cfg.encoder_ar_weight * ar if cfg.encoder_ar_weight > 0 else diff
    if cfg.certainty_weight > 0:
        loss = loss + cfg.certainty_weight * certainty_sum / denominator.clamp_min(1)
    return LossOutput(
        loss=loss,
        diffusion_loss=diff.detach(),
        ar_loss=ar.detach(),
        counted_tokens=int(counted.sum()),
        t=t,
        canvas_index=canvas_index,
        corrupted=corrupted,
        noisy=noisy,
        per_target_loss=per_target.detach(),
        targets=targets,
        diffusion_sum=diff_sum,
        ar_sum=ar_sum,
        counts=torch.stack([denominator, reads.sum()]).to(torch.float64),
        certainty_sum=certainty_sum,
        certain_tokens=certain,
    )
