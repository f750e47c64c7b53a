"""Where stage outputs live, and how they are written so that a failure never leaves half a file."""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.contract import PipelineError, declared
from pipeline.formats import NO_QAT

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("pipeline", "stages")
# Every file of a finished output, with its size, modification time and sha256, written last: what
# a later reader compares the files with before trusting them.
FILES = "files.json"


def _select(cfg: DictConfig, dotted: str):
    value = OmegaConf.select(cfg, dotted)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


@functools.lru_cache(maxsize=None)
def code_files(stage: str) -> tuple[Path, ...]:
    """The stage module (or package) and every project module it imports, transitively (lazy imports too)."""
    seen, todo = {}, [f"stages.{stage}"]
    while todo:
        module = todo.pop()
        path = ROOT / (module.replace(".", "/") + ".py")
        if "." in module and not path.is_file():  # a package of modules, such as stages.report
            path = path.with_suffix("") / "__init__.py"
        if module in seen or not path.is_file():
            continue
        seen[module] = path
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PROJECT_PACKAGES:
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] in PROJECT_PACKAGES]
    return tuple(seen[m] for m in sorted(seen))


@functools.lru_cache(maxsize=None)
def code_fingerprint(stage: str) -> str:
    """A change to the code a stage runs gives its output a new address."""
    digest = hashlib.sha256()
    for path in code_files(stage):
        digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def stage_inputs(cfg: DictConfig, stage: str) -> dict:
    """Everything a stage's output depends on, as its declaration (pipeline.contract) states:
    its settings, its code, the address of any reference output it reads, and the same of
    every stage it reads."""
    spec = declared(stage)
    inputs = {key: _select(cfg, key) for key in spec.keys(cfg)}
    for key in spec.ignores:  # each a direct child of a declared section, e.g. train.resume
        section, _, leaf = key.rpartition(".")
        inputs[section].pop(leaf, None)
    inputs[f"code:{stage}"] = code_fingerprint(stage)
    for name in spec.references:
        for kind, reference in references(cfg).items():
            key = f"reference:{name}" if kind == "fp32" else f"reference:{name}:{kind}"
            inputs[key] = stage_key(reference, name) if stage_dir(reference, name).is_dir() else None
    for upstream in spec.reads:
        inputs.update(stage_inputs(cfg, upstream))
    return inputs


def stage_key(cfg: DictConfig, stage: str) -> str:
    blob = json.dumps(stage_inputs(cfg, stage), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def variant(cfg: DictConfig, changes: dict) -> DictConfig:
    """The same settings with some keys changed (dotted names): where a sibling run, such as
    another training precision or seed, keeps its outputs."""
    other = cfg.copy()
    for key, value in changes.items():
        OmegaConf.update(other, key, value, merge=False)
    return other


def reference_seed(cfg: DictConfig) -> int:
    """Seed of the fp32-trained model this run's artifacts are also measured against."""
    seed = OmegaConf.select(cfg, "evaluate.reference_seed")
    return cfg.seed if seed is None else seed


def fp32_reference(cfg: DictConfig) -> DictConfig:
    """Settings of the fp32-trained model every artifact is also measured against: trained without
    QAT, so that a QAT run's formats are on the same scale as everyone else's."""
    return variant(cfg, {"train.precision": "fp32", "seed": reference_seed(cfg), "evaluate.reference_seed": None,
                         "train.qat": NO_QAT})


def references(cfg: DictConfig) -> dict[str, DictConfig]:
    """The trained models a run's artifacts are also measured against, by the suffix their metrics
    get (kl_vs_<suffix>): the fp32 reference and, for a QAT run, the same run without QAT, the
    model whose post-training quantization QAT competes with."""
    found = {"fp32": fp32_reference(cfg)}
    if OmegaConf.select(cfg, "train.qat", default=NO_QAT) != NO_QAT:
        found["no_qat"] = variant(cfg, {"train.qat": NO_QAT})
    return found


def label(cfg: DictConfig, stage: str) -> str:
    """Readable part of an output's name: the data, or the model, precision and seed it came from
    (in the fixed layout it is the whole address, so every setting that varies between the runs
    of one sweep must be in it)."""
    spec = declared(stage)
    if spec.scope == "data":
        return cfg.data.name
    qat = OmegaConf.select(cfg, "train.qat", default=NO_QAT)
    name = f"{cfg.model.name}-{cfg.train.precision}{'' if qat == NO_QAT else f'-qat_{qat}'}-seed{cfg.seed}"
    if "evaluate" in spec.settings and reference_seed(cfg) != cfg.seed:
        name += f"-vs-seed{reference_seed(cfg)}"
    return name


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    if declared(stage).scope == "sweep":  # one output for every precision, whichever run writes it
        cfg = variant(cfg, {"train.precision": "sweep"})
    if cfg.paths.fixed:
        return Path(cfg.paths.fixed).resolve() / stage / label(cfg, stage)
    return Path(cfg.paths.artifacts).resolve() / stage / f"{label(cfg, stage)}-{stage_key(cfg, stage)}"


def machine_cache() -> Path:
    """Where what is built once per machine and shared by every checkout is kept: llama.cpp's tools
    and the offline default's base model."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "precision-pipeline"


def keep_log(name: str, text: str) -> Path:
    """Keeps a tool's whole output (or a traceback) where a one-line error can point to it: the Hydra
    run's output folder, else a folder under the system's temporary directory."""
    import tempfile
    import time

    folder = Path(tempfile.gettempdir()) / "precision-pipeline"
    with contextlib.suppress(ImportError, ValueError):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            folder = Path(HydraConfig.get().runtime.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(text)
    return path


def scratch_dir(final: Path) -> Path:
    """Where atomic_dir builds `final` before renaming it into place."""
    return Path(final).with_name(f".{Path(final).name}.partial")


@contextlib.contextmanager
def atomic_dir(final: Path, record: bool = True):
    """Yield a scratch directory that replaces `final` only if the block finishes without error,
    with its files listed in FILES (`record`: a stage output, which readers verify)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = scratch_dir(final)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if record:
        record_files(scratch)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    scratch.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data) -> None:
    tmp = Path(path).with_name(Path(path).name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_dir(path: Path, pattern: str = "*") -> str:
    """Hash of the names and contents of the files under `path` matching `pattern`."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob(pattern) if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def record_files(directory: Path) -> None:
    """Writes FILES for every file under `directory` (renaming the directory keeps their times)."""
    directory = Path(directory)
    entries = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != FILES):
        stat = file.stat()
        entries[str(file.relative_to(directory))] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                      "sha256": sha256_file(file)}
    write_json(directory / FILES, entries)


class ChangedOutput(PipelineError):
    """A stage output whose files are no longer the ones the stage wrote."""


# Outputs this process has hashed in full, with every file's (size, modification time) then: a stage
# reads its upstream outputs again and again, and hashing them each time would cost more than reading.
_hashed: set[tuple] = set()


def verify_output(path: Path, stage: str, full: bool = False, rebuild: str | None = None) -> Path:
    """`path` (an output of `stage`) if each file FILES lists is still the one the stage wrote:
    the same size and modification time, or else (and always when `full`) the same sha256. A file
    that changed, went missing or was never recorded stops the run, in one line naming it, both
    hashes and how to rebuild it (`rebuild`; default: rerun=[stage])."""
    path = Path(path)
    how = rebuild or f"rerun=[{stage}] writes it again"
    record = path / FILES
    if not record.is_file():
        raise ChangedOutput(f"{path} has no {FILES}, so its files cannot be checked: it is not a finished {stage} "
                            f"output of this version; {how}.")
    files, seen = read_json(record), []
    for name, expected in files.items():
        file = path / name
        try:
            stat = file.stat()
        except FileNotFoundError:
            raise ChangedOutput(f"{file} is missing from the {stage} output it belongs to (expected sha256 "
                                f"{expected['sha256']}); {how}.") from None
        seen.append((name, stat.st_size, stat.st_mtime_ns))
    hashed = (path, tuple(seen))
    if full and hashed in _hashed:
        return path
    for (name, size, mtime_ns), expected in zip(seen, files.values()):
        if not full and (size, mtime_ns) == (expected["bytes"], expected["mtime_ns"]):
            continue
        file = path / name
        found = sha256_file(file)
        if found != expected["sha256"]:
            raise ChangedOutput(f"{file} changed after the {stage} stage wrote it (sha256 expected {expected['sha256']}, "
                                f"found {found}; {size} bytes, {expected['bytes']} written); {how}.")
    if full:
        _hashed.add(hashed)
    return path


def disk_bytes(path: Path) -> int:
    """Size of a file, or of every file under a directory."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def verify_stage_output(cfg: DictConfig, stage: str, rebuild: str | None = None) -> Path:
    """verify_output on `stage`'s output at these settings, as `verify` asks."""
    return verify_output(stage_dir(cfg, stage), stage, full=OmegaConf.select(cfg, "verify") == "full", rebuild=rebuild)


def require_stage_output(cfg: DictConfig, stage: str) -> Path:
    """The output directory of an upstream stage, verified, or a clear error saying how to produce it."""
    path = stage_dir(cfg, stage)
    if not path.is_dir():
        raise FileNotFoundError(
            f"No {stage} output for these settings at {path}. "
            f"Run `python -m pipeline stage={stage}` with the same settings first (or stage=all)."
        )
    return verify_stage_output(cfg, stage)
