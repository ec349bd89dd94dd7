"""The block-diffusion SFT objective: corruption, self-conditioning, and the loss.

One training forward per batch:
  1. encoder: one causal pass over the clean ``prompt + response`` fills a KV cache (what generation builds by
     prefilling the prompt and then appending each finished canvas);
  2. one canvas per example, chosen uniformly, is corrupted with rate t ~ U(t_min, 1);
  3. decoder: the noisy canvas attends to the cache before it and bidirectionally to itself
     (optionally twice: a no-grad pass whose logits self-condition the second);
  4. cross-entropy on the positions the settings select, plus an optional next-token loss on the encoder.

Logits are computed only at the positions a loss reads: for the real model one canvas of logits is
256 x 262,144 floats (268 MB in fp32) per example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from finetune.canvas import decoder_masks, encoder_masks

CORRUPTIONS = ("uniform", "mask")
LOSS_ON = ("supervised", "corrupted")
WEIGHTINGS = ("flat", "inverse_t")


@dataclass
class ObjectiveConfig:
    """Settings of the diffusion loss. Defaults follow the model's own sampler and the NeMo/Google recipe."""

    corruption: str = "uniform"  # uniform: random vocabulary tokens, as generate() starts from; mask: a mask token id
    mask_token_id: int | None = None  # used only with corruption=mask
    loss_on: str = "supervised"  # supervised: every canvas position (uniform noise hides which tokens are wrong)
    weighting: str = "flat"  # flat: mean CE over counted tokens; inverse_t: CE/t summed, over supervised tokens
    t_min: float = 1e-3  # t ~ U(t_min, 1) per example
    self_conditioning_p: float = 0.5  # probability per example of a first no-grad pass feeding its logits back
    encoder_ar_weight: float = 1.0  # weight of the next-token loss on the encoder's hidden states

    def __post_init__(self):
        for key, value, allowed in (
            ("corruption", self.corruption, CORRUPTIONS),
            ("loss_on", self.loss_on, LOSS_ON),
            ("weighting", self.weighting, WEIGHTINGS),
        ):
            if value not in allowed:
                raise ValueError(f"objective.{key}={value!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"objective.t_min={self.t_min} must be in [0, 1)")
        if not 0.0 <= self.self_conditioning_p <= 1.0:
            raise ValueError(f"objective.self_conditioning_p={self.self_conditioning_p} must be in [0, 1]")
        if self.encoder_ar_weight < 0:
            raise ValueError(f"objective.encoder_ar_weight={self.encoder_ar_weight} must be >= 0")
        if self.corruption == "mask" and self.mask_token_id is None:
            raise ValueError("objective.corruption=mask needs objective.mask_token_id (the tokenizer has no mask token)")


@dataclass
class LossOutput:
    loss: torch.Tensor  # what backward() is called on
    diffusion_loss: torch.Tensor  # detached parts, for logging
    ar_loss: torch.Tensor
    counted_tokens: int  # positions the diffusion loss read
    t: torch.Tensor  # (B,) noise level per example
    canvas_index: torch.Tensor  # (B,) canvas chosen per example
    corrupted: torch.Tensor  # (B, C) bool, positions replaced by noise
    noisy: torch.Tensor  # (B, C) the decoder's input canvas


def project(model, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head + soft-capping, as `DiffusionGemmaForBlockDiffusion.forward` does, in fp32."""
    logits = model.lm_head(hidden).float()
    cap = model.final_logit_softcapping
    return torch.tanh(logits / cap) * cap if cap else logits


def _layers_sliding_window(text_config) -> int | None:
    return text_config.sliding_window if "sliding_attention" in text_config.layer_types else None


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
        attention_mask=encoder_masks(length, sliding, input_ids.device),
        past_key_values=cache,
        position_ids=positions,
    )
    return out.last_hidden_state, cache


def decode(model, canvas, cache, canvas_starts, self_conditioning_logits=None, self_conditioning_mask=None):
    """Decoder pass over one canvas per example (canvas k of example b starts at ``canvas_starts[b]``)."""
    text_config = model.config.text_config
    canvas_length = canvas.shape[1]
    cache_len = cache.get_seq_length()
    masks = decoder_masks(canvas_starts, cache_len, canvas_length, _layers_sliding_window(text_config))
    positions = canvas_starts[:, None] + torch.arange(canvas_length, device=canvas.device)[None]
    return model.model.decoder(
        decoder_input_ids=canvas,
        past_key_values=cache,
        self_conditioning_logits=self_conditioning_logits,
        self_conditioning_mask=self_conditioning_mask,
        decoder_attention_mask=masks,
        decoder_position_ids=positions,
    ).last_hidden_state


def _rand(shape, generator, device):
    return torch.rand(shape, generator=generator, device=device if generator is None else generator.device).to(device)


def diffusion_loss(
    model,
    batch: dict[str, torch.Tensor],
    cfg: ObjectiveConfig,
    canvas_length: int,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    canvas_index: torch.Tensor | None = None,
    self_conditioning: torch.Tensor | None = None,
) -> LossOutput:
    """Compute the block-diffusion loss for a collated batch (see `finetune.canvas.collate`).

    ``t``, ``canvas_index`` and ``self_conditioning`` fix what is otherwise sampled (for evaluation at fixed noise
    levels and for tests); ``generator`` makes the sampling reproducible.
    """
    ids = batch["input_ids"]
    device = ids.device
    bsz = ids.shape[0]
    vocab = model.config.text_config.vocab_size
    prompt_lens, response_lens = batch["prompt_lens"].to(device), batch["response_lens"].to(device)
    num_canvases = batch["num_canvases"].to(device)

    encoder_trains = any(p.requires_grad for p in model.model.encoder.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
        enc_hidden, cache = encode(model, ids)

    if canvas_index is None:
        canvas_index = (_rand(bsz, generator, device) * num_canvases).long().clamp_max(num_canvases - 1)
    starts = prompt_lens + canvas_index * canvas_length
    offsets = torch.arange(canvas_length, device=device)[None]
    targets = ids.gather(1, starts[:, None] + offsets)
    supervised = torch.ones_like(targets, dtype=torch.bool)  # the canvas region is response or supervised EOS fill

    if t is None:
        t = cfg.t_min + (1.0 - cfg.t_min) * _rand(bsz, generator, device)
    t = t.to(device=device, dtype=torch.float32)
    corrupted = (_rand((bsz, canvas_length), generator, device) < t[:, None]) & supervised
    if cfg.corruption == "uniform":
        gen_device = device if generator is None else generator.device
        noise = torch.randint(0, vocab, (bsz, canvas_length), generator=generator, device=gen_device).to(device)
    else:
        noise = torch.full_like(targets, cfg.mask_token_id)
    noisy = torch.where(corrupted, noise, targets)

    if self_conditioning is None:
        self_conditioning = _rand(bsz, generator, device) < cfg.self_conditioning_p
    sc_logits = None
    if bool(self_conditioning.any()):
        # First pass without gradient, exactly like generation's first denoising step (zero SC signal).
        with torch.no_grad():
            sc_logits = project(model, decode(model, noisy, cache, starts)).to(model.lm_head.weight.dtype)
    hidden = decode(model, noisy, cache, starts, sc_logits, self_conditioning if sc_logits is not None else None)

    counted = corrupted if cfg.loss_on == "corrupted" else supervised
    ce = F.cross_entropy(project(model, hidden[counted]), targets[counted], reduction="none")
    if cfg.weighting == "inverse_t":
        # Unbiased ELBO-style estimate: sum of CE/t over corrupted tokens, normalised by all supervised tokens.
        weights = (1.0 / t)[:, None].expand_as(counted)[counted]
        diff = (ce * weights).sum() / supervised.sum().clamp_min(1)
    else:
        diff = ce.sum() / counted.sum().clamp_min(1)
    if counted.sum() == 0:
        diff = hidden.sum() * 0.0  # keeps the graph; nothing to score in this batch

    ar = torch.zeros((), device=device)
    if cfg.encoder_ar_weight > 0:
        # Next-token loss on the response and its first EOS, read from the encoder's hidden states.
        pos = torch.arange(ids.shape[1], device=device)[None]
        target_mask = (pos >= prompt_lens[:, None]) & (pos <= (prompt_lens + response_lens)[:, None])
        ar = F.cross_entropy(project(model, enc_hidden[:, :-1][target_mask[:, 1:]]), ids[:, 1:][target_mask[:, 1:]])
    loss = diff + cfg.encoder_ar_weight * ar if cfg.encoder_ar_weight > 0 else diff
    return LossOutput(
        loss=loss,
        diffusion_loss=diff.detach(),
        ar_loss=ar.detach(),
        counted_tokens=int(counted.sum()),
        t=t,
        canvas_index=canvas_index,
        corrupted=corrupted,
        noisy=noisy,
    )
