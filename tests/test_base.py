"""The toy (model=base): a fine-tune of a base model pretrained on the standard library's docstrings,
built once per machine. The base never sees the text it is measured on, and the fine-tune learns."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.artifacts import read_json, stage_dir
from pipeline.hardware import detect, resolve_precision
from pipeline.models import base_config, starting_checkpoint
from stages.prepare import SHARED_PASSAGE, load_documents, normalized, split, stdlib_docstrings
from tests.conftest import compose_with, only_dir, pipeline, runs

BASE = "model=base"


@pytest.mark.slow  # reads every docstring of the standard library and every pydoc topic (seconds)
def test_the_base_never_sees_the_held_out_text():
    """No held-out pydoc topic (the default's fine-tune data) shares a passage with the base's
    pretraining text, and no held-out stdlib answer (the chat data) occurs in it."""
    corpus = "\n".join(normalized(text) for _, text in stdlib_docstrings())
    pydoc, stdlib = (compose_with(BASE, f"data={name}").data for name in ("pydoc", "stdlib"))
    _, topics = split(load_documents(pydoc), pydoc.heldout_fraction, pydoc.split_seed)
    for topic in map(normalized, topics):
        shared = [topic[i : i + SHARED_PASSAGE] for i in range(0, len(topic) - SHARED_PASSAGE, SHARED_PASSAGE)
                  if topic[i : i + SHARED_PASSAGE] in corpus]
        assert not shared, shared[:2]
    _, conversations = split(load_documents(stdlib), stdlib.heldout_fraction, stdlib.split_seed)
    answers = [normalized(m["content"]) for c in conversations for m in c if m["role"] == "assistant"]
    assert answers and not [a for a in answers if a in corpus]


def test_the_base_is_addressed_by_its_recipe_not_by_the_fine_tune():
    default = compose_with(BASE)
    base = stage_dir(base_config(default), "train")
    assert str(base) == starting_checkpoint(default)
    for fine_tune in ("train.lr=1e-4", "seed=3", "train.precision=bf16", "model.lora.enabled=true", "data=stdlib"):
        assert stage_dir(base_config(compose_with(BASE, fine_tune)), "train") == base, fine_tune
    assert stage_dir(base_config(compose_with(BASE, "model.pretrain.train.max_steps=7")), "train") != base
    assert base_config(compose_with("model=tiny")) is None



@pytest.mark.slow
def test_the_toy_fine_tune_learns_and_its_base_is_built_once_per_machine(tmp_path):
    """The toy's fine-tune (model=base, on the pydoc text the base never saw) lowers the held-out
    loss; what quantization costs a fine-tuned model is asserted on the real one (test_smollm2.py)."""
    pipeline(tmp_path, "stage=[prepare,train]", BASE)
    cfg = compose_with(BASE, f"paths.artifacts={tmp_path}/artifacts")
    cfg.train.precision = resolve_precision(cfg.train.precision, detect())[0]  # as the run resolved `auto`
    train = read_json(stage_dir(cfg, "train") / "summary.json")
    assert train["heldout_loss"] < train["start_heldout_loss"] - 0.3, train

    (base_run,) = runs(tmp_path, "base")
    assert base_run.data.tags["output"] == starting_checkpoint(cfg)
    # Another checkout on this machine reuses the base: its tokenizer is the base's.
    other = tmp_path / "other"
    other.mkdir()
    pipeline(other, "stage=prepare", BASE)
    (reused,) = runs(other, "base")
    assert reused.data.tags["reused"] == "true"
    tokenizer = AutoTokenizer.from_pretrained(only_dir(other / "artifacts" / "prepare") / "tokenizer")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(starting_checkpoint(cfg)).get_vocab()


@pytest.mark.slow
def test_the_base_is_instruction_tuned_on_the_chat_data(tmp_path):
    """The other fine-tune users run most: the chat data on the same base, its answers as targets."""
    pipeline(tmp_path, "stage=[prepare,train]", BASE, "data=stdlib", "profile=smoke", "train.precision=fp32")
    cfg = compose_with(BASE, "data=stdlib", "profile=smoke", "train.precision=fp32", f"paths.artifacts={tmp_path}/artifacts")
    prepared = stage_dir(cfg, "prepare")
    targets = np.load(prepared / "train_targets.npy")
    assert 0 < targets.mean() < 1  # answers only
    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    assert tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    train = read_json(stage_dir(cfg, "train") / "summary.json")
    assert train["loss_on"] == "assistant" and train["heldout_loss"] < train["start_heldout_loss"]
