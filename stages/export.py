"""export: GGUF files for llama.cpp, from the trained and from the AWQ-smoothed weights.

For each source: a 16-bit base file written with the `gguf` library (f16, or bf16 when the model
was trained in bf16, where it is lossless), then llama.cpp's own quantizer for every type in
export.types. A file counts as an artifact only after it is validated: llama.cpp loads it, its
tokenizer gives the Hugging Face tokenizer's ids, every tensor has the requested type (llama.cpp
silently falls back to other types where a row does not fill a block), and, for the base file,
its logits match the source model.

Outputs: <source>/model-<type>.gguf and manifest.json (hashes, sizes, timings, tensor types,
validation results).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import atomic_dir, read_json, require_stage_output, sha256_file, stage_dir, write_json
from pipeline.data import load_blocks
from pipeline.models import load_causal_lm, shape_only_model
from pipeline import llamacpp
from pipeline.config import BASE_TYPES
from pipeline.contract import Stage

STAGE = Stage("export", settings=("export",), reads=("prepare", "train", "quantize"))

# transformers class -> (GGUF architecture, whether q/k rows are permuted to llama.cpp's rope layout).
# HF stores q/k for the "rotate half" rope; llama.cpp's llama arch rotates interleaved pairs and
# its qwen2 arch rotates halves as HF does.
ARCHITECTURES = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
}
# Pre-tokenizer regexes of byte-level BPE tokenizers -> llama.cpp's name for them.
PRE_TOKENIZERS = {
    None: "gpt-2",  # ByteLevel with its built-in GPT-2 regex
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def file_type(name: str):
    import gguf

    try:
        return gguf.LlamaFileType[f"MOSTLY_{name.upper()}"]
    except KeyError:
        valid = sorted(t.name.removeprefix("MOSTLY_").lower() for t in gguf.LlamaFileType if t.name.startswith("MOSTLY_"))
        raise ValueError(f"export.types: {name!r} is not a llama.cpp type; valid: {', '.join(valid)}.") from None


def main_tensor_type(name: str):
    """The GGML type a llama.cpp file type stores its weights in (q4_k_m -> Q4_K)."""
    import gguf

    parts = name.upper().split("_")
    for end in range(len(parts), 0, -1):
        if "_".join(parts[:end]) in gguf.GGMLQuantizationType.__members__:
            return gguf.GGMLQuantizationType["_".join(parts[:end])]
    raise ValueError(f"No GGML tensor type for {name!r}.")


def check(cfg: DictConfig) -> None:
    x = cfg.export
    for name in x.types:
        file_type(name)
    arch = type(shape_only_model(cfg)).__name__
    if arch not in ARCHITECTURES:
        raise ValueError(f"export: {arch} is not supported; GGUF export supports {', '.join(ARCHITECTURES)}.")


def base_type(cfg: DictConfig) -> str:
    if cfg.export.base_type != "auto":
        return cfg.export.base_type
    return "bf16" if cfg.train.precision == "bf16" else "f16"


def pre_tokenizer(tokenizer_json: dict, override: str) -> str:
    if override != "auto":
        return override
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    regexes = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
    level = [p for p in parts if p.get("type") == "ByteLevel"]
    key = regexes[0] if regexes else (None if level and level[0].get("use_regex", True) else "unknown")
    if key not in PRE_TOKENIZERS:
        raise ValueError("export: this tokenizer's pre-tokenizer is not one llama.cpp is known to share "
                         f"({', '.join(PRE_TOKENIZERS.values())}); set export.pre_tokenizer to llama.cpp's name for it.")
    return PRE_TOKENIZERS[key]


def add_tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> None:
    import gguf

    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    if tokenizer_json["model"]["type"] != "BPE":
        raise ValueError(f"export: only byte-level BPE tokenizers are supported, not {tokenizer_json['model']['type']}.")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # the model's embedding has more rows than the tokenizer has tokens
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token not in added
                         else gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def permute_for_rope(weights, n_head: int):
    """HF's rotate-half q/k rows -> the interleaved pairs llama.cpp's llama arch rotates."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def checkpoint_tensors(checkpoint: Path):
    """(name, tensor) of a Hugging Face checkpoint's safetensors files, one at a time."""
    from safetensors import safe_open

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"export: {checkpoint} has no .safetensors weights.")
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def write_gguf(checkpoint: Path, tokenizer, path: Path, dtype: str, provenance: dict) -> None:
    """GGUF from a checkpoint directory's config and safetensors, streamed tensor by tensor."""
    import gguf
    import numpy as np
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(checkpoint)
    arch_name, permute = ARCHITECTURES[c.architectures[0]]
    arch = gguf.MODEL_ARCH[arch_name]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}  # transformers 5 keeps rope_theta here
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"export: rope scaling {rope['rope_type']!r} is not supported yet.")
    rope_theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(provenance["name"])
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "f32": gguf.LlamaFileType.ALL_F32}[dtype])
    for key, value in provenance.items():
        writer.add_string(f"precision_pipeline.{key}", str(value))
    add_tokenizer(writer, tokenizer, c.vocab_size, provenance["pre_tokenizer"])

    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for hf_name, tensor in checkpoint_tensors(checkpoint):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"export: no GGUF name for tensor {hf_name}.")
        data = tensor.float().numpy()
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_for_rope(data, c.num_attention_heads)
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_for_rope(data, c.num_key_value_heads)
        if data.ndim == 1 or dtype == "f32":  # llama.cpp keeps norms and biases in f32
            writer.add_tensor(name, data.astype(np.float32))
        elif dtype == "f16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def rounded_like_gguf(model, dtype: str):
    """The model with its matrices rounded to `dtype` as the base file stores them (vectors stay
    f32 there), so llama.cpp's logits are compared like with like."""
    import torch

    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    for parameter in model.parameters():
        if parameter.ndim > 1:
            parameter.data = parameter.data.to(torch_dtype).float()
    return model


def quantize_gguf(source: Path, target: Path, name: str) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(name))
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.exists():
        raise RuntimeError(f"llama.cpp failed to quantize {source.name} to {name} (status {status}).")


def fallbacks(types: dict, name: str) -> list[dict]:
    """Weight tensors that llama.cpp stored in another block layout than `name` asks for."""
    import gguf

    wanted = main_tensor_type(name)
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    found = []
    for tensor, (type_name, shape) in types.items():
        qtype = gguf.GGMLQuantizationType[type_name]
        if len(shape) > 1 and gguf.GGML_QUANT_SIZES[qtype][0] != block:
            found.append({"tensor": tensor, "shape": list(shape), "type": type_name, "wanted": wanted.name,
                          "why": f"rows of {shape[0]} do not fill blocks of {block}" if shape[0] % block else "unknown"})
    return found


def validate(path: Path, name: str, tokenizer, texts: list[str], reference=None, check_ids=None,
             max_logit_diff: float = 0.0, allow_fallback: bool = False) -> dict:
    """Load in llama.cpp and check tokenizer, tensor types and (for a base file) logits."""
    types = llamacpp.tensor_types(path)
    report = {"tensor_types": dict(Counter(t for t, _ in types.values()))}
    if name not in BASE_TYPES:
        report["fallbacks"] = fallbacks(types, name)
        if report["fallbacks"] and not allow_fallback:
            lines = "\n".join(f"  {f['tensor']} {f['shape']}: {f['type']} instead of {f['wanted']} ({f['why']})"
                              for f in report["fallbacks"])
            raise ValueError(f"llama.cpp fell back to other types for {len(report['fallbacks'])} tensor(s) of "
                             f"{path.name}:\n{lines}\nSet export.allow_fallback=true to keep such files.")
    llm = llamacpp.load(path, n_ctx=max(len(r) for r in check_ids) if check_ids is not None else 512)
    for text in texts:
        ours, theirs = llamacpp.tokenize(llm, text), tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise ValueError(f"{path.name}: llama.cpp tokenizes differently from the Hugging Face tokenizer at token "
                             f"{at} ({ours[at:at + 5]} vs {theirs[at:at + 5]}); the pre-tokenizer is likely wrong.")
    report["tokenizer_texts_checked"] = len(texts)
    if reference is not None:
        logits = llamacpp.logits_fn(llm)(check_ids)
        diff = (logits - reference).abs().max().item()
        ours, theirs = logits.argmax(-1), reference.argmax(-1)
        # Where the source's two best logits are closer than the tolerance allows the logits
        # to move, a different top-1 is rounding, not a broken file; anywhere else it is a bug.
        margin = reference.gather(-1, theirs.unsqueeze(-1)) - reference.gather(-1, ours.unsqueeze(-1))
        flips = int(((ours != theirs) & (margin.squeeze(-1) > 2 * max_logit_diff)).sum())
        top1 = (ours == theirs).float().mean().item()
        report.update(max_logit_diff=diff, top1_agreement=top1, top1_flips_beyond_ties=flips)
        if flips or diff > max_logit_diff:
            raise ValueError(f"{path.name}: llama.cpp's logits differ from the source model's (top-1 agreement "
                             f"{top1:.4f} with {flips} flip(s) that are not near-ties, max |diff| {diff:.4g}; "
                             f"export.check.max_logit_diff={max_logit_diff}).")
    llm.close()
    return report


def run(cfg: DictConfig, tracker) -> None:
    import torch
    from transformers import AutoTokenizer

    x = cfg.export
    prepared = require_stage_output(cfg, "prepare")
    sources = {"trained": require_stage_output(cfg, "train")}
    if "awq_smoothed" in x.sources and (stage_dir(cfg, "quantize") / "awq_smoothed").is_dir():
        sources["awq_smoothed"] = stage_dir(cfg, "quantize") / "awq_smoothed"
    sources = {k: v for k, v in sources.items() if k in x.sources}
    if not sources:
        raise FileNotFoundError(f"export.sources={list(x.sources)}: none exists yet; run stage=quantize first.")

    dtype = base_type(cfg)
    tokenizer = AutoTokenizer.from_pretrained(sources["trained"])
    pre = pre_tokenizer(json.loads(tokenizer.backend_tokenizer.to_str()), x.pre_tokenizer)
    texts = [json.loads(line)["text"][:2000] for line in (prepared / "heldout.jsonl").read_text().splitlines()[: x.check.texts]]
    check_ids = load_blocks(prepared, "heldout", cfg.data.seq_len)[: x.check.sequences]

    out = stage_dir(cfg, "export")
    manifest = {}
    with atomic_dir(out) as tmp:
        for source, path in sources.items():
            with torch.no_grad():
                reference = rounded_like_gguf(load_causal_lm(path), dtype)(check_ids).logits
            (tmp / source).mkdir()
            base = tmp / source / f"model-{dtype}.gguf"
            provenance = {"name": f"{cfg.model.name}-{cfg.train.precision}-{source}", "source": source,
                          "training_precision": cfg.train.precision, "pipeline_run": tracker.pipeline_run_id,
                          "pre_tokenizer": pre}
            started = time.perf_counter()
            write_gguf(path, tokenizer, base, dtype, provenance)
            files = {dtype: {"seconds": time.perf_counter() - started,
                             **validate(base, dtype, tokenizer, texts, reference, check_ids, x.check.max_logit_diff)}}
            for name in x.types:
                target = tmp / source / f"model-{name}.gguf"
                started = time.perf_counter()
                quantize_gguf(base, target, name)
                files[name] = {"seconds": time.perf_counter() - started,
                               **validate(target, name, tokenizer, texts, allow_fallback=x.allow_fallback)}
            for name, info in files.items():
                file = tmp / source / f"model-{name}.gguf"
                info.update(bytes=file.stat().st_size, sha256=sha256_file(file))
            manifest[source] = files
        write_json(tmp / "manifest.json", manifest)
    record(cfg, tracker)


def record(cfg: DictConfig, tracker) -> None:
    out = stage_dir(cfg, "export")
    metrics = {}
    for source, files in read_json(out / "manifest.json").items():
        for name, info in files.items():
            metrics[f"export/{source}.{name}/size_mb"] = info["bytes"] / 2**20
            metrics[f"export/{source}.{name}/seconds"] = info["seconds"]
            metrics[f"export/{source}.{name}/fallback_tensors"] = len(info.get("fallbacks", []))
            file = out / source / f"model-{name}.gguf"
            if info["bytes"] <= cfg.export.log_files_max_mb * 2**20:
                tracker.log_artifact(file, f"gguf/{source}")
    tracker.log_metrics(metrics)
    tracker.log_artifact(out / "manifest.json")
