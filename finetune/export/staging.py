"""Where an export is written, and how: ``<out>.tmp-XXXX`` renamed to ``<out>`` only when complete, files that exist
only whole (shards and JSON written under ``.partial`` names, then renamed: finetune.disk), and whether the disk has
room for it before anything is written."""

from __future__ import annotations

import os
import shutil
import tempfile

from finetune import disk
from finetune.config import ExportSettings
from finetune.errors import UserError


class Staged:
    """``<out>.tmp-XXXX`` next to ``out``: renamed into place by ``commit``, removed on any failure."""

    def __init__(self, out: str):
        self.out = out
        self.parent = os.path.dirname(out)
        self.created_parent = not os.path.isdir(self.parent)
        os.makedirs(self.parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=self.parent)
        self.done = False

    def commit(self):
        if os.path.exists(self.out):
            raise UserError(f"{self.out} appeared while exporting: nothing overwritten")
        os.rename(self.path, self.out)
        self.done = True

    def cleanup(self):
        if not self.done:
            shutil.rmtree(self.path, ignore_errors=True)
            if self.created_parent:
                try:
                    os.rmdir(self.parent)
                except OSError:
                    pass


def write_shard(tensors: dict, path: str):
    """One shard under a temporary name, then renamed: a shard file that exists is whole."""
    from safetensors.torch import save_file

    disk.write_whole(path, lambda partial: save_file(tensors, partial, metadata={"format": "pt"}))


def write_json(obj, path: str):
    disk.write_json(path, obj, indent=2, sort_keys=True)


def refuse_if_it_cannot_fit(outs: dict, needed: dict) -> None:
    """Before anything is written: each export's known size (``needed``: {format: bytes}, a margin included) against
    the free space of the filesystem it goes to; exports on one filesystem add up. Refused as disk.DiskFull."""
    by_device: dict = {}
    for fmt, out in outs.items():
        parent = os.path.dirname(out)
        while not os.path.exists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        by_device.setdefault(os.stat(parent).st_dev, []).append(fmt)
    for fmts in by_device.values():
        total = sum(needed.get(f, 0) for f in fmts)
        free = disk.free_bytes(outs[fmts[0]])
        if total > free:
            what = " and ".join(f"{f} {disk.human(needed.get(f, 0))}" for f in fmts)
            raise disk.DiskFull(f"not enough disk space for the export at {outs[fmts[0]]}: {disk.human(total)} "
                                f"needed ({what}, a margin included), {disk.human(free)} free there; nothing was "
                                "written: free some space, or pass out=<a directory on a larger disk>")


def output_dirs(settings: ExportSettings, default: str) -> dict:
    """``{format: final directory}``: ``out=`` as given (with format=both, ``out/adapter`` and ``out/merged``), else
    ``default/<format>``. An existing directory is refused: an export never overwrites."""
    formats = ["adapter", "merged"] if settings.format == "both" else [settings.format]
    if settings.out is None:
        dirs = {f: os.path.join(default, f) for f in formats}
    elif settings.format == "both":
        dirs = {f: os.path.join(settings.out, f) for f in formats}
    else:
        dirs = {settings.format: settings.out}
    dirs = {f: os.path.abspath(os.path.expanduser(d)) for f, d in dirs.items()}
    for d in dirs.values():
        if os.path.exists(d):
            raise UserError(f"{d} already exists: export never overwrites; remove it or pass out=<another dir>")
    return dirs
