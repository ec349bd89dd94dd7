"""Imported at start-up by a launched process when tests put this folder on PYTHONPATH (tests/test_distributed.py):
process 1 sleeps inside any glob of a checkpoint staging directory, between pathlib's is-a-directory check and its
scandir. The end of Trainer.train globs it on every process; when process 0 removed it in that window (a loaded CI
machine, once in three runs) process 1 died with FileNotFoundError: .../checkpoints/.staging. The sleep makes that
window certain, so a run that does not wait for every process before cleaning up fails every time."""

import os
import pathlib
import time

if os.environ.get("RANK") == "1":
    _select_from = pathlib._WildcardSelector._select_from

    def _slow(self, parent_path, *args):
        if str(parent_path).endswith(".staging"):
            time.sleep(2)
        return _select_from(self, parent_path, *args)

    pathlib._WildcardSelector._select_from = _slow
