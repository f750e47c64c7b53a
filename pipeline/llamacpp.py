"""llama.cpp for the GGUF stages: its converter, from the same source as the Python binding that
loads the files, and the files read back and run through llama.cpp (llama-cpp-python).

The converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py) is taken from the
llama-cpp-python source distribution, which carries the llama.cpp tree it is built from under
vendor/llama.cpp: a file the converter writes is then one that this llama.cpp reads.
`python -m pipeline.llamacpp fetch` (part of `make install`) unpacks it once into the environment.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# Another llama.cpp source tree (for example a newer checkout) instead of the fetched one.
SOURCE_ENV = "LLAMA_CPP_SOURCE"
# Pre-tokenizer regexes of byte-level BPE tokenizers -> llama.cpp's name for them, for tokenizers
# the converter does not recognise (it knows released models by a hash of their output, so a
# freshly trained tokenizer, like the offline default's, is unknown to it).
PRE_TOKENIZERS = {
    None: "gpt-2",  # ByteLevel with its built-in GPT-2 regex
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def source_dir() -> Path:
    """Where llama.cpp's source for this llama-cpp-python version is (or goes)."""
    if os.environ.get(SOURCE_ENV):
        return Path(os.environ[SOURCE_ENV]).expanduser()
    from importlib import metadata

    return Path(sys.prefix) / "src" / f"llama.cpp-{metadata.version('llama-cpp-python')}"


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py; a clear error, before any work, where it is missing."""
    script = source_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"llama.cpp's converter is not at {script}: run `make install` or "
                                f"`python -m pipeline.llamacpp fetch` (or set {SOURCE_ENV} to a llama.cpp source tree).")
    return script


def converter_architectures() -> dict[str, str]:
    """{transformers architecture: the converter's module for it (llama, qwen, gemma, ...)} of what
    llama.cpp's converter writes, read from its registry without importing it (that imports torch)."""
    tree = ast.parse((converter().parent / "conversion" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "TEXT_MODEL_MAP":
            return ast.literal_eval(node.value)
    raise ValueError(f"{converter().parent / 'conversion'}: no TEXT_MODEL_MAP; is this a llama.cpp source tree?")


def fetch() -> Path:
    """Unpacks llama.cpp's source from llama-cpp-python's source distribution (pip's cache or the
    package index), once; the vocabulary test files and git data are left out."""
    from importlib import metadata

    target = source_dir()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    version = metadata.version("llama-cpp-python")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and not m.name.startswith((prefix + "models/", prefix + ".git"))]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / prefix, target)
    return target


def pre_tokenizer(tokenizer_json: dict, override: str = "auto") -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, from its tokenizer.json."""
    if override != "auto":
        return override
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    regexes = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
    level = [p for p in parts if p.get("type") == "ByteLevel"]
    key = regexes[0] if regexes else (None if level and level[0].get("use_regex", True) else "unknown")
    if key not in PRE_TOKENIZERS:
        raise ValueError("export: this tokenizer's pre-tokenizer is not one llama.cpp recognises or is known to share "
                         f"({', '.join(PRE_TOKENIZERS.values())}); set export.pre_tokenizer to llama.cpp's name for it.")
    return PRE_TOKENIZERS[key]


def convert(checkpoint: Path, out: Path, outtype: str, name: str, pre: str, metadata: dict[str, str]) -> None:
    """A GGUF file of `checkpoint` written by llama.cpp's converter, in a process of its own (it
    brings its own gguf-py). `pre`: "auto" (the converter's own recognition, else ours) or a name.
    `metadata` goes into the file as precision_pipeline.<key> strings."""
    converter()
    command = [sys.executable, "-m", "pipeline.llamacpp", "convert", str(checkpoint), str(out), outtype, name, pre,
               json.dumps(metadata)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"llama.cpp's converter failed on {checkpoint} (exit status {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")


def _convert(checkpoint: str, out: str, outtype: str, name: str, pre: str, metadata: str) -> None:
    """convert_hf_to_gguf.py's own main(), with two additions: a pre-tokenizer it does not recognise
    is named as `pre_tokenizer` finds it (or as configured), and our metadata is written too."""
    source = converter().parent
    sys.path[:0] = [str(source / "gguf-py"), str(source)]
    import convert_hf_to_gguf
    from conversion import TextModel

    recognise, prepare_metadata = TextModel.get_vocab_base_pre, TextModel.prepare_metadata

    def vocab_base_pre(self, tokenizer):
        if pre != "auto":
            return pre
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            from transformers import AutoTokenizer

            # As transformers builds the tokenizer, which need not be tokenizer.json's pipeline
            # (transformers 5 gives a Qwen2 model Qwen's pre-tokenizer whatever the file says).
            loaded = AutoTokenizer.from_pretrained(checkpoint)
            return pre_tokenizer(json.loads(loaded.backend_tokenizer.to_str()))

    def with_metadata(self, vocab_only):
        prepare_metadata(self, vocab_only)
        for key, value in json.loads(metadata).items():
            self.gguf_writer.add_string(f"precision_pipeline.{key}", str(value))

    TextModel.get_vocab_base_pre, TextModel.prepare_metadata = vocab_base_pre, with_metadata
    sys.argv = ["convert_hf_to_gguf.py", checkpoint, "--outfile", out, "--outtype", outtype, "--model-name", name]
    convert_hf_to_gguf.main()


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
    """Token ids as a Hugging Face tokenizer gives them by default: no BOS, special tokens written
    in the text parsed as such."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def apply_chat_template(llm, messages: list[dict]) -> str | None:
    """The prompt llama.cpp renders for `messages` (then the assistant's turn) with the chat template
    embedded in the model's file, as llama-server does without --jinja; None where the file has no
    template or llama.cpp does not recognise it."""
    import ctypes

    import llama_cpp

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    encoded = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(encoded))(*(llama_cpp.llama_chat_message(r, c) for r, c in encoded))
    size = 1024 + 2 * sum(len(r) + len(c) for r, c in encoded)
    buffer = ctypes.create_string_buffer(size)
    needed = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(encoded), True, buffer, size)
    if needed < 0:
        return None
    if needed > size:
        buffer = ctypes.create_string_buffer(needed)
        llama_cpp.llama_chat_apply_template(template.encode(), chat, len(encoded), True, buffer, needed)
    return buffer.raw[:needed].decode("utf-8")


def metadata_value(path: Path, key: str):
    """One metadata value of a GGUF file (a string or a number), or None."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get(key)
    return None if field is None else field.contents()


if __name__ == "__main__":
    commands = {"fetch": lambda: print(fetch()), "convert": _convert}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m pipeline.llamacpp {{{'|'.join(commands)}}} ...")
    commands[sys.argv[1]](*sys.argv[2:])
