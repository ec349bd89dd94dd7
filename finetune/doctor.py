"""python -m finetune.doctor [recipe=NAME] [hardware=NAME] [key=value ...]: is this machine ready for the run?

Checked before anything downloads, in a few seconds, without a weight: Python, the torch build against the GPU, the
driver against the build, the device the config asks for, bitsandbytes when it quantises, the memory plan
(`finetune.plan`) against the memory free now, the disk the run will write, access to the base model, and vLLM for
serving. One line per check (ok, warn, FAIL, or skip where it does not apply), each warning and failure with its
fix; exit code 1 when any check failed. What the machine is comes from `gather` alone, so tests can fake it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field

from finetune import disk
from finetune.errors import UserError

GB = 1e9
REQUIRES_PYTHON = (3, 10)  # pyproject.toml: requires-python = ">=3.10"
TORCH_INDEX = "https://download.pytorch.org/whl/"
# The oldest Linux driver each CUDA release needs (NVIDIA's CUDA Toolkit release notes, "CUDA Toolkit and
# Corresponding Driver Versions"): a torch build bundles its CUDA runtime, but the driver must be at least this.
MIN_DRIVER = {
    (13, 0): 580,  # CUDA 13.x builds (cu130): the DGX Spark's
    (12, 9): 575,
    (12, 8): 570,  # CUDA 12.8 builds (cu128): the first with Blackwell (sm_100, sm_120) kernels
    (12, 6): 560,
    (12, 4): 550,
    (12, 1): 530,
    (12, 0): 525,
    (11, 8): 520,
}
# Jetson and other integrated GPUs: no cubin of another minor version runs on them (torch.cuda.DEVICE_REQUIREMENT)
INTEGRATED = {(5, 3), (6, 2), (7, 2), (8, 7)}
BITSANDBYTES_MINIMUM = "0.50"  # pyproject.toml's quant extra
VLLM_MINIMUM = "0.24"  # the first vLLM that serves DiffusionGemma
# bytes per LoRA parameter in a checkpoint: fp32 weights (4) and AdamW's two fp32 moments (8)
CHECKPOINT_BYTES_PER_PARAM = 12
ADAPTER_BYTES_PER_PARAM = 4  # a saved adapter: fp32 LoRA weights
# beside the weights a run writes tokenizer copies (the 26B's tokenizer.json is ~30 MB), logs, reports, events
OTHER_FILES = 64 * 10**6
EXPORT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
STATUSES = ("ok", "warn", "FAIL", "skip")  # skip: the check does not apply to this config or machine

USAGE = """usage: python -m finetune.doctor [recipe=NAME] [hardware=PROFILE] [key=value ...] [--cfg job|hydra|all]

Checks this machine for the run those arguments describe, before anything downloads (a few seconds, no weights):
Python, torch and the GPU, the driver, the device, bitsandbytes, memory, disk, model access, vLLM. Exit code 1
when a check failed; each failure and warning says what to do.

  recipe=NAME       a file in recipes/ (default: tiny)
  hardware=PROFILE  a profile in finetune/conf/hardware/ (default: the recipe's)
  key=value         any config key, as for python -m finetune
"""


# --- what the machine is ----------------------------------------------------------------------------------------------
@dataclass
class Facts:
    """This machine, as `gather` finds it (tests build their own)."""

    python: tuple  # sys.version_info[:3]
    torch: str  # torch.__version__
    cuda_build: str | None = None  # torch.version.cuda: the CUDA the build is for; None for a CPU build
    arch_list: list = field(default_factory=list)  # torch.cuda.get_arch_list(): sm_XY cubins, compute_XY PTX
    gpu_name: str | None = None  # the first visible CUDA device (the one a run uses); None: torch sees none
    capability: tuple | None = None  # its compute capability (major, minor)
    gpu_free: int | None = None  # torch.cuda.mem_get_info(): bytes free on it now
    gpu_total: int | None = None
    driver: str | None = None  # nvidia-smi's driver_version, e.g. 580.95.05
    driver_cuda: str | None = None  # the newest CUDA the driver runs (the CUDA driver API's version), e.g. 13.0
    smi_gpu: str | None = None  # the GPU nvidia-smi names (also when torch cannot see it)
    ram_available: int | None = None  # MemAvailable: what a CPU run may use now
    bitsandbytes: str | None = None  # its version, None when not installed
    vllm: str | None = None  # its version, or where its command is; None when neither
    hf_token: bool = False  # huggingface_hub.get_token() finds a token (HF_TOKEN or `hf auth login`)
    hf_offline: bool = False  # HF_HUB_OFFLINE is set: nothing may be downloaded


def gather() -> Facts:
    """This machine's facts: no download, no weights; a CUDA context on the first GPU where there is one."""
    import torch
    from huggingface_hub import constants, get_token

    smi_gpu, driver = _nvidia_smi()
    facts = Facts(python=tuple(sys.version_info[:3]), torch=torch.__version__, cuda_build=torch.version.cuda,
                  driver=driver, smi_gpu=smi_gpu, ram_available=_ram_available(),
                  bitsandbytes=_version("bitsandbytes"), vllm=_version("vllm") or _on_path("vllm"),
                  hf_token=bool(get_token()), hf_offline=bool(constants.HF_HUB_OFFLINE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's own capability warning: the torch line says what it means
        try:
            if torch.version.cuda and torch.cuda.is_available():
                facts.arch_list = list(torch.cuda.get_arch_list())
                facts.gpu_name = torch.cuda.get_device_name(0)
                facts.capability = tuple(torch.cuda.get_device_capability(0))
                version = getattr(torch._C, "_cuda_getDriverVersion", lambda: 0)()  # e.g. 13000
                facts.driver_cuda = f"{version // 1000}.{version % 1000 // 10}" if version else None
                facts.gpu_free, facts.gpu_total = torch.cuda.mem_get_info(0)
        except RuntimeError:  # a GPU CUDA cannot start on: what was found so far, and the checks say the rest
            pass
    return facts


def _nvidia_smi() -> tuple[str | None, str | None]:
    """(the first GPU's name, the driver version) from nvidia-smi, or Nones where it is missing or fails."""
    if not shutil.which("nvidia-smi"):
        return None, None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15).stdout
        name, driver = (s.strip() for s in out.splitlines()[0].rsplit(",", 1))
        return name, driver
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None, None


def _ram_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:  # not Linux: psutil where it happens to be installed (it is no dependency of ours)
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def _version(package: str) -> str | None:
    """An installed package's version, read from its metadata (importing vLLM or bitsandbytes takes seconds)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(package) is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _on_path(program: str) -> str | None:
    where = shutil.which(program)
    return f"the {program} command at {where}" if where else None


def in_hub_cache(repo: str, filename: str, revision: str | None = None) -> str | None:
    """The cached path of a hub file, or None: the cache only, never the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return found if isinstance(found, str) else None


# --- one check --------------------------------------------------------------------------------------------------------
@dataclass
class Check:
    status: str  # one of STATUSES
    name: str
    detail: str
    fix: str = ""  # what to do, for a warning or a failure

    def __post_init__(self):
        assert self.status in STATUSES, self.status

    def lines(self) -> list[str]:
        out = [f"  {self.status:<5} {self.name:<13} {self.detail}"]
        if self.fix:
            out.append(f"  {'':<5} {'':<13} fix: {self.fix}")
        return out


# --- 1. Python --------------------------------------------------------------------------------------------------------
def check_python(facts: Facts) -> Check:
    found = ".".join(map(str, facts.python))
    need = ".".join(map(str, REQUIRES_PYTHON))
    if tuple(facts.python[:2]) >= REQUIRES_PYTHON:
        return Check("ok", "python", f"{found} (the toolkit requires >= {need})")
    return Check("FAIL", "python", f"{found}: the toolkit requires >= {need} (pyproject.toml)",
                 f"make the environment with a newer Python: python3.12 -m venv .venv && . .venv/bin/activate && "
                 f"pip install -e \".[dev]\"")


# --- 2. torch and the GPU ---------------------------------------------------------------------------------------------
def _arch(entry: str) -> tuple[str, tuple[int, int], str] | None:
    """'sm_120' -> ('sm', (12, 0), ''); 'compute_90a' -> ('compute', (9, 0), 'a'); None for anything else."""
    m = re.fullmatch(r"(sm|compute)_(\d+)([af]?)", entry)
    if not m:
        return None
    n = int(m[2])
    return m[1], (n // 10, n % 10), m[3]


def kernels_for(capability: tuple, arch_list: list) -> tuple[str, str] | None:
    """How a GPU of ``capability`` runs a build with ``arch_list``: ("exact" | "compatible" | "ptx", the entry that
    serves it), or None when nothing does. A cubin sm_XZ runs on sm_XY with the same major X and Z <= Y (binary
    compatible within a major; an arch-specific sm_XZa and the integrated GPUs only on their own); PTX compute_AB is
    compiled by the driver for any AB <= XY (slow the first time, then cached)."""
    capability = tuple(capability)
    compatible, ptx = [], []
    for entry in arch_list:
        parsed = _arch(entry)
        if parsed is None:
            continue
        kind, version, suffix = parsed
        if kind == "sm":
            if version == capability:
                return "exact", entry
            if suffix != "a" and capability not in INTEGRATED and version[0] == capability[0] \
                    and version[1] < capability[1]:
                compatible.append((version, entry))
        elif version == capability or suffix != "a" and version < capability:
            ptx.append((version, entry))
    if compatible:
        return "compatible", max(compatible)[1]
    if ptx:
        return "ptx", max(ptx)[1]
    return None


def _sm(capability) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def _driver_major(driver: str | None) -> int | None:
    try:
        return int(str(driver).split(".")[0])
    except ValueError:
        return None


def torch_requirement() -> str:
    """The torch range `pip install -e .` enforces: pyproject.toml's in a checkout, else the installed package's
    (read, not copied here, so that a new range needs no edit of this file)."""
    import importlib.metadata

    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(pyproject) as f:
            found = re.search(r'^\s*"(torch[<>=!~][^"]*)"', f.read(), flags=re.M)
        if found:
            return found[1]
    except OSError:
        pass
    try:
        return next(r for r in importlib.metadata.requires("finetune") or [] if re.match(r"torch[<>=!~]", r))
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        return "torch"


def torch_install(facts: Facts) -> str:
    """The command that installs a CUDA build of torch this machine's driver runs (CUDA 13 from driver 580, 12.8 from
    570: both have Blackwell kernels)."""
    major = _driver_major(facts.driver)
    index = "cu130" if major is None or major >= MIN_DRIVER[(13, 0)] else "cu128"
    command = f"pip uninstall -y torch && pip install \"{torch_requirement()}\" --index-url {TORCH_INDEX}{index}"
    if major is None:
        return command + f" (cu128 instead of cu130 where the driver is older than {MIN_DRIVER[(13, 0)]})"
    if major < MIN_DRIVER[(12, 8)]:
        return f"update the NVIDIA driver to {MIN_DRIVER[(12, 8)]} or newer (it is {facts.driver}), then {command}"
    return command


def check_torch(facts: Facts) -> Check:
    if not facts.cuda_build:
        if facts.smi_gpu:
            return Check("warn", "torch", f"{facts.torch} (CPU build), but this machine has a GPU "
                         f"({facts.smi_gpu}) that no run can use with it",
                         f"install a CUDA build: {torch_install(facts)}")
        return Check("ok", "torch", f"{facts.torch} (CPU build)")
    build = f"{facts.torch} (CUDA {facts.cuda_build} build)"
    if facts.capability is None:
        return Check("ok", "torch", f"{build}; no GPU visible to it")
    gpu = f"{facts.gpu_name} is {_sm(facts.capability)}"
    listed = " ".join(facts.arch_list) or "none"
    served = kernels_for(facts.capability, facts.arch_list)
    if served is None:
        fix = (f"install a build for CUDA 12.8+ / 13: {torch_install(facts)}" if facts.capability[0] >= 10 else
               f"install a torch build whose arch list has {_sm(facts.capability)}: "
               "https://pytorch.org/get-started/locally/")
        return Check("FAIL", "torch", f"{build}; {gpu}, which this build has no kernels for (its arch list: "
                     f"{listed}): \"no kernel image is available for execution on the device\"", fix)
    how, entry = served
    if how == "exact":
        return Check("ok", "torch", f"{build}; {gpu}, in its arch list")
    if how == "compatible":
        return Check("ok", "torch", f"{build}; {gpu}, run by its {entry} kernels (same major version). If PyTorch "
                     f"warns at start that the build \"does not include kernels\" for {_sm(facts.capability)}, or "
                     "about the \"minimum and maximum cuda capability\", that warning is harmless here")
    return Check("ok", "torch", f"{build}; {gpu}, run through the PTX of {entry}: the driver compiles it on first "
                 "use (a slow first start, cached after)")


# --- 3. the driver ----------------------------------------------------------------------------------------------------
def min_driver(cuda: str) -> int | None:
    """The oldest driver a build for CUDA ``cuda`` (e.g. '12.8') runs on; None where MIN_DRIVER does not say."""
    try:
        version = tuple(int(x) for x in cuda.split(".")[:2])
    except ValueError:
        return None
    known = [v for v in MIN_DRIVER if v <= version]
    return MIN_DRIVER[max(known)] if known else None


def check_driver(facts: Facts) -> Check:
    if not facts.driver and not facts.capability:
        return Check("skip", "driver", "no GPU on this machine (no CUDA device, no nvidia-smi)")
    if not facts.cuda_build:
        return Check("ok", "driver", f"{facts.driver} (unused: torch is a CPU build)")
    build = f"the CUDA {facts.cuda_build} build of torch"
    need = min_driver(facts.cuda_build)
    major = _driver_major(facts.driver)
    if major is not None:
        if need is None:
            return Check("ok", "driver", f"{facts.driver} (no minimum on record for {build})")
        if major >= need:
            return Check("ok", "driver", f"{facts.driver} ({build} needs >= {need})")
        other = ""
        if facts.cuda_build.split(".")[0] == "13" and major >= MIN_DRIVER[(12, 8)]:
            other = (f", or a torch build for CUDA 12.8, which this driver runs: pip uninstall -y torch && "
                     f"pip install \"{torch_requirement()}\" --index-url {TORCH_INDEX}cu128")
        return Check("FAIL", "driver", f"{facts.driver} is too old for {build} (it needs >= {need})",
                     f"update the NVIDIA driver to {need} or newer{other}")
    if facts.driver_cuda:  # no nvidia-smi: the CUDA version the driver runs says as much
        runs = tuple(map(int, facts.driver_cuda.split("."))) >= tuple(map(int, facts.cuda_build.split(".")[:2]))
        if runs:
            return Check("ok", "driver", f"runs CUDA up to {facts.driver_cuda} ({build})")
        return Check("FAIL", "driver", f"runs CUDA up to {facts.driver_cuda}, older than {build}",
                     f"update the NVIDIA driver to {need or 'a newer one'} or newer")
    return Check("warn", "driver", "version unknown (nvidia-smi not found)",
                 "check the driver with nvidia-smi (it ships with the NVIDIA driver)")


# --- 4. the device the config asks for --------------------------------------------------------------------------------
def check_device(cfg, facts: Facts) -> Check:
    device = cfg.hardware.device
    where = f"hardware.device={device} (hardware={cfg.hardware.profile})"
    if device == "cpu":
        return Check("ok", "device", where)
    if facts.gpu_name:
        return Check("ok", "device", f"{where}: cuda, {facts.gpu_name}")
    if device == "auto":
        return Check("ok", "device", f"{where}: cpu (no CUDA device visible)")
    if not facts.cuda_build:
        why, fix = "this torch is a CPU build", f"install a CUDA build of torch: {torch_install(facts)}"
    elif facts.smi_gpu:
        why = f"nvidia-smi sees a GPU ({facts.smi_gpu}) but torch does not"
        fix = "check the driver line above and CUDA_VISIBLE_DEVICES, then nvidia-smi"
    else:
        why, fix = "no NVIDIA GPU or driver found", "check the GPU and its driver with nvidia-smi"
    return Check("FAIL", "device", f"{where} needs a CUDA device, but none is visible: {why}",
                 f"{fix}; to try the toolkit on this machine's CPU instead: python -m finetune recipe=tiny "
                 "(hardware=cpu)")


# --- 5. bitsandbytes --------------------------------------------------------------------------------------------------
def check_bitsandbytes(cfg, facts: Facts) -> Check:
    from packaging.version import Version

    quantization = cfg.model.quantization
    if quantization == "none":
        return Check("skip", "bitsandbytes", "not needed (model.quantization=none)")
    fix = "pip install -e \".[quant]\""
    if facts.bitsandbytes is None:
        return Check("FAIL", "bitsandbytes", f"not installed; model.quantization={quantization} needs it", fix)
    try:
        old = Version(facts.bitsandbytes) < Version(BITSANDBYTES_MINIMUM)
    except ValueError:
        old = False
    if old:
        return Check("FAIL", "bitsandbytes", f"{facts.bitsandbytes}: the toolkit needs >= {BITSANDBYTES_MINIMUM} for "
                     f"model.quantization={quantization}", f"pip install -U \"bitsandbytes>={BITSANDBYTES_MINIMUM}\"")
    return Check("ok", "bitsandbytes", f"{facts.bitsandbytes} (model.quantization={quantization})")


# --- 6. memory --------------------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    """What the run's model is, from its config on meta (finetune.plan's model)."""

    parameters: int  # the base's, each tied tensor once
    stored_bytes: int  # the base's weights as its files store them
    trainable: int  # LoRA parameters


def plan_run(cfg):
    """(the memory plan, the model's Sizes) from the config alone, or (the UserError, None) where it cannot be made
    here. One canvas per example: data.supervise=all would read the data to count turns (a download)."""
    from finetune import plan
    from finetune.config import settings
    from finetune.model import dtype_for

    try:
        current = plan.plan(cfg)
        config = plan.model_config(settings(cfg.model))
    except UserError as e:
        return e, None
    stored = plan._stored_dtype(config)
    # the same key as plan.plan's own: the meta model it built, not a second one
    model = plan._meta_model(config, dtype_for(cfg.model.dtype, current.device), settings(cfg.lora),
                             cfg.model.attn_implementation)
    base = model.get_base_model()
    parameters = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return current, Sizes(parameters, parameters * stored.itemsize, trainable)


def check_memory(cfg, facts: Facts, current, overrides: list) -> Check:
    from finetune.plan import verdict

    again = _command("finetune.plan", overrides)
    if isinstance(current, UserError):
        return Check("warn", "memory", f"no plan: {current}", f"do what it says, then {again}")
    total = current.peak + current.context
    profile = int(cfg.hardware.memory_gb * GB) if cfg.hardware.memory_gb is not None else None
    turns = " (one canvas per example; python -m finetune.plan counts data.supervise=all's turns)" \
        if cfg.data.supervise == "all" else ""
    if current.device == "cuda":
        if facts.gpu_free is None:
            return Check("skip", "memory", f"{total / GB:.1f} GB planned for a CUDA device ({current.profile}); none "
                         "visible here to compare with (see device)")
        free, source = facts.gpu_free, (f"free on {facts.gpu_name} now: {facts.gpu_free / GB:.1f} of "
                                        f"{(facts.gpu_total or 0) / GB:.1f} GB")
    else:
        if facts.ram_available is None:
            return Check("warn", "memory", f"{total / GB:.1f} GB planned; this machine's available memory is unknown",
                         "compare it with free -g")
        free, source = facts.ram_available, "available now, /proc/meminfo"
    memory = free if profile is None else min(profile, free)
    if memory == profile and profile < free:
        source = f"hardware.memory_gb; {free / GB:.1f} GB free now"
    checked = dataclasses.replace(current, memory=memory, memory_source=source,
                                  capacity=int(memory * (1 - cfg.plan.headroom)))
    said = verdict(checked) + turns
    if checked.fits:
        return Check("ok", "memory", said)
    if checked.close:
        return Check("warn", "memory", said, f"{again} shows the breakdown; watch the first steps' peak")
    return Check("FAIL", "memory", said, f"{again} lists the smallest changes that fit (or free the memory others "
                 "hold: nvidia-smi / free -g)")


def _command(module: str, overrides: list) -> str:
    return " ".join(["python -m " + module, *overrides])


# --- 7. disk ----------------------------------------------------------------------------------------------------------
def _filesystem(path: str) -> int:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return os.stat(path).st_dev


def _hub_weights_cached(name: str, revision: str | None) -> bool:
    """Whether every safetensors file of a hub model is in the hub cache already (read from its index there)."""
    import json

    if in_hub_cache(name, "model.safetensors", revision):
        return True
    index = in_hub_cache(name, "model.safetensors.index.json", revision)
    if not index:
        return False
    with open(index) as f:
        shards = set(json.load(f).get("weight_map", {}).values())
    return bool(shards) and all(in_hub_cache(name, shard, revision) for shard in shards)


def _output_parent(cfg) -> str:
    """Where the run directory goes: output_dir's parent (outputs/ by default, beside where the run starts)."""
    return os.path.dirname(os.path.abspath(os.path.expanduser(cfg.output_dir or "outputs/run")))


@dataclass
class Need:
    """Bytes the run will write in one place."""

    where: str
    what: str
    nbytes: int
    move: str  # the setting that puts it elsewhere


def disk_needs(cfg, sizes: Sizes) -> list[Need]:
    """What the run writes: the base's weights where they are downloaded or built (nothing for a local directory or a
    base already there), then checkpoints, the adapter and the export under the output directory's parent."""
    from huggingface_hub import constants

    from finetune.config import is_local_model, settings
    from finetune.tiny import base_cached, base_dir

    model = cfg.model
    needs = []
    if model.name_or_path == "tiny":
        path = base_dir(cfg.cache_dir, settings(model).tiny)
        needs.append(Need(os.path.dirname(path), "tiny base", 0 if base_cached(path) else sizes.stored_bytes,
                          "cache_dir=/big/disk/cache"))
    elif not is_local_model(model.name_or_path):
        cached = _hub_weights_cached(model.name_or_path, model.revision)
        needs.append(Need(constants.HF_HUB_CACHE, "base weights", 0 if cached else sizes.stored_bytes,
                          "HF_HUB_CACHE=/big/disk/hub (an environment variable)"))
    out, move = _output_parent(cfg), "output_dir=/big/disk/<run>"
    kept = cfg.checkpoint.keep + 1  # a new checkpoint is sealed before the oldest is deleted
    needs.append(Need(out, f"checkpoints (up to {kept})", sizes.trainable * CHECKPOINT_BYTES_PER_PARAM * kept, move))
    needs.append(Need(out, "adapter", sizes.trainable * ADAPTER_BYTES_PER_PARAM, move))
    needs.append(Need(out, "tokenizer copies and logs (allowance)", OTHER_FILES, move))
    export = cfg.export
    if export.format in ("adapter", "both"):
        needs.append(Need(out, "adapter export", sizes.trainable * ADAPTER_BYTES_PER_PARAM, move))
    if export.format in ("merged", "both"):
        untied = 2 if export.untie else 1  # an untied export writes the encoder's text layers apart
        needs.append(Need(out, f"merged export ({export.dtype})",
                          sizes.parameters * EXPORT_BYTES[export.dtype] * untied, move))
    return needs


def _not_counted(cfg, sizes: Sizes) -> str:
    """What the run or its next steps write beyond `disk_needs`, said on the output directory's line."""
    said = ""
    if cfg.export.format in ("none", "adapter") and cfg.model.name_or_path != "tiny":  # exported after, by hand
        merged = sizes.parameters * EXPORT_BYTES[cfg.export.dtype]
        said = f"; a later python -m finetune.export format=merged writes {disk.human(merged)} more there"
    source = cfg.data.train
    if not source.startswith("tiny:") and not os.path.exists(os.path.expanduser(source)):
        said += f"; not counted: the data set's download (data.train={source})"
    return said


def check_disk(cfg, sizes: Sizes | None) -> list[Check]:
    """One line per filesystem written to: what goes there against its free space."""
    if sizes is None:
        return [Check("skip", "disk", "no model size without a plan (see memory)")]
    by_filesystem: dict[int, list[Need]] = {}
    for need in disk_needs(cfg, sizes):
        by_filesystem.setdefault(_filesystem(need.where), []).append(need)
    out = _filesystem(_output_parent(cfg))
    checks = []
    for filesystem, needs in by_filesystem.items():
        places = " and ".join(dict.fromkeys(n.where for n in needs))
        total = sum(n.nbytes for n in needs)
        free = disk.free_bytes(needs[0].where)
        parts = ", ".join(f"{n.what} {disk.human(n.nbytes)}" if n.nbytes else f"{n.what} (already there)"
                          for n in needs)
        detail = (f"{places}: {disk.human(total)} to write ({parts}), {disk.human(free)} free"
                  + (_not_counted(cfg, sizes) if filesystem == out else ""))
        if free >= total:
            checks.append(Check("ok", "disk", detail))
        else:
            moves = ", ".join(dict.fromkeys(n.move for n in needs if n.nbytes))
            checks.append(Check("FAIL", "disk", detail, f"free {disk.human(total - free)} there, or write "
                                f"elsewhere: {moves}"))
    return checks


# --- 8. access to the base model --------------------------------------------------------------------------------------
def check_model_access(cfg, facts: Facts) -> Check:
    from finetune.config import is_local_model, settings
    from finetune.model import resolve_model_path
    from finetune.tiny import base_cached, base_dir

    name, revision = cfg.model.name_or_path, cfg.model.revision
    if name == "tiny":
        path = base_dir(cfg.cache_dir, settings(cfg.model).tiny)
        return Check("ok", "model access", "tiny: built on this machine, no hub (" + (
            f"cached at {path})" if base_cached(path) else "pre-trained on the first run, about 4 minutes)"))
    if is_local_model(name):
        try:
            return Check("ok", "model access", f"local directory {resolve_model_path(name, revision)}")
        except UserError as e:
            return Check("FAIL", "model access", str(e), "point model.name_or_path at a directory saved with "
                         "save_pretrained (config.json and safetensors), or a hub id")
    page = f"https://huggingface.co/{name}"
    if facts.hf_offline:  # the run reads only the cache: its config and every weight file must be there
        if in_hub_cache(name, "config.json", revision) and _hub_weights_cached(name, revision):
            return Check("ok", "model access", f"{name}: in the hub cache (HF_HUB_OFFLINE is set)")
        return Check("FAIL", "model access", f"{name}: HF_HUB_OFFLINE is set and the model is not (whole) in the "
                     "hub cache", f"download it once online: unset HF_HUB_OFFLINE, hf auth login, accept the licence "
                     f"at {page}, then hf download {name}")
    if facts.hf_token:
        return Check("ok", "model access", f"{name}: a hub token is set (the licence must be accepted at {page}: "
                     "the doctor does not ask the hub)")
    return Check("FAIL", "model access", f"{name}: no hub token on this machine, and the model's licence must be "
                 "accepted before it downloads", f"hf auth login, and accept the licence at {page}")


# --- 9. vLLM ----------------------------------------------------------------------------------------------------------
def check_vllm(facts: Facts) -> Check:
    from packaging.version import InvalidVersion, Version

    where = "the serving section of playbooks/dgx-spark/README.md or playbooks/rtx-workstation/README.md"
    install = f"python -m venv ~/vllm && ~/vllm/bin/pip install \"vllm>={VLLM_MINIMUM}\" (its own environment: it " \
              "pins its own torch)"
    if facts.vllm is None:
        return Check("warn", "vllm", f"not installed here: serving the merged export needs vLLM >= {VLLM_MINIMUM} "
                     "(training does not; it may serve on another machine)", f"{install}; see {where}")
    try:
        old = Version(facts.vllm) < Version(VLLM_MINIMUM)
    except InvalidVersion:  # the command on PATH, version not asked (vllm --version takes seconds)
        return Check("ok", "vllm", f"{facts.vllm} (DiffusionGemma needs >= {VLLM_MINIMUM})")
    if old:
        return Check("warn", "vllm", f"{facts.vllm}: too old to serve DiffusionGemma (needs >= {VLLM_MINIMUM})",
                     f"{install}; see {where}")
    return Check("ok", "vllm", facts.vllm)


# --- all of them ------------------------------------------------------------------------------------------------------
def diagnose(cfg, facts: Facts, overrides: list):
    """Every check, in order, as it is made (the plan takes a second or two)."""
    yield check_python(facts)
    yield check_torch(facts)
    yield check_driver(facts)
    yield check_device(cfg, facts)
    yield check_bitsandbytes(cfg, facts)
    current, sizes = plan_run(cfg)
    yield check_memory(cfg, facts, current, overrides)
    yield from check_disk(cfg, sizes)
    yield check_model_access(cfg, facts)
    yield check_vllm(facts)


def summary(checks: list[Check]) -> str:
    failed = [c.name for c in checks if c.status == "FAIL"]
    warned = sum(c.status == "warn" for c in checks)
    warnings_said = f"{warned} warning{'s' * (warned != 1)}"
    if failed:
        return (f"doctor: {len(failed)} check{'s' * (len(failed) != 1)} failed ({', '.join(dict.fromkeys(failed))})"
                f"{', ' + warnings_said if warned else ''}: fix them and run it again")
    return "doctor: ready" + (f" ({warnings_said})" if warned else "")


def main(argv: list | None = None) -> int:
    from finetune.cli import command, show_config
    from finetune.config import check, compose, recipe_choice

    def body(overrides, cfg_mode):
        if cfg_mode:
            return show_config(overrides, cfg_mode)
        cfg = compose(overrides)
        check(cfg)
        print(f"doctor: recipe={recipe_choice(overrides)}, hardware={cfg.hardware.profile}, "
              f"model {cfg.model.name_or_path}", flush=True)
        checks = []
        for found in diagnose(cfg, gather(), overrides):
            checks.append(found)
            print("\n".join(found.lines()), flush=True)
        print(summary(checks))
        return 1 if any(c.status == "FAIL" for c in checks) else 0

    return command(argv if argv is not None else sys.argv[1:], USAGE, body)


if __name__ == "__main__":
    sys.exit(main())
