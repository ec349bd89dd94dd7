"""What is exported: a run directory written by ``python -m finetune`` (its config, metrics and adapter), or any saved
PEFT adapter for DiffusionGemma (stock peft, TRL's example, axolotl, Unsloth's DiffusionTrainer), of which only the
adapter itself is known."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from finetune.errors import UserError

# What a trainer's checkpoint directory holds beside the adapter: training state, not part of an exported adapter.
TRAINER_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin")


@dataclass
class Source:
    adapter_dir: str
    base_model: str  # what adapter_config.json names: a hub id or a local directory
    run_dir: str | None = None  # None: an adapter saved outside our runs
    cfg: dict = field(default_factory=dict)  # the run's config.yaml; empty without a run
    metrics: dict | None = None
    lora: dict = field(default_factory=dict)  # adapter_config.json
    placement: str | None = None  # shared | separate | decoder | encoder, once the adapter is loaded
    canvas_length: int = 256
    revision: str | None = None  # a hub base's commit or branch (finetune.model.adapter_revision); None: local base
    trust_remote_code: bool = False  # the run's model.trust_remote_code; False for an adapter from elsewhere

    @property
    def argument(self) -> str:
        """How the export command names this source."""
        return f"run_dir={self.run_dir}" if self.run_dir else f"adapter={self.adapter_dir}"

    @property
    def name(self) -> str:
        if self.run_dir:
            return self.cfg.get("run_name") or os.path.basename(self.run_dir)
        return os.path.basename(self.adapter_dir)

    @property
    def export_dir(self) -> str:
        return export_dir(self.run_dir, None if self.run_dir else self.adapter_dir)

    def adapter_files(self) -> list:
        """The files an adapter export copies: everything but the model card (the export writes its own) and a
        trainer checkpoint's state."""
        return [name for name in sorted(os.listdir(self.adapter_dir))
                if name != "README.md" and name not in TRAINER_STATE and not name.startswith("rng_state")
                and os.path.isfile(os.path.join(self.adapter_dir, name))]


def export_dir(run_dir: str | None, adapter: str | None) -> str:
    """Where ``<format>/`` goes by default. A run keeps its exports inside it (``<run>/export``). An adapter gets a
    sibling ``<DIR>-export``: writing into its directory would change what another tool (or a hub cache snapshot)
    owns, and a folder inside an adapter is picked up by anything that uploads or copies that adapter."""
    if run_dir:
        return os.path.join(os.path.abspath(os.path.expanduser(run_dir)), "export")
    return os.path.abspath(os.path.expanduser(adapter)) + "-export"


def _adapter_config(adapter_dir: str) -> dict:
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        return json.load(f)


def read_run(run_dir: str) -> Source:
    from omegaconf import OmegaConf

    from finetune.model import adapter_base, adapter_revision

    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    adapter_dir = os.path.join(run_dir, "adapter")
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise UserError(f"run_dir={run_dir} is not a finished run: it needs config.yaml and adapter/ "
                        "(written by python -m finetune); for an adapter saved elsewhere use adapter=DIR")
    cfg = OmegaConf.to_container(OmegaConf.load(config_path))
    metrics = None
    if os.path.isfile(os.path.join(run_dir, "metrics.json")):
        with open(os.path.join(run_dir, "metrics.json")) as f:
            metrics = json.load(f)
    model = cfg.get("model", {})
    return Source(adapter_dir, adapter_base(adapter_dir), run_dir, cfg, metrics, _adapter_config(adapter_dir),
                  placement=cfg.get("lora", {}).get("placement"),
                  revision=adapter_revision(adapter_dir, model.get("name_or_path"), model.get("revision")),
                  trust_remote_code=bool(model.get("trust_remote_code", False)))


def read_adapter(adapter_dir: str) -> Source:
    """Any saved PEFT adapter: its base is the one its adapter_config.json names."""
    from finetune.model import adapter_base, adapter_revision

    adapter_dir = os.path.abspath(os.path.expanduser(adapter_dir))
    base = adapter_base(adapter_dir)
    return Source(adapter_dir, base, lora=_adapter_config(adapter_dir), revision=adapter_revision(adapter_dir))


def load_finetuned(src: Source, device: str):
    """Base + the adapter as ``finetune.model.load`` gives it (an adapter whose encoder and decoder LoRA agree is
    re-tied); a run's model.dtype is kept, an adapter from elsewhere loads as ``auto`` (float32 on CPU, bfloat16 on
    CUDA). Sets ``src.placement`` from the weights."""
    from finetune.model import load, resolve_model_path

    dtype = src.cfg.get("model", {}).get("dtype", "auto")
    model, tokenizer, src.placement = load(resolve_model_path(src.base_model, src.revision), device, dtype,
                                           adapter=src.adapter_dir, revision=src.revision,
                                           trust_remote_code=src.trust_remote_code)
    return model.eval(), tokenizer
