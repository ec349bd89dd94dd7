"""The house: imports flow one way, config -> model -> data -> objective -> train -> eval -> export -> run, and no
module reaches back up the chain (imports inside functions count: a lazy import is still a dependency)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each module's stage; a module may import its own stage or earlier ones. Entry points sit last.
STAGES = [
    ["finetune.errors", "finetune.config", "finetune.conf", "finetune.disk", "finetune.runlock"],  # and what every
    # writer shares: whole-file writes and the full disk (disk), one process per run directory (runlock)
    ["finetune.cli"],  # the command-line prologue every command shares: config only
    ["finetune.tiny", "finetune.model", "finetune.quantize", "finetune.quantized_load", "finetune.expert_lora"],
    # the model layer: load base, adapter, tokenizer; the tiny architecture; 4-bit frozen weights, and quantising
    # them as they load; LoRA on the experts
    ["finetune.emulated", "finetune.head", "finetune.checkpointing", "finetune.checkpoints",
     "finetune.distributed"],  # how a step runs: half-precision products in fp32 where a CPU's are slow, chunked head,
    # checkpointed layers; how a run survives: sealed checkpoints, resume; several processes as one
    ["finetune.canvas"],
    ["finetune.data"],  # sources -> rows, render -> examples, splits
    ["finetune.objective"],
    ["finetune.train"],
    ["finetune.pretrain"],  # the tiny base's own small pipeline: model -> data -> objective -> train
    ["finetune.preflight", "finetune.plan", "finetune.doctor"],  # reports before anything loads: the data
    # (preflight), the memory (plan), the machine against the recipe (doctor)
    ["eval"],  # generation, scoring, the verdict, the report, the lm-eval model, samples while training, python -m eval
    ["finetune.chat"],  # python -m finetune.chat: talk to base + adapter with eval's rendering and sampler
    ["finetune.report"],  # the end-of-run summary
    ["finetune.export"],
    ["finetune.run"],  # the pipeline: the only module that imports every stage
    ["finetune.__main__"],
]


def stage_of(module: str) -> int:
    best = None
    for i, names in enumerate(STAGES):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > len(best[1]):
                    best = (i, name)
    assert best is not None, f"{module} has no stage in tests/test_layout.py: place it in the flow"
    return best[0]


def modules():
    for package in ("finetune", "eval"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    yield module.removesuffix(".__init__"), path


def imports(path: str, module: str):
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = base + ("." + node.module if node.module else "")
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{a.name}" for a in node.names)


def test_no_module_imports_a_later_stage():
    ours = dict(modules())
    ours.pop("finetune")  # the empty package itself: `from finetune import x` is an import of x
    back_edges = []
    for module, path in ours.items():
        mine = stage_of(module)
        for target in imports(path, module):
            known = target
            while known and known not in ours:
                known = known.rpartition(".")[0]
            if not known or known == module or module.startswith(known + "."):
                continue
            if stage_of(known) > mine:
                back_edges.append(f"{module} (stage {mine}) imports {known} (stage {stage_of(known)})")
    assert not back_edges, "\n".join(sorted(set(back_edges)))


def test_the_stage_table_catches_a_back_edge(tmp_path):
    """The check above would see data importing train (the old tiny -> train circle, one step removed)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from finetune.train import fit\n")
    assert "finetune.train" in set(imports(str(bad), "finetune.data.bad"))
    assert stage_of("finetune.train") > stage_of("finetune.data.bad")
