"""Model and tokenizer sources shared by the stages."""

from __future__ import annotations

import warnings
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


# The base trains every weight: its LoRA settings are unused, and fixed so that the fine-tune's do
# not give the base another address.
NO_LORA = {"enabled": False, "r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": []}


def base_config(cfg: DictConfig) -> DictConfig | None:
    """The settings that pretrain the base model of `model.pretrain` (the prepare and train stages on
    its data and train recipe, from random initialisation on model.arch, into the machine cache),
    or None where the model has no such recipe. Nothing of the fine-tune's own settings enters it,
    so every fine-tune of one recipe starts from the same base."""
    from omegaconf import OmegaConf, open_dict

    from pipeline.artifacts import machine_cache

    recipe = OmegaConf.select(cfg, "model.pretrain")
    if recipe is None:
        return None
    base = cfg.copy()
    with open_dict(base):
        base.model = {"name": cfg.model.name, "name_or_path": None, "arch": cfg.model.arch, "pretrain": None,
                      "lora": NO_LORA}
        base.data, base.train, base.seed = recipe.data, recipe.train, recipe.seed
        if base.train.precision == "auto":  # as the runner resolves the fine-tune's: by this machine
            from pipeline.hardware import detect, resolve_precision

            base.train.precision = resolve_precision("auto", detect())[0]
        base.accelerate.num_processes = 1
        base.paths = {"artifacts": str(machine_cache() / "base"), "fixed": None}
        base.tracking.log_model = False
    return base


def starting_checkpoint(cfg: DictConfig) -> str | None:
    """What the train stage fine-tunes: the pretrained base of `model.pretrain`, the checkpoint in
    `model.name_or_path`, or None (random initialisation on `model.arch`)."""
    from pipeline.artifacts import stage_dir

    base = base_config(cfg)
    return str(stage_dir(base, "train")) if base is not None else pretrained_source(cfg)


def save_tokenizer(tokenizer, directory: Path) -> None:
    """The tokenizer's files as llama.cpp's converter reads them. transformers 5 saves tokenizer.json
    alone; the converter reads a SentencePiece vocabulary (scores, byte pieces) from tokenizer.model,
    which added tokens are special from tokenizer_config.json's added_tokens_decoder (without it,
    <start_of_turn> and the like become plain text to llama.cpp), and which vocabulary reader to
    use from the tokenizer_class the checkpoint declared (Phi-4-mini's GPT2Tokenizer)."""
    import json
    import shutil

    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.setdefault("added_tokens_decoder", {str(i): t.__getstate__() for i, t in tokenizer.added_tokens_decoder.items()})
    # The directory it was loaded from; a tokenizer built in memory (prepare's) has none.
    source = Path(str(tokenizer.name_or_path)) if tokenizer.name_or_path else None
    if source is not None and (source / "tokenizer.model").is_file():
        shutil.copy(source / "tokenizer.model", directory / "tokenizer.model")
    if source is not None and (source / "tokenizer_config.json").is_file():
        declared = json.loads((source / "tokenizer_config.json").read_text())
        if "tokenizer_class" in declared:
            config["tokenizer_class"] = declared["tokenizer_class"]
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def model_config(cfg: DictConfig, **overrides):
    """The transformers config of the model the train stage starts from."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    source = pretrained_source(cfg)
    if source is not None:
        return AutoConfig.from_pretrained(source)
    arch = OmegaConf.to_container(cfg.model.arch, resolve=True)
    return AutoConfig.for_model(arch.pop("model_type"), **arch, **overrides)


def shape_only_model(cfg: DictConfig):
    """The model the train stage starts from, on the meta device: its classes and shapes without
    weights, so stages can check their settings against it before any work."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(cfg))


def model_logits(model):
    """`model` as a function of token ids [batch, seq] to fp32 logits [batch, seq, vocab]."""
    import torch

    def logits(ids):
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    return logits


def load_causal_lm(path: Path):
    """An fp32 model from a Hugging Face directory; compressed-tensors checkpoints are unpacked."""
    import torch
    from transformers import AutoModelForCausalLM

    if "quantization_config" not in (Path(path) / "config.json").read_text():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    from transformers.utils.quantization_config import CompressedTensorsConfig

    with warnings.catch_warnings():
        # transformers warns that the checkpoint's own quantization config wins; only the
        # dequantize-on-load flag is taken from ours, which is the point.
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
