"""llama.cpp on what users bring: a vocabulary llama.cpp aborts on ends a child process, not the
run; a checkpoint made by transformers' GGUF loader is repaired; chat templates are checked as
llama-server renders them, before training."""

import json

import pytest

from pipeline import llamacpp, llamacpp_chat
from tests.conftest import compose_with
from tests.families import checkpoint

# A ChatML template that adds a default system prompt where the conversation has none, as
# SmolLM2-Instruct's does: llama.cpp's legacy built-in ChatML drops it, llama-server's Jinja keeps it.
DEFAULT_SYSTEM = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# ChatML with transformers' {% generation %} markers (for assistant masks); the tag trims the newline
# after it, in transformers and in llama-server alike.
GENERATION = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
              "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
              "{% endgeneration %}\n{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def gguf_loaded_checkpoint(tmp_path):
    """A checkpoint as a user makes one from a published GGUF file of a byte-level BPE model of the
    Llama architecture (a tiny SmolLM2): transformers' GGUF loader, then save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = checkpoint("smollm2", tmp_path / "source")
    published = tmp_path / "published"
    published.mkdir()
    llamacpp.convert(source, published / "model-f16.gguf", "f16", "smollm2", "auto", {})
    loaded = AutoModelForCausalLM.from_pretrained(published, gguf_file="model-f16.gguf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(published, gguf_file="model-f16.gguf")
    # save_pretrained refuses a model loaded so: the same weights in a plain model save.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    target = tmp_path / "from-gguf"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return source, target


@pytest.fixture(scope="module")
def from_gguf(tmp_path_factory):
    return gguf_loaded_checkpoint(tmp_path_factory.mktemp("gguf-loaded"))


def test_the_gguf_loader_mislabels_the_vocabulary_and_llama_cpp_aborts_in_a_child(from_gguf, tmp_path):
    """Converted as transformers saved it, the vocabulary makes llama.cpp throw as it tokenizes text
    that needs byte pieces the vocabulary lacks: the child dies, and this process gets one line
    with llama.cpp's reason and its log."""
    from transformers import AutoTokenizer

    _, target = from_gguf
    model = json.loads((target / "tokenizer.json").read_text())["model"]
    assert model["type"] == "BPE" and model["byte_fallback"]  # the loader's mislabel, which the fix rests on
    as_saved = tmp_path / "as-saved"
    AutoTokenizer.from_pretrained(target).save_pretrained(as_saved)
    (as_saved / "config.json").write_text((target / "config.json").read_text())
    vocabulary = tmp_path / "vocabulary.gguf"
    llamacpp.convert(as_saved, vocabulary, "f16", "from-gguf", "auto", {}, vocab_only=True)
    with pytest.raises(llamacpp.NativeAbort) as error:
        llamacpp.inspect(vocabulary, ["Hello, wörld\n"], vocab_only=True)  # ö and the newline: byte pieces
    message = str(error.value)
    assert "\n" not in message and f"while loading the vocabulary in {vocabulary} and tokenizing" in message
    assert "killed by SIGABRT" in message and "std::out_of_range" in message, message
    log = message.rsplit("(its output: ", 1)[1].rstrip(").")
    assert "terminate called" in open(log).read()


def test_a_checkpoint_from_the_gguf_loader_is_rebuilt_as_byte_level_and_passes_the_dry_run(from_gguf):
    from stages.export import PROBE, dry_run

    from pipeline.tokenizer import checkpoint_tokenizer
    from transformers import AutoTokenizer

    source, target = from_gguf
    rebuilt, original = checkpoint_tokenizer(str(target)), AutoTokenizer.from_pretrained(source)
    for text in (PROBE, "x = 12345 + 678\n\n\tprint('héllo')  # 東京", "<|im_start|>user\nHi<|im_end|>\n"):
        assert rebuilt(text)["input_ids"] == original(text)["input_ids"], text
    cfg = compose_with("model=hf", f"model.name_or_path={target}", "data.seq_len=64")
    assert "tokenizes the probe as transformers does" in dry_run(cfg, "LlamaForCausalLM")


def chat_checkpoint(tmp_path, template: str):
    """The tiny SmolLM2 with `template` as its chat template."""
    model = checkpoint("smollm2", tmp_path / "chat")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    return model


@pytest.mark.parametrize("template", [DEFAULT_SYSTEM, GENERATION], ids=["default-system-prompt", "generation-markers"])
def test_templates_llama_server_renders_as_transformers_pass_the_dry_run(template, tmp_path):
    from stages.export import dry_run

    model = chat_checkpoint(tmp_path, template)
    cfg = compose_with("model=hf", f"model.name_or_path={model}", "data=stdlib", "data.seq_len=64")
    assert "llama-server (Jinja) renders 3 conversations" in dry_run(cfg, "LlamaForCausalLM")


def test_a_template_llama_server_renders_otherwise_is_refused_before_training(tmp_path):
    """SmolLM2's default system prompt, served with --no-jinja: the legacy renderer drops it."""
    from tests.conftest import refused

    model = chat_checkpoint(tmp_path, DEFAULT_SYSTEM)
    message = refused(tmp_path, "stage=all", "model=hf", f"model.name_or_path={model}", "data=stdlib",
                      "data.seq_len=64", "serve.llamacpp.jinja=false")
    assert message.startswith("export (dry run before training): the chat template of"), message
    assert "llama-server (--no-jinja) renders 2 of 3 prompts into other tokens" in message
    assert "first at token 0" in message or "first at token" in message
    assert "serve.llamacpp.jinja=true" in message and "export.check.allow_chat_template_mismatch=true" in message


def test_the_stand_in_renders_and_tokenizes_as_the_file_does(tmp_path):
    """llama-server on the one-layer stand-in gives the token ids llama.cpp gives on the real file."""
    model = chat_checkpoint(tmp_path, DEFAULT_SYSTEM)
    vocabulary = tmp_path / "vocabulary.gguf"
    llamacpp.convert(model, vocabulary, "f16", "chat", "auto", {}, vocab_only=True)
    conversation = [{"role": "user", "content": "Grüße 東京 🦙 x² 12345"}]
    ((prompt, ids),) = llamacpp_chat.served_prompts(vocabulary, [conversation], True, tmp_path)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert llamacpp.inspect(vocabulary, [prompt], vocab_only=True)["tokens"] == [ids]
