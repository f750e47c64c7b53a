"""Model and tokenizer sources shared by the stages."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

from omegaconf import DictConfig


def pretrained_source(cfg: DictConfig) -> str | None:
    """`model.name_or_path` checked before any work: a local path must exist and hold a config."""
    source = cfg.model.name_or_path
    if cfg.model.get("gguf") is not None:
        if source is not None:
            raise ValueError(f"model.gguf={cfg.model.gguf!r} and model.name_or_path={source!r} are both set; "
                             "the fine-tune starts from one of them (set the other to null).")
        return str(gguf_source(str(cfg.model.gguf)))
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


@functools.lru_cache(maxsize=None)
def gguf_source(spec: str) -> Path:
    """model.gguf's checkpoint, converted once per machine (and hashed once per process)."""
    from pipeline.gguf_checkpoint import checkpoint

    return checkpoint(spec)


# Weight files transformers loads with pickle (torch.load), which can run code as it loads.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth")


def safe_weights(source: str) -> str:
    """A local checkpoint's weights checked before any work: safetensors, or pickles that torch's safe
    loader (weights_only) accepts. A pickle naming anything else (code it would run) is refused in
    one line, with the command that converts a trusted one; the pickle is never executed here."""
    import torch

    path = Path(source)
    if not path.is_dir():
        return f"{source} is not a local directory; transformers fetches and checks its weights"
    if any(path.glob("*.safetensors")):
        return f"the weights in {source} are safetensors"
    pickles = sorted(f for pattern in PICKLE_WEIGHTS for f in path.glob(pattern))
    if not pickles:
        raise FileNotFoundError(f"model.name_or_path={source!r} holds no weights (*.safetensors, or pickled *.bin / *.pt "
                                "files); point it at a checkpoint saved with save_pretrained.")
    for file in pickles:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except Exception as error:  # a legacy (non-zip) pickle, or no pickle at all: torch.load cannot vouch for it
            unsafe = [f"an unreadable pickle ({type(error).__name__})"]
        if unsafe:
            convert = (f"python -c \"import torch, safetensors.torch as s; d = torch.load('{file}', weights_only=False); "
                       f"s.save_file({{k: v.contiguous().clone() for k, v in d.items()}}, '{path}/model.safetensors', "
                       f"metadata={{'format': 'pt'}})\"")
            raise ValueError(f"model.name_or_path: {file} is a pickle that names {', '.join(unsafe[:3])}, which torch's "
                             "safe loader (weights_only) refuses, since loading it would run code; where you trust the "
                             f"file, convert it to safetensors ({convert}) and remove {file.name}.")
    return f"the pickled weights in {source} hold only what torch's safe loader accepts"


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
