"""Real widths in every CI, not only on meta: the 26B config's full-attention layer at its real sizes (hidden 2,816,
head_dim 512 with K=V and partial rotary, experts of 704, the 262,144-token tied head, the real vision tower), with 8
of its 128 experts, saved as the hub lays a model out (sharded safetensors + index) and driven through the command a
user runs: `python -m finetune` with the Spark recipe on a CPU, 2 steps, a merged export whose fresh-process stock
reload must give the fine-tuned model's logits.

Sized for one minute on 2 cores with every tensor at its real shape: a canvas of 64 tokens instead of 256 (a sequence
length, no weight's shape; at 256 the 262k head made each fp32 step 8 s instead of 3), the checkpoint written in this
process (a subprocess cost 4 s of imports). bench/rehearsal.py does the rest at 2 layers, 128 experts and the real
canvas, with every entry point, and measures it.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_a_real_width_layer_loads_sharded_trains_and_its_merged_export_reloads_stock(tmp_path):
    base, run_dir = tmp_path / "dg", tmp_path / "run"
    from make_26b_config import write_checkpoint

    config = write_checkpoint(str(base), layers=1, experts=8, max_shard_size="1GB", canvas_length=64)
    assert config.text_config.layer_types == ["full_attention"] and config.text_config.num_experts == 8
    shards = set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) >= 2, shards

    # the recipe as a Spark user runs it, with no revision override for the local directory; on this CPU: fp32
    # weights (bf16 matmuls have no fast kernel on most CPUs), one canvas of answer, 2 steps of batch 1;
    # lr 1e-2 so that the adapter moves the logits well above the export's float32 round-off
    command = [sys.executable, "-m", "finetune", "recipe=chat_spark", "hardware=cpu", f"model.name_or_path={base}",
               "model.dtype=float32", "data.train=tests/data/chats.jsonl", "data.max_prompt_tokens=64",
               "data.max_response_canvases=1", "train.max_steps=2", "train.batch_size=1", "train.grad_accum=1",
               "train.lr=1e-2", "objective.encoder_ar_weight=0", "objective.self_conditioning_p=0",
               "eval.enabled=false", "export.format=merged", "export.dtype=float32", "export.max_shard_size=2GB",
               f"output_dir={run_dir}"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 2 and metrics["base_commit"] is None
    identity = metrics["base_identity"]
    assert identity.startswith("sha256:")
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["revision"] == identity
    # export.verify reloads the merged directory with stock from_pretrained in a fresh process and compares its
    # logits with the fine-tuned model's: they must agree far below the adapter's own effect on them
    found = re.search(r"merged reloads to max \|logit diff\| (\S+) \(tolerance (\S+); adapter effect (\S+)\)", out)
    assert found, out[-3000:]
    diff, tolerance, effect = (float(x) for x in found.groups())
    assert diff <= tolerance and effect > 100 * diff, found.group(0)
    merged = run_dir / "export" / "merged"
    config = json.loads((merged / "config.json").read_text())
    text = config["text_config"]
    assert (text["hidden_size"], text["vocab_size"], text["moe_intermediate_size"]) == (2816, 262_144, 704)
    assert len(list(merged.glob("model-*.safetensors"))) >= 2  # sharded, as served
