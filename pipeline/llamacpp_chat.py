"""Chat prompts as llama-server renders and tokenizes them, for comparison with transformers'.

llama-server renders chat with its Jinja engine by default (`--no-jinja`: llama.cpp's legacy
built-in formats, which are also what the C API `llama_chat_apply_template` gives), and the two
differ: SmolLM2's template adds a default system prompt that the legacy renderer drops, and a
template with `{% generation %}` markers trims a newline that the legacy ChatML writes. So the
prompt is asked of llama-server itself, through its `/apply-template` and `/tokenize` endpoints,
with the flag the serve stage starts it with.

The server runs on a stand-in: a one-layer model with a tiny width that carries the file's whole
vocabulary and template (every `tokenizer.*` key, and `general.name`, on which llama.cpp keys some
tokenizer rules). Rendering and tokenizing read nothing else, so the stand-in renders exactly as the
real file would, starts in a second whatever the model's size, and can be made from a `--vocab-only`
file before training. The server is a process of its own: nothing it does can end the run.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import llamacpp
from pipeline.server import Server, free_port

# The stand-in's shape: llama.cpp's smallest sensible Llama (one head of 32).
WIDTH = 32
# Metadata of a file that the stand-in carries over: what rendering and tokenizing read.
CARRIED = ("tokenizer.", "general.name")


def stand_in(source: Path, target: Path) -> Path:
    """A one-layer Llama GGUF with the vocabulary, template and name of `source` (a model or a
    `--vocab-only` file), for llama-server to render and tokenize with."""
    import logging

    import gguf
    import numpy as np

    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # its lines about the file: not for the console
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), "llama")
    n_vocab = None
    for name, field in reader.fields.items():
        if not name.startswith(CARRIED):
            continue
        value = field.contents()
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(name, value, field.types[0], sub_type=field.types[-1] if array else None)
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if n_vocab is None:
        raise llamacpp.GGUFError(f"{source} holds no vocabulary (tokenizer.ggml.tokens).")
    writer.add_context_length(4096)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(1)
    writer.add_feed_forward_length(WIDTH)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_rope_dimension_count(WIDTH)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(0)

    def weights(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", weights(n_vocab, WIDTH).astype(np.float16))
    writer.add_tensor("output_norm.weight", np.ones(WIDTH, dtype=np.float32))
    for part in ("attn_norm", "ffn_norm"):
        writer.add_tensor(f"blk.0.{part}.weight", np.ones(WIDTH, dtype=np.float32))
    for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        writer.add_tensor(f"blk.0.{part}.weight", weights(WIDTH, WIDTH))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def served_prompts(source: Path, conversations: list[list[dict]], jinja: bool, workdir: Path, server: str | None = None,
                   timeout_s: float = 60) -> list[tuple[str, list[int]]]:
    """For each conversation (each ending before the answer asked for), the prompt llama-server
    renders with `source`'s template and the token ids it feeds the model (BOS as the file adds
    it, special tokens in the text parsed as such): what `/v1/chat/completions` computes on."""
    import httpx

    model = stand_in(source, Path(workdir) / "stand-in.gguf")
    port = free_port()
    command = [str(llamacpp.tool("llama-server", server)), "--model", str(model), "--host", "127.0.0.1", "--port",
               str(port), "--threads", "1", "--parallel", "1", "--ctx-size", "512", "--no-webui",
               "--jinja" if jinja else "--no-jinja"]
    found = []
    with Server(command, port, Path(workdir) / "llama-server.log", timeout_s) as running:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            for messages in conversations:
                answer = client.post("/apply-template", json={"messages": messages})
                if answer.status_code != 200:
                    raise llamacpp.GGUFError(f"llama-server ({'Jinja' if jinja else '--no-jinja'}) could not render a "
                                             f"prompt with the chat template of {source}: {answer.text[:300]}")
                prompt = answer.json()["prompt"]
                ids = client.post("/tokenize", json={"content": prompt, "add_special": True, "parse_special": True})
                found.append((prompt, ids.json()["tokens"]))
    return found
