"""Model and tokenizer sources shared by the stages."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def pretrained_source(cfg: DictConfig) -> str | None:
    """`model.name_or_path` checked before any work: a local path must exist and hold a config."""
    source = cfg.model.name_or_path
    if source is None:
        if cfg.model.arch is None:
            raise ValueError("model.name_or_path is null and model.arch is empty: give a checkpoint "
                             "(model=hf model.name_or_path=/path/to/checkpoint) or an architecture (model=tiny).")
        return None
    path = Path(str(source)).expanduser()
    looks_local = path.exists() or str(source).startswith(("/", ".", "~")) or str(source).count("/") > 1
    if looks_local:
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise FileNotFoundError(f"model.name_or_path={source!r} {what}; expected a Hugging Face "
                                    f"checkpoint directory (config.json, weights, tokenizer files).")
        return str(path.resolve())
    return str(source)  # a hub id: only reachable where the machine can download
