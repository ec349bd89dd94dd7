"""The config schema: every key, its type, its default and its one-line comment, once.

The dataclasses below are registered with Hydra as structured configs, so the YAML in `finetune/conf/` (the
alternatives of a group: `model=diffusiongemma_26b`, `hardware=dgx_spark`, `objective=axolotl`, ...) and the recipes in
`recipes/` state only what differs, and a key that does not exist or a value of the wrong type is an error that
names the key. The stages import their settings from here; nothing here imports a stage.

`python -m finetune` runs through `@hydra.main` (multirun with `-m`, `hydra.run.dir`, `--cfg all`, `--info`, tab
completion: Hydra as its users know it); `finetune.cli` validates every job's overrides with `compose` first, so bad
input is still one line and exit code 2 with nothing written. `python -m eval`, `python -m finetune.preflight` and
`python -m finetune.export` compose the same config through the same prologue.
"""

import dataclasses
import glob
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf

from finetune.errors import UserError

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
RECIPES_DIR = os.environ.get(
    "FINETUNE_RECIPES", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
)
DEFAULT_RECIPE = "tiny"


# --- the schema ----------------------------------------------------------------------------------------------------
# What a resumed run may change (finetune.checkpoints.compare) is a fact of each field, given as its metadata and
# inherited by the fields under it (every field of `Config` states one, so a new key cannot be forgotten):
FIXED = {"resume": "fixed"}  # refused: the checkpoint's weights, optimizer state and data position mean nothing else
HELD_OUT = {"resume": "held_out"}  # fixed while eval rows come out of data.train (it decides which train), else quiet
LAUNCH = {"resume": "launch"}  # refused: the checkpoint holds each process's state as that launch laid it out
LISTED = {"resume": "listed"}  # allowed and listed as changed (a lower lr after a NaN is a legitimate resume)
QUIET = {"resume": "quiet"}  # allowed, not listed: where the run writes, what it reports, how it evaluates
RESUME_RULES = ("fixed", "held_out", "launch", "listed", "quiet")


def is_local_model(name: str) -> bool:
    """model.name_or_path names something on this machine (tiny, an existing path, or what looks like one) rather
    than a hub id (``org/name``)."""
    expanded = os.path.expanduser(str(name))
    return name == "tiny" or os.path.exists(expanded) or expanded.startswith(("/", ".")) or name.count("/") != 1 or \
        os.sep == "\\" and "\\" in name


def _hub_revision(revision, *, _parent_):
    """``${hub_revision:main}``, a model group's default revision: itself for a hub id, null for a local directory
    (which has no revisions: a run records its identity instead, finetune.model.local_identity). A revision the user
    sets (model.revision=... or in their own recipe) replaces this, and a local directory refuses it."""
    return None if is_local_model(_parent_.name_or_path) else revision


OmegaConf.register_new_resolver("hub_revision", _hub_revision, replace=True)

TINY_SIZES = ("tiny", "small")  # finetune.tiny.build_config's dimensions


@dataclass
class TinyBaseSettings:
    """The built-in tiny base; changing any key builds (and caches) another base."""

    size: str = "small"  # tiny (64 hidden) or small (128 hidden)
    canvas_length: int = 8  # block length; 256 in the real model
    # full pre-training steps on the generic tasks (finetune/tiny.py PRETRAIN_TASKS); 1200 rather than 600: the
    # longer-trained base learns a new whole-word task (reverse) from 200 LoRA steps (bench/ABLATION.md)
    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    rows: int = 12000
    seed: int = 0

    def __post_init__(self):
        if self.size not in TINY_SIZES:
            raise UserError(f"model.tiny.size={self.size!r}: use one of {', '.join(TINY_SIZES)}")


EXPERTS_IMPLEMENTATIONS = ("auto", "eager", "grouped_mm", "batched_mm")
# transformers also takes flex_attention and hub kernels for DiffusionGemma (no flash_attention_*: the model declares
# no support), but the objective hands the layers 4-D tensor masks, which only these two read (flex_attention needs a
# BlockMask: given a tensor it crashed the process here)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
QUANTIZATIONS = ("none", "experts4bit", "all4bit")
QUANT_TYPES = ("nf4", "fp4")


@dataclass
class ModelSettings:
    # tiny (built in), a hub id (google/diffusiongemma-26B-A4B-it) or a local directory
    name_or_path: str = field(default="tiny", metadata=FIXED)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU | float32 | bfloat16 | float16
    # none | experts4bit: the 128 frozen experts per layer in 4 bits (45.7 -> ~12.9 GB for the 26B model) | all4bit:
    # the dense text linears too (3.3 -> ~0.9 GB); the LoRA adapter is the same as on the bf16 base
    quantization: str = "none"
    quant_type: str = "nf4"  # 4-bit format: nf4 | fp4 (finetune/quantize.py says why nf4)
    # sdpa: the fused kernels, our boolean 4-D masks as they are | eager: the reference, keeps every layer's score
    # matrix (the memory plan counts it)
    attn_implementation: str = "sdpa"
    # how the 128 frozen experts run: auto (eager on CPU, grouped_mm on CUDA: bench/experts.py) | eager |
    # grouped_mm | batched_mm (copies each token's expert weights: inference only)
    experts_implementation: str = "auto"
    # hub ids only: the branch, tag or commit hash to load (null: the default branch); a local directory is recorded
    # by a hash of its config and index instead (finetune.model.local_identity) and refuses a revision set for it
    revision: Optional[str] = field(default=None, metadata=QUIET)
    trust_remote_code: bool = False  # run code shipped with a checkpoint (auto_map); DiffusionGemma (native) needs none
    # used only when name_or_path is tiny
    tiny: TinyBaseSettings = field(default_factory=TinyBaseSettings, metadata=FIXED)

    def __post_init__(self):
        for key, allowed in (("quantization", QUANTIZATIONS), ("quant_type", QUANT_TYPES)):
            if getattr(self, key) not in allowed:
                raise UserError(f"model.{key}={getattr(self, key)!r}: use one of {', '.join(allowed)}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise UserError(f"model.attn_implementation={self.attn_implementation!r}: use sdpa or eager (training "
                            "gives the layers 4-D mask tensors, which flex_attention and kernels cannot take, and "
                            "transformers has no flash attention for DiffusionGemma)")
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise UserError(f"model.experts_implementation={self.experts_implementation!r}: use one of "
                            f"{', '.join(EXPERTS_IMPLEMENTATIONS)}")
        if self.revision is not None and self.name_or_path == "tiny":  # a local directory: finetune.model refuses it
            raise UserError(f"model.revision={self.revision!r} pins a hub id, but model.name_or_path is tiny (built "
                            "here): set model.revision=null")


@dataclass
class DataSettings:
    # (__post_init__ checks and never rewrites a value: Hydra builds the schema's defaults through it)
    train: str = "tiny:shift"  # tiny:<task>, a local .jsonl/.json/.parquet/.csv file or directory, or a hub data set id
    # same forms | auto: the train source's own held-out rows (tiny:<task>: new rows of the task; a hub data set: its
    # eval_split), and for your file or directory a seeded eval_fraction of it, printed | null: always that fraction
    eval: Optional[str] = field(default="auto", metadata=HELD_OUT)
    train_split: str = "train"  # split names, for hub data sets
    eval_split: str = field(default="test", metadata=QUIET)
    subset: Optional[str] = None  # hub data set config name
    train_rows: Optional[int] = None  # cap on rows read (tiny: rows generated); null reads them all
    # rows read from the eval source; held out of train (eval null, or auto with your file): at most this many of its
    # rows, the rest train
    eval_rows: Optional[int] = field(default=64, metadata=HELD_OUT)
    eval_fraction: float = field(default=0.05, metadata=HELD_OUT)  # held out of train: this seeded fraction of it
    seed: int = 0  # linked to the run's seed in conf/config.yaml
    system_prompt: Optional[str] = None  # prepended as a system turn when the row has none
    max_prompt_tokens: int = 1024  # longer prompts are dropped (or cut) and counted: prompts cost encoder memory
    max_response_canvases: int = 4  # responses needing more canvases are dropped (or cut) and counted
    overlong: str = "drop"  # drop: skip over-long turns (counted) | truncate: cut old context / response tail
    supervise: str = "last"  # last: the final assistant turn (the public recipes) | all: every assistant turn
    thinking: bool = False  # true: render with the thinking flag and train on reasoning; false strips reasoning
    on_bad_row: str = "error"  # error: stop at the first bad row | skip: skip it, count it, report the first few
    text_prompt_fraction: float = 0.5  # plain-text rows: this head fraction is the prompt, the tail is supervised
    training_template: str = "auto"  # auto: TRL's training variant of the model's template ({% generation %} marks)
    # rename map {their column: ours}, e.g. data.columns="{question: prompt, answer: completion}" (typed Any: Hydra
    # cannot add keys to a typed Dict from the command line)
    columns: Optional[Any] = None
    # whose answers train: data (the rows' own) | base (the base model's answer to each training prompt, generated
    # once before LoRA with eval.generation's sampler and cached: self-distillation, for objective=fast; held-out
    # rows keep the data's references)
    answers: str = "data"

    def __post_init__(self):
        if self.columns is not None and not (isinstance(self.columns, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.columns.items())):
            raise UserError(f"data.columns={self.columns!r}: give a map of column names, e.g. "
                            "data.columns=\"{question: prompt, answer: completion}\"")
        for key, allowed in (("overlong", ("drop", "truncate")), ("supervise", ("last", "all")),
                             ("on_bad_row", ("error", "skip")), ("answers", ("data", "base"))):
            if getattr(self, key) not in allowed:
                raise UserError(f"data.{key}={getattr(self, key)!r}: use one of {', '.join(allowed)}")
        if not 0.0 < self.text_prompt_fraction < 1.0:
            raise UserError(f"data.text_prompt_fraction={self.text_prompt_fraction}: must be between 0 and 1")
        if self.max_response_canvases < 1 or self.max_prompt_tokens < 1:
            raise UserError("data.max_response_canvases and data.max_prompt_tokens must be at least 1")
        if not 0.0 < self.eval_fraction < 1.0:
            raise UserError(f"data.eval_fraction={self.eval_fraction}: must be between 0 and 1 (the share of "
                            "data.train held out when data.eval is null, or auto with your own file)")


TARGET_PRESETS = ("attn_mlp", "attn", "mlp", "attn_mlp_experts", "experts")
PLACEMENTS = ("shared", "decoder", "separate")


@dataclass
class LoraSettings:
    """LoRA on the text stack; the router, embeddings and head stay frozen, the experts unless targets name them."""

    r: int = 16
    alpha: int = 32  # scale = alpha / r
    dropout: float = 0.0  # must be 0 with expert targets (peft cannot factor dropout out of a per-expert delta)
    # attn_mlp (q,k,v,o + the dense MLP's gate,up,down: every public recipe) | attn | mlp | attn_mlp_experts (those and
    # one LoRA per routed expert on its fused gate/up and its down projection: finetune/expert_lora.py) | experts
    targets: str = "attn_mlp"
    expert_r: Optional[int] = None  # rank of each expert's LoRA (null: r); scale alpha / expert_r
    # Encoder and decoder are one weight-tied stack run twice. shared: one LoRA used by both passes (keeps the tie,
    # merges into one tensor) | decoder: the denoiser only, encoder frozen (least memory; needs
    # objective.encoder_ar_weight=0) | separate: independent encoder and decoder LoRA (cannot merge into the tie)
    placement: str = "shared"

    def __post_init__(self):
        if self.targets not in TARGET_PRESETS:
            raise UserError(f"lora.targets={self.targets!r}: use one of {', '.join(TARGET_PRESETS)}")
        if self.placement not in PLACEMENTS:
            raise UserError(f"lora.placement={self.placement!r}: use one of {', '.join(PLACEMENTS)}")
        if self.expert_r is not None and (not isinstance(self.expert_r, int) or self.expert_r < 1):
            raise UserError(f"lora.expert_r={self.expert_r!r}: give a positive integer, or null for lora.r")
        if self.on_experts and self.dropout:
            raise UserError(f"lora.dropout={self.dropout} with lora.targets={self.targets}: LoRA on the experts takes "
                            "no dropout (one delta per expert cannot factor it out; peft refuses it too): set "
                            "lora.dropout=0")

    @property
    def on_experts(self) -> bool:
        return self.targets in ("attn_mlp_experts", "experts")

    @property
    def rank_of_experts(self) -> int:
        return self.expert_r or self.r


CORRUPTIONS = ("uniform", "mask")
LOSS_ON = ("supervised", "corrupted")
WEIGHTINGS = ("flat", "inverse_t")


@dataclass
class ObjectiveConfig:
    """Settings of the diffusion loss. Defaults follow the model's own sampler and the NeMo/Google recipe: uniform
    noise (generate() starts from random tokens), every canvas position scored (the sampler re-predicts all of them),
    self-conditioning as at inference, and NeMo/Google's next-token loss on the encoder."""

    corruption: str = "uniform"  # uniform: random vocabulary tokens (DiffusionGemma's own) | mask: MDLM/LLaDA-style
    mask_token_id: Optional[int] = None  # corruption=mask: null takes the tokenizer's mask token
    loss_on: str = "supervised"  # supervised: every canvas position | corrupted: only replaced ones (axolotl)
    weighting: str = "flat"  # flat: mean CE over counted tokens | inverse_t: CE/t, ELBO-style (axolotl)
    t_min: float = 1e-3  # t ~ U(t_min, 1) per example
    self_conditioning_p: float = 0.5  # per example: a no-grad first pass whose logits condition the second
    # what that second pass reads: null: softmax(raw logits) (NeMo, axolotl) | [lo, hi]: softmax(raw / tau), tau ~
    # U(lo, hi) per example, as generate() feeds each next step its logits over the step's temperature (the
    # sampler's schedule runs from eval.generation.t_max to t_min: [0.4, 0.8] by default)
    self_conditioning_temperature: Optional[List[float]] = None
    encoder_ar_weight: float = 1.0  # next-token loss on the encoder's hidden states (0 drops it, as Unsloth does)
    # certainty forcing (objective=fast): + weight x the entropy of softmax(logits / temperature) at the scored canvas
    # positions whose top prediction is already the clean token, summed and normalised with the diffusion loss: the
    # sampler accepts a position once its entropy is under a bound, so sharper right answers take fewer steps
    # (dParallel's idea, for masked diffusion, here on uniform-noise canvases). 0 turns it off
    certainty_weight: float = 0.0
    certainty_temperature: float = 1.0

    def __post_init__(self):
        for key, value, allowed in (("corruption", self.corruption, CORRUPTIONS), ("loss_on", self.loss_on, LOSS_ON),
                                    ("weighting", self.weighting, WEIGHTINGS)):
            if value not in allowed:
                raise ValueError(f"objective.{key}={value!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"objective.t_min={self.t_min} must be in [0, 1)")
        if not 0.0 <= self.self_conditioning_p <= 1.0:
            raise ValueError(f"objective.self_conditioning_p={self.self_conditioning_p} must be in [0, 1]")
        if self.encoder_ar_weight < 0:
            raise ValueError(f"objective.encoder_ar_weight={self.encoder_ar_weight} must be >= 0")
        if self.certainty_weight < 0:
            raise ValueError(f"objective.certainty_weight={self.certainty_weight} must be >= 0 (0: off)")
        if not self.certainty_temperature > 0:
            raise ValueError(f"objective.certainty_temperature={self.certainty_temperature} must be > 0")
        temperature = self.self_conditioning_temperature
        if temperature is not None and not (len(temperature) == 2 and 0 < temperature[0] <= temperature[1]):
            raise ValueError(f"objective.self_conditioning_temperature={list(temperature)} must be null or [lo, hi] "
                             "with 0 < lo <= hi, e.g. [0.4, 0.8] (the sampler's t_min, t_max)")
        if self.corruption == "mask" and self.mask_token_id is None:
            raise ValueError("objective.corruption=mask needs objective.mask_token_id "
                             "(the tokenizer has no mask token)")


REPORT_TO = ("tensorboard", "none", "wandb", "trackio")


@dataclass
class TrainSettings:
    """The public recipes' optimiser: AdamW (0.95, 0.99), warmup then cosine to lr/10, clip 1.0, 800 steps."""

    max_steps: int = 800
    batch_size: int = field(default=1, metadata=FIXED)  # per device; effective batch = batch_size x grad_accum
    grad_accum: int = field(default=8, metadata=FIXED)
    lr: float = 1.5e-4
    min_lr_ratio: float = 0.1  # cosine ends at lr x min_lr_ratio
    warmup_steps: int = 25
    weight_decay: float = 1e-4
    adam_beta1: float = 0.95
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    logging_steps: int = field(default=10, metadata=QUIET)
    # true: encoder and decoder layers are recomputed in backward instead of keeping their activations
    gradient_checkpointing: bool = False
    # true: torch.compile each text layer (regional); measured no gain on CPU (bench/RESULTS.md). With
    # gradient_checkpointing the encoder layers are wrapped too, but dynamo cannot trace their checkpointed cache
    # write (a graph break: measured, torch 2.13), so they run eager and only the decoder layers are compiled
    compile: bool = False
    # linked to the run's seed in conf/config.yaml; also the sampler's data seed: another one replays another order
    seed: int = field(default=0, metadata=FIXED)
    disable_tqdm: bool = field(default=False, metadata=QUIET)
    # where the loss, its parts, lr and grad norm go live: tensorboard (into <run>/tensorboard) | none | wandb |
    # trackio; several, quoted for Hydra: train.report_to='tensorboard,wandb'
    report_to: str = field(default="tensorboard", metadata=QUIET)

    def __post_init__(self):
        for name in self.report_to_list():
            if name not in REPORT_TO:
                raise UserError(f"train.report_to={self.report_to!r}: use {', '.join(REPORT_TO)} (or several, "
                                "comma-separated)")

    def report_to_list(self) -> List[str]:
        names = [n.strip() for n in str(self.report_to).split(",") if n.strip()]
        return [] if names in ([], ["none"]) else names


@dataclass
class CheckpointSettings:
    """Checkpoints of a run (<run>/checkpoints/checkpoint-N): adapter, optimizer, scheduler, RNG states, data position,
    loss trace and config, sealed by a manifest of SHA-256 checksums (finetune/checkpoints.py)."""

    every: int = 0  # optimizer steps between checkpoints; 0: none (Ctrl-C and SIGTERM still write one)
    keep: int = 2  # the newest complete checkpoints kept; older ones are deleted once a newer one is complete

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise UserError(f"checkpoint.every={self.every}, checkpoint.keep={self.keep}: every must be >= 0 "
                            "(0: none) and keep >= 1")


@dataclass
class HardwareSettings:
    """One machine a run is planned for (the `hardware` group: one profile per file, finetune/conf/hardware)."""

    profile: str = "cpu"  # the profile's name, for the plan's report
    device: str = "cpu"  # cpu | cuda (the first visible GPU: choose one with CUDA_VISIBLE_DEVICES) | auto
    bf16: bool = False  # mixed precision in the Trainer
    # memory a run may use, in GB (1e9 bytes); null: this machine's available memory (CPU) or the card's (CUDA)
    # (a machine whose CPU and GPU share one memory, the DGX Spark, sets the part of it a run may use)
    memory_gb: Optional[float] = None

    def __post_init__(self):
        if self.device not in DEVICES:
            raise UserError(f"hardware.device={self.device!r}: use one of {', '.join(DEVICES)} (cuda is the first "
                            "visible GPU: choose another with CUDA_VISIBLE_DEVICES=N)")


DEVICES = ("auto", "cpu", "cuda")  # what finetune.model.resolve_device, the loader and the Trainer's placement know


@dataclass
class DistributedSettings:
    """Training on several processes (the `distributed` group; launch with accelerate launch or torchrun)."""

    strategy: str = "auto"  # auto: ddp when launched on several processes | none | ddp: a full copy per process |
    # fsdp: FSDP2 shards the frozen base over the processes, LoRA replicated as with ddp (a base larger than a device)
    # processes the run is planned for (python -m finetune.plan); null: the launch's (WORLD_SIZE), 1 for a plain run
    world_size: Optional[int] = None

    def __post_init__(self):
        if self.strategy not in DISTRIBUTED_STRATEGIES:
            raise UserError(f"distributed.strategy={self.strategy!r} is not one of "
                            f"{', '.join(DISTRIBUTED_STRATEGIES)} (or choose the group: distributed=ddp)")
        if self.world_size is not None and self.world_size < 1:
            raise UserError(f"distributed.world_size={self.world_size} must be >= 1 (or null: the launch's)")


DISTRIBUTED_STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class PlanSettings:
    """The memory plan every training run makes before it loads anything (python -m finetune.plan prints it)."""

    enforce: bool = True  # refuse a run whose predicted peak does not fit hardware.memory_gb (exit 2)
    headroom: float = 0.05  # fraction of hardware.memory_gb kept free (fragmentation, other processes)


@dataclass
class GenerationSettings:
    """The model's sampler (transformers' DiffusionGemma generate())."""

    # null: sized from the held-out references (their canvases plus one, within data.max_response_canvases)
    max_new_tokens: Optional[int] = None
    max_denoising_steps: int = 48  # the model's own default; fewer is faster, coarser
    entropy_bound: float = 0.1  # higher accepts more tokens per step: faster, riskier
    t_max: float = 0.8  # temperature at the first denoising step (linear schedule)
    t_min: float = 0.4  # temperature at the last
    stability_threshold: Optional[int] = None  # adaptive stop: steps the argmax canvas stays equal; null: model's (1)
    confidence_threshold: Optional[float] = None  # adaptive stop: mean entropy below which to stop; null: model's
    batch_size: int = 16  # prompts per generate() call (left-padded); tokens/second is measured at this batch size
    seed: int = 0  # starting noise; base and adapter get the same (linked to the run's seed in conf/config.yaml)


@dataclass
class SampleSettings:
    """Answers shown: side by side in report.md, and while training (off until ``every`` is set)."""

    shown: int = 10  # generations shown side by side in report.md (report.json keeps all)
    # while training: answers to the first `prompts` held-out prompts every N optimizer steps (and at the last),
    # same sampler and starting noise each time, to <run>/samples.jsonl and TensorBoard's text tab; null: off
    every: Optional[int] = None
    prompts: int = 4

    def __post_init__(self):
        if self.shown < 0:
            raise UserError(f"eval.samples.shown={self.shown}: give 0 or more generations to show")
        if self.every is not None and self.every < 1:
            raise UserError(f"eval.samples.every={self.every}: give a number of steps (1 or more), or null for off")
        if self.prompts < 1:
            raise UserError(f"eval.samples.prompts={self.prompts}: give 1 or more held-out prompts")


@dataclass
class BenchmarkSettings:
    """A second, named data set scored the same way, to catch what the adapter broke; off while source is null.
    (Off rather than a null block: Hydra cannot merge eval.benchmark={...} from the command line into a null.)"""

    name: Optional[str] = None  # shown in the report; null: the source
    source: Optional[str] = None  # tiny:<task>, a local .jsonl/.json/.parquet/.csv file, or a hub data set id
    subset: Optional[str] = None  # hub data set config name
    split: str = "test"
    columns: Optional[Any] = None  # rename map to prompt/completion (or give a messages column)
    scorers: List[str] = field(default_factory=lambda: ["exact_match"])
    max_examples: Optional[int] = 200  # null: all rows
    instruction: Optional[str] = None  # appended to each question


@dataclass
class SweepSettings:
    """The sampler's speed/quality trade-off: score and speed at each value of one setting; off while values is
    empty (e.g. 'eval.sweep={param: max_denoising_steps, values: [4, 8, 16, 48]}')."""

    param: str = "max_denoising_steps"  # max_denoising_steps | entropy_bound
    values: List[Any] = field(default_factory=list)


@dataclass
class SpeedCurveSettings:
    """Score against parallelism (eval/speed_curve.py): base and adapter at every point of a grid of the sampler's
    entropy bound x maximum denoising steps per canvas, every model forward counted; off unless enabled.
    `eval.speed_curve=true` is short for `eval.speed_curve.enabled=true` with this grid."""

    enabled: bool = False
    max_denoising_steps: List[int] = field(default_factory=lambda: [4, 16, 48])  # 48: the model's default
    entropy_bound: List[float] = field(default_factory=lambda: [0.1, 1.0, 4.0])  # 0.1: the model's default
    timing_prompts: int = 4  # held-out prompts generated one at a time (batch 1) per point and side, for seconds/answer

    @classmethod
    def of(cls, value) -> "SpeedCurveSettings":
        """The settings from what the config holds: a bool (the shorthand), null (off) or a block of these keys."""
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if value is None or isinstance(value, bool):
            return cls(enabled=bool(value))
        if not isinstance(value, dict):
            raise UserError(f"eval.speed_curve={value!r}: give true, false or a block of "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"eval.speed_curve.{unknown[0]}: no such key (keys: "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))})")
        out = cls(**value)
        def values(v):
            return list(v) if isinstance(v, (list, tuple)) else [v]  # one value: a grid of one

        try:
            out.max_denoising_steps = [int(v) for v in values(out.max_denoising_steps)]
            out.entropy_bound = [float(v) for v in values(out.entropy_bound)]
            out.timing_prompts = int(out.timing_prompts)
        except (TypeError, ValueError):
            raise UserError("eval.speed_curve: max_denoising_steps, entropy_bound and timing_prompts take numbers "
                            f"(got {value})") from None
        if out.enabled and not (out.max_denoising_steps and out.entropy_bound):
            raise UserError("eval.speed_curve: give at least one max_denoising_steps and one entropy_bound value")
        if out.timing_prompts < 0:
            raise UserError(f"eval.speed_curve.timing_prompts={out.timing_prompts}: give 0 (no timing) or more")
        return out


@dataclass
class EvalSettings:
    """Evaluation, base vs adapter: at the end of training and with python -m eval."""

    enabled: bool = True  # false skips the evaluation at the end of training
    max_examples: int = 64  # held-out rows used for generation
    loss_t: List[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # fixed noise levels (comparable)
    loss_batches: int = 4  # batches of 16 held-out examples per noise level
    scorers: List[str] = field(default_factory=lambda: ["exact_match"])  # first is the headline; exact_match, numeric
    samples: SampleSettings = field(default_factory=SampleSettings)
    regression_tolerance: float = 0.02  # a score change counts above this and 2 paired standard errors
    speed_tolerance: float = 0.1  # adapter tokens per forward more than 10% below base counts as "slower"
    zero_delta_tolerance: float = 1e-8  # a LoRA delta norm at or below this counts as zero ("adapter changed nothing")
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    # GSM8K for the chat recipes (conf/eval/chat.yaml), the base's copy task for tiny; eval.benchmark=null: none
    benchmark: Optional[BenchmarkSettings] = field(default_factory=BenchmarkSettings)
    sweep: Optional[SweepSettings] = field(default_factory=SweepSettings)
    # score vs tokens per forward over a sampler grid (SpeedCurveSettings); Any so that eval.speed_curve=true works
    speed_curve: Any = field(default_factory=lambda: dataclasses.asdict(SpeedCurveSettings()))

    def __post_init__(self):
        SpeedCurveSettings.of(self.speed_curve)  # a bad key or value is one error line before anything loads


EXPORT_FORMATS = ("adapter", "merged", "both")
EXPORT_DTYPES = ("bfloat16", "float32", "float16")


@dataclass
class ExportSettings:
    """Export at the end of a run (the `export` group) or with python -m finetune.export."""

    format: str = "adapter"  # adapter (PEFT, for transformers + peft) | merged (full weights, for vLLM) | both | none
    dtype: str = "bfloat16"  # merged weights: bfloat16 (as released) | float32 | float16
    verify: bool = True  # reload the export in a fresh process and compare logits with the fine-tuned model
    untie: bool = False  # merged, when encoder and decoder deltas differ: true unties (2x size, no vLLM)
    max_shard_size: str = "5GB"  # merged safetensors shard size
    push_to_hub: Optional[str] = None  # a hub repo id (org/name) to upload the verified export to; null keeps it local
    device: str = "auto"  # python -m finetune.export: where the merge and check run (auto | cpu | cuda)
    out: Optional[str] = None  # python -m finetune.export: where the export goes (default <run>/export/<format>)

    def validate(self, allow_none: bool = False):
        formats = EXPORT_FORMATS + (("none",) if allow_none else ())
        if self.format not in formats:
            raise UserError(f"format={self.format!r}: use one of {', '.join(formats)}")
        if self.dtype not in EXPORT_DTYPES:
            raise UserError(f"dtype={self.dtype!r}: use one of {', '.join(EXPORT_DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device={self.device!r}: use auto, cpu or cuda")
        if self.push_to_hub is not None and str(self.push_to_hub).count("/") != 1:
            raise UserError(f"push_to_hub={self.push_to_hub!r}: give a hub repo id such as my-org/my-model")
        try:
            from huggingface_hub import split_torch_state_dict_into_shards

            split_torch_state_dict_into_shards({}, max_shard_size=str(self.max_shard_size))  # parses the size
        except ValueError:
            raise UserError(f"max_shard_size={self.max_shard_size!r}: give a size such as 5GB or 500MB") from None
        return self


@dataclass
class Config:
    run_name: Optional[str] = field(default=None, metadata=QUIET)  # names the run directory; null: the recipe name
    # the run directory (same as hydra.run.dir); null: outputs/<run_name>-<time>
    output_dir: Optional[str] = field(default=None, metadata=QUIET)
    # where the pre-trained tiny base is cached
    cache_dir: str = field(default="${oc.env:FINETUNE_CACHE,'~/.cache/finetune'}", metadata=QUIET)
    seed: int = field(default=0, metadata=FIXED)  # one seed for data order, noise and initialisation
    model: ModelSettings = field(default_factory=ModelSettings, metadata=LISTED)
    data: DataSettings = field(default_factory=DataSettings, metadata=FIXED)
    lora: LoraSettings = field(default_factory=LoraSettings, metadata=FIXED)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata=LISTED)
    train: TrainSettings = field(default_factory=TrainSettings, metadata=LISTED)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings, metadata=QUIET)
    # auto: continue output_dir's newest complete checkpoint in place (fresh when it has none) | false: start fresh |
    # a checkpoint or run directory to continue (python -m finetune resume=PATH continues in PATH's run directory)
    resume: Any = field(default="auto", metadata=QUIET)
    hardware: HardwareSettings = field(default_factory=HardwareSettings, metadata=LISTED)
    distributed: DistributedSettings = field(default_factory=DistributedSettings, metadata=LAUNCH)
    plan: PlanSettings = field(default_factory=PlanSettings, metadata=QUIET)
    eval: EvalSettings = field(default_factory=EvalSettings, metadata=QUIET)
    export: ExportSettings = field(default_factory=ExportSettings, metadata=QUIET)


def resume_rule(key: str) -> str:
    """How a resumed run treats a change of the dotted config ``key``: the `resume` metadata of its field, or of the
    nearest field above it. A key the schema no longer has is listed (it was removed since the checkpoint)."""
    cls, rule = Config, "listed"
    for part in key.split("."):
        found = {f.name: f for f in dataclasses.fields(cls)}.get(part) if cls else None
        if found is None:
            break
        rule = found.metadata.get("resume", rule)
        hint = typing.get_type_hints(cls)[part]
        cls = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
    return rule


def settings(node):
    """A config node as its dataclass (validated by the dataclass itself); errors name the key."""
    try:
        return OmegaConf.to_object(node)
    except UserError:
        raise
    except Exception as e:
        raise UserError(_first_message(e)) from None


# --- recipes and composition ---------------------------------------------------------------------------------------
def recipe_names() -> list:
    return sorted(os.path.splitext(os.path.basename(f))[0] for f in glob.glob(os.path.join(RECIPES_DIR, "*.yaml")))


def register() -> None:
    """The schema as `schema` and recipes/*.yaml as the config group `recipe` (each a `_global_` experiment file).

    A recipe's run name is its file name unless the file sets run_name.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for name in recipe_names():
        path = os.path.join(RECIPES_DIR, f"{name}.yaml")
        try:
            node = OmegaConf.load(path)
        except Exception as e:
            raise UserError(f"recipe file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if "run_name" not in node:
            node.run_name = name
        store.store(group="recipe", name=name, node=node, package="_global_")


def recipe_choice(overrides: list) -> str:
    for o in overrides:
        if o.startswith("recipe="):
            return o.split("=", 1)[1]
    return DEFAULT_RECIPE


def _first_message(e: BaseException) -> str:
    """One line from an exception chain: where (the override, or the config file) and what, with the key."""
    chain = []
    while e is not None:
        text = str(e).strip()
        if text:
            chain.append(text.splitlines())
        e = e.__cause__ or e.__context__
    if not chain:
        return "invalid configuration"
    lines = chain[0]
    key = next((line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("full_key:")), "")
    override = re.match(r"Error merging override (\S+)", lines[0])
    in_file = re.match(r"In '([^']+)': \w+ raised while composing config:", lines[0])
    if override and len(chain) > 1:
        return f"{override.group(1)}: {chain[1][0]}"
    if in_file and len(lines) > 1:
        group, name = in_file.group(1).rpartition("/")[::2]
        where = os.path.join(RECIPES_DIR, f"{name}.yaml") if group == "recipe" else \
            os.path.join(CONF_DIR, f"{in_file.group(1)}.yaml")
        return f"{where}: {key + ': ' if key else ''}{lines[1].strip()}"
    return f"{key}: {lines[0]}" if key and key not in lines[0] else lines[0]


# Keys that moved: their old name gets the new one instead of "unknown key".
RENAMED = {
    "train.save_steps": "checkpoint.every (steps between checkpoints)",
    "train.save_total_limit": "checkpoint.keep (complete checkpoints kept)",
    "train.resume_from_checkpoint": "resume=PATH (or resume=auto with output_dir=<run>, the default)",
    "model.load_in_4bit": "model.quantization (experts4bit: the experts in 4 bits; all4bit: the dense linears too)",
    "hardware.unified": "hardware.memory_gb alone (a machine whose CPU and GPU share one memory plans for the part a "
                        "run may use of it: finetune/conf/hardware/dgx_spark.yaml)",
}


def explain(e: BaseException) -> str:
    """Hydra's and OmegaConf's composition errors as one line that says what to do."""
    msg = _first_message(e)
    missing = re.search(r"Could not find '(\w+)/(\w+)'", msg)
    if missing:
        group, choice = missing.groups()
        folder = os.path.join(CONF_DIR, group)
        options = recipe_names() if group == "recipe" else sorted(
            os.path.splitext(f)[0] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
        return f"{group}={choice} is not a known {group} config; choose one of {', '.join(options)}"
    if "not in struct" in msg or "Could not override" in msg or "Key '" in msg and "not in" in msg:
        key = msg.split("'")[1] if "'" in msg else msg
        if key in RENAMED:
            return f"{key} is now {RENAMED[key]}"
        return f"unknown config key {key!r}: check the spelling (python -m finetune --cfg job lists every key)"
    return msg


def compose(overrides: list, return_hydra_config: bool = False) -> DictConfig:
    """The resolved config for these command-line overrides; a bad override is a UserError naming it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    recipe = recipe_choice(overrides)
    if recipe not in recipe_names():
        raise UserError(f"unknown recipe {recipe!r}: choose one of {', '.join(recipe_names())} "
                        f"(files in {RECIPES_DIR})")
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    except Exception as e:  # hydra raises several types; the readable message may sit on a cause
        raise UserError(explain(e)) from None
    finally:
        GlobalHydra.instance().clear()
    if return_hydra_config:
        return cfg
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:
        raise UserError(f"config does not resolve: {explain(e)}") from None
    return cfg


def check(cfg: DictConfig) -> None:
    """Build the groups' settings once: their own checks run before anything is loaded or written (the objective's
    need the tokenizer for a mask token: `finetune.objective.objective_settings`)."""
    for key in ("model", "data", "lora", "train", "checkpoint", "hardware", "distributed", "eval", "export"):
        settings(cfg[key])


def eval_settings(eval_cfg) -> dict:
    """An `eval` block (a config node, or a plain dict that states only some keys) completed with the schema's
    defaults, as a plain dict: the evaluation reads every value from here, never from a default of its own."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalSettings), eval_cfg)
    except Exception as e:
        raise UserError(f"eval: {_first_message(e)}") from None
    return OmegaConf.to_container(merged, resolve=True)
