"""QAT: the fake quantizer rounds as the deployed format does, checked against the format's own
quantizer (gguf-py's Q4_0, compressed-tensors' W4A16) and against a real QAT run's deployed artifact,
dequantized by the format's own code."""

import numpy as np
import pytest
import torch

from pipeline import llamacpp, qat
from pipeline.artifacts import read_json
from pipeline.formats import QAT
from tests.conftest import FAST, TEST_MODEL, compose_with, only_dir, pipeline, refused


def awkward_blocks() -> torch.Tensor:
    """Weights of every kind a block can hold: random scales, a zero block, ties of magnitude of
    either sign, values half a code apart, fp16-subnormal scales."""
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(64, 256, generator=generator) * 10 ** torch.empty(64, 1).uniform_(-4, 1, generator=generator)]
    rows.append(torch.zeros(1, 256))
    tie = torch.randn(1, 256, generator=generator)
    tie[0, 5], tie[0, 9] = 3.0, -3.0
    rows.append(tie)
    rows.append((torch.arange(256, dtype=torch.float32).reshape(1, 256) % 32 - 16) / 2 + 0.5)
    rows.append(torch.randn(1, 256, generator=generator) * 1e-6)
    return torch.cat(rows)


def test_q4_0_rounds_as_gguf_py_quantizes():
    import gguf

    weights = awkward_blocks()
    Q4_0 = gguf.GGMLQuantizationType.Q4_0
    theirs = gguf.quants.dequantize(gguf.quants.quantize(weights.numpy(), Q4_0), Q4_0)
    assert np.array_equal(qat.q4_0(weights).numpy(), theirs)
    # A rounded weight rounds to itself: the deployed file of a QAT model is what training saw.
    assert torch.equal(qat.q4_0(qat.q4_0(weights)), qat.q4_0(weights))


@pytest.mark.parametrize("symmetric", [False, True])
def test_w4a16_rounds_as_compressed_tensors_quantizes(symmetric):
    """Against compressed-tensors' own parameters and round trip, as llm-compressor's RTN calls them
    (its min-max observer takes each group's min and max)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    weights, group = awkward_blocks(), 64
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group)
    groups = weights.reshape(weights.shape[0], -1, group)
    scale, zero = calculate_qparams(groups.amin(dim=-1), groups.amax(dim=-1), args)
    theirs = fake_quantize(weights, scale, zero, args)
    ours = qat.w4a16(weights, group, symmetric)
    assert torch.equal(ours, theirs)
    # Another group size rounds otherwise: the setting reaches the rounding.
    assert not torch.equal(qat.w4a16(weights, 128, symmetric), ours)


def test_fake_quantized_layers_round_forward_and_pass_gradients_back():
    from transformers import AutoModelForCausalLM

    from pipeline.models import model_config

    cfg = compose_with(*TEST_MODEL, "train.qat=q4_0")
    model = AutoModelForCausalLM.from_config(model_config(cfg))
    before = dict(model.named_parameters())
    linear = len([m for m in model.modules() if isinstance(m, torch.nn.Linear)])
    assert qat.prepare(model, cfg) == linear - 1  # every Linear but the output head
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, qat.q4_0(layer.weight)))
    # Straight through: the gradient of the latent weight is that of the rounded one.
    assert torch.equal(layer.weight.grad, torch.ones(layer.out_features, 3) @ x.detach())
    # The optimizer's parameters are the model's own, before and after.
    assert all(p is before[n] for n, p in model.named_parameters())
    qat.convert(model)
    assert not [m for m in model.modules() if type(m).__name__ == "FakeQuantizedLinear"]
    assert all(p is before[n] for n, p in model.named_parameters())


def test_w4a16_targets_follow_quantize_ignore():
    from transformers import AutoModelForCausalLM

    from pipeline.models import model_config

    cfg = compose_with(*TEST_MODEL, "train.qat=w4a16", "quantize.ignore=[lm_head,re:.*down_proj]", "quantize.group_size=64")
    model = AutoModelForCausalLM.from_config(model_config(cfg))
    names = qat.targets(model, cfg)
    assert names and not [n for n in names if n.endswith(("down_proj", "lm_head"))]
    layer = model.get_submodule(names[0])
    qat.prepare(model, cfg)
    x = torch.randn(2, layer.in_features)
    assert torch.equal(model.get_submodule(names[0])(x),
                       torch.nn.functional.linear(x, qat.w4a16(layer.weight, 64, False)))


def test_w4a16_settings_are_part_of_a_w4a16_run_s_address_only():
    from pipeline.artifacts import stage_key

    def key(*overrides):
        return stage_key(compose_with(*overrides), "train")

    assert key("train.qat=w4a16", "quantize.group_size=64") != key("train.qat=w4a16", "quantize.group_size=128")
    assert key("train.qat=w4a16") != key("train.qat=w4a16", "quantize.symmetric=true")
    for arm in ("none", "q4_0"):
        assert key(f"train.qat={arm}", "quantize.group_size=64") == key(f"train.qat={arm}", "quantize.group_size=128")


def test_qat_refusals_come_before_any_work(tmp_path):
    message = refused(tmp_path, "train.qat=q4_0", "export.types=[q8_0]")
    assert "train.qat=q4_0 trains for llama.cpp Q4_0, which export.types=['q8_0'] does not make: add q4_0" in message
    message = refused(tmp_path, "train.qat=w4a16", "quantize.methods=[awq]")
    assert "train.qat=w4a16 trains for compressed-tensors W4A16 (RTN), which quantize.methods=['awq']" in message
    message = refused(tmp_path, "stage=train", "train.qat=w4a16", "quantize.group_size=512")
    assert "blocks of 512" in message and "input width 256" in message
    message = refused(tmp_path, "train.qat=q4_0", "model.lora.enabled=true")
    assert "train.qat=q4_0 needs a full fine-tune" in message
    message = refused(tmp_path, "train.qat=q4_x")
    assert "q4_x" in message and "none" in message and "q4_0" in message and "w4a16" in message


# Each format's writer (QAT[format].stage) set to write only that format.
WRITES_ONLY = {"q4_0": ["export.sources=[trained]", "export.types=[q4_0]"],
               "w4a16": ["quantize.methods=[rtn]", "quantize.group_size=64"]}


def llama_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter reorders the rows of Llama's q_proj and k_proj (its rotary layout)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def qat_run(tmp_path, fmt: str) -> tuple[dict, dict]:
    """A short QAT run up to its deployed artifact: the saved (latent) weights and the model's config."""
    from safetensors.torch import load_file

    pipeline(tmp_path, f"stage=[prepare,train,{QAT[fmt].stage}]", *TEST_MODEL, "train.precision=fp32", f"train.qat={fmt}",
             *FAST, *WRITES_ONLY[fmt])
    trained = only_dir(tmp_path / "artifacts" / "train")
    assert f"-qat_{fmt}-" in trained.name and read_json(trained / "summary.json")["qat"] == fmt
    return load_file(trained / "model.safetensors"), read_json(trained / "config.json")


@pytest.mark.slow
def test_a_qat_run_deploys_exactly_the_weights_it_trained_with(tmp_path):
    import gguf

    saved, config = qat_run(tmp_path, "q4_0")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    path = only_dir(tmp_path / "artifacts" / "export") / "trained" / "model-q4_0.gguf"
    file = gguf.GGUFReader(path)
    checked = 0
    for name, weight in saved.items():
        tensor = next(t for t in file.tensors if t.name == names.get_name(name, try_suffixes=(".weight",)))
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_0:
            continue
        kind = name.split(".")[-2]
        ours = qat.q4_0(llama_rows(weight, heads[kind]) if kind in heads else weight)
        theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(ours.numpy(), theirs), name
        # Training moved the weights off the grid: the equality is not that of rounded inputs.
        assert not torch.equal(weight, qat.q4_0(weight)), name
        checked += 1
    assert checked == 7 * config["num_hidden_layers"]  # every Linear of every block
    types = llamacpp.tensor_types(path)
    assert types["output.weight"][0] == types["token_embd.weight"][0] == "Q8_0"


@pytest.mark.slow
def test_a_w4a16_qat_run_deploys_exactly_the_weights_it_trained_with(tmp_path):
    from pipeline.models import load_causal_lm

    saved, config = qat_run(tmp_path, "w4a16")
    # compressed-tensors unpacks the checkpoint's int4 codes, scales and zero points at load.
    deployed = load_causal_lm(only_dir(tmp_path / "artifacts" / "quantize") / "rtn").state_dict()
    checked = 0
    for name, weight in saved.items():
        if not name.endswith("proj.weight"):
            assert torch.equal(deployed[name], weight), name  # left in full precision: embeddings, norms, head
            continue
        assert torch.equal(deployed[name], qat.w4a16(weight, 64, False)), name
        assert not torch.equal(weight, qat.w4a16(weight, 64, False)), name
        checked += 1
    assert checked == 7 * config["num_hidden_layers"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(QAT))
def test_the_report_sets_qat_against_ptq_at_the_same_format(tmp_path, fmt):
    settings = [*TEST_MODEL, "train.precision=fp32", *FAST, *WRITES_ONLY[fmt], "evaluate.second_opinion.enabled=false"]
    pipeline(tmp_path, f"stage=[prepare,train,{QAT[fmt].stage},evaluate,report]", f"train.qat=none,{fmt}", *settings,
             multirun=True)
    # One report per arm; the plain arm's, written before the QAT arm existed, compares both once rerun.
    pipeline(tmp_path, "stage=report", *settings)
    reports = sorted((tmp_path / "artifacts" / "report").iterdir())
    assert [r.name.split("-")[2] for r in reports] == [f"qat_{fmt}", "seed0"]
    data = [read_json(r / "report.json") for r in reports]
    assert data[0]["qat"] == data[1]["qat"]
    found = data[0]["qat"]["fp32"][fmt]
    # The paired figures are those of the two arms' own measurements on the same sequences.
    assert found["ratio"] == pytest.approx(found["qat_perplexity"] / found["ptq_perplexity"], rel=1e-9)
    ptq, aware, full = found["ptq_perplexity"], found["qat_perplexity"], found["trained_perplexity"]
    assert found["ratio_ci"][0] <= found["ratio"] <= found["ratio_ci"][1]
    assert found["ptq_loss"] == pytest.approx(ptq / full, rel=1e-9)
    if found["ptq_loss_ci"][0] > 1:  # a fraction of PTQ's loss only where it lost something
        assert found["recovered"] == pytest.approx((ptq - aware) / (ptq - full), rel=1e-9)
        assert found["recovered_ci"][0] <= found["recovered"] <= found["recovered_ci"][1]
    else:
        assert found["recovered"] is None and "there is none to recover" in "\n".join(data[0]["headline"])
    # The QAT file's KL is from the model trained without QAT (at fp32, that is also the fp32 reference).
    (qat_evaluation,) = (tmp_path / "artifacts" / "evaluate").glob(f"*-qat_{fmt}-*")
    evaluation = read_json(qat_evaluation / "summary.json")[QAT[fmt].column]
    assert found["qat_kl"] == evaluation["kl_vs_no_qat"] == evaluation["kl_vs_fp32"] != evaluation["kl"]
    assert found["step_time_ratio"] > 0
    page = (reports[0] / "report.md").read_text()
    assert "## QAT against PTQ at the same deployed format" in page and "| fp32, no QAT |" in page
    assert any(line.startswith(f"- **QAT for {QAT[fmt].label}** (fp32)") for line in data[0]["headline"])
