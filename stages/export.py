"""export: GGUF files for llama.cpp, from the trained and from the AWQ-smoothed weights.

For each source: a 16-bit base file written by llama.cpp's own converter (f16, or bf16 when the
model was trained in bf16, where it is lossless), then llama.cpp's quantizer for every type in
export.types. A file counts as an artifact only after it is validated: llama.cpp loads and runs
it in a child process (an abort there ends the child, not the run), its tokenizer gives the Hugging
Face tokenizer's ids, the tensors llama.cpp stored in other types than requested (where a row does
not fill a block) are recorded, llama-server renders chat prompts into the tokens the model was
trained on, and, for the base file, its logits match the source model's within their own spread.
What llama.cpp cannot export, or would run differently, is
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
from pipeline.models import load_causal_lm, pretrained_source, shape_only_model
from pipeline.tokenizer import checkpoint_tokenizer, save_tokenizer
from pipeline import llamacpp, llamacpp_chat
from pipeline.config import BASE_TYPES
from pipeline.hardware import PRECISION_TABLE
from pipeline.formats import MANIFEST, SMOOTHED, gguf_file, require_qat_artifact, smoothed_checkpoint
from pipeline.contract import PipelineError, Stage, last_words

log = logging.getLogger(__name__)
# serve.llamacpp.jinja: how the deployed llama-server renders chat, which the export checks.
STAGE = Stage("export", settings=("export", "serve.llamacpp.jinja"), reads=("prepare", "train", "quantize"),
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
# The tolerance has a part relative to the logits' own spread as well (logit_agreement): SmolLM2's
# correct bf16 file moved 0.31-0.44 over 30 layers, while a file with a wrong rope layout or
# scrambled weights moves by whole spreads.
LOGIT_TOLERANCE_SCALE = {"f16": 1, "f32": 1, "bf16": 8}
# Text every tokenizer check includes: accents, CJK, emoji, symbols, code and whitespace runs.
PROBE = "Grüße, naïve café: 東京 🦙 x² → ∞\n\tdef f(x):\n        return x  # 12345\n\n"


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
        llamacpp.file_type(name)
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
    the prepare and train stages save it (pipeline.tokenizer.save_tokenizer), llama.cpp's converter
    on that and config.json with --vocab-only, the vocabulary loaded in llama.cpp and its token
    ids compared with transformers', as the export checks them after training; for chat data, the
    prompts of PROBE_CONVERSATIONS as llama-server renders them compared with the chat template's.
    llama.cpp runs in processes of its own. Refuses in one line; a pass is kept in the machine
    cache under the hash of what it read and of the code."""
    import tempfile

    checkpoint = pretrained_source(cfg)
    if checkpoint is None or not Path(checkpoint).is_dir():
        return "the starting model's vocabulary is the pipeline's own (no dry run of a user's checkpoint)"
    read = sorted(f for f in Path(checkpoint).iterdir() if f.is_file() and not f.name.endswith(WEIGHTS))
    chat = [cfg.data.chat_template, cfg.serve.llamacpp.jinja] if is_chat(cfg.data) else None
    key = hashlib.sha256(json.dumps([code_fingerprint("export"), llamacpp.source_dir().name, cfg.export.pre_tokenizer,
                                     chat, [(f.name, sha256_file(f)) for f in read]]).encode()).hexdigest()[:16]
    cached = machine_cache() / "dry-run" / f"{key}.json"
    if cached.is_file():
        return read_json(cached)["summary"] + " (cached)"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = checkpoint_tokenizer(checkpoint)  # as the prepare stage loads it
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
        texts = probe_texts(tokenizer, [])
        try:
            found = llamacpp.inspect(vocabulary, texts, vocab_only=True)
            report = tokenizer_agreement(found["tokens"], tokenizer, texts, f"the vocabulary of {checkpoint}")
            if is_chat(cfg.data):
                chat_tokenizer = template_set(tokenizer, cfg.data)
                served = llamacpp_chat.served_prompts(vocabulary, PROBE_CONVERSATIONS, cfg.serve.llamacpp.jinja, Path(tmp),
                                                      cfg.serve.llamacpp.server)
                report["chat_template"] = chat_template_agreement(
                    served, chat_tokenizer, PROBE_CONVERSATIONS, f"the chat template of {checkpoint}", False, renderer(cfg))
        except ValueError as error:
            raise ValueError(f"export (dry run before training): {error}") from None
    seconds = time.perf_counter() - started
    summary = (f"llama.cpp's converter writes the vocabulary of {checkpoint}, llama.cpp loads it and tokenizes "
               f"the probe as transformers does" + (f"; llama-server ({renderer(cfg)}) renders "
               f"{len(PROBE_CONVERSATIONS)} conversations into the tokens of the chat template" if is_chat(cfg.data)
               else "") + f" ({seconds:.1f} s)")
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


def probe_texts(tokenizer, texts: list[str]) -> list[str]:
    """What a tokenizer check has llama.cpp tokenize: the probe, `texts`, and last the tokenizer's
    added and special tokens written in text, as a chat template writes them."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values()]
    return [PROBE, *texts, "".join(f"{t}Hi {t} {PROBE}" for t in added)]


def tokenizer_agreement(llama_ids: list[list[int]], tokenizer, texts: list[str], name: str) -> dict:
    """Refuses a llama.cpp vocabulary whose token ids (`llama_ids`, of `texts` as `probe_texts` gives
    them) differ from the Hugging Face tokenizer's on the probe or the texts; reports how it
    tokenizes special tokens written in text."""
    *plain, specials = [(first_difference(ours, theirs), ours, theirs) for ours, theirs in
                        zip(llama_ids, (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts))]
    for at, ours, theirs in plain:
        if at is not None:
            raise ValueError(f"{name}: llama.cpp tokenizes differently from the Hugging Face tokenizer at token "
                             f"{at} ({ours[at:at + 5]} vs {theirs[at:at + 5]}); the pre-tokenizer is likely wrong.")
    report = {"tokenizer_texts_checked": len(plain)}
    at, ours, theirs = specials
    report["special_tokens_agree"] = at is None
    if at is not None:
        # SentencePiece vocabularies with a leading-space prefix: llama.cpp adds the prefix after every
        # special token as transformers' legacy mode did; transformers 5 does not.
        report["special_tokens_difference"] = {"at": at, "llama_cpp": ours[at:at + 5], "transformers": theirs[at:at + 5]}
        log.warning("%s: around special tokens written in text, llama.cpp tokenizes differently from the Hugging "
                    "Face tokenizer (token %d: %s vs %s)", name, at, ours[at:at + 5], theirs[at:at + 5])
    return report


# Conversations the dry run renders before training, where no held-out data exists yet: with and
# without a system message (a template may add a default one), several turns, and text that a
# template might trim or escape.
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "What does str.split() return?"}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "Name a  Python  keyword.\n"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": PROBE}],
]


def renderer(cfg: DictConfig) -> str:
    """How the deployed llama-server renders chat prompts: serve.llamacpp.jinja."""
    return "Jinja" if cfg.serve.llamacpp.jinja else "--no-jinja"


def template_set(tokenizer, data: DictConfig):
    """The tokenizer with the chat template the prepare stage gives it (data.chat_template, else its own)."""
    from pipeline.chat import template_for

    tokenizer.chat_template = template_for(data, tokenizer)
    return tokenizer


def chat_template_agreement(served: list[tuple[str, list[int]]], tokenizer, prompts: list[list[dict]], name: str,
                            allow_mismatch: bool, how: str) -> dict:
    """Whether llama-server (`served`: each prompt as it renders and tokenizes it, rendering as `how`
    says) feeds the model the tokens apply_chat_template gives for each prompt, which the model was
    trained with."""
    checked = [(ours == (theirs := prompt_ids(tokenizer, prompt)), rendered, ours, theirs)
               for (rendered, ours), prompt in zip(served, prompts)]
    differ = [c for c in checked if not c[0]]
    report = {"renderer": f"llama-server ({how})", "conversations": len(checked),
              "same_prompt_tokens": len(checked) - len(differ)}
    if differ:
        _, rendered, ours, theirs = differ[0]
        at = first_difference(ours, theirs)
        text = tokenizer.decode(theirs[:at]) if at else ""
        report["first_difference"] = {"rendered": rendered, "at": at, "llama_cpp": ours[at:at + 5],
                                      "transformers": theirs[at:at + 5]}
        message = (f"{name}: llama-server ({how}) renders {len(differ)} of {len(checked)} prompts into other tokens "
                   f"than the chat template the model is trained with, first at token {at} ({ours[at:at + 5]} vs "
                   f"{theirs[at:at + 5]}, after {text[-60:]!r}; llama-server rendered {rendered[:160]!r}).")
        if not allow_mismatch:
            other = "serve.llamacpp.jinja=false" if how == "Jinja" else "serve.llamacpp.jinja=true"
            raise ValueError(message + f" Set data.chat_template to a template both render alike, try {other}, or set "
                             "export.check.allow_chat_template_mismatch=true to keep such files.")
        log.warning(message)
    return report


def bits_per_weight(types: dict) -> float:
    """The file's weights' size in bits over their count, as llama.cpp reports a model's BPW."""
    import gguf

    import numpy as np

    bits = count = 0
    for type_name, shape in types.values():
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
        elements = int(np.prod(shape))
        bits, count = bits + elements // block * size * 8, count + elements
    return bits / count


def logit_agreement(logits, reference, name: str, check) -> dict:
    """How far llama.cpp's logits moved from the source model's, against a tolerance of both kinds,
    as allclose has it: an absolute part (export.check.max_logit_diff) and one relative to the
    logits' own spread at the position (export.check.max_logit_diff_rel, times their standard
    deviation over the vocabulary), both 8 times larger for bf16. Rounding error grows with depth
    and the logits' size, so an absolute limit set on a 4-layer model refuses a correct 30-layer
    file; a relative one alone refuses a random-weight model's near-flat logits. Also the mean KL
    divergence (export.check.max_kl), and top-1 flips where the source's two candidates were
    further apart than twice the tolerance (elsewhere a flip is rounding between near-ties)."""
    import torch

    scale = LOGIT_TOLERANCE_SCALE[name]
    spread = reference.std(-1, keepdim=True)
    allowed = scale * (check.max_logit_diff + check.max_logit_diff_rel * spread)
    diff = (logits - reference).abs()
    ours, theirs = logits.argmax(-1), reference.argmax(-1)
    margin = reference.gather(-1, theirs.unsqueeze(-1)) - reference.gather(-1, ours.unsqueeze(-1))
    flips = int(((ours != theirs) & (margin > 2 * allowed).squeeze(-1)).sum())
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(reference, -1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    report = {"max_logit_diff": diff.max().item(), "max_logit_diff_of_allowed": (diff / allowed).max().item(),
              "logit_spread_median": spread.median().item(), "kl": kl,
              "top1_agreement": (ours == theirs).float().mean().item(), "top1_flips_beyond_ties": flips}
    if flips or report["max_logit_diff_of_allowed"] > 1 or kl > check.max_kl:
        times = f", x {scale} for {name}" if scale != 1 else ""
        raise ValueError(f"llama.cpp's logits differ from the source model's: top-1 agreement "
                         f"{report['top1_agreement']:.4f} with {flips} flip(s) that are not near-ties, KL {kl:.3g} "
                         f"(export.check.max_kl={check.max_kl}), largest move {report['max_logit_diff']:.3g}, "
                         f"{report['max_logit_diff_of_allowed']:.3g} times what is allowed there (export.check."
                         f"max_logit_diff={check.max_logit_diff} + max_logit_diff_rel={check.max_logit_diff_rel} x the "
                         f"logits' spread{times}).")
    return report


def validate(path: Path, name: str, tokenizer, texts: list[str], check: DictConfig, reference=None, check_ids=None,
             refuse_fallback: str | None = None, chat=None) -> dict:
    """A file as llama.cpp has it: its tensor types (and where llama.cpp fell back to others), its
    tokenizer and, for a base file, its logits and the chat prompts llama-server renders with it
    (`chat`: the prompts, as llama-server served them, and how it rendered them), each compared
    with the source's. llama.cpp runs in a child process."""
    import torch

    types = llamacpp.tensor_types(path)
    report = {"tensor_types": dict(Counter(t for t, _ in types.values())), "bits_per_weight": bits_per_weight(types)}
    if name not in BASE_TYPES:
        report["fallbacks"] = fallbacks(types, name)
        if report["fallbacks"] and refuse_fallback:
            listed = "; ".join(f"{f['tensor']} {f['shape']}: {f['type']} instead of {f['wanted']} ({f['why']})"
                               for f in report["fallbacks"][:3])
            more = f"; and {len(report['fallbacks']) - 3} more" if len(report["fallbacks"]) > 3 else ""
            raise ValueError(f"llama.cpp fell back to other types for {len(report['fallbacks'])} tensor(s) of "
                             f"{path.name}: {listed}{more}. {refuse_fallback}")
    probes = probe_texts(tokenizer, texts)
    found = llamacpp.inspect(path, probes, logits_of=None if check_ids is None else check_ids.numpy())
    report.update(tokenizer_agreement(found["tokens"], tokenizer, probes, path.name))
    report["chat_template_sha256"] = hashlib.sha256(found["metadata"].get("tokenizer.chat_template", "").encode()).hexdigest()
    if chat is not None:
        prompts, served, how = chat
        report["chat_template"] = chat_template_agreement(served, tokenizer, prompts, path.name,
                                                          check.allow_chat_template_mismatch, how)
    # Logits are computed in the child for every file, so that evaluate, which computes them in its
    # own process, reads only files llama.cpp has run; they are compared where a reference exists.
    if reference is not None:
        try:
            report.update(logit_agreement(torch.from_numpy(found["logits"]), reference, name, check))
        except ValueError as error:
            raise ValueError(f"{path.name}: {error}") from None
    return report


def fallback_refusal(cfg: DictConfig, name: str) -> str | None:
    """Why a file of type `name` may not hold tensors of other types (None: it may, and they are
    recorded): QAT trained for exactly this format's rounding, or export.allow_fallback=false."""
    if cfg.train.qat != "none" and name == cfg.train.qat:
        return (f"train.qat={cfg.train.qat} trained every Linear for {name}'s rounding; make every quantized "
                "layer's input width a multiple of the block size.")
    if not cfg.export.allow_fallback:
        return "Set export.allow_fallback=true to keep such files (llama.cpp's usual behaviour)."
    return None


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
            seconds = time.perf_counter() - started
            # Every file of a source carries the base file's vocabulary and template (llama-quantize
            # copies them): the prompts llama-server renders are asked once, on the base file.
            chat = None
            if chat_prompts:
                served = llamacpp_chat.served_prompts(base, chat_prompts, cfg.serve.llamacpp.jinja, tmp / source,
                                                      cfg.serve.llamacpp.server)
                chat = (chat_prompts, served, renderer(cfg))
            files = {dtype: {"seconds": seconds, "pre_tokenizer": llamacpp.metadata_value(base, "tokenizer.ggml.pre"),
                             **validate(base, dtype, tokenizer, texts, x.check, reference, check_ids, chat=chat)}}
            for leftover in ("stand-in.gguf", "llama-server.log"):
                (tmp / source / leftover).unlink(missing_ok=True)
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
                llamacpp.quantize(full, target, name, x.embedding_types.get(name), matrix)
                files[kind] = {"seconds": time.perf_counter() - started,
                               **validate(target, name, tokenizer, texts, x.check, check_ids=check_ids[:1],
                                          refuse_fallback=fallback_refusal(cfg, name))}
                if files[kind]["chat_template_sha256"] != files[dtype]["chat_template_sha256"]:
                    raise PipelineError(f"{target.name} carries another chat template than {base.name}, which "
                                        "llama-quantize copied it from.")
                if files[kind]["fallbacks"]:
                    log.warning("%s/%s: llama.cpp stored %d tensor(s) in other types than %s (rows that do not fill its "
                                "blocks): %.2f bits per weight; listed in the manifest", source, target.name,
                                len(files[kind]["fallbacks"]), name, files[kind]["bits_per_weight"])
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
