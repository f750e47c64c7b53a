"""What the machine can compute natively, and the precision policy built on it."""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass, field
from pathlib import Path

@dataclass(frozen=True)
class TrainingPrecision:
    """What a training precision means, everywhere it matters; train.qat is a dimension of its own
    (pipeline.formats.QAT)."""
    # Accelerate's mixed_precision: the autocast the forward runs under (weights stay fp32).
    mixed_precision: str
    # The dtype a Linear layer's output has under it, checked after the first step (fp8 matmuls emit bf16).
    compute_dtype: str
    # The 16-bit GGUF type of its base file (export.base_type=auto): bf16 keeps what bf16 computed with.
    gguf_base_type: str
    # Its colour in the report's plots.
    colour: str


PRECISION_TABLE = {
    "fp32": TrainingPrecision("no", "float32", "f16", "tab:blue"),
    "bf16": TrainingPrecision("bf16", "bfloat16", "bf16", "tab:orange"),
    "fp16": TrainingPrecision("fp16", "float16", "f16", "tab:green"),
    "fp8": TrainingPrecision("fp8", "bfloat16", "f16", "tab:red"),
}
# train.precision=compare: a run at each precision of report.precisions that this machine runs
# (compared_precisions), the fp32 noise floor and the report, from one command (pipeline.compare).
COMPARE = "compare"
PRECISIONS = (*PRECISION_TABLE, "auto", COMPARE)
# CPU flags that mean native (not emulated) low-precision arithmetic.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_FP16_FLAGS = ("amx_fp16", "avx512_fp16")
INTERESTING_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")


class PrecisionError(ValueError):
    """A precision was asked for that this hardware or installation cannot run."""


@dataclass
class Hardware:
    device: str  # "cuda" or "cpu"
    cpu_model: str
    cpu_flags: list[str] = field(default_factory=list)
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    gpu_bf16: bool = False

    def describe(self) -> str:
        if self.device == "cuda":
            major, minor = self.compute_capability
            return f"GPU {self.gpu_name} (compute capability {major}.{minor})"
        flags = ", ".join(self.cpu_flags) or "no AVX2/AVX-512/AMX"
        return f"CPU {self.cpu_model} ({flags})"

    def tags(self) -> dict[str, str]:
        tags = {
            "hardware.device": self.device,
            "hardware.cpu": self.cpu_model,
            "hardware.cpu_flags": ",".join(self.cpu_flags),
        }
        if self.device == "cuda":
            tags["hardware.gpu"] = self.gpu_name
            tags["hardware.compute_capability"] = "%d.%d" % self.compute_capability
        return tags


def _cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return model, [f for f in INTERESTING_CPU_FLAGS if f in flags]


def detect() -> Hardware:
    import torch

    cpu_model, cpu_flags = _cpu_info()
    if not torch.cuda.is_available():
        return Hardware("cpu", cpu_model, cpu_flags)
    return Hardware(
        "cuda",
        cpu_model,
        cpu_flags,
        gpu_name=torch.cuda.get_device_name(0),
        compute_capability=torch.cuda.get_device_capability(0),
        gpu_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
    )


def resolve_precision(requested: str, hw: Hardware) -> tuple[str, str]:
    """The precision to train in and why, or PrecisionError before any work is done."""
    if requested not in PRECISIONS or requested == COMPARE:
        raise PrecisionError(f"train.precision={requested!r} is not one of {', '.join(PRECISIONS[:-1])}.")
    on = hw.describe()
    if hw.device == "cuda":
        cc = hw.compute_capability
        if requested == "auto":
            if hw.gpu_bf16:
                return "bf16", f"{on} supports bf16"
            if cc >= (7, 0):
                return "fp16", f"{on} has fp16 tensor cores but no bf16"
            return "fp32", f"{on} has neither bf16 nor fp16 tensor cores"
        if requested == "bf16" and not hw.gpu_bf16:
            raise PrecisionError(f"train.precision=bf16 needs a GPU with bf16 support; {on} has none. "
                                 f"Valid here: fp32, fp16, auto.")
        if requested == "fp8":
            if cc < (8, 9):
                raise PrecisionError(f"train.precision=fp8 needs compute capability 8.9 or newer (Ada, Hopper, "
                                     f"Blackwell); {on} is older. Valid here: fp32, fp16"
                                     f"{', bf16' if hw.gpu_bf16 else ''}, auto.")
            if not any(importlib.util.find_spec(m) for m in ("torchao", "transformer_engine")):
                raise PrecisionError("train.precision=fp8 needs an fp8 backend for Accelerate: "
                                     "pip install torchao (or transformer-engine).")
        return requested, "requested"
    native_bf16 = any(f in hw.cpu_flags for f in CPU_BF16_FLAGS)
    if requested == "auto":
        if native_bf16:
            return "bf16", f"{on} has native bf16"
        return "fp32", f"{on} has no native bf16 (AMX or AVX512-BF16): bf16 and fp16 would be emulated and slower"
    if requested == "fp8":
        raise PrecisionError(f"train.precision=fp8 needs a GPU of compute capability 8.9 or newer; this machine "
                             f"has {on}. Valid here: fp32, bf16, fp16, auto.")
    return requested, "requested"


def emulated(precision: str, hw: Hardware) -> bool:
    """Whether this machine trains in `precision` only by emulating it (a CPU without its instructions)."""
    flags = {"bf16": CPU_BF16_FLAGS, "fp16": CPU_FP16_FLAGS}.get(precision)
    return hw.device == "cpu" and flags is not None and not any(f in hw.cpu_flags for f in flags)


def compared_precisions(wanted, hw: Hardware) -> tuple[list[str], dict[str, str]]:
    """Of the precisions `wanted` (report.precisions; fp32 first and always, since the others are
    measured against it), those train.precision=compare trains on this machine, and why each other
    one is left out: what the hardware cannot run, and on a CPU what it would only emulate (bf16
    without AVX512-BF16 or AMX, fp16 without AVX512-FP16 or AMX-FP16), several times slower than
    fp32 and so no choice on it. train.precision=<it> still runs one of those."""
    chosen, left_out = [], {}
    for precision in ["fp32", *(p for p in wanted if p != "fp32")]:
        if emulated(precision, hw):
            left_out[precision] = f"{hw.describe()} would emulate it, slower than fp32"
            continue
        try:
            resolve_precision(precision, hw)
        except PrecisionError as error:
            left_out[precision] = str(error).split(";")[0].split(". ")[0]
            continue
        chosen.append(precision)
    return chosen, left_out


def peak_memory_mb(device: str) -> float:
    """Peak memory so far: CUDA max allocated on a GPU, the process's peak RSS on a CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
