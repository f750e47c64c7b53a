"""export: GGUF files for llama.cpp, from the trained and from the AWQ-smoothed weights.

For each source: a 16-bit base file written by llama.cpp's own converter (f16, or bf16 when the
model was trained in bf16, where it is lossless), then llama.cpp's quantizer for every type in
export.types. A file counts as an artifact only after it is validated: llama.cpp loads it, its
tokenizer gives the Hugging Face tokenizer's ids, every tensor has the requested type (llama.cpp
silently falls back to other types where a row does not fill a block), and, for the base file,
its logits match the source model. What llama.cpp cannot export, or would run differently, is
refused from config.json and the tokenizer files before any work, and a user's checkpoint has its
vocabulary through the converter and llama.cpp then too (dry_run), so that it is refused before
training, not after.

Every quantized type is made from an f32 conversion of the source, the weights as trained. Types
in export.imatrix are made a second time with llama.cpp's importance matrix (llama-imatrix on the
16-bit file, over the quantize stage's calibration samples of the train split).

Outputs: <source>/model-<type>.gguf (and model-<type>-imat.gguf with <source>/imatrix.gguf,
calibration.txt) and manifest.json (hashes, sizes, timings, tensor types, validation results, the
files' quantize.imatrix.* keys).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import (atomic_dir, code_fingerprint, keep_log, machine_cache, read_json, require_stage_output,
                                sha256_file, stage_dir, write_json)
from pipeline.chat import heldout_chat_prompts, is_chat, prompt_ids
from pipeline.data import calibration_blocks, load_blocks
from pipeline.models import load_causal_lm, pretrained_source, save_tokenizer, shape_only_model
from pipeline import llamacpp
from pipeline.config import BASE_TYPES
from pipeline.hardware import PRECISION_TABLE
from pipeline.formats import MANIFEST, SMOOTHED, gguf_file, require_qat_artifact, smoothed_checkpoint
from pipeline.contract import PipelineError, Stage, last_words

log = logging.getLogger(__name__)
STAGE = Stage("export", settings=("export",), reads=("prepare", "train", "quantize"),
              # A file quantized with an importance matrix: model-<type>-imat.gguf, artifact <source>.<type>-imat.
              names={"imatrix": "imat"})
# The importance-matrix keys llama-quantize writes into a file it quantized with one.
IMATRIX_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                "quantize.imatrix.chunks_count")

# Rope variants llama.cpp applies as transformers does, and the converter modules that write
# them (None: every one). Any other (e.g. "dynamic") would export a model that attends differently.
ROPE_TYPES = {"default": None, "linear": None, "yarn": None, "longrope": None, "su": None, "llama3": {"llama"}}
# Converter modules whose llama.cpp graph applies no sliding-window attention: a checkpoint that
# uses one (Mistral v0.1, Qwen2 with use_sliding_window) would run as full attention there.
NO_SLIDING_WINDOW = {"llama", "qwen"}
# Architectures whose converter writes a sliding window but not which layers use it: llama.cpp
# assumes every n-th layer is global.
SWA_PERIODS = {"Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 6}
LAYER_TYPES = {False: "sliding_attention", True: "full_attention"}


# llama.cpp rounds a matmul's activations to its weights' 16-bit type, and bf16 keeps 3 mantissa bits
# fewer than f16: a bf16 base file's logits may move 2**3 times as far from the source model's (a
# bf16 fine-tune of the offline default's base: 0.051, where f16 files of fp32 models stay near 0.001).
LOGIT_TOLERANCE_SCALE = {"f16": 1, "f32": 1, "bf16": 8}
# Text every tokenizer check includes: accents, CJK, emoji, symbols, code and whitespace runs.
PROBE = "Grüße, naïve café: 東京 🦙 x² → ∞\n\tdef f(x):\n        return x  # 12345\n\n"


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


def check(cfg: DictConfig) -> list[str]:
    x = cfg.export
    for name in [*x.types, *x.embedding_types, *x.embedding_types.values()]:
        file_type(name)
    require_qat_artifact(cfg, "export", x.types)
    if x.types:
        llamacpp.tool("llama-quantize")
    if with_imatrix(x):
        llamacpp.tool("llama-imatrix")
    model = shape_only_model(cfg)
    problems = gguf_problems(type(model).__name__, model.config.to_dict(), pretrained_source(cfg), cfg.data.seq_len)
    if problems:
        raise ValueError("export: " + " ".join(problems))
    return [f"llama.cpp's converter writes {type(model).__name__} with these settings", dry_run(cfg, type(model).__name__)]


# The files of a checkpoint that its vocabulary's dry run reads (everything but the weights).
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def dry_run(cfg: DictConfig, arch: str) -> str:
    """The deployment path tried on a user's checkpoint before any training: its tokenizer saved as
    the prepare and train stages save it (pipeline.models.save_tokenizer), llama.cpp's converter
    on that and config.json with --vocab-only, the vocabulary loaded in llama.cpp and its token
    ids compared with transformers', as the export checks them after training. Refuses in one
    line; a pass is kept in the machine cache under the hash of what it read and of the code."""
    import tempfile

    from transformers import AutoTokenizer

    checkpoint = pretrained_source(cfg)
    if checkpoint is None or not Path(checkpoint).is_dir():
        return "the starting model's vocabulary is the pipeline's own (no dry run of a user's checkpoint)"
    read = sorted(f for f in Path(checkpoint).iterdir() if f.is_file() and not f.name.endswith(WEIGHTS))
    key = hashlib.sha256(json.dumps([code_fingerprint("export"), llamacpp.source_dir().name, cfg.export.pre_tokenizer,
                                     [(f.name, sha256_file(f)) for f in read]]).encode()).hexdigest()[:16]
    cached = machine_cache() / "dry-run" / f"{key}.json"
    if cached.is_file():
        return read_json(cached)["summary"] + " (cached)"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        save_tokenizer(tokenizer, Path(tmp))
        shutil.copy(Path(checkpoint) / "config.json", Path(tmp) / "config.json")
        vocabulary = Path(tmp) / "vocabulary.gguf"
        try:
            llamacpp.convert(Path(tmp), vocabulary, "f16", gguf_name(cfg), cfg.export.pre_tokenizer, {}, vocab_only=True)
        except llamacpp.ConverterError as error:
            reason = error.reason.replace(tmp, checkpoint)  # the copy it read stands for the checkpoint
            raise ValueError(f"export (dry run before training): llama.cpp's converter refuses the vocabulary of "
                             f"{checkpoint}: {reason}; {converter_fix(reason, tokenizer, checkpoint, arch)} (its output: "
                             f"{error.log}).") from None
        llm = llamacpp.load_vocabulary(vocabulary)
        try:
            report = tokenizer_agreement(llm, tokenizer, [], f"the vocabulary of {checkpoint}")
        except ValueError as error:
            raise ValueError(f"export (dry run before training): {error}") from None
        finally:
            llm.close()
    seconds = time.perf_counter() - started
    summary = (f"llama.cpp's converter writes the vocabulary of {checkpoint}, llama.cpp loads it and tokenizes "
               f"the probe as transformers does ({seconds:.1f} s)")
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_json(cached, {"summary": summary, "seconds": seconds, "checkpoint": checkpoint, **report})
    return summary


def converter_fix(reason: str, tokenizer, checkpoint: str, arch: str) -> str:
    """What to do about a converter refusal whose cause is known."""
    if "tokenizer.model" in reason:
        kind = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        byte_level = kind.get("type") == "BPE" and not kind.get("byte_fallback")
        return (f"the converter reads {arch}'s vocabulary from tokenizer.model, which {checkpoint} lacks, and its "
                f"tokenizer.json ({kind.get('type')}, byte_fallback={kind.get('byte_fallback', False)}) is not a "
                "SentencePiece vocabulary one can be written from: "
                + ("a byte-level BPE is read from tokenizer.json where tokenizer_config.json declares tokenizer_class "
                   "GPT2Tokenizer, as Phi-4-mini's does" if byte_level and arch == "Phi3ForCausalLM" else
                   "add the tokenizer.model the model was released with"))
    if "pre-tokenizer" in reason or "NotImplementedError" in reason:
        return "set export.pre_tokenizer to llama.cpp's name for this tokenizer's pre-tokenizer"
    return "without GGUF files, the other stages still run: stage=[prepare,train,quantize,evaluate,serve]"


def gguf_name(cfg: DictConfig) -> str:
    """general.name of the files: the starting checkpoint's, since llama.cpp keys some tokenizer rules
    on it (Phi-3's special tokens); our own names go into the precision_pipeline.* keys."""
    return Path(str(cfg.model.name_or_path)).name if cfg.model.name_or_path else cfg.model.name


def gguf_problems(arch: str, config: dict, checkpoint: str | None, seq_len: int) -> list[str]:
    """What in a model's config.json and tokenizer files llama.cpp cannot export or would run
    differently, each naming the key, its value and what would work."""
    modules = llamacpp.converter_architectures()
    if arch not in modules:
        near = sorted(a for a in modules if a.endswith("ForCausalLM"))
        return [f"llama.cpp's converter does not write {arch} (config.json architectures); it writes {', '.join(near)}."]
    module, found = modules[arch], []
    for where, params in rope_settings(config):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ROPE_TYPES or (ROPE_TYPES[kind] and module not in ROPE_TYPES[kind]):
            valid = [k for k, m in ROPE_TYPES.items() if not m or module in m]
            found.append(f"rope_type={kind!r}{f' ({where})' if where else ''} is not one llama.cpp applies to {arch}; "
                         f"it applies {', '.join(valid)}.")
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", True) and window
    if module in NO_SLIDING_WINDOW and uses_window and window < seq_len:
        found.append(f"sliding_window={window} is smaller than data.seq_len={seq_len}, and llama.cpp runs {arch} with "
                     f"full attention: set data.seq_len<={window} (or sliding_window to null in config.json if the "
                     "model does not need it).")
    period = SWA_PERIODS.get(arch)
    layer_types = config.get("layer_types")
    if period and layer_types and layer_types != [LAYER_TYPES[(i + 1) % period == 0] for i in range(len(layer_types))]:
        found.append(f"layer_types={layer_types} does not follow the pattern llama.cpp runs {arch} with: every "
                     f"{period}{'nd' if period == 2 else 'th'} layer full_attention, the others sliding_attention.")
    if checkpoint is not None and Path(checkpoint).is_dir():
        files = Path(checkpoint)
        vocabulary = (json.loads((files / "tokenizer.json").read_text())["model"]["type"]
                      if (files / "tokenizer.json").is_file() else None)
        if not (files / "tokenizer.model").is_file() and vocabulary != "BPE":
            found.append(f"the tokenizer in {checkpoint} is {vocabulary or 'missing'}; llama.cpp's converter writes "
                         "SentencePiece (tokenizer.model) and byte-level BPE (tokenizer.json) vocabularies.")
    return found


def rope_settings(config: dict) -> list[tuple[str, dict]]:
    """(layer type, rope settings) of a config: one entry without a layer type, or one per layer
    type where transformers keeps them apart (Gemma 3's sliding_attention / full_attention)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return list(rope.items())
    return [("", rope)]


def base_type(cfg: DictConfig) -> str:
    if cfg.export.base_type != "auto":
        return cfg.export.base_type
    return PRECISION_TABLE[cfg.train.precision].gguf_base_type


def rounded_like_gguf(model, dtype: str):
    """The model with its matrices rounded to `dtype` as the base file stores them (vectors stay
    f32 there), so llama.cpp's logits are compared like with like."""
    import torch

    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    for parameter in model.parameters():
        if parameter.ndim > 1:
            parameter.data = parameter.data.to(torch_dtype).float()
    return model


def quantize_gguf(source: Path, target: Path, name: str, embedding_type: str | None = None,
                  imatrix: Path | None = None) -> None:
    file_type(name)
    stated = ["--token-embedding-type", embedding_type, "--output-tensor-type", embedding_type] if embedding_type else []
    # Beside the matrix, which the file names as llama-quantize was given it: not the scratch folder's path.
    stated += ["--imatrix", imatrix.name] if imatrix else []
    result = subprocess.run([str(llamacpp.tool("llama-quantize")), *stated, str(source), str(target), name.upper(), "1"],
                            capture_output=True, text=True, cwd=imatrix.parent if imatrix else None)
    if result.returncode != 0 or not target.exists():
        log = keep_log(f"llama-quantize-{name}", result.stdout + result.stderr)
        raise PipelineError(f"llama-quantize failed on {source.name} -> {name} (exit status {result.returncode}): "
                            f"{last_words(result.stdout + result.stderr)} (its output: {log})")


def with_imatrix(x: DictConfig) -> list[str]:
    """The types made a second time with an importance matrix: those of export.imatrix that are made."""
    return [name for name in x.imatrix if name in x.types]


def importance_matrix(base: Path, calibration: Path, target: Path, seq_len: int, samples: int) -> None:
    """llama-imatrix's importance matrix of the 16-bit file's weights over the calibration text,
    tokenized as in training (special tokens in it are parsed as such: a chat template's markup), in
    windows of a sample's length; it needs two windows, and the text may tokenize a little shorter,
    so with fewer than three samples the windows are half a sample."""
    window = seq_len if samples >= 3 else seq_len // 2
    result = subprocess.run([str(llamacpp.tool("llama-imatrix")), "-m", str(base), "-f", calibration.name, "-o",
                             str(target), "-c", str(window), "--parse-special", "--no-ppl"],
                            capture_output=True, text=True, cwd=calibration.parent)
    if result.returncode != 0 or not target.exists():
        log = keep_log("llama-imatrix", result.stdout + result.stderr)
        raise PipelineError(f"llama-imatrix failed on {base.name} (exit status {result.returncode}): "
                            f"{last_words(result.stdout + result.stderr)} (its output: {log})")


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


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    """The first position where two token id lists differ (None: they are equal)."""
    if ours == theirs:
        return None
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))


def token_difference(llm, tokenizer, text: str) -> tuple[int | None, list[int], list[int]]:
    """Where llama.cpp's token ids for `text` first differ from the Hugging Face tokenizer's (None:
    nowhere), both parsing special tokens written in the text."""
    ours, theirs = llamacpp.tokenize(llm, text), tokenizer(text, add_special_tokens=False)["input_ids"]
    return first_difference(ours, theirs), ours, theirs


def tokenizer_agreement(llm, tokenizer, texts: list[str], name: str) -> dict:
    """Refuses a llama.cpp vocabulary that tokenizes the probe or `texts` otherwise than the Hugging
    Face tokenizer; reports how it tokenizes special tokens written in text."""
    for text in [PROBE, *texts]:
        at, ours, theirs = token_difference(llm, tokenizer, text)
        if at is not None:
            raise ValueError(f"{name}: llama.cpp tokenizes differently from the Hugging Face tokenizer at token "
                             f"{at} ({ours[at:at + 5]} vs {theirs[at:at + 5]}); the pre-tokenizer is likely wrong.")
    report = {"tokenizer_texts_checked": len(texts) + 1}
    # Added and special tokens written in the text, as a chat template writes them.
    added = [t.content for t in tokenizer.added_tokens_decoder.values()]
    at, ours, theirs = token_difference(llm, tokenizer, "".join(f"{t}Hi {t} {PROBE}" for t in added))
    report["special_tokens_agree"] = at is None
    if at is not None:
        # SentencePiece vocabularies with a leading-space prefix: llama.cpp adds the prefix after every
        # special token as transformers' legacy mode did; transformers 5 does not.
        report["special_tokens_difference"] = {"at": at, "llama_cpp": ours[at:at + 5], "transformers": theirs[at:at + 5]}
        log.warning("%s: around special tokens written in text, llama.cpp tokenizes differently from the Hugging "
                    "Face tokenizer (token %d: %s vs %s)", name, at, ours[at:at + 5], theirs[at:at + 5])
    return report


def chat_template_agreement(llm, tokenizer, prompts: list[list[dict]], name: str, allow_mismatch: bool) -> dict:
    """Whether llama.cpp, rendering each held-out prompt with the file's embedded chat template,
    feeds the model the tokens apply_chat_template gives (BOS as the file adds it)."""
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    checked = []
    for prompt in prompts:
        rendered = llamacpp.apply_chat_template(llm, prompt)
        if rendered is None:
            log.warning("%s: llama.cpp has no built-in rendering of the embedded chat template; llama-server needs "
                        "--jinja to serve it, and the prompt tokens are not checked.", name)
            return {"llama_cpp_renders": False}
        ours = llm.tokenize(rendered.encode("utf-8"), add_bos=add_bos, special=True)
        theirs = prompt_ids(tokenizer, prompt)
        checked.append((ours == theirs, rendered, ours, theirs))
    differ = [c for c in checked if not c[0]]
    report = {"llama_cpp_renders": True, "conversations": len(checked), "same_prompt_tokens": len(checked) - len(differ)}
    if differ:
        _, rendered, ours, theirs = differ[0]
        at = first_difference(ours, theirs)
        report["first_difference"] = {"rendered": rendered, "at": at, "llama_cpp": ours[at:at + 5],
                                      "transformers": theirs[at:at + 5]}
        message = (f"{name}: llama.cpp renders {len(differ)} of {len(checked)} held-out prompts into other tokens than "
                   f"the chat template the model was trained with (token {at}: {ours[at:at + 5]} vs {theirs[at:at + 5]}; "
                   f"llama.cpp rendered {rendered[:200]!r}).")
        if not allow_mismatch:
            raise ValueError(message + " Set export.check.allow_chat_template_mismatch=true to keep such files.")
        log.warning(message)
    return report


def validate(path: Path, name: str, tokenizer, texts: list[str], reference=None, check_ids=None,
             max_logit_diff: float = 0.0, allow_fallback: bool = False, chat_prompts=(),
             allow_template_mismatch: bool = False) -> dict:
    """Load in llama.cpp and check tokenizer, tensor types and (for a base file) logits."""
    types = llamacpp.tensor_types(path)
    report = {"tensor_types": dict(Counter(t for t, _ in types.values()))}
    if name not in BASE_TYPES:
        report["fallbacks"] = fallbacks(types, name)
        if report["fallbacks"] and not allow_fallback:
            listed = "; ".join(f"{f['tensor']} {f['shape']}: {f['type']} instead of {f['wanted']} ({f['why']})"
                               for f in report["fallbacks"][:3])
            more = f"; and {len(report['fallbacks']) - 3} more" if len(report["fallbacks"]) > 3 else ""
            raise ValueError(f"llama.cpp fell back to other types for {len(report['fallbacks'])} tensor(s) of "
                             f"{path.name}: {listed}{more}. Set export.allow_fallback=true to keep such files.")
    llm = llamacpp.load(path, n_ctx=max(len(r) for r in check_ids) if check_ids is not None else 512)
    report.update(tokenizer_agreement(llm, tokenizer, texts, path.name))
    if chat_prompts:
        report["chat_template"] = chat_template_agreement(llm, tokenizer, chat_prompts, path.name,
                                                          allow_template_mismatch)
    if reference is not None:
        allowed = max_logit_diff * LOGIT_TOLERANCE_SCALE[name]
        logits = llamacpp.logits_fn(llm)(check_ids)
        diff = (logits - reference).abs().max().item()
        ours, theirs = logits.argmax(-1), reference.argmax(-1)
        # Where the source's two best logits are closer than the tolerance allows the logits
        # to move, a different top-1 is rounding, not a broken file; anywhere else it is a bug.
        margin = reference.gather(-1, theirs.unsqueeze(-1)) - reference.gather(-1, ours.unsqueeze(-1))
        flips = int(((ours != theirs) & (margin.squeeze(-1) > 2 * allowed)).sum())
        top1 = (ours == theirs).float().mean().item()
        report.update(max_logit_diff=diff, top1_agreement=top1, top1_flips_beyond_ties=flips)
        if flips or diff > allowed:
            scale = f" x {LOGIT_TOLERANCE_SCALE[name]} for {name}" if LOGIT_TOLERANCE_SCALE[name] != 1 else ""
            raise ValueError(f"{path.name}: llama.cpp's logits differ from the source model's (top-1 agreement "
                             f"{top1:.4f} with {flips} flip(s) that are not near-ties, max |diff| {diff:.4g}; "
                             f"export.check.max_logit_diff={max_logit_diff}{scale}).")
    llm.close()
    return report


def run(cfg: DictConfig, tracker) -> None:
    import torch
    from transformers import AutoTokenizer

    x = cfg.export
    prepared = require_stage_output(cfg, "prepare")
    sources = {"trained": require_stage_output(cfg, "train")}
    if SMOOTHED in x.sources and (smoothed := smoothed_checkpoint(stage_dir(cfg, "quantize"))):
        sources[SMOOTHED] = smoothed
    sources = {k: v for k, v in sources.items() if k in x.sources}
    if not sources:
        raise FileNotFoundError(f"export.sources={list(x.sources)}: none exists yet; run stage=quantize first.")

    dtype = base_type(cfg)
    tokenizer = AutoTokenizer.from_pretrained(sources["trained"])
    texts = [json.loads(line)["text"][:2000] for line in (prepared / "heldout.jsonl").read_text().splitlines()[: x.check.texts]]
    chat_prompts = heldout_chat_prompts(prepared)[: x.check.conversations] if is_chat(cfg.data) else []
    checks = {"chat_prompts": chat_prompts, "allow_template_mismatch": x.check.allow_chat_template_mismatch}
    check_ids = load_blocks(prepared, "heldout", cfg.data.seq_len)[: x.check.sequences]

    out = stage_dir(cfg, "export")
    manifest = {}
    with atomic_dir(out) as tmp:
        matrix_types = with_imatrix(x)
        if matrix_types:  # the quantize stage's calibration samples, as text: llama-imatrix tokenizes them again
            samples = calibration_blocks(prepared, cfg.quantize.calibration, cfg.seed)
            calibration = tmp / "calibration.txt"
            calibration.write_text("\n".join(tokenizer.decode(block) for block in samples.tolist()))
        for source, path in sources.items():
            with torch.no_grad():
                reference = rounded_like_gguf(load_causal_lm(path), dtype)(check_ids).logits
            (tmp / source).mkdir()
            base = gguf_file(tmp, source, dtype)
            provenance = {"name": f"{cfg.model.name}-{cfg.train.precision}-{source}", "source": source,
                          "training_precision": cfg.train.precision, "pipeline_run": tracker.pipeline_run_id}
            started = time.perf_counter()
            llamacpp.convert(path, base, dtype, gguf_name(cfg), x.pre_tokenizer, provenance)
            files = {dtype: {"seconds": time.perf_counter() - started,
                             "pre_tokenizer": llamacpp.metadata_value(base, "tokenizer.ggml.pre"),
                             **validate(base, dtype, tokenizer, texts, reference, check_ids, x.check.max_logit_diff,
                                        **checks)}}
            # llama-quantize reads the fp32 weights as trained: from the 16-bit file it would round
            # twice, and a QAT model's blocks would no longer be the ones it trained with.
            full = base if dtype == "f32" or not x.types else tmp / f"{source}-f32.gguf"
            if full != base:
                llamacpp.convert(path, full, "f32", gguf_name(cfg), x.pre_tokenizer, provenance)
            if matrix_types:
                started = time.perf_counter()
                imatrix = tmp / source / "imatrix.gguf"
                importance_matrix(base, calibration, imatrix, cfg.quantize.calibration.seq_len, len(samples))
                matrix_seconds = time.perf_counter() - started
            for name, matrix in [(n, None) for n in x.types] + [(n, imatrix) for n in matrix_types]:
                kind = f"{name}-{STAGE.names['imatrix']}" if matrix else name
                target = gguf_file(tmp, source, kind)
                started = time.perf_counter()
                quantize_gguf(full, target, name, x.embedding_types.get(name), matrix)
                files[kind] = {"seconds": time.perf_counter() - started,
                               **validate(target, name, tokenizer, texts, allow_fallback=x.allow_fallback, **checks)}
                if matrix:
                    files[kind]["imatrix"] = {"seconds": matrix_seconds,
                                              **{key: llamacpp.metadata_value(target, key) for key in IMATRIX_KEYS}}
            if full != base:
                full.unlink()
            for name, info in files.items():
                file = gguf_file(tmp, source, name)
                info.update(bytes=file.stat().st_size, sha256=sha256_file(file))
            manifest[source] = files
        write_json(tmp / MANIFEST, manifest)
    record(cfg, tracker)


def record(cfg: DictConfig, tracker) -> None:
    out = stage_dir(cfg, "export")
    metrics = {}
    for source, files in read_json(out / MANIFEST).items():
        for name, info in files.items():
            metrics[f"export/{source}.{name}/size_mb"] = info["bytes"] / 2**20
            metrics[f"export/{source}.{name}/seconds"] = info["seconds"]
            metrics[f"export/{source}.{name}/fallback_tensors"] = len(info.get("fallbacks", []))
            file = gguf_file(out, source, name)
            if info["bytes"] <= cfg.export.log_files_max_mb * 2**20:
                tracker.log_artifact(file, f"gguf/{source}")
    tracker.log_metrics(metrics)
    tracker.log_artifact(out / MANIFEST)
    for matrix in sorted(out.glob("*/imatrix.gguf")):
        tracker.log_artifact(matrix, f"imatrix/{matrix.parent.name}")
    if (out / "calibration.txt").exists():
        tracker.log_artifact(out / "calibration.txt", "imatrix")
