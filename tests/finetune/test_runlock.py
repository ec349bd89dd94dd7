"""One run, one directory (finetune.runlock): a second start on a directory another process trains in is refused in
one line naming the holder and writes nothing; a lock left by a killed process is taken over with a warning; eval and
export refuse a run still training; each job of a -m sweep locks its own directory. No model is trained here: the
run itself is replaced by a stand-in that looks at the lock (tests/test_interruptions.py trains two at once)."""

import os
import signal
import socket
import subprocess
import sys

import pytest

import finetune.run as run_module
from finetune import runlock
from finetune.__main__ import main
from finetune.errors import UserError

from conftest import ROOT, assert_one_line_error

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from finetune import runlock
runlock.acquire({run!r})
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run: (its Popen, the run directory)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, run=str(run))], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc, run
    proc.kill()
    proc.wait()


def tree(path):
    """Every file under ``path`` with its bytes; the lock file read in another process: closing any descriptor of a
    file drops this process's fcntl locks on it, so the process holding a lock must never open it otherwise."""
    files = {os.path.relpath(os.path.join(r, n), path): os.path.join(r, n) for r, _, names in os.walk(path)
             for n in names}
    return {name: subprocess.run(["cat", full], capture_output=True).stdout for name, full in files.items()}


def second_start(run, tmp_path):
    """`python -m finetune output_dir=RUN` in a process of its own (a cache of its own: if it were not refused, it
    would not build the tiny base where other tests look for it)."""
    return subprocess.run([sys.executable, "-m", "finetune", f"output_dir={run}", "train.max_steps=1"], cwd=ROOT,
                          env={**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache")}, capture_output=True,
                          text=True, timeout=120)


def test_a_lock_held_by_another_process_is_refused_naming_it(holder):
    proc, run = holder
    with pytest.raises(UserError, match=f"pid {proc.pid} on {socket.gethostname()}"):
        runlock.acquire(str(run))
    assert runlock.held_by_other(str(run)) == (socket.gethostname(), proc.pid)
    assert (run / runlock.NAME).read_text().split() == [socket.gethostname(), str(proc.pid)]  # untouched


def test_a_second_python_m_finetune_exits_2_naming_the_holder_and_writes_nothing(holder):
    proc, run = holder
    before = tree(run)
    result = second_start(run, run.parent)
    assert_one_line_error(result, f"is in use by another run (pid {proc.pid} on {socket.gethostname()})")
    assert tree(run) == before  # no .hydra/, no log, the lock file still the holder's


def test_a_stale_lock_of_a_killed_process_is_taken_over_with_a_warning(holder, capsys):
    proc, run = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / runlock.NAME).read_text().split()[1] == str(proc.pid)  # the dead holder's name is still there
    assert runlock.held_by_other(str(run)) is None  # fcntl locks die with their process
    runlock.acquire(str(run))
    try:
        err = capsys.readouterr().err
        assert f"took over the stale lock of pid {proc.pid}" in err
        assert tree(run)[runlock.NAME].decode().split() == [socket.gethostname(), str(os.getpid())]
    finally:
        runlock.release(str(run))
    assert (run / runlock.NAME).read_text() == ""  # a clean end empties the file: the next start warns of nothing
    runlock.acquire(str(run))
    runlock.release(str(run))
    assert "stale" not in capsys.readouterr().err


def test_a_run_holds_its_lock_from_before_hydra_writes_and_a_second_start_meanwhile_is_refused(tmp_path,
                                                                                              monkeypatch):
    run = tmp_path / "run"
    seen = {}

    def stand_in(cfg, run_dir):
        seen["held"] = runlock.held_by_other(run_dir) is None and os.path.abspath(run_dir) in runlock._held
        before = tree(run)
        seen["file"] = before[runlock.NAME].decode().split()
        seen["second"] = second_start(run, tmp_path)
        seen["unchanged"] = tree(run) == before
        (run / "metrics.json").write_text("{}")  # something of its own: the directory stays
        return {}

    monkeypatch.setattr(run_module, "run", stand_in)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    try:
        assert main([f"output_dir={run}"]) == 0
    finally:
        runlock.release(str(run))
    assert seen["held"] and seen["file"] == [socket.gethostname(), str(os.getpid())]
    assert_one_line_error(seen["second"], f"(pid {os.getpid()} on {socket.gethostname()})")
    assert seen["unchanged"]


def test_the_default_directory_named_by_the_clock_is_the_one_locked_and_run_in(tmp_path, monkeypatch):
    """output_dir's default is outputs/<run_name>-<time to the second>, and Hydra reads the clock again after the
    check has locked the directory: held here across a second boundary between the two, the run must still go to
    the directory it locked, and leave no other behind (CI once found outputs/ holding an empty locked directory)."""
    import time

    import finetune.__main__ as entry

    seen = []

    def stand_in(cfg, run_dir):
        seen.append((os.path.abspath(run_dir), sorted(runlock._held)))
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            f.write("{}")
        return {}

    def register_then_tick(register=entry.register):
        register()
        start = int(time.time())
        while int(time.time()) == start:  # the next second: Hydra's ${now:...} now names another directory
            time.sleep(0.01)

    monkeypatch.setattr(run_module, "run", stand_in)
    monkeypatch.setattr(entry, "register", register_then_tick)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["train.max_steps=1"]) == 0
    finally:
        for held in list(runlock._held):
            runlock.release(held)
    [(run_dir, held)] = seen
    assert held == [run_dir]
    assert os.listdir(tmp_path / "outputs") == [os.path.basename(run_dir)]


def test_each_job_of_a_sweep_locks_its_own_directory(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    held = []

    def stand_in(cfg, run_dir):
        held.append((os.path.abspath(run_dir), sorted(runlock._held)))
        assert tree(run_dir)[runlock.NAME].decode().split()[1] == str(os.getpid())
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            f.write("{}")
        return {}

    monkeypatch.setattr(run_module, "run", stand_in)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    assert main(["-m", "seed=1,2", f"hydra.sweep.dir={sweep}"]) == 0
    assert [dirs for _, dirs in held] == [[job] for job, _ in held]  # its own, and only its own
    assert sorted(os.path.basename(job) for job, _ in held) == ["0", "1"]
    assert not runlock._held  # each released when its job ended
    assert all((sweep / name / runlock.NAME).read_text() == "" for name in ("0", "1"))


def test_a_failed_start_leaves_no_directory_though_it_took_the_lock(tmp_path, monkeypatch):
    run = tmp_path / "run"

    def stand_in(cfg, run_dir):
        raise UserError("stand-in failure before anything of the run's own is written")

    monkeypatch.setattr(run_module, "run", stand_in)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    with pytest.raises(SystemExit) as exited:
        main([f"output_dir={run}"])
    runlock.release(str(run))
    assert exited.value.code == 2 and not run.exists()  # run.lock and .hydra/ only: unused, removed


def test_eval_and_export_refuse_a_run_that_is_still_training(holder, capsys):
    from eval.__main__ import main as eval_main
    from finetune.export.cli import main as export_main

    proc, run = holder
    (run / "adapter").mkdir()
    expected = f"is still training (pid {proc.pid} on {socket.gethostname()}); wait for it to finish or stop it"
    for command, args in ((export_main, [f"run_dir={run}"]), (export_main, [f"adapter={run / 'adapter'}"]),
                          (eval_main, [f"adapter={run / 'adapter'}"])):
        assert command(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    proc.kill()
    proc.wait()
    runlock.refuse_if_training(str(run / "adapter"), "adapter=")  # the holder is gone: it reads on
    assert runlock.held_by_other(str(run)) is None  # and did not keep the lock it tried
