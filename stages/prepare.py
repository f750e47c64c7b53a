"""prepare: documents -> seeded train / held-out split -> tokenizer -> cached token ids, all hashed.

Outputs (in the stage directory): tokenizer/ (a transformers tokenizer), train.npy and
heldout.npy (int32 token ids, documents joined by the end-of-text token), heldout.jsonl (the
held-out documents as text) and manifest.json (counts and content hashes).
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
from pipeline.models import pretrained_source, save_tokenizer
from pipeline.contract import Stage

STAGE = Stage("prepare", settings=("data", "model.name_or_path", "model.arch.vocab_size"), scope="data")

TEXT_SUFFIXES = (".txt", ".jsonl")
END_OF_TEXT = "<|endoftext|>"


def check(cfg: DictConfig) -> None:
    data = cfg.data
    if not 0 < data.heldout_fraction < 1:
        raise ValueError(f"data.heldout_fraction={data.heldout_fraction} must be between 0 and 1 (exclusive).")
    if data.source == "text":
        text_files(data.files)
    if data.source == "hf" and str(data.path).startswith(("/", ".", "~")) and not Path(data.path).expanduser().exists():
        raise FileNotFoundError(f"data.path={data.path!r} does not exist.")
    pretrained_source(cfg)


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


def load_documents(data: DictConfig) -> list[str]:
    if data.source == "pydoc":
        from pydoc_data.topics import topics

        docs = [topics[key] for key in sorted(topics)]
    elif data.source == "text":
        docs = []
        for file in text_files(data.files):
            if file.suffix == ".txt":
                docs += re.split(r"\n\s*\n", file.read_text(encoding="utf-8"))
                continue
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if data.text_field not in record:
                        raise KeyError(f"{file}:{number} has no field {data.text_field!r} (data.text_field); "
                                       f"fields: {', '.join(record)}.")
                    docs.append(record[data.text_field])
    else:
        docs = _hf_dataset(data)
    docs = [d.strip() for d in docs if d and d.strip()]
    if len(docs) < 2:
        raise ValueError(f"data ({data.name}) has {len(docs)} non-empty document(s); a train / held-out split needs 2 or more.")
    return docs


def _hf_dataset(data: DictConfig) -> list[str]:
    import datasets

    path = Path(str(data.path)).expanduser()
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
    if path.is_file():
        dataset = datasets.load_dataset(builders.get(path.suffix, "text"), data_files=str(path), split="train")
    elif (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        dataset = datasets.load_from_disk(str(path))  # written by save_to_disk
        if isinstance(dataset, datasets.DatasetDict):
            if data.split not in dataset:
                raise KeyError(f"data.split={data.split!r} not in {data.path}; splits: {', '.join(dataset)}.")
            dataset = dataset[data.split]
    else:
        dataset = datasets.load_dataset(str(data.path), data.config_name, split=data.split)
    if data.text_field not in dataset.column_names:
        raise KeyError(f"data.text_field={data.text_field!r} is not a column of {data.path}; "
                       f"columns: {', '.join(dataset.column_names)}.")
    return list(dataset[data.text_field])


def split(docs: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(docs) * heldout_fraction))
    heldout = sorted(order[:n_heldout])
    train = sorted(order[n_heldout:])
    return [docs[i] for i in train], [docs[i] for i in heldout]


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE with GPT-2's pre-tokenizer, so llama.cpp reads it as the `gpt-2` pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def encode(tokenizer, docs: list[str]):
    import numpy as np

    eos = tokenizer.eos_token_id
    ids = []
    for doc_ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += doc_ids + [eos]
    return np.asarray(ids, dtype=np.int32)


def run(cfg: DictConfig, tracker) -> None:
    import numpy as np
    from transformers import AutoTokenizer

    docs = load_documents(cfg.data)
    train_docs, heldout_docs = split(docs, cfg.data.heldout_fraction, cfg.data.split_seed)

    source = pretrained_source(cfg)
    if source is None:
        tokenizer = train_tokenizer(train_docs, cfg.model.arch.vocab_size)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer of {source} has no end-of-text token to separate documents.")

    train_ids, heldout_ids = encode(tokenizer, train_docs), encode(tokenizer, heldout_docs)
    if len(heldout_ids) < cfg.data.seq_len + 1:
        raise ValueError(f"The held-out split has {len(heldout_ids)} tokens, fewer than one sequence of "
                         f"data.seq_len={cfg.data.seq_len}; use more data or a larger data.heldout_fraction.")

    out = stage_dir(cfg, "prepare")
    with atomic_dir(out) as tmp:
        save_tokenizer(tokenizer, tmp / "tokenizer")
        np.save(tmp / "train.npy", train_ids)
        np.save(tmp / "heldout.npy", heldout_ids)
        (tmp / "heldout.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in heldout_docs))
        hashes = {
            "train_ids": sha256_file(tmp / "train.npy"),
            "heldout_ids": sha256_file(tmp / "heldout.npy"),
            "heldout_text": sha256_file(tmp / "heldout.jsonl"),
            "tokenizer": sha256_dir(tmp / "tokenizer"),
        }
        manifest = {
            "data_hash": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest(),
            "hashes": hashes,
            "documents": {"train": len(train_docs), "heldout": len(heldout_docs)},
            "tokens": {"train": int(len(train_ids)), "heldout": int(len(heldout_ids))},
            "vocab_size": len(tokenizer),
            "tokenizer_source": source or "trained (byte-level BPE)",
        }
        write_json(tmp / "manifest.json", manifest)
    record(cfg, tracker)


def record(cfg: DictConfig, tracker) -> None:
    out = stage_dir(cfg, "prepare")
    manifest = read_json(out / "manifest.json")
    tracker.set_tags({"data_hash": manifest["data_hash"]})
    tracker.set_tags({"data_hash": manifest["data_hash"]}, run_id=tracker.pipeline_run_id)
    tracker.log_metrics({
        "prepare/train_documents": manifest["documents"]["train"],
        "prepare/heldout_documents": manifest["documents"]["heldout"],
        "prepare/train_tokens": manifest["tokens"]["train"],
        "prepare/heldout_tokens": manifest["tokens"]["heldout"],
        "prepare/vocab_size": manifest["vocab_size"],
    })
    tracker.log_artifact(out / "manifest.json")
    tracker.log_artifacts(out / "tokenizer", "tokenizer")

