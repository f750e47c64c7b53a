"""A published GGUF file as the checkpoint a fine-tune starts from (`model.gguf`).

transformers' GGUF loader dequantizes the file's weights to fp32; the checkpoint is saved once per
machine into the cache, at an address made of the file's sha256 and this module's code, and checked
against the files it recorded each time it is used again. The loader's tokenizer is not kept as it
writes it: a byte-level BPE comes out labelled byte-fallback (`tokenizer.byte_level_rebuilt` rebuilds
it), and its special tokens are taken from the wrong ids (SmolLM2's EOS became `<|im_start|>`), so
BOS, EOS, padding and the chat template are set from the file's own metadata."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

# model.gguf=package:<distribution>/<file>: a file an installed Python distribution ships, found
# through its installed-files record, so that the package's own module (and what it imports) is
# never imported.
PACKAGE_PREFIX = "package:"
# Where the converted checkpoint records where its weights came from (read by train, the report and
# MLflow's tags).
PROVENANCE = "provenance.json"


def gguf_path(spec: str) -> Path:
    """The GGUF file `model.gguf` names: a path, or package:<distribution>/<file>."""
    if spec.startswith(PACKAGE_PREFIX):
        distribution, _, name = spec.removeprefix(PACKAGE_PREFIX).partition("/")
        try:
            dist = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(f"model.gguf={spec!r}: the Python package {distribution!r} is not installed "
                                    f"(`make install` installs the project's, or pip install {distribution}).") from None
        found = [f for f in dist.files or [] if f.name == name]
        if not found:
            shipped = sorted(f.name for f in dist.files or [] if f.name.endswith(".gguf"))
            raise FileNotFoundError(f"model.gguf={spec!r}: {distribution} {dist.version} ships no file {name!r}; "
                                    f"its GGUF files: {', '.join(shipped) or 'none'}.")
        return Path(dist.locate_file(found[0])).resolve()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.gguf={spec!r} is not a file; give a GGUF file's path, or "
                                f"{PACKAGE_PREFIX}<distribution>/<file> for one an installed package ships.")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"model.gguf={spec!r} is not a GGUF file (its first bytes are not GGUF).")
    return path.resolve()


def package_version(spec: str) -> str | None:
    if not spec.startswith(PACKAGE_PREFIX):
        return None
    distribution = spec.removeprefix(PACKAGE_PREFIX).partition("/")[0]
    return f"{distribution} {importlib.metadata.version(distribution)}"


def address(file: Path, sha256: str) -> Path:
    from pipeline.artifacts import machine_cache

    code = hashlib.sha256(Path(__file__).read_bytes() + Path(__file__).with_name("tokenizer.py").read_bytes())
    key = hashlib.sha256(f"{sha256}:{code.hexdigest()}".encode()).hexdigest()[:12]
    return machine_cache() / "gguf" / f"{file.stem}-{key}"


def checkpoint(spec: str) -> Path:
    """The checkpoint of the GGUF file `spec` names, converted into the cache the first time."""
    from filelock import FileLock

    from pipeline.artifacts import ChangedOutput, atomic_dir, sha256_file, verify_output

    file = gguf_path(spec)
    target = address(file, sha256_file(file))
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            try:
                return verify_output(target, "GGUF conversion", rebuild=f"remove {target} to convert it again")
            except ChangedOutput:
                log.warning("%s changed since it was converted; converting %s again", target, file.name)
        print(f"model: converting {file.name} to a checkpoint (once for this machine) ...", flush=True)
        started = time.perf_counter()
        with atomic_dir(target) as scratch:
            convert(file, scratch, spec)
        print(f"model: converted in {time.perf_counter() - started:.1f} s -> {target}", flush=True)
    return target


def file_metadata(file: Path) -> dict:
    """The GGUF keys the checkpoint takes from the file itself (gguf-py reads them; no llama.cpp)."""
    from gguf import GGUFReader

    reader = GGUFReader(file)
    wanted = ("general.name", "general.file_type", "tokenizer.chat_template", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id",
              "tokenizer.ggml.model", "tokenizer.ggml.pre")
    found = {}
    for key in wanted:
        field = reader.get_field(key)
        if field is not None:
            found[key] = field.contents()
    found["tensor_types"] = sorted({t.tensor_type.name for t in reader.tensors})
    return found


def convert(file: Path, out: Path, spec: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.tokenizer import byte_level_rebuilt, save_tokenizer

    meta = file_metadata(file)
    loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the loader's mark; save_pretrained refuses a model with it
        del config.quantization_config
    ids = {role: meta.get(f"tokenizer.ggml.{key}_token_id") for role, key in
           (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    if ids["pad"] is None:
        ids["pad"] = ids["eos"]
    for role, token_id in ids.items():
        if token_id is not None:
            setattr(config, f"{role}_token_id", int(token_id))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    del loaded
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = config.bos_token_id, config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)

    loaded_tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    tokenizer = byte_level_rebuilt(loaded_tokenizer) or loaded_tokenizer
    for role, token_id in ids.items():
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    if "tokenizer.chat_template" in meta:
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    tokenizer.name_or_path = ""  # built here: nothing to copy from the loader's directory
    save_tokenizer(tokenizer, out)
    provenance = {"gguf": file.name, "source": spec, "package": package_version(spec),
                  "general_name": meta.get("general.name"), "tensor_types": meta["tensor_types"],
                  "weights": f"dequantized to fp32 from {'/'.join(meta['tensor_types'])} by transformers' GGUF loader",
                  "tokenizer": {"model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre"),
                                "rebuilt_byte_level": tokenizer is not loaded_tokenizer},
                  "special_token_ids": ids}
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
