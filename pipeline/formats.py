"""The deployed formats, declared once: what the quantize stage writes, where the export stage keeps
its GGUF files, and the formats a model can be trained for.

Config validation, the quantize and export stages, evaluate, serve and the report read these; none
of them spells a method's name or another stage's output folder. A method's checkpoint lands in the
quantize output under its own name, and `quantized_checkpoints` finds what a finished output holds
from the summary the stage wrote, not from the folders on disk; `gguf_files` does the same for an
export output, from its manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class QuantizeMethod:
    # What the report calls the step from the trained model to this checkpoint.
    label: str
    # The compressed-tensors scheme it writes, as vLLM reads it from config.json.
    scheme: str
    # Whether llm-compressor runs the model on calibration samples (its sequential pipeline).
    calibrated: bool
    # Whether its weights are 4-bit groups of quantize.group_size input channels.
    grouped: bool
    # How evaluate measures it on a CPU, where no kernel runs the format natively.
    measured_as: str


METHODS = {
    "awq": QuantizeMethod("AWQ (smoothing and 4-bit)", "W4A16", True, True,
                          "int4 weights dequantized to fp32 at load"),
    "rtn": QuantizeMethod("RTN (4-bit)", "W4A16", False, True, "int4 weights dequantized to fp32 at load"),
    "gptq": QuantizeMethod("GPTQ (4-bit)", "W4A16", True, True, "int4 weights dequantized to fp32 at load"),
    # FP8 W8A8 needs FP8 matmuls (H100, H200) to run; on a CPU compressed-tensors' own forward
    # rounds every Linear's input to FP8 per token before the fp32 matmul, as the kernel would.
    "fp8_dynamic": QuantizeMethod("FP8 W8A8 (dynamic activations)", "FP8_DYNAMIC", False, False,
                                  "fp8 weights dequantized at load, activations rounded to fp8 per token in each "
                                  "Linear's forward (simulated)"),
}
# The AWQ-smoothed float weights (AWQ's scales folded in, not quantized), which the GGUF export
# quantizes with llama.cpp's own types.
SMOOTHED = "awq_smoothed"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class QatFormat:
    """A deployed format a model can be trained for (train.qat), and the artifact that deploys it."""
    label: str
    # The stage that writes the deployed artifact, and its name there (an export type, a quantize method).
    stage: str
    artifact: str
    # The settings of that stage that decide how the format rounds, and so what QAT trains for: part
    # of the train stage's address for this format only.
    settings: tuple[str, ...] = ()

    @property
    def column(self) -> str:
        """Its name among evaluate's artifacts: a GGUF file of the trained weights, or a checkpoint."""
        return f"trained.{self.artifact}" if self.stage == "export" else self.artifact


QAT = {
    # Llama.cpp's Q4_0, written without an importance matrix (with one, llama-quantize searches
    # the scales and no longer rounds as training did).
    "q4_0": QatFormat("llama.cpp Q4_0", "export", "q4_0"),
    # compressed-tensors W4A16 as the quantize stage's RTN writes it for vLLM: min-max scales (and
    # zero points) per group, so the checkpoint holds exactly the weights training computed with.
    "w4a16": QatFormat("compressed-tensors W4A16 (RTN)", "quantize", "rtn",
                       ("quantize.group_size", "quantize.symmetric", "quantize.ignore")),
}
NO_QAT = "none"


def qat_settings(cfg) -> tuple[str, ...]:
    """The settings train.qat brings into the train stage's address."""
    found = QAT.get(cfg.train.qat)
    return found.settings if found else ()


def require_qat_artifact(cfg, stage: str, made) -> None:
    """Refuses a QAT run whose deployed artifact `stage` is to write, when its settings (`made`:
    the export types or quantize methods) leave it out."""
    found = QAT.get(cfg.train.qat)
    if found is not None and found.stage == stage and found.artifact not in made:
        key = {"export": "export.types", "quantize": "quantize.methods"}[stage]
        raise ValueError(f"train.qat={cfg.train.qat} trains for {found.label}, which {key}={list(made)} does not make: "
                         f"add {found.artifact}.")


def ignored(name: str, patterns) -> bool:
    """Whether a module name matches quantize.ignore (names, or re:<regex>), as llm-compressor matches it."""
    import re

    return any(re.match(p[3:], name) if p.startswith("re:") else name == p or name.endswith("." + p) for p in patterns)


def quantized_checkpoints(folder: Path) -> dict[str, Path]:
    """{method: checkpoint} of a finished quantize output (empty where there is none)."""
    import json

    summary = folder / SUMMARY
    if not summary.is_file():
        return {}
    return {method: folder / method for method in json.loads(summary.read_text())["methods"]}


def smoothed_checkpoint(folder: Path) -> Path | None:
    return folder / SMOOTHED if (folder / SMOOTHED).is_dir() else None


# The export stage's list of the files it validated, with their hashes, sizes and checks.
MANIFEST = "manifest.json"


def gguf_file(out: Path, source: str, name: str) -> Path:
    """Where an export output keeps the file of one source (trained, awq_smoothed) in one format."""
    return out / source / f"model-{name}.gguf"


def gguf_files(out: Path) -> list[tuple[str, Path]]:
    """(name, path) of every validated GGUF file an export output holds, e.g. ("trained.q4_k_m", ...):
    the files its manifest lists, written only after they passed validation."""
    import json

    manifest = Path(out) / MANIFEST
    if not manifest.exists():
        return []
    return [(f"{source}.{name}", gguf_file(out, source, name)) for source, files in json.loads(manifest.read_text()).items()
            for name in files]
