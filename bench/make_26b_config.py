"""Write DiffusionGemma 26B-A4B's config (no weights) to finetune/models/diffusiongemma-26b-a4b-it/.

    python bench/make_26b_config.py            # rewrites config.json and generation_config.json there
    python bench/make_26b_config.py --out DIR  # somewhere else
    python bench/make_26b_config.py --checkpoint DIR --layers 2   # + random weights, sharded, and a tokenizer

The text values are the published 26B-A4B text config (public copies of google/diffusiongemma-26B-A4B-it's
config.json; summarised in /work/shared/DIFFUSIONGEMMA.md). The vision tower is transformers' default Gemma 4 vision
config and the generation config is transformers' own defaults for DiffusionGemmaGenerationConfig: neither is read
from the hub. `slice_config` cuts the first N layers out of it, for real-shaped benchmarks and tests that cannot
hold all 30 layers. `write_checkpoint` saves such a slice with random weights as the hub lays the model out
(sharded safetensors with an index, config, generation config) beside `write_tokenizer`'s stand-in tokenizer of the
real vocabulary size: a local directory a user's `hf download --local-dir` would give, for rehearsals at real width
(bench/rehearsal.py) and the real-width test (tests/test_real_width.py).
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import DiffusionGemmaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "finetune", "models", "diffusiongemma-26b-a4b-it")

LAYERS = 30
TEXT = dict(
    num_hidden_layers=LAYERS,
    # 5 sliding-window layers, then 1 full-attention layer, five times
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(LAYERS)],
    hidden_size=2816,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,  # full-attention layers: head_dim 512 ...
    num_global_key_value_heads=2,  # ... and 2 KV heads
    attention_k_eq_v=True,  # full-attention layers derive V from K (no v_proj there)
    intermediate_size=2112,  # the dense MLP beside the experts
    num_experts=128,
    moe_intermediate_size=704,
    top_k_experts=8,
    vocab_size=262_144,
    sliding_window=1024,
    final_logit_softcapping=30.0,
    hidden_activation="gelu_pytorch_tanh",
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    },
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def build_config(layers: int = LAYERS) -> DiffusionGemmaConfig:
    """The 26B-A4B config; ``layers`` < 30 keeps the first ``layers`` layer types (the last one full-attention, as
    the class requires)."""
    text = dict(TEXT, num_hidden_layers=layers, layer_types=_layer_types(TEXT["layer_types"], layers))
    config = DiffusionGemmaConfig(text_config=text, vision_config=None, canvas_length=256, tie_word_embeddings=True)
    config.architectures = ["DiffusionGemmaForBlockDiffusion"]
    config.dtype = torch.bfloat16  # the released weights are bf16 (52 GB)
    return config


def _layer_types(types: list[str], layers: int) -> list[str]:
    if not 1 <= layers <= len(types):
        raise ValueError(f"layers={layers}: give 1 to {len(types)}")
    # DiffusionGemmaTextConfig forces the last layer to full attention (with a warning): say so up front
    return list(types[: layers - 1]) + ["full_attention"]


def slice_config(config: DiffusionGemmaConfig, layers: int, **text_values) -> DiffusionGemmaConfig:
    """The first ``layers`` layers of a loaded config (e.g. the shipped one), its layer sizes otherwise unless
    ``text_values`` overrides some (e.g. ``vocab_size``).

    The per-layer overrides (head_dim and KV heads of full-attention layers) are keyed by layer index, so they are
    rebuilt from the full layers' values rather than copied."""
    text = config.text_config
    full = next(i for i, t in enumerate(text.layer_types) if t == "full_attention")
    values = text.to_dict()
    for key in ("per_layer_config", "model_type", "transformers_version"):
        values.pop(key, None)
    values.update(
        num_hidden_layers=layers,
        layer_types=_layer_types(text.layer_types, layers),
        global_head_dim=text.per_layer_config[full].head_dim,
        num_global_key_value_heads=text.per_layer_config[full].num_key_value_heads,
        **text_values,
    )
    top = config.to_dict()
    top.pop("text_config")
    top.pop("model_type", None)
    top.pop("transformers_version", None)
    return DiffusionGemmaConfig(**{**top, "text_config": values})


def write_checkpoint(out: str, layers: int = 2, experts: int | None = None, dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "2GB", seed: int = 0,
                     std: float = 0.02, canvas_length: int = 256) -> DiffusionGemmaConfig:
    """The shipped config's first ``layers`` layers (the last full-attention: head_dim 512, K=V, partial rotary) at
    real width with random ``dtype`` weights (normal, ``std``; norms and scales 1, as transformers initialises
    them), saved with save_pretrained as sharded safetensors + index, with the tokenizer (`write_tokenizer`) and
    the generation config. ``experts`` < 128 keeps fewer experts of the real shape (at least top_k: 8). The vision
    tower is always the real one (transformers' default Gemma 4 tower): DiffusionGemma's model builds it whatever
    the config says. ``canvas_length`` < 256 shortens the canvas, a sequence length that changes no tensor's shape. Weights
    are written straight into their storage: 2 layers (4.9 GB in bf16) take ~30 s and ~6 GB of memory."""
    from transformers import DiffusionGemmaForBlockDiffusion

    config = slice_config(DiffusionGemmaConfig.from_pretrained(OUT), layers,
                          **({"num_experts": experts} if experts else {}))
    config.canvas_length = canvas_length
    config.dtype = dtype
    # Drawing 2.5B normal values takes minutes on one core; a pool of 2^24 + 3 draws (not a multiple of any row
    # width), cycled from a random start per tensor, gives every row and tensor different values in seconds.
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(2**24 + 3, generator=generator) * std).to(dtype)
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu")  # no init pass: every saved tensor is written below
    model.tie_weights()  # to_empty gave each module its own copy: tie encoder/decoder and the head again
    state = model.state_dict()  # parameters and persistent buffers (non-persistent ones are rebuilt at load)
    unique = {t.untyped_storage().data_ptr(): t for t in state.values()}  # a tied tensor once
    with torch.no_grad():
        for tensor in unique.values():
            if tensor.dim() < 2:  # RMSNorm weights, router scales, layer scalars: 1, as transformers initialises them
                tensor.fill_(1.0)
                continue
            flat, at = tensor.view(-1), int(torch.randint(len(pool), (1,), generator=generator))
            done = 0
            while done < flat.numel():
                n = min(len(pool) - at, flat.numel() - done)
                flat[done:done + n].copy_(pool[at:at + n])
                done, at = done + n, 0
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    generation_config().save_pretrained(out)
    write_tokenizer(out, config.text_config.vocab_size)
    return config


def write_tokenizer(out: str, vocab_size: int = 262_144):
    """A stand-in for Gemma 4's tokenizer with its vocabulary size: the tiny base's character tokenizer (Gemma's
    special ids pad 0, eos 1, bos 2, the chat template's markup tokens, the released chat template) whose vocabulary
    is padded with ``<unused_N>`` entries to ``vocab_size`` ids, so embeddings, the head and every id the model sees
    are real-sized. The filler is vocabulary, as Gemma's unused ids are, not 262k added tokens: those made every
    load take 10 s and every save 7 s (a trie of added tokens, deep-copied by transformers), which Gemma's own
    tokenizer does not cost."""
    from finetune.tiny import build_tokenizer

    tok = build_tokenizer(vocab_size)
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    tok.save_pretrained(out)
    return tok


def generation_config():
    """transformers 5.24's DiffusionGemmaGenerationConfig leaves every sampler value at None and generate() fills
    them from `_get_default_generation_params`; writing those values out makes the file say what runs."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    text = build_config().text_config  # Gemma's ids: pad 0, eos 1, bos 2
    return DiffusionGemmaGenerationConfig(
        **DiffusionGemmaGenerationConfig._get_default_generation_params(),
        bos_token_id=text.bos_token_id,
        pad_token_id=text.pad_token_id,
        eos_token_id=text.eos_token_id,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT, help="directory to write config.json and generation_config.json")
    parser.add_argument("--checkpoint", metavar="DIR", help="instead: write a real-width slice with random weights "
                        "and a stand-in tokenizer to DIR (write_checkpoint)")
    parser.add_argument("--layers", type=int, default=2, help="--checkpoint: the first N layers (the last full)")
    parser.add_argument("--experts", type=int, default=None, help="--checkpoint: keep N of the 128 experts")
    parser.add_argument("--canvas-length", type=int, default=256, help="--checkpoint: tokens per canvas")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="--checkpoint: weights")
    parser.add_argument("--max-shard-size", default="2GB", help="--checkpoint: safetensors shard size")
    args = parser.parse_args(argv)
    if args.checkpoint:
        write_checkpoint(args.checkpoint, args.layers, args.experts, getattr(torch, args.dtype),
                         args.max_shard_size, canvas_length=args.canvas_length)
        print(f"wrote {args.checkpoint}")
        return
    os.makedirs(args.out, exist_ok=True)
    build_config().save_pretrained(args.out)
    generation_config().save_pretrained(args.out)
    print(f"wrote {os.path.join(args.out, 'config.json')} and generation_config.json")


if __name__ == "__main__":
    main()
