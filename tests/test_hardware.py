"""The precision policy on fabricated hardware: every branch, CPU and GPU, without either."""

import pytest

from pipeline import hardware
from pipeline.hardware import PRECISION_TABLE, Hardware, PrecisionError, compared_precisions, resolve_precision

AVX2 = Hardware("cpu", "AVX2 CPU", ["avx2"])
BF16_CPU = Hardware("cpu", "Zen 4", ["avx2", "avx512f", "avx512_bf16"])


def gpu(cc, bf16):
    return Hardware("cuda", "host", [], gpu_name=f"GPU sm{cc[0]}{cc[1]}", compute_capability=cc, gpu_bf16=bf16)


H100, T4, P100 = gpu((9, 0), True), gpu((7, 5), False), gpu((6, 0), False)


@pytest.mark.parametrize("hw, expected", [(BF16_CPU, "bf16"), (AVX2, "fp32"), (H100, "bf16"), (T4, "fp16"), (P100, "fp32")])
def test_auto_picks_the_best_native_precision_and_says_why(hw, expected):
    precision, reason = resolve_precision("auto", hw)
    assert precision == expected and hw.describe() in reason


@pytest.mark.parametrize("hw", [AVX2, BF16_CPU, H100, T4])
@pytest.mark.parametrize("requested", ["fp32", "fp16"])
def test_explicit_precisions_that_run_everywhere_are_kept(hw, requested):
    assert resolve_precision(requested, hw) == (requested, "requested")


def test_bf16_is_refused_on_a_gpu_without_it_and_allowed_on_any_cpu():
    with pytest.raises(PrecisionError, match="needs a GPU with bf16 support.*Valid here: fp32, fp16, auto"):
        resolve_precision("bf16", T4)
    assert resolve_precision("bf16", AVX2) == ("bf16", "requested")  # emulated, slow, but what was asked


@pytest.mark.parametrize("hw", [AVX2, BF16_CPU])
def test_fp8_is_refused_on_a_cpu(hw):
    with pytest.raises(PrecisionError, match="fp8 needs a GPU of compute capability 8.9"):
        resolve_precision("fp8", hw)


def test_fp8_needs_compute_capability_8_9():
    with pytest.raises(PrecisionError, match="8.9 or newer.*Valid here: fp32, fp16, auto"):
        resolve_precision("fp8", gpu((8, 0), False))


def test_fp8_needs_a_backend(monkeypatch):
    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PrecisionError, match="pip install torchao"):
        resolve_precision("fp8", H100)
    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: name == "torchao")
    assert resolve_precision("fp8", H100) == ("fp8", "requested")


def test_unknown_precision_names_the_choices():
    with pytest.raises(PrecisionError, match="'fp4' is not one of fp32, bf16, fp16, fp8, auto"):
        resolve_precision("fp4", AVX2)


ALL = ["fp32", "bf16", "fp16", "fp8"]


@pytest.mark.parametrize("hw, chosen, left_out", [
    (AVX2, ["fp32"], ["bf16", "fp16", "fp8"]),  # emulated: several times slower, no choice on it
    (Hardware("cpu", "Sapphire Rapids", ["avx512_bf16", "avx512_fp16", "amx_fp16"]), ["fp32", "bf16", "fp16"], ["fp8"]),
    (T4, ["fp32", "fp16"], ["bf16", "fp8"]),
])
def test_compare_trains_each_precision_the_machine_runs_and_says_why_not_the_others(hw, chosen, left_out):
    found, why = compared_precisions(["bf16", "fp16", "fp8"], hw)  # fp32 always, first
    assert found == chosen and list(why) == left_out and all(why.values())
    assert hardware.emulated("bf16", hw) == (hw is AVX2)
    assert compared_precisions(ALL, H100)[0] == ALL or "fp8" in compared_precisions(ALL, H100)[1]
    with pytest.raises(PrecisionError, match="'compare' is not one of fp32, bf16, fp16, fp8, auto"):
        resolve_precision("compare", hw)  # the runner expands it; a stage never trains "compare"


def test_fp8_matmuls_are_checked_for_their_bf16_output():
    assert [PRECISION_TABLE[p].compute_dtype for p in ("fp32", "bf16", "fp16", "fp8")] == ["float32", "bfloat16", "float16", "bfloat16"]
