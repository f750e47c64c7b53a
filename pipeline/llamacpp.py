"""GGUF files read back and run through llama.cpp (llama-cpp-python), with clear errors."""

from __future__ import annotations

from pathlib import Path


def gguf_files(export_dir: Path) -> list[tuple[str, Path]]:
    """(name, path) of every validated GGUF file an export output holds, e.g. ("trained.q4_k_m", ...):
    the files its manifest lists, which the export stage writes only after validating them."""
    import json

    manifest = Path(export_dir) / "manifest.json"
    if not manifest.exists():
        return []
    return [(f"{source}.{name}", Path(export_dir) / source / f"model-{name}.gguf")
            for source, files in json.loads(manifest.read_text()).items() for name in files]


class GGUFError(ValueError):
    """A file that is not a complete, loadable GGUF model."""


def tensor_types(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (GGML type name, shape)} read from the file's header."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors}
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise GGUFError(f"{path} is not a valid GGUF file (truncated or corrupted?): {error}") from error


def load(path: Path, n_ctx: int, threads: int = 1):
    """A llama.cpp model with per-position logits. The file is checked first: llama.cpp itself
    may crash the process on a damaged file rather than raise."""
    import llama_cpp

    tensor_types(path)
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                               n_threads=threads, verbose=False)
    except ValueError as error:
        raise GGUFError(f"llama.cpp could not load {path}: {error}") from error


def logits_fn(llm):
    """A function from token ids [batch, seq] to logits [batch, seq, vocab], like a HF model's."""
    import numpy as np
    import torch

    def logits(ids):
        rows = []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            rows.append(np.array(llm.scores[: len(row)], dtype=np.float32))
        return torch.from_numpy(np.stack(rows))

    return logits


def tokenize(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
