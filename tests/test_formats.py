"""The deployed formats declared once (pipeline.formats), and the methods added through them: GPTQ
W4A16 and FP8 W8A8 through real llm-compressor, loaded by transformers and evaluated like the others."""

import ast
import json
from pathlib import Path

import pytest
import torch

from pipeline.artifacts import read_json
from pipeline.contract import declared
from pipeline.formats import METHODS, SMOOTHED
from pipeline.metrics import mean_kl
from pipeline.models import load_causal_lm
from tests.conftest import ROOT, only_dir, pipeline
from tests.test_quantize_evaluate import heldout

STAGES = ("prepare", "train", "quantize", "export", "evaluate", "serve", "report")


def owned_names() -> dict[str, set[str]]:
    """{stage: the names in its output that other stages read}."""
    owned = {name: set(declared(name).names.values()) for name in STAGES}
    owned["quantize"] |= {*METHODS, SMOOTHED}
    return owned


def string_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    # A module's own docstring describes its outputs in words; it is not a reader spelling them.
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    # A role looked up in a writer's declaration (declared("train").names["adapter"]) is no spelling.
    roles = {id(node.slice) for node in ast.walk(tree)
             if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "names"}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings | roles}


def test_no_stage_spells_another_stages_output_names():
    owned = owned_names()
    for module in sorted((ROOT / "stages").rglob("*.py")):
        stage = module.stem if module.parent.name == "stages" else module.parent.name
        spelled = {f"{owner}: {name!r}" for owner, names in owned.items() if owner != stage
                   for name in names & string_literals(module)}
        assert not spelled, f"{module.relative_to(ROOT)} spells names another stage writes: {sorted(spelled)}"


def test_every_method_has_a_recipe_and_a_config_choice():
    from omegaconf import OmegaConf

    from pipeline.config import Quantize, VLLM
    from stages.quantize import recipe

    q = OmegaConf.create({"group_size": 32, "symmetric": False, "ignore": ["lm_head"], "awq": {"n_grid": 3, "duo_scaling": True}})
    for method, declared_method in METHODS.items():
        modifiers = recipe(method, q, 128)
        assert modifiers and (declared_method.calibrated or method != "awq")
    choices = {f.name: f.metadata.get("each") for f in Quantize.__dataclass_fields__.values()}
    assert set(choices["methods"]) == set(METHODS)
    assert set(VLLM.__dataclass_fields__["artifacts"].metadata["each"]) == {"trained", *METHODS}


@pytest.mark.slow
def test_gptq_and_fp8_checkpoints_are_written_and_evaluated_like_the_others(own_chain):
    pipeline(own_chain, "stage=[quantize,evaluate]", "profile=smoke", "train.precision=fp32",
             "quantize.methods=[gptq,fp8_dynamic]", "evaluate.second_opinion.enabled=false")
    quantized = next(p for p in (own_chain / "artifacts" / "quantize").iterdir()
                     if set(read_json(p / "summary.json")["methods"]) == {"gptq", "fp8_dynamic"})
    config = {m: json.loads((quantized / m / "config.json").read_text())["quantization_config"] for m in ("gptq", "fp8_dynamic")}
    assert {c["quant_method"] for c in config.values()} == {"compressed-tensors"}
    assert config["gptq"]["format"] == "pack-quantized"
    (gptq,) = config["gptq"]["config_groups"].values()
    assert (gptq["weights"]["num_bits"], gptq["weights"]["group_size"]) == (4, 128)
    assert config["fp8_dynamic"]["format"] == "float-quantized"
    (fp8,) = config["fp8_dynamic"]["config_groups"].values()
    assert fp8["weights"]["type"] == "float" and fp8["input_activations"]["dynamic"] is True

    # On a CPU the FP8 checkpoint's activations are rounded in each Linear's forward: switching
    # that off (weights only) must change the logits, or the activations were not simulated.
    ids = heldout(own_chain)
    trained = load_causal_lm(only_dir(own_chain / "artifacts" / "train"))
    fp8_model = load_causal_lm(quantized / "fp8_dynamic")
    with torch.no_grad():
        reference, simulated = trained(ids).logits, fp8_model(ids).logits
        for module in fp8_model.modules():
            if hasattr(module, "quantization_scheme"):
                module.quantization_enabled = False
        weights_only = fp8_model(ids).logits
    assert mean_kl(reference, simulated) > 1.5 * mean_kl(reference, weights_only) > 0

    evaluation = next(p for p in (own_chain / "artifacts" / "evaluate").iterdir() if (p / "metrics" / "gptq.json").is_file())
    summary = read_json(evaluation / "summary.json")
    for method in ("gptq", "fp8_dynamic"):
        assert 0 < summary[method]["kl"] < 0.05 and summary[method]["kl_ci"][0] <= summary[method]["kl"]
        assert read_json(evaluation / "metrics" / f"{method}.json")["source"]["measured_as"] == METHODS[method].measured_as
