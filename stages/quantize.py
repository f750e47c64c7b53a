"""quantize: post-training quantization of the trained model through llm-compressor.

The methods (pipeline.formats.METHODS): AWQ, GPTQ and plain RTN write int4 weights in groups of
quantize.group_size with 16-bit activations (W4A16); fp8_dynamic writes FP8 W8A8 (per-channel
weights, activations scaled per token at run time), which needs no calibration.

Outputs (in the stage directory), each a Hugging Face checkpoint with the tokenizer:
- <method>/: a compressed-tensors checkpoint (vLLM serves it; transformers loads it on a CPU),
  with the recipe llm-compressor applied;
- awq_smoothed/: the trained model with AWQ's scales folded into its float weights, not quantized.
  It computes the trained model's function (checked here) and is what the GGUF export quantizes
  with llama.cpp's own types, to show whether AWQ's scaling helps them too;
- summary.json: timings, sizes, calibration hash, the methods written.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig

from pipeline.artifacts import atomic_dir, disk_bytes, keep_log, read_json, require_stage_output, stage_dir, write_json
from pipeline.data import calibration_blocks, load_blocks
from pipeline.metrics import mean_kl
from pipeline.formats import METHODS, SMOOTHED, SUMMARY, require_qat_artifact
from pipeline.grouping import GROUP_SIZES, auto_group_size, group_size, quantized_linears
from pipeline.models import load_causal_lm, shape_only_model
from pipeline.tokenizer import save_tokenizer
from pipeline.contract import PipelineError, Stage

log = logging.getLogger(__name__)
STAGE = Stage("quantize", settings=("quantize",), reads=("prepare", "train"))

# llm-compressor logs every lifecycle step at INFO; keep its console to warnings unless asked.
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
QUANT_PARAM_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "weight_packed")


def group_size_chosen(cfg: DictConfig, stages: list[str]) -> str:
    """What quantize.group_size is for this model, and why, for the pre-flight report and the log;
    where the selected stages round in groups (a W4A16 method, QAT for W4A16)."""
    grouped = any(METHODS[m].grouped for m in cfg.quantize.methods) and "quantize" in stages
    if not (grouped or (cfg.train.qat == "w4a16" and "train" in stages)):
        return "no selected stage rounds in groups"
    size = group_size(cfg)
    if cfg.quantize.group_size != "auto":
        return f"quantize.group_size={size} (set)"
    widths = auto_group_size(cfg)[1]
    chosen = (f"quantize.group_size=auto: {size}, the largest of {', '.join(map(str, GROUP_SIZES))} that divides every "
              f"quantized Linear layer's input width ({', '.join(map(str, widths))})")
    log.info("%s", chosen)
    return chosen


def check(cfg: DictConfig) -> list[str]:
    q = cfg.quantize
    require_qat_artifact(cfg, "quantize", q.methods)
    # The model's shapes, without its weights, decide whether the scheme fits every layer.
    model = shape_only_model(cfg)
    linears = quantized_linears(cfg, model)
    grouped = [m for m in q.methods if METHODS[m].grouped]
    size = group_size(cfg) if grouped else None
    bad = {n: w for n, w in linears.items() if w % size} if grouped else {}
    if bad:
        widths = sorted(set(linears.values()))
        valid = [g for g in (16, 32, 64, 128, 256, 512) if all(w % g == 0 for w in widths)]
        first = ", ".join(f"{n} (input width {w})" for n, w in list(bad.items())[:3])
        raise ValueError(f"quantize.group_size={size} does not divide the input width of {len(bad)} Linear layer(s), "
                         f"which {', '.join(grouped)} quantize in groups: {first}. Input widths: {widths}; group sizes "
                         f"that fit: {valid or 'none of 16..512'} (or add the layers to quantize.ignore).")
    if "awq" in q.methods:
        from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY

        arch = type(model).__name__
        if arch not in AWQ_MAPPING_REGISTRY:
            raise ValueError(f"llm-compressor has no AWQ mapping for {arch}; supported: "
                             f"{', '.join(sorted(AWQ_MAPPING_REGISTRY))}. Use quantize.methods=[rtn].")
    return [(f"quantize.group_size={size} divides the input width of all {len(linears)} Linear layers"
             if grouped else f"{len(linears)} Linear layers to quantize per channel")
            + (f"; llm-compressor has an AWQ mapping for {type(model).__name__}" if "awq" in q.methods else "")]


def recipe(method: str, q: DictConfig, size: int) -> list:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if not METHODS[method].grouped:  # a preset scheme: nothing of it is ours to set
        return [QuantizationModifier(targets=["Linear"], scheme=METHODS[method].scheme, ignore=list(q.ignore))]
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=q.symmetric, strategy="group", group_size=size)
    scheme = {"config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, "ignore": list(q.ignore)}
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [GPTQModifier(**scheme)]
    quantize = QuantizationModifier(**scheme)
    if method == "rtn":
        return [quantize]
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(n_grid=q.awq.n_grid, duo_scaling=q.awq.duo_scaling), quantize]


@contextlib.contextmanager
def _cpu_workaround():
    """llm-compressor 0.14 pins calibration tensors in memory for fast copies to an accelerator;
    with no accelerator, pin_memory() raises. Pinning only speeds up those copies, so skip it."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def run(cfg: DictConfig, tracker) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    q = cfg.quantize
    trained = require_stage_output(cfg, "train")
    prepared = require_stage_output(cfg, "prepare")
    tokenizer = AutoTokenizer.from_pretrained(trained)

    calibration = calibration_blocks(prepared, q.calibration, cfg.seed)
    calibration_hash = hashlib.sha256(calibration.numpy().tobytes()).hexdigest()
    dataset = Dataset.from_dict({"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()})
    check_ids = load_blocks(prepared, "heldout", cfg.data.seq_len)[:8]

    out = stage_dir(cfg, "quantize")
    summary = {"calibration": {"samples": len(calibration), "seq_len": q.calibration.seq_len, "sha256": calibration_hash},
               "group_size": group_size(cfg) if any(METHODS[m].grouped for m in q.methods) else None,
               "group_size_setting": q.group_size, "symmetric": q.symmetric, "ignore": list(q.ignore),
               "source_bytes": disk_bytes(trained), "methods": {}}
    with atomic_dir(out) as tmp, _cpu_workaround():
        for method in q.methods:
            model = load_causal_lm(trained)
            started = time.perf_counter()
            try:
                oneshot(model=model, dataset=dataset, recipe=recipe(method, q, group_size(cfg)), num_calibration_samples=len(calibration),
                        max_seq_length=q.calibration.seq_len, pipeline="sequential" if METHODS[method].calibrated else "datafree")
            except Exception as error:  # llm-compressor's refusals come as any exception, deep in its pipelines
                trace = keep_log(f"llm-compressor-{method}", traceback.format_exc())
                reason = (str(error).strip().splitlines() or [""])[0]
                raise PipelineError(f"llm-compressor's {method} failed on {trained}: {type(error).__name__}: {reason} "
                                    f"(its traceback: {trace})") from error
            seconds = time.perf_counter() - started
            if method == "awq":
                summary["awq_smoothed_kl"] = save_smoothed(model, trained, tmp / SMOOTHED, check_ids, q.awq.smoothed_max_kl)
                save_tokenizer(tokenizer, tmp / SMOOTHED)
            model.save_pretrained(tmp / method, save_compressed=True)
            save_tokenizer(tokenizer, tmp / method)
            summary["methods"][method] = {"seconds": seconds, "bytes": disk_bytes(tmp / method),
                                          "scheme": METHODS[method].scheme}
        write_json(tmp / SUMMARY, summary)
    record(cfg, tracker)


def record(cfg: DictConfig, tracker) -> None:
    q, out = cfg.quantize, stage_dir(cfg, "quantize")
    summary = read_json(out / SUMMARY)
    tracker.log_params({f"quantize.{method}.scheme": (f"W4A16_{'SYM' if q.symmetric else 'ASYM'}_G{summary['group_size']}"
                                                      if METHODS[method].grouped else METHODS[method].scheme)
                        for method in summary["methods"]} | {"quantize.calibration_sha256": summary["calibration"]["sha256"]})
    metrics = {"quantize/calibration_samples": summary["calibration"]["samples"],
               "quantize/source_mb": summary["source_bytes"] / 2**20}
    for method, info in summary["methods"].items():
        metrics[f"quantize/{method}/seconds"] = info["seconds"]
        metrics[f"quantize/{method}/size_mb"] = info["bytes"] / 2**20
        metrics[f"quantize/{method}/compression"] = summary["source_bytes"] / info["bytes"]
        tracker.log_artifact(out / method / "recipe.yaml", f"recipes/{method}")
    if "awq_smoothed_kl" in summary:
        metrics["quantize/awq_smoothed/kl"] = summary["awq_smoothed_kl"]
    tracker.log_metrics(metrics)
    tracker.log_artifact(out / SUMMARY)


def save_smoothed(model, trained: Path, path: Path, check_ids, max_kl: float) -> float:
    """Save the AWQ-scaled float weights as a plain checkpoint, after checking they compute the
    trained model's function (AWQ only moves scale between a norm and the layers it feeds)."""
    import torch

    float_weights = {k: v for k, v in model.state_dict().items() if not k.endswith(QUANT_PARAM_SUFFIXES)}
    smoothed = load_causal_lm(trained)
    reference = load_causal_lm(trained)
    smoothed.load_state_dict(float_weights, strict=True)
    with torch.no_grad():
        kl = mean_kl(reference(check_ids).logits, smoothed(check_ids).logits)
    if kl > max_kl:
        raise RuntimeError(f"The AWQ-smoothed float model drifted from the trained model: mean KL {kl:.3g} > "
                           f"quantize.awq.smoothed_max_kl={max_kl}. Its scales were not folded exactly.")
    smoothed.save_pretrained(path)
    return kl
