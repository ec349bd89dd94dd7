"""A run's checkpoints: written so that they cannot lie, found and checked again before a resume.

Trainer writes a checkpoint's files (the adapter as safetensors, optimizer and scheduler state, every RNG the step
draws from: python, numpy, torch CPU and CUDA, which includes our noise, and trainer_state.json with the step and the
epoch: the data position). `seal` adds ours (the loss trace and the resolved config) and a manifest with each file's
size and SHA-256, written last; `commit` renames the sealed directory into place. So a directory named checkpoint-N is
either complete or was damaged afterwards, and `verify` tells which. Nothing here deletes a checkpoint that fails its
check: it is skipped with a warning and left for the user to look at.

`choose` is the resume decision (`resume=auto|false|PATH`); it reads and checks, and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field

from finetune import disk
from finetune.config import resume_rule
from finetune.errors import UserError

CHECKPOINTS = "checkpoints"  # <run>/checkpoints/checkpoint-N
MANIFEST = "manifest.json"
TRACE = "trace.json"  # the loss of every micro-batch and its source rows, up to this step
CONFIG = "config.yaml"  # the run's resolved config when the checkpoint was written
STAGING = ".staging"  # <run>/checkpoints/.staging: where Trainer writes before a checkpoint is sealed
# What a resume needs; a checkpoint without one of these is not complete, whatever its manifest says.
REQUIRED = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json",
            TRACE, CONFIG)
RNG = re.compile(r"^rng_state(_\d+)?\.pth$")  # rng_state.pth, or one per process (rng_state_<rank>.pth)
FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _missing(names) -> list[str]:
    """What a resume needs that ``names`` lacks."""
    missing = [name for name in REQUIRED if name not in names]
    return missing if any(RNG.match(n) for n in names) else missing + ["rng_state.pth"]


# --- writing -------------------------------------------------------------------------------------------------------
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, _, names in os.walk(directory) for name in names)


def write_json(path: str, data) -> None:
    """Whole or not at all: a full disk leaves no truncated JSON (finetune.disk)."""
    disk.write_json(path, data)


def seal(directory: str, info: dict) -> None:
    """Fsync every file of a written checkpoint, then write its manifest (sizes, SHA-256, ``info``) last."""
    entries = {}
    for name in _files(directory):
        path = os.path.join(directory, name)
        _fsync(path)
        entries[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    missing = _missing(entries)
    if missing:  # our own bug or a Trainer change: never seal what cannot be resumed
        raise RuntimeError(f"checkpoint {directory} lacks {', '.join(missing)}: not sealed")
    write_json(os.path.join(directory, MANIFEST), {"format": FORMAT, **info, "files": entries})
    _fsync(os.path.join(directory, MANIFEST))
    _fsync(directory)


def commit(sealed: str, final: str) -> None:
    """Rename a sealed checkpoint into place. A directory already there (a damaged checkpoint of the same step, left
    by a run that is being resumed from an earlier one) is kept beside it, not overwritten."""
    if os.path.exists(final):
        os.replace(final, _free(f"{final}.replaced"))
    os.replace(sealed, final)
    _fsync(os.path.dirname(final))


def _free(stem: str) -> str:
    """<stem>-<time>, or -<time>-2, -3, ... when that name is taken: renaming aside never overwrites."""
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = name, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def rotate(root: str, keep: int) -> list[str]:
    """Delete complete checkpoints older than the newest ``keep`` complete ones; returns what was deleted. Damaged
    ones are never counted nor deleted."""
    complete = [path for _, path in listed(root) if verify(path) is None]
    for path in complete[keep:]:
        shutil.rmtree(path)
    return complete[keep:]


# --- reading -------------------------------------------------------------------------------------------------------
def listed(root: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N directory under ``root``, newest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := _NAME.match(name))]
    return sorted(found, reverse=True)


def manifest(directory: str) -> dict:
    with open(os.path.join(directory, MANIFEST)) as f:
        return json.load(f)


def verify(directory: str) -> str | None:
    """None if ``directory`` is a complete checkpoint; otherwise why not, in a few words naming the file."""
    if not os.path.isfile(os.path.join(directory, MANIFEST)):
        return f"no {MANIFEST} (an interrupted write, or not written by this version)"
    try:
        entries = manifest(directory)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    missing = _missing(entries)
    if missing:
        return f"{MANIFEST} does not list {', '.join(missing)}"
    for name, entry in entries.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != entry["bytes"]:
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {entry['bytes']} (truncated?)"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in {MANIFEST} (corrupted)"
    return None


def newest_complete(root: str, warn=None) -> str | None:
    """The newest checkpoint under ``root`` that passes `verify`; each newer one that fails is named to ``warn``."""
    for _, path in listed(root):
        problem = verify(path)
        if problem is None:
            return path
        if warn:
            warn(f"warning: skipping checkpoint {path}: {problem}")
    return None


def run_of(path: str) -> str:
    """The run directory of a checkpoint (<run>/checkpoints/checkpoint-N -> <run>); a run directory is its own."""
    path = os.path.abspath(os.path.expanduser(path))
    return os.path.dirname(os.path.dirname(path)) if _NAME.match(os.path.basename(path)) else path


# --- the resume decision -------------------------------------------------------------------------------------------
# What a resumed run may change is on each field of the schema (finetune.config: FIXED, HELD_OUT, LAUNCH, LISTED,
# QUIET): the checkpoint's weights, optimizer state and data position mean nothing under another base, LoRA shape,
# data stream or seed (refused); lr, max_steps, the objective, ... may change (listed), since resuming with a lower lr
# after a NaN is a legitimate thing to do; where a run writes, what it reports and how it evaluates are not listed.


@dataclass
class Decision:
    checkpoint: str | None = None  # the checkpoint to continue from; None starts fresh
    set_aside: list[str] = field(default_factory=list)  # what to move out of the way (renamed, never deleted) first
    changed: list[str] = field(default_factory=list)  # "key: checkpoint -> now" for settings that differ

    @property
    def base_commit(self) -> str | None:
        return manifest(self.checkpoint).get("base_commit") if self.checkpoint else None

    @property
    def base_identity(self) -> str | None:
        return manifest(self.checkpoint).get("base_identity") if self.checkpoint else None


def resume_value(value) -> str:
    """``resume`` as one of auto | false | a path."""
    if value is None or value is False or str(value).lower() in ("false", "no", "none", "null", "0"):
        return "false"
    return "auto" if str(value) == "auto" else os.path.abspath(os.path.expanduser(str(value)))


def _flat(node, prefix="") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _eval_not_given(data: dict) -> bool:
    """Without the data layer's answer (`finetune.data.holds_out_of_train`): data.eval null or auto may hold rows out
    of data.train."""
    return data.get("eval", "") in (None, "auto")


def compare(saved: dict, now: dict, checkpoint: str, holds_out=_eval_not_given) -> list[str]:
    """Settings that differ between the checkpoint's config and this run's: refused if fixed, else listed.
    ``holds_out(data)`` says whether a config's data block takes its eval rows out of data.train."""
    old, new = _flat(saved), _flat(now)
    held_out = any(holds_out(config.get("data") or {}) for config in (saved, now))  # here or in the checkpoint
    changed = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        rule = resume_rule(key)
        if rule == "held_out" and not held_out:
            rule = "quiet"  # it only names or sizes the held-out set
        # A key the checkpoint's config lacks was added to the schema since: nothing to compare it with.
        if before == after or key not in old or rule == "quiet":
            continue
        if rule == "launch":
            raise UserError(f"resume: {checkpoint} was written by a launch with {key}={before!r}, this one has "
                            f"{after!r}: a checkpoint holds each process's data position and random state and its "
                            "optimizer state as that launch laid it out, so resume with the same number of "
                            "processes and strategy (accelerate launch --num_processes N), or start a new run")
        if rule == "held_out":
            raise UserError(f"resume: {checkpoint} was trained with {key}={before!r}, this run says {after!r}: while "
                            "the eval rows are held out of data.train it decides which rows train, and a resumed run "
                            "keeps its training rows (drop the override, or start a new run in another output_dir)")
        if rule == "fixed":
            raise UserError(f"resume: {checkpoint} was trained with {key}={before!r}, this run says {after!r}: a "
                            "resumed run keeps its base, LoRA, data, batch and seed (drop the override, or start a "
                            "new run in another output_dir)")
        changed.append(f"{key}: {before!r} -> {after!r}")
    return changed


def _saved_config(checkpoint: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(os.path.join(checkpoint, CONFIG)), resolve=False)


def choose(resume, run_dir: str, config: dict, holds_out=_eval_not_given) -> tuple[Decision, list[str]]:
    """What this run continues from, and what must be set aside first, for ``resume`` (auto | false | a checkpoint
    or run directory) and the run directory; plus warnings to print. Refusals are UserErrors that say what to do.

    auto: the newest complete checkpoint of run_dir, in place; fresh when run_dir has none. false: fresh; checkpoints
    of an earlier run in run_dir are renamed aside. PATH: that checkpoint (or the newest complete one of that run
    directory), checked strictly; into its own run directory (newer checkpoints of that run, from the trajectory
    being abandoned, are renamed aside), or into run_dir as a new run branched from it. A run directory holding a
    finished adapter is only continued when PATH names it or one of its checkpoints; that adapter is renamed aside.
    ``holds_out`` goes to `compare`.
    """
    value = resume_value(resume)
    root = os.path.join(run_dir, CHECKPOINTS)
    adapter = os.path.join(run_dir, "adapter")
    finished = os.path.exists(adapter)
    warnings: list[str] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")

    if value == "false":
        if finished:
            raise UserError(f"output_dir {run_dir} already holds an adapter: choose another output_dir (nothing "
                            "overwritten)")
        aside = [root] if listed(root) else []
        if aside:
            warnings.append(f"resume=false: the checkpoints of the earlier run in {run_dir} are kept in "
                            f"{root}.old-{stamp}")
        return Decision(set_aside=aside), warnings

    if value == "auto":
        if finished:
            newest = listed(root)
            hint = newest[0][1] if newest else f"{root}/checkpoint-N"
            raise UserError(f"output_dir {run_dir} holds a finished run (adapter/): choose another output_dir for a "
                            f"new run; to train this one further, give resume={hint} (its adapter is kept as "
                            "adapter.replaced-<time>)")
        if not listed(root):
            return Decision(), warnings
        checkpoint = newest_complete(root, warn=warnings.append)
        if checkpoint is None:
            raise UserError(f"output_dir {run_dir} holds checkpoints but none is complete (warnings above): nothing to "
                            f"resume; resume=false starts over there (they are kept in {root}.old-<time>), or choose "
                            "another output_dir")
    else:
        checkpoint = value
        if not os.path.isdir(checkpoint):
            raise UserError(f"resume={resume}: no such directory: give a checkpoint (<run>/checkpoints/checkpoint-N), "
                            "a run directory, auto or false")
        if not _NAME.match(os.path.basename(checkpoint)):  # a run directory: its newest complete checkpoint
            found = newest_complete(os.path.join(checkpoint, CHECKPOINTS), warn=warnings.append)
            if found is None:
                raise UserError(f"resume={resume}: no complete checkpoint under {checkpoint}/{CHECKPOINTS}")
            checkpoint = found
        problem = verify(checkpoint)
        if problem:
            raise UserError(f"resume={resume}: {checkpoint} is not a complete checkpoint: {problem}; resume=auto "
                            "picks the newest complete one")
        same_run = os.path.abspath(run_of(checkpoint)) == os.path.abspath(run_dir)
        if not same_run and (finished or listed(root)):
            raise UserError(f"output_dir {run_dir} already holds a run: to branch from {checkpoint}, give an "
                            "output_dir that is new or empty (nothing overwritten)")
    decision = Decision(checkpoint=checkpoint, changed=compare(_saved_config(checkpoint), config, checkpoint,
                                                               holds_out))
    step = int(_NAME.match(os.path.basename(checkpoint)).group(1))
    newer = [path for n, path in listed(root) if n > step] if value != "auto" else []
    for path in reversed(newer):  # else rotation and resume=auto would take them for this run's newest
        decision.set_aside.append(path)
        warnings.append(f"resume: {path} is newer than {checkpoint}; it is kept as {path}.abandoned-<time>")
    if finished:
        decision.set_aside.append(adapter)
        warnings.append(f"resume: the finished adapter in {run_dir} is kept as {adapter}.replaced-{stamp}")
    return decision, warnings


def set_aside(paths: list[str]) -> None:
    """Rename each path aside, never deleting: <run>/checkpoints -> checkpoints.old-<time> (resume=false), an adapter
    -> adapter.replaced-<time>, a checkpoint newer than the one resumed -> checkpoint-N.abandoned-<time>."""
    for path in paths:
        name = os.path.basename(path)
        suffix = "replaced" if name == "adapter" else "abandoned" if _NAME.match(name) else "old"
        os.replace(path, _free(f"{path}.{suffix}"))


def clean_staging(root: str) -> None:
    """Remove what an interrupted write left in the staging directory (never a sealed checkpoint)."""
    shutil.rmtree(os.path.join(root, STAGING), ignore_errors=True)
