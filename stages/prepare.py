"""prepare: documents or conversations -> seeded train / held-out split -> tokenizer -> cached
token ids, all hashed.

Outputs (in the stage directory): tokenizer/ (a transformers tokenizer, with its chat template for
chat data), train.npy and heldout.npy (int32 token ids: documents joined by the end-of-text token,
or conversations rendered by the chat template one after another), for chat data also
<split>_targets.npy (1 where a token is part of an answer) and <split>_lengths.npy (tokens per
conversation), heldout.jsonl (the held-out documents as text; conversations also as messages) and
manifest.json (counts and content hashes).
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
import re
from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import atomic_dir, read_json, sha256_dir, sha256_file, stage_dir, write_json
from pipeline.chat import (CHATML, CHATML_TOKENS, ChatDataError, conversation, is_chat, render, template_for,
                           tokenize_answers)
from pipeline.models import pretrained_source, starting_checkpoint
from pipeline.tokenizer import checkpoint_tokenizer, save_tokenizer
from pipeline.contract import Stage

STAGE = Stage("prepare", settings=("data", "model.name_or_path", "model.arch.vocab_size", "model.pretrain"), scope="data",
              names={"manifest": "manifest.json"})  # the data hash, counts and content hashes: read by train and report
MANIFEST = STAGE.names["manifest"]

TEXT_SUFFIXES = (".txt", ".jsonl")
END_OF_TEXT = "<|endoftext|>"
# data.source=stdlib: functions of these modules, asked about and answered by their docstrings.
STDLIB_MODULES = ("builtins", "os", "os.path", "json", "re", "string", "textwrap", "itertools", "functools",
                  "collections", "math", "statistics", "shutil", "pathlib", "random", "datetime", "heapq", "bisect",
                  "operator", "glob", "fnmatch", "base64", "hashlib", "csv", "io", "time", "copy", "difflib",
                  "html", "urllib.parse", "zlib", "struct", "secrets", "uuid", "inspect", "typing", "enum",
                  "dataclasses", "contextlib", "calendar", "decimal", "fractions", "gzip", "tempfile", "shlex",
                  "unicodedata", "pprint", "traceback", "warnings", "argparse", "logging", "sqlite3", "zipfile")
QUESTIONS = ("What does {} do?", "Explain {} briefly.", "What is {} for?", "Describe {}.")
SYSTEM = "You answer questions about the Python standard library in a sentence or two."
# data.source=docstrings: standard-library source folders left out (tests, demos, GUI and tooling code).
DOCSTRING_SKIP = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
                  "pydoc_data", "__pycache__"}
# A docstring sharing a passage this long with the pydoc topics is left out of data.source=docstrings.
SHARED_PASSAGE = 80


def check(cfg: DictConfig) -> None:
    data = cfg.data
    if not 0 < data.heldout_fraction < 1:
        raise ValueError(f"data.heldout_fraction={data.heldout_fraction} must be between 0 and 1 (exclusive).")
    if data.source == "text":
        for file in text_files(data.files):
            file_records(file)  # a broken JSON line refused now, not after minutes of other stages' checks
    if data.source == "hf" and str(data.path).startswith(("/", ".", "~")) and not Path(data.path).expanduser().exists():
        raise FileNotFoundError(f"data.path={data.path!r} does not exist.")
    local = Path(str(data.path)).expanduser() if data.source == "hf" else None
    if local is not None and local.suffix in (".json", ".jsonl") and local.is_file():
        json_file_check(local, "data.path")  # datasets' own error names neither the file nor the line
    if data.source in ("pydoc", "docstrings") and is_chat(data):
        raise ValueError(f"data.format={data.format} does not fit data.source={data.source} (plain text); data=stdlib "
                         "is the offline chat data.")
    if data.source == "stdlib" and data.format != "messages":
        raise ValueError(f"data.source=stdlib holds conversations: data.format must be messages, not {data.format}.")
    source = pretrained_source(cfg)
    if is_chat(data) and source is not None:
        template_for(data, checkpoint_tokenizer(source))


def text_files(patterns) -> list[Path]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matches:
            raise FileNotFoundError(f"data.files: {pattern!r} matches no file.")
        files += [Path(m) for m in matches]
    bad = [str(f) for f in files if f.suffix not in TEXT_SUFFIXES]
    if bad:
        raise ValueError(f"data.files: {', '.join(bad)} not supported; use {' or '.join(TEXT_SUFFIXES)} files.")
    return files


def stdlib_questions() -> list[dict]:
    """Conversations about standard-library functions, answered by the first paragraph of their
    docstrings: some with a system prompt, some with a second question."""
    import importlib
    import inspect

    found = []
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            answer = " ".join(doc.split("\n\n")[0].split()) if doc else ""
            if 20 <= len(answer) <= 400:
                found.append((f"{module_name}.{name}", answer))
    rows = []
    for i in range(0, len(found) - 1, 2):
        (first, first_answer), (second, second_answer) = found[i], found[i + 1]
        messages = [{"role": "user", "content": QUESTIONS[i // 2 % len(QUESTIONS)].format(f"`{first}`")},
                    {"role": "assistant", "content": first_answer}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        if i % 4 == 0:
            messages += [{"role": "user", "content": f"And `{second}`?"}, {"role": "assistant", "content": second_answer}]
        rows.append({"messages": messages})
    return rows


def normalized(text: str) -> str:
    return " ".join(text.split())


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(where, text) of the standard library's docstrings, read from its source files with ast (no
    module is imported), each once, less every one that holds an answer of stdlib_questions() or
    shares a passage of SHARED_PASSAGE characters with a pydoc topic: the text the offline data
    sets measure a fine-tune on is never in it."""
    import ast
    import sysconfig

    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    found, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if DOCSTRING_SKIP & set(relative.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40 and doc not in seen:
                    seen.add(doc)
                    found.append((f"{relative}:{getattr(node, 'lineno', 1)}", doc))
    texts = [normalized(doc) for _, doc in found]
    joined = "\n".join(texts)
    answers = {m["content"] for row in stdlib_questions() for m in row["messages"] if m["role"] == "assistant"}
    answers = [a for a in answers if a in joined]  # the few that occur at all, searched for doc by doc
    passages = {t[i : i + SHARED_PASSAGE] for t in map(normalized, topics.values()) for i in range(len(t) - SHARED_PASSAGE + 1)}
    step = SHARED_PASSAGE // 2  # a shared passage of 1.5 x SHARED_PASSAGE holds one of these windows whole
    return [(where, doc) for (where, doc), text in zip(found, texts)
            if not any(a in text for a in answers)
            and not any(text[i : i + SHARED_PASSAGE] in passages for i in range(0, len(text) - SHARED_PASSAGE + 1, step))]


def records(data: DictConfig) -> list[tuple[str, object]]:
    """(where, record) of every document: a string of plain text or a dict (a JSON line, a dataset row)."""
    if data.source == "pydoc":
        from pydoc_data.topics import topics

        return [(f"pydoc topic {key}", topics[key]) for key in sorted(topics)]
    if data.source == "stdlib":
        return [(f"stdlib question {i}", row) for i, row in enumerate(stdlib_questions())]
    if data.source == "docstrings":
        return [(f"docstring {where}", text) for where, text in stdlib_docstrings()]
    if data.source == "hf":
        dataset = _hf_dataset(data)
        # Plain text reads one column, far faster than whole rows on a large dataset.
        rows = dataset if is_chat(data) else dataset[data.text_field]
        return [(f"{data.path} row {i}", row) for i, row in enumerate(rows)]
    return [found for file in text_files(data.files) for found in file_records(file)]


def file_records(file: Path, setting: str = "data.files") -> list[tuple[str, object]]:
    """(where, record) of a local .txt or .jsonl file, as other tools write them too: a UTF-8 BOM
    (Windows editors, PowerShell, Excel) dropped, CRLF read as LF (read_text's universal newlines).
    A .jsonl line that is not a JSON object is refused with its line number in the file."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{setting}: {file} is not UTF-8 text ({error.reason} at byte {error.start}); "
                         "save it as UTF-8.") from None
    if file.suffix == ".txt":
        return [(str(file), d) for d in re.split(r"\n\s*\n", text)]
    found = []
    # split("\n"), not splitlines(): that also splits at U+2028, U+0085 and others, which a JSON
    # string may hold unescaped, and would break the line and shift every line number after it.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{setting}: {file} line {number} is not valid JSON: {error.msg} "
                             f"(column {error.colno}).") from None
        if not isinstance(record, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(record), "a number")
            raise ValueError(f"{setting}: {file} line {number} is {kind}, not a JSON object: {line.strip()[:80]}")
        found.append((f"{file}:{number}", record))
    return found


def json_file_check(file: Path, setting: str) -> None:
    """A local .json or .jsonl file as datasets' json builder reads it: one JSON document (an array
    of records, or an object), or JSON Lines. A broken one is refused with its line in the file."""
    if file.suffix == ".jsonl":
        file_records(file, setting)
        return
    text = file.read_text(encoding="utf-8-sig", errors="replace")
    try:
        json.loads(text)
        return
    except json.JSONDecodeError as error:
        whole = error
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        lines = isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        lines = False
    if lines:  # JSON Lines under a .json name: each line is checked
        file_records(file, setting)
        return
    raise ValueError(f"{setting}: {file} is not valid JSON: {whole.msg} (line {whole.lineno} column {whole.colno}); "
                     "a .json file holds one JSON document or one JSON object a line.")


def load_documents(data: DictConfig) -> list:
    """Documents (strings), or for chat data conversations (lists of messages)."""
    found = records(data)
    if is_chat(data):
        docs = []
        for where, record in found:
            if not isinstance(record, dict):
                raise ChatDataError(f"{where} is plain text; data.format={data.format} reads JSON records "
                                    "(.jsonl files or dataset rows).")
            docs.append(conversation(record, data, where))
    else:
        docs = []
        for where, record in found:
            if isinstance(record, dict):
                if data.text_field not in record:
                    raise KeyError(f"{where} has no field {data.text_field!r} (data.text_field); fields: "
                                   f"{', '.join(record)}. Chat data needs data.format (one of messages, "
                                   "prompt_completion, alpaca).")
                record = record[data.text_field]
            docs.append(record)
        docs = [d.strip() for d in docs if d and d.strip()]
    if len(docs) < 2:
        raise ValueError(f"data ({data.name}) has {len(docs)} non-empty document(s); a train / held-out split needs 2 or more.")
    return docs


def _hf_dataset(data: DictConfig):
    import datasets

    path = Path(str(data.path)).expanduser()
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
    if path.is_file():
        if path.suffix in (".json", ".jsonl"):  # datasets' error on a broken line names neither the file nor the line
            json_file_check(path, "data.path")
        builder = builders.get(path.suffix, "text")
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        except datasets.exceptions.DatasetGenerationError as error:
            cause = error.__cause__ or error
            raise ValueError(f"data.path: datasets' {builder} reader cannot read {path}: "
                             f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None
    elif (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        dataset = datasets.load_from_disk(str(path))  # written by save_to_disk
        if isinstance(dataset, datasets.DatasetDict):
            if data.split not in dataset:
                raise KeyError(f"data.split={data.split!r} not in {data.path}; splits: {', '.join(dataset)}.")
            dataset = dataset[data.split]
    else:
        dataset = datasets.load_dataset(str(data.path), data.config_name, split=data.split)
    if not is_chat(data) and data.text_field not in dataset.column_names:
        raise KeyError(f"data.text_field={data.text_field!r} is not a column of {data.path}; "
                       f"columns: {', '.join(dataset.column_names)}.")
    return dataset


def split(docs: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(docs) * heldout_fraction))
    heldout = sorted(order[:n_heldout])
    train = sorted(order[n_heldout:])
    return [docs[i] for i in train], [docs[i] for i in heldout]


def train_tokenizer(docs: list[str], vocab_size: int, chat: bool = False):
    """Byte-level BPE with GPT-2's pre-tokenizer, so llama.cpp reads it as the `gpt-2` pre-tokenizer.
    It holds ChatML's special tokens and template, so that a model pretrained on plain text with it
    can be instruction-tuned; for chat data its EOS is `<|im_end|>`, where a turn and generation end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, *CHATML_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer)
    eos = CHATML_TOKENS[1] if chat else END_OF_TEXT
    trained = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=eos,
                                      pad_token=END_OF_TEXT)
    trained.chat_template = CHATML
    return trained


def encode(tokenizer, docs: list[str]):
    import numpy as np

    eos = tokenizer.eos_token_id
    ids = []
    for doc_ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += doc_ids + [eos]
    return np.asarray(ids, dtype=np.int32)


def encode_chat(tokenizer, conversations: list[list[dict]], split_name: str, data: DictConfig
                ) -> tuple[dict, dict, list[list[dict]]]:
    """Token ids, answer mask and length of every conversation that fits data.seq_len (or is cut
    to it, data.too_long=truncate), the counts of what was dropped or cut, and the conversations kept."""
    import numpy as np

    ids, targets, lengths, kept = [], [], [], []
    counts = {"examples": 0, "dropped_too_long": 0, "truncated": 0, "dropped_no_answer_left": 0, "target_tokens": 0}
    for i, messages in enumerate(conversations):
        example, answer = tokenize_answers(tokenizer, messages, f"{split_name} conversation {i}")
        if len(example) > data.seq_len:
            if data.too_long == "drop":
                counts["dropped_too_long"] += 1
                continue
            example, answer = example[: data.seq_len], answer[: data.seq_len]
            counts["truncated"] += 1
            if not any(answer):
                counts["dropped_no_answer_left"] += 1
                continue
        ids += example
        targets += answer
        lengths.append(len(example))
        kept.append(messages)
        counts["examples"] += 1
        counts["target_tokens"] += sum(answer)
    if counts["target_tokens"] == 0:
        raise ChatDataError(
            f"No answer token is left to train on in the {split_name} split: {len(conversations)} conversation(s), "
            f"{counts['dropped_too_long']} longer than data.seq_len={data.seq_len} dropped, "
            f"{counts['dropped_no_answer_left']} cut before their first answer. Raise data.seq_len or set "
            "data.too_long=truncate.")
    arrays = {"": np.asarray(ids, dtype=np.int32), "_targets": np.asarray(targets, dtype=np.uint8),
              "_lengths": np.asarray(lengths, dtype=np.int32)}
    return arrays, counts, kept


def load_tokenizer(cfg: DictConfig, train_docs: list):
    source = starting_checkpoint(cfg)
    chat = is_chat(cfg.data)
    if source is None:
        texts = [m["content"] for c in train_docs for m in c] if chat else train_docs
        return train_tokenizer(texts, cfg.model.arch.vocab_size, chat), None
    tokenizer = checkpoint_tokenizer(source)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer of {source} has no end-of-text token to separate documents.")
    if chat:
        tokenizer.chat_template = template_for(cfg.data, tokenizer)
    return tokenizer, source


def run(cfg: DictConfig, tracker) -> None:
    import numpy as np

    data = cfg.data
    docs = load_documents(data)
    train_docs, heldout_docs = split(docs, data.heldout_fraction, data.split_seed)
    tokenizer, source = load_tokenizer(cfg, train_docs)

    splits, counts = {}, {}
    heldout_rows = [{"text": d} for d in heldout_docs]
    for name, split_docs in (("train", train_docs), ("heldout", heldout_docs)):
        if is_chat(data):
            arrays, counts[name], kept = encode_chat(tokenizer, split_docs, name, data)
            splits.update({f"{name}{suffix}": array for suffix, array in arrays.items()})
            if name == "heldout":  # later stages read the held-out ids and these rows: the same conversations
                heldout_rows = [{"text": render(tokenizer, c), "messages": c} for c in kept]
        else:
            splits[name] = encode(tokenizer, split_docs)
    if len(splits["heldout"]) < data.seq_len + 1:
        raise ValueError(f"The held-out split has {len(splits['heldout'])} tokens, fewer than one sequence of "
                         f"data.seq_len={data.seq_len}; use more data or a larger data.heldout_fraction.")

    out = stage_dir(cfg, "prepare")
    with atomic_dir(out) as tmp:
        save_tokenizer(tokenizer, tmp / "tokenizer")
        for name, array in splits.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "heldout.jsonl").write_text("".join(json.dumps(row) + "\n" for row in heldout_rows))
        hashes = {f"{name}_ids": sha256_file(tmp / f"{name}.npy") for name in splits}
        hashes.update(heldout_text=sha256_file(tmp / "heldout.jsonl"), tokenizer=sha256_dir(tmp / "tokenizer"))
        manifest = {
            "data_hash": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest(),
            "hashes": hashes,
            "format": data.format,
            "documents": {"train": len(train_docs), "heldout": len(heldout_docs)},
            "tokens": {"train": int(len(splits["train"])), "heldout": int(len(splits["heldout"]))},
            "vocab_size": len(tokenizer),
            "tokenizer_source": source or "trained (byte-level BPE)",
        }
        if is_chat(data):
            manifest["chat"] = {"template": tokenizer.chat_template, "too_long": data.too_long, "splits": counts}
        write_json(tmp / MANIFEST, manifest)
    record(cfg, tracker)


def record(cfg: DictConfig, tracker) -> None:
    out = stage_dir(cfg, "prepare")
    manifest = read_json(out / MANIFEST)
    tracker.set_tags({"data_hash": manifest["data_hash"]})
    tracker.set_tags({"data_hash": manifest["data_hash"]}, run_id=tracker.pipeline_run_id)
    tracker.log_metrics({
        "prepare/train_documents": manifest["documents"]["train"],
        "prepare/heldout_documents": manifest["documents"]["heldout"],
        "prepare/train_tokens": manifest["tokens"]["train"],
        "prepare/heldout_tokens": manifest["tokens"]["heldout"],
        "prepare/vocab_size": manifest["vocab_size"],
        **{f"prepare/{split}_{key}": value for split, counts in manifest.get("chat", {}).get("splits", {}).items()
           for key, value in counts.items()},
    })
    tracker.log_artifact(out / MANIFEST)
    tracker.log_artifacts(out / "tokenizer", "tokenizer")

