"""The fresh process of the export check: stock classes load the files on disk and compute logits on fixed inputs.

    python -m finetune.export.reload --model DIR_OR_ID [--revision REV] [--adapter DIR] --dtype bfloat16
                                     --device cpu --inputs inputs.safetensors --out logits.safetensors

The model is built by stock classes only (transformers' DiffusionGemmaForBlockDiffusion, peft's PeftModel): what a
user (or vLLM's loader) gets from the files, not what the exporting process happens to hold in memory. Weights load
from safetensors only, and no code shipped with a checkpoint runs (the classes are transformers' and peft's own).
``finetune.export.verify.reload_logits`` runs it and reads ``--out``. A checkpoint that loads with missing,
unexpected or mismatched keys is a failure (exit 1, one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.export.reload", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="merged export directory, or the base model of --adapter")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a hub --model")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory loaded onto --model")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--inputs", required=True, help="safetensors with ids_<i> and canvas_<i> (long tensors)")
    parser.add_argument("--out", required=True, help="where logits_<i> (float32) are written")
    parser.add_argument("--cast-to", default=None, choices=("bfloat16", "float16"),
                        help="then cast the model to this precision and write its logits too (cast_logits_<i>): "
                             "what the coarser precision of the fine-tuned model costs by itself, on these weights")
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import DiffusionGemmaForBlockDiffusion

    kwargs = {"dtype": getattr(torch, args.dtype), "use_safetensors": True, "revision": args.revision}
    if args.device == "cuda":
        kwargs["device_map"] = {"": 0}
    model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(args.model, output_loading_info=True, **kwargs)
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        print(f"loading {args.model} is incomplete: {json.dumps(bad)[:2000]}", file=sys.stderr)
        return 1
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    inputs = load_file(args.inputs)
    device = next(model.parameters()).device
    out = {}
    with torch.no_grad():
        for prefix in ("", "cast_") if args.cast_to else ("",):
            if prefix:
                model.to(getattr(torch, args.cast_to))  # in place: no second copy of the weights
            for i in range(len(inputs) // 2):
                ids, canvas = inputs[f"ids_{i}"].to(device), inputs[f"canvas_{i}"].to(device)
                out[f"{prefix}logits_{i}"] = model(input_ids=ids, decoder_input_ids=canvas).logits.float().cpu()
    save_file(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
