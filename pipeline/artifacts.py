"""Where stage outputs live, and how they are written so that a failure never leaves half a file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# The settings each stage's output depends on. "stage:X" stands for all of stage X's inputs, so
# a change upstream moves every downstream directory too.
STAGE_INPUTS = {
    "prepare": ["data", "model.name_or_path", "model.arch.vocab_size"],
    "train": ["stage:prepare", "model", "train", "seed", "accelerate.num_processes"],
    "quantize": ["stage:train", "quantize"],
    "export": ["stage:quantize", "export"],
    "evaluate": ["stage:export", "evaluate"],
    "serve": ["stage:export", "serve"],
    "report": ["stage:serve", "stage:evaluate", "report"],
}
# Settings that change how a stage runs, not what it produces.
NOT_INPUTS = {"train.resume", "train.log_every", "train.checkpoint_every", "report.gates"}


def _select(cfg: DictConfig, dotted: str):
    value = OmegaConf.select(cfg, dotted)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _stage_inputs(cfg: DictConfig, stage: str) -> dict:
    inputs = {}
    for key in STAGE_INPUTS[stage]:
        if key.startswith("stage:"):
            inputs.update(_stage_inputs(cfg, key.removeprefix("stage:")))
        else:
            inputs[key] = _select(cfg, key)
    for key in NOT_INPUTS:
        section, _, leaf = key.rpartition(".")
        if isinstance(inputs.get(section), dict):
            inputs[section].pop(leaf, None)
    return inputs


def stage_key(cfg: DictConfig, stage: str) -> str:
    blob = json.dumps(_stage_inputs(cfg, stage), sort_keys=True, default=str)
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


def label(cfg: DictConfig, stage: str) -> str:
    """Readable part of an output's name: the data, or the model, precision and seed it came from
    (in the fixed layout it is the whole address, so every varying setting must be in it)."""
    if stage == "prepare":
        return cfg.data.name
    # One report for the whole sweep, whichever precision's run writes it.
    name = f"{cfg.model.name}-{'sweep' if stage == 'report' else cfg.train.precision}-seed{cfg.seed}"
    if stage == "evaluate" and reference_seed(cfg) != cfg.seed:
        name += f"-vs-seed{reference_seed(cfg)}"
    return name


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    if stage == "report":
        cfg = variant(cfg, {"train.precision": "sweep"})
    if cfg.paths.fixed:
        return Path(cfg.paths.fixed).resolve() / stage / label(cfg, stage)
    return Path(cfg.paths.artifacts).resolve() / stage / f"{label(cfg, stage)}-{stage_key(cfg, stage)}"


def scratch_dir(final: Path) -> Path:
    """Where atomic_dir builds `final` before renaming it into place."""
    return Path(final).with_name(f".{Path(final).name}.partial")


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a scratch directory that replaces `final` only if the block finishes without error."""
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


def disk_bytes(path: Path) -> int:
    """Size of a file, or of every file under a directory."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def require_stage_output(cfg: DictConfig, stage: str) -> Path:
    """The output directory of an upstream stage, or a clear error saying how to produce it."""
    path = stage_dir(cfg, stage)
    if not path.is_dir():
        raise FileNotFoundError(
            f"No {stage} output for these settings at {path}. "
            f"Run `python -m pipeline stage={stage}` with the same settings first (or stage=all)."
        )
    return path
