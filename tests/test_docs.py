"""The docs are true to the code. Every command line in a fenced shell block of README.md and playbooks/*/README.md
is checked, one test per line:
- run here in a CPU form where that is cheap: the Quickstart (CI runs the same two commands), `python -m finetune`
  lines that Hydra answers or that print the config (`--info`, `--help`, `--cfg`), `python -m finetune.preflight`
  on the tiny recipe, and `python -m finetune.plan` lines once finetune/plan.py exists (`run_plan`);
- otherwise shell-parsed (shlex) and, for our entry points, checked as the entry point checks its arguments before
  it loads anything, so a typo in a key fails here: `python -m finetune` composes and checks every job,
  finetune.plan and finetune.preflight compose their overrides, finetune.export parses its keys, eval runs with
  `--cfg job`;
- plain shell (pip, git, sudo, nvidia-smi, ...) must shlex-parse and name a program listed in PROGRAMS (so
  `pyhton -m finetune` fails), `sh -c` strings are parsed the same way, and `python -c` code and every ```python
  block must compile.
Placeholders such as `<time>` or `<this repository>` stand for a value: they are replaced by PLACEHOLDER (an
adapter path by a fake adapter directory) before the check.
"""

import ast
import contextlib
import glob
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
ENTRY_POINTS = ("finetune", "finetune.plan", "finetune.preflight", "finetune.export", "eval", "finetune.chat",
                "finetune.doctor")
OTHER_MODULES = ("pytest", "venv", "pip", "eval.harness")  # python -m X that is not ours to compose
# the programs the docs may name; a new one is added here on purpose, a typo fails
PROGRAMS = ("python", "python3", "pip", "git", "cd", ".", "source", "sudo", "sh", "bash", "eval", "export",
            "tensorboard", "vllm", "hf", "nvidia-smi", "free", "watch", "ssh", "echo", "cat",
            "sync", "finetune", "accelerate", "torchrun", "ibdev2netdev", "ip", "chmod", "netplan", "ping",
            "ib_write_bw", "iperf3", "sha256sum", "ssh-keygen", "ssh-copy-id", "ufw", "mkdir", "chown", "rsync",
            "printf", "docker", "curl", "timeout", "apt", "du", "rm")
# programs that no current package installs, with what replaces them: refused in commands, prose and the library's
# hints alike (huggingface_hub 1.0 removed `huggingface-cli`, and transformers >= 5.24 needs huggingface_hub >= 1.31)
REMOVED = {"huggingface-cli": "huggingface_hub >= 1.0 installs only `hf`: `hf auth login`, `hf download REPO "
                              "--local-dir DIR`"}
# the console scripts the docs name, by the distribution that installs them (vllm: on the serving machine only)
CONSOLE_SCRIPTS = {"hf": "huggingface_hub", "accelerate": "accelerate", "torchrun": "torch",
                   "tensorboard": "tensorboard", "finetune": "finetune", "vllm": "vllm"}
LAUNCHERS = ("accelerate", "torchrun")  # `accelerate launch [flags] -m MODULE args`, `torchrun [flags] -m MODULE args`
OPERATORS = ("&&", "||", ";", "|", "&")
REDIRECTIONS = (">", ">>", "<", "&>", ">&")  # the target that follows is dropped
PLACEHOLDER = re.compile(r"<[^\s<>][^<>]*>")


def docs(root=ROOT) -> list:
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "playbooks", "*", "README.md")))


def fenced_blocks(text) -> list:
    """(language, [(line number, line)]) for each fenced block of a Markdown text."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)\s*$", line)
        if fence and current is None:
            current = (fence.group(1).lower(), [])
        elif fence and not fence.group(1):
            blocks.append(current)
            current = None
        elif current is not None:
            current[1].append((number, line))
    assert current is None, "a fenced block is not closed"
    return blocks


def code_blocks(text) -> list:
    """The text of each shell (or untagged) fenced block."""
    return ["\n".join(line for _, line in lines) + "\n" for lang, lines in fenced_blocks(text)
            if lang in SHELL_LANGUAGES + ("",)]


def command_lines(root=ROOT) -> list:
    """(where, command, comment) for every command line of a fenced shell block: `file:line`, the command without
    its trailing comment (continuation lines joined), and that comment."""
    found = []
    for path in docs(root):
        for lang, lines in fenced_blocks(open(path).read()):
            if lang not in SHELL_LANGUAGES:
                continue
            pending, start = "", None
            for number, line in lines:
                if pending.endswith("\\"):
                    pending = pending[:-1].rstrip() + " " + line.strip()
                else:
                    pending, start = line.strip(), number
                if pending.endswith("\\"):
                    continue
                command, comment = split_comment(pending)
                if command:
                    found.append((f"{os.path.relpath(path, root)}:{start}", command, comment))
    return found


def split_comment(line) -> tuple:
    """(command, comment): a `#` that starts a word outside quotes begins the comment, as in bash."""
    quote, i = None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1:].strip()
        elif ch == "\\":
            i += 1
        i += 1
    return line.strip(), ""


def simple_commands(command) -> list:
    """The argv of each simple command of a shell line (split at &&, ||, ;, | and &, redirections dropped), with
    placeholders replaced; a line the shell could not parse is an AssertionError."""
    lex = shlex.shlex(PLACEHOLDER.sub("PLACEHOLDER", command), posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, ""
    try:
        tokens = list(lex)
    except ValueError as e:
        raise AssertionError(f"does not parse as a shell command ({e}): {command}") from None
    argvs, argv, skip = [], [], False
    for token in tokens:
        if skip:
            skip = False
        elif token in OPERATORS:
            argvs.append(argv)
            argv = []
        elif token in REDIRECTIONS:
            skip = True
        else:
            argv.append(token)
    argvs.append(argv)
    assert all(argvs), f"an empty command between operators: {command}"
    return argvs


def entry_points(command) -> list:
    """(module, args) for each of our entry points the line runs; checks the plain shell on the way."""
    found = []
    for argv in simple_commands(command):
        while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):  # FOO=1 cmd
            argv = argv[1:]
        if argv and argv[0] == "sudo":  # sudo [-options] cmd ...
            argv = argv[1:]
            while argv and argv[0].startswith("-"):
                argv = argv[1:]
        assert argv, f"no program: {command}"
        program = argv[0]
        assert program not in REMOVED, f"`{program}` no longer exists ({REMOVED.get(program)}): {command}"
        assert program in PROGRAMS, f"`{program}` is not a program these docs use (a typo? else add it to " \
                                    f"PROGRAMS in tests/test_docs.py): {command}"
        if program in ("sh", "bash") and "-c" in argv:
            found += entry_points(argv[argv.index("-c") + 1])
        elif program in LAUNCHERS and "-m" in argv:  # the module after the launcher's own -m, and its arguments,
            at = argv.index("-m")  # checked as one of the processes it starts (finetune reads WORLD_SIZE)
            module = argv[at + 1]
            assert module in ENTRY_POINTS, f"{program} -m {module}: not a module these docs launch"
            flags = argv[:at]
            count = next((flags[i + 1] for i, f in enumerate(flags) if f in ("--num_processes", "--nproc_per_node")),
                         "2")  # a config file's (two Sparks: 2)
            found.append((module, argv[at + 2:], int(count)))
        elif program == "finetune":  # the console script: python -m finetune
            found.append(("finetune", argv[1:]))
        elif program in ("python", "python3") and argv[1:2] == ["-c"]:
            try:
                compile(argv[2], "<python -c>", "exec")
            except SyntaxError as e:
                raise AssertionError(f"python -c code does not compile ({e}): {command}") from None
        elif program in ("python", "python3") and argv[1:2] and argv[1].endswith(".py"):  # a script of ours
            script = os.path.join(ROOT, argv[1])
            assert argv[1].startswith("bench/") and os.path.isfile(script), f"{argv[1]}: no such script: {command}"
            source = open(script).read()
            for flag in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")):
                assert f'"{flag}"' in source, f"{argv[1]} takes no {flag}: {command}"
        elif program in ("python", "python3"):
            assert argv[1:2] == ["-m"] and len(argv) > 2, f"python without -m MODULE or -c CODE: {command}"
            module = argv[2]
            assert module in ENTRY_POINTS + OTHER_MODULES, f"python -m {module}: not a module these docs use"
            if module in ENTRY_POINTS:
                found.append((module, argv[3:]))
    return found


# --- how each entry point checks a documented line ------------------------------------------------------------
def quiet(fn, *args):
    """fn(*args) -> (its result, what it wrote to stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        result = fn(*args)
    return result, err.getvalue()


def run_module(module, args, timeout=180):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def compose_overrides(args):
    """The Hydra overrides of a command composed with the project's schema; a bad key or value raises."""
    from finetune.config import compose
    from finetune.errors import UserError

    try:
        return compose(list(args))
    except UserError as e:
        raise AssertionError(f"error: {e}") from None


PLANNED: dict = {}  # args -> (exit code, stdout, stderr) of `python -m finetune.plan ARGS` in this process


def run_plan(args, expect=None) -> str | None:
    """Run a documented `python -m finetune.plan` line for real: on CPU, before anything loads, it must print a
    breakdown and a verdict line starting with `fits` or `does not fit`, and exit 0 either way. `expect` is the
    verdict the docs claim in the line's comment (`# fits ...` / `# does not fit ...`), checked when given.
    In this process: the plan's meta model is shared by the lines that plan the same model, and a plan is a function
    of its arguments, so the lines documented twice (and the bad-key test's documented line) are planned once."""
    from finetune.plan import main

    if tuple(args) not in PLANNED:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
        PLANNED[tuple(args)] = code, out.getvalue(), err.getvalue()
    code, out, err = PLANNED[tuple(args)]
    assert code == 0, err[-1500:]
    verdicts = re.findall(r"^\s*(fits|does not fit)\b", out, flags=re.M)
    assert verdicts, f"no line starting with `fits` or `does not fit`:\n{out[-1500:]}"
    if expect:
        assert verdicts[-1] == expect, f"the docs say {expect!r}, the planner says {verdicts[-1]!r}"
    return out


def run_preflight(args, out_dir):
    """Run a documented `python -m finetune.preflight` line for real, in this process (the function `python -m`
    calls, from the repository root as the docs' relative paths assume; tests/finetune/test_preflight.py runs the
    module itself): it must exit 0 and print the rendered examples."""
    from finetune.preflight import main

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*args, f"output_dir={out_dir}"])
    finally:
        os.chdir(cwd)
    assert code == 0 and "rendered examples" in out.getvalue(), err.getvalue()[-1500:]


def check_entry_point(module, args, comment, tmp_path):
    """Check one documented use of an entry point; an AssertionError says what is wrong."""
    from finetune.cli import HYDRA_ANSWERS

    if module == "finetune":
        from finetune.__main__ import check

        from finetune.cli import hydra_flags, show_config, take_cfg

        if any(a in HYDRA_ANSWERS for a in args):  # answered by Hydra itself (--info, --help): run it as written
            result = run_module("finetune", args, timeout=120)
            assert result.returncode == 0 and result.stdout.strip(), result.stderr[-1500:]
            return
        code, err = quiet(check, args)  # every job the line starts, composed and checked as the run does first
        assert code == 0, err
        rest = list(args)
        mode = take_cfg(rest)
        if mode:  # --cfg: print it as the command does
            quiet(show_config, hydra_flags(rest)[0], mode)
    elif module == "finetune.plan":
        compose_overrides(args)
        expect = next((v for v in ("does not fit", "fits") if comment.startswith(v)), None)
        run_plan(args, expect)
    elif module == "finetune.preflight":
        from finetune.config import recipe_choice, settings

        settings(compose_overrides(args).data)
        if recipe_choice(args) == "tiny" and "PLACEHOLDER" not in " ".join(args):  # cheap: run it as written
            run_preflight(args, tmp_path / "preflight")
    elif module == "finetune.export":
        from finetune.errors import UserError
        from finetune.export.cli import parse

        try:
            parse(args)
        except UserError as e:
            raise AssertionError(f"error: {e}") from None
    elif module in ("eval", "finetune.chat"):  # checked as they check their arguments: --cfg job loads nothing
        from importlib import import_module

        main = import_module("eval.__main__" if module == "eval" else module).main
        adapter = tmp_path / "adapter"  # stands for the adapter directory a run writes
        adapter.mkdir(exist_ok=True)
        (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "google/diffusiongemma-26B-A4B-it"}')
        # an adapter a documented run writes (a placeholder, or a path such as runs/chat_5090/adapter): the stand-in
        args = [f"adapter={adapter}" if a.startswith("adapter=") and ("PLACEHOLDER" in a or not os.path.exists(
            os.path.join(ROOT, a.split("=", 1)[1]))) else a for a in args]
        assert not any("PLACEHOLDER" in a for a in args), "a placeholder outside adapter="
        code, err = quiet(main, args + ["--cfg", "job"])
        assert code == 0, err
    elif module == "finetune.doctor":  # its overrides composed here; tests/finetune/test_doctor.py runs it
        compose_overrides(args)


def check_command_line(where, command, comment, tmp_path, monkeypatch):
    for module, args, *processes in entry_points(command):
        try:
            with monkeypatch.context() as env:
                if processes:  # a launcher's line: checked as one of its processes
                    env.setenv("WORLD_SIZE", str(processes[0]))
                    env.setenv("RANK", "0")
                check_entry_point(module, args, comment, tmp_path)
        except AssertionError as e:
            raise AssertionError(f"{where}: {command}\n{e}") from None


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FINETUNE_CACHE", "/nonexistent-cache-should-not-be-used")  # --cfg builds no tiny base


COMMANDS = command_lines()


@pytest.mark.parametrize("where,command,comment", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_documented_command(where, command, comment, tmp_path, offline, monkeypatch):
    check_command_line(where, command, comment, tmp_path, monkeypatch)


def test_the_check_sees_every_entry_point_and_fails_on_a_bad_key(tmp_path, offline, monkeypatch):
    """The docs use every entry point, and the check of each fails on a documented line with a misspelt key: the
    docs copied to tmp_path with one key changed, never the docs themselves."""
    modules = {}  # module: its first documented line that gives only key=value arguments
    for where, command, comment in COMMANDS:
        for module, args, *_ in entry_points(command):
            if all("=" in a and not a.startswith("-") for a in args):
                modules.setdefault(module, (where, command, comment))
    for module in ENTRY_POINTS:
        assert module in modules, f"no documented `python -m {module}` line"
    for module, (where, command, comment) in modules.items():
        bad = "formt=merged" if module == "finetune.export" else "trian.lr=1e-4"
        copy = tmp_path / module.replace(".", "_")
        path, line = where.rsplit(":", 1)
        for doc in docs():
            os.makedirs(copy / os.path.dirname(os.path.relpath(doc, ROOT)), exist_ok=True)
            lines = open(doc).read().splitlines()
            if os.path.relpath(doc, ROOT) == path:
                lines[int(line) - 1] = re.sub(rf"python -m {re.escape(module)}(?=\s|$)", f"python -m {module} {bad}",
                                              lines[int(line) - 1], count=1)
            (copy / os.path.relpath(doc, ROOT)).write_text("\n".join(lines) + "\n")
        mutated = [c for c in command_lines(str(copy)) if c[0] == where]
        assert mutated and bad in mutated[0][1], (where, mutated)
        check_command_line(where, command, comment, tmp_path, monkeypatch)  # as documented: passes
        with pytest.raises(AssertionError, match=re.escape(bad.split("=")[0])):
            check_command_line(*mutated[0], tmp_path, monkeypatch)


@pytest.mark.parametrize("line", ["pyhton -m finetune recipe=tiny", "python -m finetune.pln recipe=tiny",
                                  "python bench/expert.py", "python bench/experts.py --size real",
                                  "git clone 'unclosed", "pip install -e . &&",
                                  "python -c \"import torch; print(torch.cuda.get_arch_list()\""])
def test_a_misspelt_program_or_broken_shell_fails(line):
    with pytest.raises(AssertionError):
        entry_points(line)


def test_comments_and_placeholders_are_read_as_the_shell_reads_them():
    found = command_lines(os.path.join(os.path.dirname(__file__), "data", "docs_sample"))
    assert [(c, m) for _, c, m in found] == [
        ("python -m finetune recipe=chat_spark", "train"),
        ("python -m finetune -m train.lr=1e-3,2e-3 lora.r=8,16", "a sweep"),
        ("sudo sh -c 'sync; echo 3 > /proc/sys/vm/drop_caches'", ""),
        ("git clone <this repository> finetune && cd finetune", ""),
    ]
    assert entry_points("sudo sh -c 'sync; echo 3 > /proc/sys/vm/drop_caches'") == []
    assert entry_points("accelerate launch --multi_gpu --num_processes 4 -m finetune recipe=tiny output_dir=x") == [
        ("finetune", ["recipe=tiny", "output_dir=x"], 4)]
    assert entry_points("sudo -E sh -c 'python -m finetune recipe=tiny'") == [("finetune", ["recipe=tiny"])]
    with pytest.raises(AssertionError, match="pyhton"):
        entry_points("sudo sh -c 'sync; pyhton -m finetune'")  # sh -c strings are checked too
    assert entry_points("python -m eval adapter=outputs/<run>/adapter") == [
        ("eval", ["adapter=outputs/PLACEHOLDER/adapter"])]
    assert entry_points("pip install x && python -m finetune.plan recipe=chat_rtx hardware=rtx_5090") == [
        ("finetune.plan", ["recipe=chat_rtx", "hardware=rtx_5090"])]


def test_python_blocks_compile():
    for path in docs():
        for lang, lines in fenced_blocks(open(path).read()):
            if lang == "python":
                source = "\n".join(line for _, line in lines)
                ast.parse(source, filename=f"{os.path.relpath(path, ROOT)}:{lines[0][0]}")


def test_untagged_blocks_hold_no_commands():
    """A command in an untagged block would escape the checks above: tag it ```bash."""
    for path in docs():
        for lang, lines in fenced_blocks(open(path).read()):
            assert lang in SHELL_LANGUAGES + ("", "python", "text", "yaml", "json"), (path, lang)
            if lang == "":
                for number, line in lines:
                    assert not re.match(r"^\s*(\$ )?(python3?|pip|git|sudo) ", line), f"{path}:{number}: {line}"


def test_quickstart_is_two_commands_and_ci_runs_the_same():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Quickstart", 1)[1]
    commands = [line for line in code_blocks(section)[0].splitlines() if line.strip()]
    assert len(commands) == 2, commands
    install_and_run, test = commands
    assert install_and_run.endswith("python -m finetune")
    assert test == "python -m pytest"
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert re.search(r"^python -m pytest$", ci, flags=re.M)
    for step in ("python3 -m venv .venv", "pip install -q torch==2.13.0", "constraints=(-c constraints.txt)",
                 'pip install -q "${constraints[@]}" -e ".[dev'):
        assert step in ci  # CI adds optional extras (lm-eval) so their tests run, on the locked versions by default
    for step in ("python3 -m venv .venv", "pip install torch==2.13.0", 'pip install -e ".[dev]"'):
        assert step in install_and_run


def test_documented_harness_commands_name_the_registered_model():
    commands = [(where, command) for where, command, _ in COMMANDS if "python -m eval.harness " in command]
    assert commands
    for where, command in commands:
        assert "--model diffusiongemma" in command and "--apply_chat_template" in command, (where, command)


def test_docs_name_only_recipes_and_hardware_profiles_that_exist():
    recipes = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))}
    profiles = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "finetune", "conf", "hardware",
                                                                           "*.yaml"))}
    for path in docs():
        text = open(path).read()
        for name in re.findall(r"recipe=(\w+)", text):
            assert name in recipes, (path, name)
        for name in re.findall(r"hardware=(\w+)", text):
            assert name in profiles, (path, name)


def removed_programs_named(root=ROOT) -> list:
    """(file:line, program) wherever the docs, the recipes or the library's messages name a program in REMOVED, in a
    command, in prose or in a hint string."""
    paths = docs(root) + sorted(glob.glob(os.path.join(root, "recipes", "*.yaml")))
    for package in ("finetune", "eval", "bench"):
        paths += sorted(glob.glob(os.path.join(root, package, "**", "*.py"), recursive=True))
        paths += sorted(glob.glob(os.path.join(root, package, "**", "*.yaml"), recursive=True))
    hits = []
    for path in paths:
        for number, line in enumerate(open(path).read().splitlines(), 1):
            hits += [(f"{os.path.relpath(path, root)}:{number}", p) for p in REMOVED if p in line]
    return hits


def test_no_doc_or_hint_names_a_program_that_no_longer_exists():
    assert removed_programs_named() == [], [f"{w}: {p}: {REMOVED[p]}" for w, p in removed_programs_named()]


def test_a_playbook_copy_that_says_huggingface_cli_fails(tmp_path):
    """The checks above see an outdated step, in a command block and in prose (a copy, never the docs themselves)."""
    for doc in docs():
        target = tmp_path / os.path.relpath(doc, ROOT)
        os.makedirs(target.parent, exist_ok=True)
        target.write_text(open(doc).read())
    playbook = tmp_path / "playbooks" / "dgx-spark" / "README.md"
    playbook.write_text(playbook.read_text() + "\nLog in with `huggingface-cli login`.\n\n```bash\nhuggingface-cli "
                        "login\n```\n")
    assert [p for _, p in removed_programs_named(str(tmp_path))] == ["huggingface-cli", "huggingface-cli"]
    commands = [c for w, c, _ in command_lines(str(tmp_path)) if "huggingface-cli" in c]
    assert commands
    with pytest.raises(AssertionError, match="hf auth login"):
        entry_points(commands[0])


def test_console_scripts_the_docs_name_are_installed_by_their_package():
    """`hf`, `accelerate`, `torchrun`, ...: each is a console script of the package that provides it in the versions
    we install, so a renamed or dropped command fails here (vllm is checked where it is installed)."""
    import importlib.metadata as metadata

    for program, distribution in CONSOLE_SCRIPTS.items():
        assert program in PROGRAMS
        try:
            scripts = {e.name for e in metadata.distribution(distribution).entry_points if e.group == "console_scripts"}
        except metadata.PackageNotFoundError:
            assert distribution == "vllm", f"{distribution} is not installed: it should be (pyproject.toml)"
            continue
        assert program in scripts, f"{distribution} {metadata.version(distribution)} installs no `{program}` command"
