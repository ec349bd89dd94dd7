"""One fine-tuning run, the pipeline: config -> model + tokenizer -> data -> LoRA training -> evaluation -> export.

The only module that imports every stage. Everything that can be checked is checked before anything is loaded or
written (`check`); the run directory is Hydra's (`hydra.run.dir`, which follows `output_dir`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import time

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune import checkpoints, disk, distributed, preflight, runlock
from finetune.config import check as check_settings
from finetune.config import settings
from finetune.data import eval_prompts, holds_out_of_train, load_splits
from finetune.errors import RunStopped, UserError
from finetune.model import (attach_lora, base_commit, base_identity, base_of, check_quantization, count_parameters,
                            dtype_for, load, local_identity, resolve_device, resolve_model_path, target_regex,
                            weights_note)
from finetune.objective import ObjectiveConfig, objective_settings
from finetune.plan import refuse_if_it_cannot_fit
from finetune.pretrain import base_model_path
from finetune.report import plot_loss, summary
from finetune.tiny import base_cached, base_dir
from finetune.train import fit

log = logging.getLogger("finetune")
HYDRA_FILES = {".hydra", "finetune.log"}  # what Hydra writes into a run directory before the run starts
UNUSED = HYDRA_FILES | {runlock.NAME}  # what a run directory holds before the run writes anything of its own


def samples_while_training(cfg: DictConfig, tokenizer, eval_rows, eval_ex, data_settings, canvas_length: int,
                           run_dir: str, model, resumed_from: str | None, strategy: str, tensorboard: bool) -> list:
    """[the eval.samples.every callback] (eval/samples.py), or [] when it is off or cannot run here."""
    every = cfg.eval.samples.every
    if not every:
        return []
    if strategy == "fsdp":  # generation on process 0 alone would need the base's shards from every process
        print("eval.samples.every: off under FSDP (the sharded base needs every process to generate); the "
              "evaluation at the end still shows the answers")
        return []
    from eval.generation import GenerationSettings
    from eval.samples import Samples
    from eval.sets import heldout_set

    count = int(cfg.eval.samples.prompts)
    pairs = eval_prompts(eval_rows, tokenizer, data_settings)[:count]
    if not pairs:
        raise UserError("eval.samples.every is set but the held-out data has no usable prompt: set data.eval or "
                        "data.eval_fraction, or eval.samples.every=null")
    heldout = heldout_set(pairs, eval_ex, {"max_examples": count, "scorers": list(cfg.eval.scorers)})
    gen = GenerationSettings(**OmegaConf.to_container(cfg.eval.generation, resolve=True))
    resumed_step = int(os.path.basename(resumed_from).rsplit("-", 1)[1]) if resumed_from else 0
    return [Samples(tokenizer, heldout, gen, every, run_dir, canvas_length, data_settings.max_response_canvases,
                    getattr(model.generation_config, "max_new_tokens", None), resumed_step,
                    tensorboard=tensorboard)]


def base_answers(cfg: DictConfig, model, tokenizer, train_rows, data_settings, canvas_length: int, path: str,
                 main: bool):
    """data.answers=base: the training rows with the base's own last answers (finetune/data/answers.py), rebuilt
    into examples; process 0 generates and caches them, the others of a launch read the cache."""
    from eval.generation import GenerationSettings, generate
    from finetune.data import build_examples
    from finetune.data.answers import with_base_answers

    def answer(prompts, generation):
        was_training = model.training
        gens = generate(model.eval(), tokenizer, prompts, generation, desc="base answers")
        model.train(was_training)
        return [g.text for g in gens]

    gen = GenerationSettings(**OmegaConf.to_container(cfg.eval.generation, resolve=True))
    model_id = f"{path}@{base_commit(model) or base_identity(model)}"
    if not main:
        distributed.barrier()  # process 0 writes the cache first
    rows, answered = with_base_answers(train_rows, answer, tokenizer, data_settings, gen, canvas_length,
                                       cfg.cache_dir, model_id, writer=main)
    if main:
        distributed.barrier()
    examples, stats = build_examples(rows, tokenizer, data_settings, canvas_length,
                                     f"data.train ({data_settings.train}, the base's answers)")
    return rows, examples, stats, answered


def training_objective(cfg: DictConfig, tokenizer=None) -> ObjectiveConfig:
    """The objective settings, and whether the LoRA placement can train them."""
    objective = objective_settings(cfg.objective, tokenizer)
    if cfg.lora.placement == "decoder" and objective.encoder_ar_weight > 0:
        raise UserError(
            "lora.placement=decoder leaves the encoder frozen, so objective.encoder_ar_weight has nothing to train: "
            "set objective.encoder_ar_weight=0 or lora.placement=shared"
        )
    if cfg.lora.placement == "separate" and objective.encoder_ar_weight == 0:
        # the decoder reads only the encoder's keys and values: without the encoder's own loss, the last encoder
        # layer's query, output and MLP LoRA would get no gradient (the first step's check would stop the run)
        raise UserError("lora.placement=separate with objective.encoder_ar_weight=0 leaves part of the encoder LoRA "
                        "untrainable: use lora.placement=shared or decoder, or keep the encoder loss")
    return objective


def check(cfg: DictConfig, run_dir: str | None = None):
    """Every check that needs no download, no model and no data: bad settings fail before anything is written.
    Returns the resume decision and its warnings for ``run_dir`` (finetune.checkpoints.choose), None without one."""
    check_settings(cfg)
    training_objective(cfg)
    target_regex(settings(cfg.lora))
    check_quantization(cfg.model.quantization)
    settings(cfg.export).validate(allow_none=True)
    if cfg.eval.enabled:  # a typo in eval.* must not wait for the end of training to show
        from eval.compare import validate

        validate(OmegaConf.to_container(cfg.eval))
    if cfg.model.name_or_path != "tiny":
        resolve_model_path(cfg.model.name_or_path, cfg.model.revision)
    for name in settings(cfg.train).report_to_list():  # Trainer would fail only once training starts
        if importlib.util.find_spec(name) is None:
            raise UserError(f"train.report_to={cfg.train.report_to!r}: {name} is not installed: pip install {name}, "
                            "or train.report_to=none")
    settings(cfg.checkpoint)
    check_launch(cfg)
    run_dir = run_dir or cfg.output_dir
    decision = None
    if run_dir:  # what it would resume, or why it cannot: before anything loads
        decision = checkpoints.choose(cfg.resume, os.path.abspath(run_dir), OmegaConf.to_container(cfg, resolve=True),
                                      holds_out=holds_out_of_train)
    refuse_if_it_cannot_fit(cfg)  # before 52 GB load and fail
    return decision


def check_launch(cfg: DictConfig) -> None:
    """This launch's processes against the `distributed` settings; records their number as distributed.world_size
    (each checkpoint's config keeps it: a resume on another number is refused, finetune.checkpoints.compare)."""
    launched = distributed.world_size()
    if launched == 1 and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
        raise UserError("MASTER_ADDR is set but WORLD_SIZE is not: accelerate launch without --multi_gpu starts "
                        "separate single processes (each would train alone into the same output_dir); add "
                        "--multi_gpu (also for one GPU per node), or unset MASTER_ADDR for a single-process run")
    planned = cfg.distributed.world_size
    if planned is not None and planned != launched:
        raise UserError(f"distributed.world_size={planned}, but this launch started {launched} process"
                        f"{'es' if launched > 1 else ''}: launch {planned} (accelerate launch --num_processes "
                        f"{planned}), or drop distributed.world_size (it is for python -m finetune.plan)")
    fsdp = distributed.strategy(cfg.distributed.strategy, launched) == "fsdp"
    if fsdp and cfg.model.quantization != "none":
        raise UserError(f"distributed=fsdp shards the bf16 weights; model.quantization={cfg.model.quantization} "
                        "keeps 4-bit experts FSDP cannot shard: use model.quantization=none with fsdp, or "
                        "distributed=ddp with the 4-bit model (each process holds it whole)")
    if fsdp and cfg.lora.placement != "decoder" and cfg.objective.self_conditioning_p > 0:
        # measured on torch 2.13 (gloo): a sharded layer pair that runs with gradient (encoder), without (the
        # self-conditioning pass) and with again (decoder) crashes in backward; either alone trains
        raise UserError("distributed=fsdp cannot yet train the encoder's LoRA together with self-conditioning "
                        f"(lora.placement={cfg.lora.placement}, objective.self_conditioning_p="
                        f"{cfg.objective.self_conditioning_p}): FSDP2 fails in backward when a sharded layer runs "
                        "with, without, then with gradient. Use lora.placement=decoder objective.encoder_ar_weight=0, "
                        "or objective.self_conditioning_p=0, or distributed=ddp when the model fits each device")
    if launched > 1 and cfg.model.name_or_path == "tiny" and not base_cached(base_dir(cfg.cache_dir,
                                                                                       settings(cfg.model).tiny)):
        raise UserError("the tiny base is not cached yet, and several processes would each pre-train it: build it "
                        "once with one process (python -m finetune.pretrain), then launch again")
    with open_dict(cfg):
        cfg.distributed.world_size = launched


def remove_if_unused(run_dir: str) -> None:
    """A run that failed before writing anything of its own leaves no directory behind (Hydra's files and the run's
    lock aside)."""
    if os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= UNUSED:
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = os.path.dirname(run_dir)  # a multirun sweep directory left with only Hydra's multirun.yaml
        if os.path.isdir(parent) and set(os.listdir(parent)) <= {"multirun.yaml"}:
            shutil.rmtree(parent, ignore_errors=True)


def save_adapter(peft_model, tokenizer, path: str, kept: str | None = None):
    """Write the adapter next to its final place, then rename: an interrupted save leaves no half adapter, a full
    disk none either (finetune.disk.DiskFull; ``kept`` says what the user still has)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    needed = sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)
    with disk.guard(path, needed_bytes=needed, staging=tmp, kept=kept):
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        peft_model.get_base_model().generation_config.save_pretrained(tmp)
        os.replace(tmp, path)


def _kept_checkpoint(root: str) -> str:
    """What a run still has when its adapter or report cannot be written."""
    last = checkpoints.newest_complete(root)
    return (f"the last sealed checkpoint, {last}, is intact: the same command continues from it" if last else
            "no checkpoint was sealed (checkpoint.every sets how often): the training is lost")


def run(cfg: DictConfig, run_dir: str | None = None) -> dict:
    """Train, evaluate and export one run into ``run_dir`` (default: cfg.output_dir)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.time()
    OmegaConf.resolve(cfg)
    run_dir = os.path.abspath(run_dir or cfg.output_dir)
    with open_dict(cfg):
        cfg.output_dir = run_dir
    decision, warnings = check(cfg, run_dir)
    device = resolve_device(cfg.hardware.device)
    distributed.start(cpu=device == "cpu")  # several processes: join the launch's group (one: nothing)
    main = distributed.is_main()
    distributed.agree(decision.checkpoint, "the checkpoint to resume")
    for line in warnings:
        print(line)
    if decision.checkpoint:
        print(f"resuming from {decision.checkpoint}" + (f" (settings changed since: {'; '.join(decision.changed)})"
                                                        if decision.changed else ""))
        if decision.base_commit and cfg.model.revision != decision.base_commit:
            print(f"resume: the base is loaded at commit {decision.base_commit}, the one the checkpoint trained on")
            cfg.model.revision = decision.base_commit
    data_settings = settings(cfg.data)

    strategy = distributed.strategy(cfg.distributed.strategy)
    path = base_model_path(settings(cfg.model), cfg.cache_dir)
    if decision.base_identity and os.path.isdir(path) and local_identity(path) != decision.base_identity:
        raise UserError(f"{path} has changed since {decision.checkpoint} was written (its config and index hashed "
                        f"{decision.base_identity}, now {local_identity(path)}): the checkpoint's LoRA learnt on the "
                        "other files. Put those back, or start fresh: resume=false (the old checkpoints are kept)")
    # fsdp: each process loads into host memory and keeps 1/N of the base on its device (finetune.distributed)
    dtype = str(dtype_for(cfg.model.dtype, device)).removeprefix("torch.")  # the training device's, wherever loaded
    model, tokenizer, _ = load(path, "cpu" if strategy == "fsdp" else device, dtype,
                               quantization=cfg.model.quantization,
                               attn=cfg.model.attn_implementation, experts=cfg.model.experts_implementation,
                               revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
                               quant_type=cfg.model.quant_type)
    canvas_length = model.config.canvas_length
    objective = training_objective(cfg, tokenizer)
    splits = load_splits(data_settings, tokenizer, canvas_length)
    train_rows, train_ex, train_stats, eval_rows, eval_ex, eval_stats = splits
    turns = max((len(e.targets) for e in train_ex), default=1)
    if data_settings.supervise == "all" and turns > 1:  # the plan before loading counted one canvas per example
        refuse_if_it_cannot_fit(cfg, turns)

    if data_settings.answers == "base":  # the base's own answers, before any LoRA exists: no second copy held
        train_rows, train_ex, train_stats, answered = base_answers(cfg, model, tokenizer, train_rows, data_settings,
                                                                    canvas_length, path, main)
    # Nothing is written before here: a run that cannot start leaves no directory (see finetune.__main__).
    os.makedirs(run_dir, exist_ok=True)
    if main:  # rank 0 writes the run's files; the others train and leave
        checkpoints.set_aside(decision.set_aside)  # renamed, never deleted: resume=false's old checkpoints, an adapter
        disk.write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(cfg))
    distributed.barrier()
    print(f"run directory: {run_dir}" + (f" ({distributed.world_size()} processes, "
                                         f"{distributed.strategy(cfg.distributed.strategy)})"
                                         if distributed.world_size() > 1 else ""))
    text, preflight_data = preflight.report(data_settings, train_ex, train_stats, eval_stats, tokenizer, canvas_length)
    if main:
        preflight.write(run_dir, text, preflight_data)
    print(f"data: train {train_stats.kept}/{train_stats.read} rows kept ({train_stats.targets} turns), "
          f"eval {eval_stats.kept}/{eval_stats.read} (details: {run_dir}/preflight.txt)")
    if data_settings.answers == "base":
        print(f"data.answers=base: {answered['replaced']} training answers are the base's own"
              + (f", {answered['kept_data_answer_empty']} kept the data's (the base gave no text)"
                 if answered["kept_data_answer_empty"] else "") + f" ({answered['cache']})")
    if eval_stats.held_out:
        print(f"data.eval: {eval_stats.held_out}")

    # Seeded here, not at the start: pre-training the tiny base on a cold cache draws from the same generator, and
    # the LoRA initialisation must not depend on whether the base was cached.
    torch.manual_seed(cfg.seed)
    peft_model = attach_lora(model, settings(cfg.lora))
    trainable, total = count_parameters(peft_model)
    print(f"model: {path} | canvas {canvas_length} | LoRA trainable {trainable:,} of {total:,} parameters")

    train_settings = settings(cfg.train)
    callbacks = samples_while_training(cfg, tokenizer, eval_rows, eval_ex, data_settings, canvas_length, run_dir,
                                       model, decision.checkpoint, strategy,
                                       tensorboard="tensorboard" in train_settings.report_to_list())
    t0 = time.time()
    root = os.path.join(run_dir, checkpoints.CHECKPOINTS)
    trainer = fit(peft_model, train_ex, train_settings, objective, canvas_length, tokenizer.pad_token_id, root,
                  bf16=cfg.hardware.bf16, use_cpu=device == "cpu", log_dir=os.path.join(run_dir, "tensorboard"),
                  checkpoint=settings(cfg.checkpoint), resume_from=decision.checkpoint,
                  run_config=OmegaConf.to_container(cfg, resolve=True), strategy=strategy, callbacks=callbacks)
    train_seconds = time.time() - t0
    stopped = signal.Signals(trainer.stopped_by).name if trainer.stopped_by else None
    if stopped and trainer.state.global_step < train_settings.max_steps:
        distributed.barrier()
        raise RunStopped(f"{stopped} at step {trainer.state.global_step}: checkpoint "
                         f"{checkpoints.newest_complete(root)} written; to continue, run the same command with "
                         f"output_dir={run_dir} (resume=auto is the default)", code=128 + trainer.stopped_by)
    if not main:  # evaluation and export run on rank 0 alone: the adapter is complete there
        return {}
    save_adapter(peft_model, tokenizer, os.path.join(run_dir, "adapter"), kept=_kept_checkpoint(root))

    logged = [e for e in trainer.state.log_history if "loss" in e]
    losses = trainer.step_losses
    metrics = {
        "run_name": cfg.run_name,
        "base_model": path,
        "base_commit": base_commit(model),  # the hub commit the base was loaded from; null for a local directory
        "base_identity": base_identity(model),  # a local directory's hash of its config and index; null for a hub id
        "training": {
            "steps": trainer.state.global_step,
            "resumed_from": decision.checkpoint,
            "seconds": train_seconds,
            "trainable_params": trainable,
            "loss_first": losses[0],
            "loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "log_history": trainer.state.log_history,
        },
        "data": {"train": train_stats.summary(), "eval": eval_stats.summary(),
                 **({"answers": answered} if data_settings.answers == "base" else {})},
    }
    # a full disk from here on: the trained adapter is safe, and the same command would refuse a finished run
    saved = f"the adapter is saved in {run_dir}/adapter (python -m eval adapter={run_dir}/adapter evaluates it)"
    disk.write_json(os.path.join(run_dir, checkpoints.TRACE), {"losses": losses, "rows": trainer.seen_rows},
                    kept=saved)
    with disk.guard(os.path.join(run_dir, "loss_curve.png"), kept=saved):
        plot_loss(losses, logged, os.path.join(run_dir, "loss_curve.png"), train_settings.grad_accum)

    if stopped:  # after the last step: the training is complete and saved; what follows is skipped
        disk.write_json(os.path.join(run_dir, "metrics.json"), metrics, indent=2, kept=saved)
        raise RunStopped(f"{stopped} after the last step: the adapter is saved in {run_dir}/adapter; evaluation and "
                         f"export were skipped (python -m eval adapter={run_dir}/adapter runs the evaluation)",
                         code=128 + trainer.stopped_by)
    if strategy == "fsdp" and (cfg.eval.enabled or cfg.export.format != "none"):
        # the sharded base needs every process, and the others have left: rank 0 evaluates and exports what
        # python -m eval would load, the base and the saved adapter, on its own device
        print(f"evaluation and export: loading the base and {run_dir}/adapter on rank 0 alone (the FSDP-sharded "
              "model needs every process)")
        del trainer, peft_model, model
        peft_model, tokenizer, _ = load(path, device, dtype, adapter=os.path.join(run_dir, "adapter"),
                                        attn=cfg.model.attn_implementation, experts=cfg.model.experts_implementation,
                                        revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
        model = base_of(peft_model)
    if cfg.eval.enabled:
        from eval.compare import compare

        pairs = eval_prompts(eval_rows, tokenizer, data_settings)
        meta = {"base_model": path, "base_commit": base_commit(model), "base_identity": base_identity(model),
                "base_weights": weights_note(cfg.model.quantization, cfg.model.quant_type, model.dtype)}
        with disk.guard(os.path.join(run_dir, "report.json"), kept=saved):
            metrics["eval"] = compare(peft_model, tokenizer, pairs, eval_ex, objective, canvas_length,
                                      OmegaConf.to_container(cfg.eval), out_dir=run_dir, data_settings=data_settings,
                                      meta=meta)
    metrics["seconds_total"] = time.time() - started
    disk.write_json(os.path.join(run_dir, "metrics.json"), metrics, indent=2, kept=saved)
    print(summary(metrics, run_dir))
    if cfg.export.format != "none":  # after metrics: a refused or failed export leaves the finished run intact
        from finetune.export import export_at_end_of_run

        metrics["export"] = export_at_end_of_run(run_dir, cfg, peft_model, tokenizer, device)
    return metrics
