"""Run time: llama.cpp for the GGUF stages. Its converter called on a checkpoint, its tools run
(llama-quantize, llama-imatrix, llama-perplexity and its files), and GGUF files read back and run
through the Python binding (llama-cpp-python).

The converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py) is the one in the
llama.cpp source the binding is made for, and the tools and the binding's library are one build of
it (pipeline.llamacpp_build, at install time): a file the converter writes is then one that this
llama.cpp reads.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from pipeline.artifacts import keep_log
from pipeline.contract import PipelineError, last_words

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
                                f"`python -m pipeline.llamacpp_build fetch` (or set {SOURCE_ENV} to a llama.cpp source tree).")
    return script


def converter_architectures() -> dict[str, str]:
    """{transformers architecture: the converter's module for it (llama, qwen, gemma, ...)} of what
    llama.cpp's converter writes, read from its registry without importing it (that imports torch)."""
    tree = ast.parse((converter().parent / "conversion" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "TEXT_MODEL_MAP":
            return ast.literal_eval(node.value)
    raise ValueError(f"{converter().parent / 'conversion'}: no TEXT_MODEL_MAP; is this a llama.cpp source tree?")


def tool(name: str, configured: str | None = None) -> Path:
    """The path of one of llama.cpp's tools (or `configured`, another build of it); a clear error,
    before any work, where it is missing."""
    path = Path(configured).expanduser() if configured else Path(sys.prefix) / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        how = ("point the setting at an executable" if configured else
               "run `make install` or `python -m pipeline.llamacpp_build build` (about 3 minutes on 2 cores, once)")
        raise FileNotFoundError(f"llama.cpp's {name} is not at {path}: {how}.")
    return path


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


class ConverterError(PipelineError):
    """llama.cpp's converter refused a checkpoint; `reason` is its own last word, `log` its whole output."""

    def __init__(self, message: str, reason: str, log: Path):
        super().__init__(message)
        self.reason, self.log = reason, log


def convert(checkpoint: Path, out: Path, outtype: str, name: str, pre: str, metadata: dict[str, str],
            vocab_only: bool = False) -> None:
    """A GGUF file of `checkpoint` (its vocabulary alone where `vocab_only`) written by llama.cpp's
    converter (ConverterProcess). `pre`: "auto" (the converter's own recognition, else ours) or a
    name. `metadata` goes into the file as precision_pipeline.<key> strings. A failure is one line
    with the converter's reason; its whole output is kept in a log."""
    converter()
    args = [str(checkpoint), str(out), outtype, name, pre, json.dumps(metadata), "vocab-only" if vocab_only else "all"]
    code, output = ConverterProcess.get().convert(args)
    if code != 0 or not out.is_file():
        reason = last_words(output)  # a traceback's last line: "SomeError: what went wrong"
        log = keep_log(f"convert-{Path(checkpoint).name}", " ".join(args) + "\n" + output)
        raise ConverterError(f"llama.cpp's converter failed on {checkpoint}: {reason} (its output: {log})", reason, log)


class ConverterProcess:
    """llama.cpp's own process: its converter, imported once in a process of its own (it brings its
    own gguf-py, which must not meet the installed one), that forks a child for each conversion, so
    that a conversion costs its own work, not the ~5 s of imports a fresh interpreter pays each
    time; and llama.cpp's runs on files made from what a user supplied (`isolated`), a child each,
    where an abort ends the child only. The process itself never computes, so its forks are safe;
    it ends when this process closes its pipe.

    Started early (`fork_early`), it is a fork of the pipeline's process before that has computed
    anything, and inherits torch and transformers, which the pipeline imports anyway, instead of
    importing them again. Started later, it is a new interpreter: a fork of a process that has
    trained would copy the state of threads it cannot use."""

    _running: ConverterProcess | None = None

    @classmethod
    def fork_early(cls) -> None:
        """Fork it now, where none runs yet; call before this process computes anything."""
        if cls._running is None:
            import torch  # noqa: F401  (imports start no threads; computing would)
            from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

            cls._running = cls(forked=True)

    @classmethod
    def get(cls) -> ConverterProcess:
        if cls._running is None or not cls._running.alive():
            cls._running = cls(forked=False)
        return cls._running

    def __init__(self, forked: bool):
        if not forked:
            process = subprocess.Popen([sys.executable, "-m", "pipeline.llamacpp", "serve"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
            # The Popen kept while the process runs: dropped, it would warn that its process still runs.
            self.process, self.pid, self.requests, self.answers = process, process.pid, process.stdin, process.stdout
            return
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(parent_writes)
                os.close(parent_reads)
                import logging

                logging.root.handlers.clear()  # the pipeline's log handlers: the converter's lines go to its logs
                # The installed gguf, which the pipeline's process may have imported, gives way to the converter's.
                for name in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
                    del sys.modules[name]
                _serve(os.fdopen(child_reads), os.fdopen(child_writes, "w"))
                code = 0
            finally:  # never the parent's exit handlers, nor a traceback of Ctrl-C on the console
                os._exit(code)
        os.close(child_reads)
        os.close(child_writes)
        self.requests, self.answers = os.fdopen(parent_writes, "w"), os.fdopen(parent_reads)

    def alive(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def convert(self, args: list[str]) -> tuple[int, str]:
        """The exit code of one conversion, and what it printed."""
        code, output, _ = self._request({"job": "convert", "args": args})
        return code, output

    def call(self, name: str, args) -> tuple[int, str, bytes | None]:
        """This module's function `name` on `args` (JSON) in a child: its exit code, what it
        printed, and its pickled (ok, result or exception)."""
        return self._request({"job": "call", "name": name, "args": list(args)})

    def _request(self, request: dict) -> tuple[int, str, bytes | None]:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="llamacpp-") as tmp:
            log, result = Path(tmp) / "output.log", Path(tmp) / "result.pickle"
            log.touch()
            try:
                self.requests.write(json.dumps({**request, "log": str(log), "result": str(result)}) + "\n")
                self.requests.flush()
                answer = self.answers.readline()
            except BrokenPipeError:
                answer = ""
            if not answer:
                return -1, f"{log.read_text(errors='replace')}\nRuntimeError: llama.cpp's process ended", None
            return int(answer), log.read_text(errors="replace"), result.read_bytes() if result.is_file() else None


@functools.cache
def _import_converter():
    source = converter().parent
    sys.path[:0] = [str(source / "gguf-py"), str(source)]
    import convert_hf_to_gguf
    from transformers import AutoTokenizer  # noqa: F401  (what a conversion imports, once)

    return convert_hf_to_gguf


def _serve(requests, answers) -> None:
    """llama.cpp's process: a job a line of JSON from `requests` (a conversion, or a call of one of
    this module's functions), each in a forked child whose output goes to the log file the line
    names; its exit code a line to `answers`. The converter is imported at the first conversion,
    llama-cpp-python at the first call: a process forked early may never be asked. This process
    never computes, so its forks are safe."""
    import pickle
    import traceback

    for line in requests:
        request = json.loads(line)
        if request["job"] == "convert":
            _import_converter()
        else:
            import llama_cpp  # noqa: F401  (loading the library starts no threads; computing would)
        child = os.fork()
        if child == 0:
            import faulthandler

            faulthandler.disable()  # an inherited handler would write an abort's dump past the log
            output = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(output, 1)
            os.dup2(output, 2)
            code = 0
            try:
                if request["job"] == "convert":
                    _convert(*request["args"])
                else:
                    try:
                        value = (True, globals()[request["name"]](*request["args"]))
                    except Exception as error:  # the caller's to raise, as if called there
                        value = (False, error)
                    with open(request["result"], "wb") as f:
                        try:
                            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
                        except Exception:  # an exception that does not pickle travels as its message
                            f.seek(0)
                            f.truncate()
                            pickle.dump((False, PipelineError(f"{type(value[1]).__name__}: {value[1]}")), f)
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(child, 0)
        print(os.waitstatus_to_exitcode(status), file=answers, flush=True)


def _convert(checkpoint: str, out: str, outtype: str, name: str, pre: str, metadata: str, parts: str) -> None:
    """convert_hf_to_gguf.py's own main(), with two additions: a pre-tokenizer it does not recognise
    is named as `pre_tokenizer` finds it (or as configured), and our metadata is written too."""
    convert_hf_to_gguf = _import_converter()
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
    sys.argv = ["convert_hf_to_gguf.py", checkpoint, "--outfile", out, "--outtype", outtype, "--model-name", name,
                *(["--vocab-only"] if parts == "vocab-only" else [])]
    convert_hf_to_gguf.main()


class GGUFError(ValueError):
    """A file that is not a complete, loadable GGUF model."""


def file_type(name: str, setting: str = "export.types"):
    """llama.cpp's file type `name` (q4_k_m, q8_0, ...), refused in one line naming `setting` and the valid ones."""
    import gguf

    try:
        return gguf.LlamaFileType[f"MOSTLY_{name.upper()}"]
    except KeyError:
        valid = sorted(t.name.removeprefix("MOSTLY_").lower() for t in gguf.LlamaFileType if t.name.startswith("MOSTLY_"))
        raise ValueError(f"{setting}: {name!r} is not a llama.cpp type; valid: {', '.join(valid)}.") from None


def quantize(source: Path, target: Path, name: str, embedding_type: str | None = None,
             imatrix: Path | None = None) -> None:
    """`source` quantized to the llama.cpp file type `name` by llama-quantize, the importance matrix
    `imatrix` given; a failure is one line with its reason, its output kept in a log."""
    file_type(name)
    stated = ["--token-embedding-type", embedding_type, "--output-tensor-type", embedding_type] if embedding_type else []
    # Beside the matrix, which the file names as llama-quantize was given it: not the scratch folder's path.
    stated += ["--imatrix", imatrix.name] if imatrix else []
    result = subprocess.run([str(tool("llama-quantize")), *stated, str(source), str(target), name.upper(), "1"],
                            capture_output=True, text=True, cwd=imatrix.parent if imatrix else None)
    if result.returncode != 0 or not target.exists():
        log = keep_log(f"llama-quantize-{name}", result.stdout + result.stderr)
        raise PipelineError(f"llama-quantize failed on {source.name} -> {name} (exit status {result.returncode}): "
                            f"{last_words(result.stdout + result.stderr)} (its output: {log})")


def tensor_types(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (GGML type name, shape)} read from the file's header."""
    return dict(_header(path).tensors)


def metadata_value(path: Path, key: str):
    """One metadata value of a GGUF file (a string, a number, or a list such as the vocabulary), or None."""
    header = _header(path)
    if key not in header.arrays:
        return header.scalars.get(key)
    import gguf

    return gguf.GGUFReader(str(path)).fields[key].contents()  # read again when asked: kept, it would be large


class Header(NamedTuple):
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    scalars: dict
    arrays: frozenset[str]


# gguf-py parses the whole header in Python (the vocabulary is most of it: 0.2-0.3 s a file), and a
# run reads the same file's tensors and metadata for each check and load. Kept by the file's identity,
# not its name: the export checks each file in its unfinished folder, which the rename into place
# keeps, so evaluate's loads in the same run find it parsed. A file rewritten since is read anew.
_HEADERS: dict[tuple, Header] = {}


def _header(path: Path) -> Header:
    try:
        stat = os.stat(path)
    except OSError as error:
        raise GGUFError(f"{path} is not a valid GGUF file: {error}") from error
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if identity not in _HEADERS:
        while len(_HEADERS) >= 64:
            _HEADERS.pop(next(iter(_HEADERS)))
        _HEADERS[identity] = _parse(path)
    return _HEADERS[identity]


def _parse(path: Path) -> Header:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        fields = reader.fields.items()
        return Header({t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors},
                      {k: f.contents() for k, f in fields if f.types[:1] != [gguf.GGUFValueType.ARRAY]},
                      frozenset(k for k, f in fields if f.types[:1] == [gguf.GGUFValueType.ARRAY]))
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise GGUFError(f"{path} is not a valid GGUF file (truncated or corrupted?): {error}") from error


def cpu_threads() -> int:
    """Threads for llama.cpp's own computing: OMP_NUM_THREADS where it is set (several processes
    sharing the cores, as the tests do), else every core this process may use."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))


def load_vocabulary(path: Path, verbose: bool = False):
    """The vocabulary of a GGUF file (as `--vocab-only` writes it) loaded in llama.cpp, to tokenize."""
    import llama_cpp

    try:
        return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=verbose)
    except ValueError as error:
        raise GGUFError(f"llama.cpp could not load the vocabulary in {path}: {error}") from error


class NativeAbort(GGUFError):
    """llama.cpp ended the process it ran in (a C++ exception, an assertion), which Python cannot
    catch: only a child process can take it."""


def isolated(what: str, name: str, *args):
    """`name`(*args), a function of this module, run by llama.cpp's own process (ConverterProcess)
    in a child forked for it, for llama.cpp calls on files and vocabularies made from what a user
    supplied: an abort there (llama.cpp throws std::out_of_range on some vocabularies, and a C++
    exception or GGML_ASSERT ends the process) ends the child, not the run, and becomes one line
    naming `what` and llama.cpp's last words, with its whole output kept in a log. The child is
    not forked from this process, which may have computed: ggml computes with the OpenMP runtime
    torch loaded, whose thread pool a fork of a process that used it cannot use (it waits forever).
    The result (or the function's Python exception) comes back pickled."""
    import pickle
    import signal

    code, text, result = ConverterProcess.get().call(name, args)
    if code == 0 and result is not None:
        ok, value = pickle.loads(result)
        if ok:
            return value
        raise value
    ended = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    raise NativeAbort(f"llama.cpp {ended} while {what}: {native_last_words(text)} "
                      f"(its output: {keep_log('llama.cpp', text)}).")


def native_last_words(text: str) -> str:
    """Why llama.cpp stopped, from its output: an uncaught C++ exception's type and what(), an
    assertion, or an error line of its log; a debugger's backtrace after them is left out."""
    import re

    thrown = re.search(r"terminate called after throwing an instance of '([^']+)'\s*what\(\):\s*(.*)", text)
    if thrown:
        return f"uncaught {thrown[1]}: {thrown[2].strip()}"
    before_backtrace = re.split(r"^(?:#\d+ |\[New LWP|\[Thread debugging|warning: process )", text, maxsplit=1,
                                flags=re.MULTILINE)[0]
    return last_words(before_backtrace)


def inspect(path: Path, texts: list[str], logits_of=None, vocab_only: bool = False) -> dict:
    """What llama.cpp makes of a GGUF file, computed in a child process (`isolated`): its metadata,
    the token ids of each text as a Hugging Face tokenizer gives them by default (`tokenize`) and,
    for token ids [n, seq] in `logits_of` (numpy), the logits [n, seq, vocab]. The caller compares
    them with transformers' in its own process."""
    import numpy as np

    what = (f"loading {'the vocabulary in ' if vocab_only else ''}{path} and tokenizing text with it"
            + (", then computing logits" if logits_of is not None else ""))
    rows = None if logits_of is None else np.asarray(logits_of).tolist()
    return isolated(what, "_inspect", str(path), list(texts), rows, vocab_only)


def _inspect(path: str, texts: list[str], rows, vocab_only: bool) -> dict:
    import numpy as np

    # verbose: llama.cpp's own log goes to the child's output, which a failure keeps. The header is
    # not read first (checked): in this child a crash on a damaged file is contained anyway.
    llm = (load_vocabulary(path, verbose=True) if vocab_only else
           load(path, n_ctx=max([len(r) for r in rows or []] + [512]), threads=cpu_threads(), checked=True,
                verbose=True))
    found = {"metadata": dict(llm.metadata), "tokens": [tokenize(llm, text) for text in texts]}
    if rows is not None:
        found["logits"] = np.stack([_row_logits(llm, row) for row in rows])
    llm.close()
    return found


def _row_logits(llm, row: list[int]):
    import numpy as np

    llm.reset()
    llm.eval(row)
    return np.array(llm.scores[: len(row)], dtype=np.float32)


def load(path: Path, n_ctx: int, threads: int = 1, checked: bool = False, verbose: bool = False):
    """A llama.cpp model with per-position logits, in this process: for files the export stage
    wrote and checked through `inspect` in a child process. The file's header is read first, since
    llama.cpp itself may crash the process on a damaged file rather than raise; `checked` skips that
    for a file already loaded once and verified unchanged since (an export output, in a later stage)."""
    import llama_cpp

    if not checked:
        tensor_types(path)
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                               n_threads=threads, verbose=verbose)
    except ValueError as error:
        raise GGUFError(f"llama.cpp could not load {path}: {error}") from error


def logits_fn(llm):
    """A function from token ids [batch, seq] to logits [batch, seq, vocab], like a HF model's."""
    import numpy as np
    import torch

    def logits(ids):
        return torch.from_numpy(np.stack([_row_logits(llm, row) for row in ids.tolist()]))

    return logits


def greedy_fn(llm):
    """Greedy continuations [n, count] of `prompts` (token id rows of any lengths), each decoded a
    token a step on llama.cpp's KV cache, as a server decodes (not the whole sequence again for
    every token)."""
    import numpy as np
    import torch

    def greedy(prompts, count: int):
        rows = []
        for row in (p.tolist() for p in prompts):
            llm.reset()
            llm.eval(row)
            new = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
            while len(new) < count:
                llm.eval(new[-1:])
                new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            rows.append(new)
        return torch.tensor(rows)

    return greedy


def tokenize(llm, text: str) -> list[int]:
    """Token ids as a Hugging Face tokenizer gives them by default: no BOS, special tokens written
    in the text parsed as such."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def perplexity(model: Path, text: Path, n_ctx: int, chunks: int, kl_base: Path, log: Path) -> dict:
    """llama-perplexity on `text` in windows of n_ctx tokens, of which it scores the second half.
    Without a `kl_base` file yet, `model` is the base: its log-probabilities are saved there (with
    the token ids). Then, for any model: {perplexity, kl, top1: value, <metric>_se: standard
    error} against that base, read from the tool's own summary."""
    import re

    command = [str(tool("llama-perplexity")), "--model", str(model), "--ctx-size", str(n_ctx), "--batch-size", str(n_ctx),
               "--chunks", str(chunks), "--threads", str(cpu_threads()), "--kl-divergence-base", str(kl_base)]
    if not kl_base.exists():
        _run_logged([*command, "--file", str(text)], log)
    output = _run_logged([*command, "--kl-divergence"], log)
    found = {}
    for key, label in (("perplexity", r"Mean PPL\(Q\)\s*"), ("kl", r"Mean\s+KLD"), ("top1", r"Same top p")):
        if match := re.search(label + r":\s*([-\d.eE+]+)\s*±\s*([-\d.eE+]+)", output):
            scale = 100 if key == "top1" else 1  # printed in percent
            found[key], found[f"{key}_se"] = float(match[1]) / scale, float(match[2]) / scale
    if len(found) != 6:  # it prints none under 100 scored tokens
        raise PipelineError(f"llama-perplexity printed no summary for {model} (its log: {log}); it needs 100 scored "
                            "tokens, half of each window. Raise evaluate.max_sequences and evaluate.second_opinion.windows.")
    return found


def _run_logged(command: list[str], log: Path) -> str:
    """Runs one of llama.cpp's tools, appending the command and its output to `log`; its output."""
    result = subprocess.run(command, capture_output=True, text=True, errors="replace")
    output = result.stdout + result.stderr
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n{output}\n")
    if result.returncode != 0:
        raise PipelineError(f"{Path(command[0]).name} failed (exit status {result.returncode}): {last_words(output)} "
                            f"(its log: {log})")
    return output


def kl_base_tokens(kl_base: Path):
    """The token ids [chunks, n_ctx] a llama-perplexity base file was computed on, as the tool read
    them from the text: its header is "_logits_", n_ctx, n_vocab, n_chunk (int32), then the ids."""
    import numpy as np

    with open(kl_base, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{kl_base} is not a llama-perplexity base file.")
        n_ctx, _, n_chunk = np.fromfile(f, dtype=np.int32, count=3)
        return np.fromfile(f, dtype=np.int32, count=n_ctx * n_chunk).reshape(n_chunk, n_ctx)


def perplexity_bos(llm) -> int | None:
    """The BOS id llama.cpp's tools put at the start of each window (llama-perplexity overwrites the
    window's first token with it), or None where the vocabulary adds none."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None


if __name__ == "__main__":
    # The converter's own process (ConverterProcess starts it).
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m pipeline.llamacpp serve  (conversions as JSON lines on stdin)")
    _serve(sys.stdin, sys.stdout)
