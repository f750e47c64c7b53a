"""Bring your own model: a tiny checkpoint of each family people fine-tune (tests/families.py), from
its directory through prepare, train, quantize (AWQ with the family's mapping), export (llama.cpp's
converter, each file validated) and evaluate; and what is refused from config.json before any work."""

import json

import pytest

from pipeline import llamacpp
from pipeline.artifacts import read_json
from stages.export import gguf_problems
from tests.conftest import compose_with, only_dir, pipeline, refused
from tests.families import FAMILIES, checkpoint

# data.seq_len 64 is longer than the Gemma sliding windows (32), so llama.cpp must apply them.
CHAIN = ["stage=[prepare,train,quantize,export,evaluate]", "model=hf", "profile=smoke", "train.precision=fp32",
         "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "data.seq_len=64",
         "quantize.calibration.samples=2", "export.sources=[trained]",
         "evaluate.max_sequences=4", "evaluate.bootstrap=20", "evaluate.prompts=1", "evaluate.prompt_tokens=16",
         "evaluate.continuation_tokens=8"]
# SentencePiece vocabularies that prefix text with a space: llama.cpp prefixes the text after each
# special token too (transformers' old legacy mode), transformers 5 does not (README: known limits).
SPACE_PREFIX = {"llama2", "mistral", "phi3"}


# Half the families fine-tune LoRA adapters (merged before saving), half the full model.
LORA = {"llama3.2": [], "mistral": [], "qwen3": [], "gemma2": [], "phi3": ["model.lora.target_modules=[qkv_proj,o_proj]"]}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_the_chain_and_llama_cpp_matches_it(family, tmp_path):
    model = checkpoint(family, tmp_path / family)
    lora = ["model.lora.enabled=true", "train.lr=5e-2", *LORA[family]] if family in LORA else []
    pipeline(tmp_path, *CHAIN, f"model.name_or_path={model}", *lora)
    trained = only_dir(tmp_path / "artifacts" / "train")
    assert not (trained / "adapter_config.json").exists() and (trained / "model.safetensors").exists()

    export = only_dir(tmp_path / "artifacts" / "export")
    files = read_json(export / "manifest.json")["trained"]
    assert set(files) == {"f16", "q8_0", "q4_k_m", "q4_0", "q4_k_m-imat"}
    # The export stage fails unless the logits match; these say by how much, and that every
    # weight has the requested type.
    assert files["f16"]["max_logit_diff"] <= 0.05 and files["f16"]["top1_flips_beyond_ties"] == 0
    assert not any(f["fallbacks"] for name, f in files.items() if name != "f16")
    assert all(f["tokenizer_texts_checked"] > 1 for f in files.values())
    assert files["f16"]["special_tokens_agree"] is (family not in SPACE_PREFIX)
    gguf = export / "trained" / "model-f16.gguf"
    assert llamacpp.metadata_value(gguf, "general.architecture") in {"llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"}
    assert llamacpp.metadata_value(gguf, "general.name") == family

    evaluation = only_dir(tmp_path / "artifacts" / "evaluate")
    summary = read_json(evaluation / "summary.json")
    assert {"trained", "awq", "rtn", "trained.f16", "trained.q8_0", "trained.q4_k_m"} <= set(summary)
    assert summary["trained.f16"]["kl"] < summary["trained.q4_k_m"]["kl"] < 0.5
    # llama-perplexity agrees on the family's own tokenization, BOS first in each window where it adds one.
    opinion = read_json(evaluation / "metrics" / "trained.q4_k_m.json")["second_opinion"]
    assert opinion["perplexity"]["agrees"] and opinion["kl"]["agrees"] and opinion["llama_perplexity"]["kl"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama2", "gemma2"])
def test_a_vocabulary_only_tokenizer_json_holds_is_exported(family, tmp_path):
    """Checkpoints saved by transformers 5 bring a SentencePiece vocabulary as tokenizer.json alone:
    prepare and train save the tokenizer.model it stands for, and llama.cpp's file then tokenizes
    and computes as the model does (the export's checks), with SentencePiece's merge order."""
    model = checkpoint(family, tmp_path / family)
    (model / "tokenizer.model").unlink()
    pipeline(tmp_path, "stage=[prepare,train,export]", "model=hf", f"model.name_or_path={model}", "profile=smoke",
             "train.precision=fp32", "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2",
             "data.seq_len=64", "export.sources=[trained]", "export.types=[q8_0]")
    assert (only_dir(tmp_path / "artifacts" / "train") / "tokenizer.model").is_file()
    export = only_dir(tmp_path / "artifacts" / "export")
    files = read_json(export / "manifest.json")["trained"]
    assert files["f16"]["tokenizer_texts_checked"] > 1 and files["f16"]["top1_flips_beyond_ties"] == 0
    gguf = export / "trained" / "model-f16.gguf"
    assert llamacpp.metadata_value(gguf, "tokenizer.ggml.model") == "llama"
    assert len(set(llamacpp.metadata_value(gguf, "tokenizer.ggml.scores"))) > 100  # merge ranks, not one score


@pytest.mark.slow
@pytest.mark.parametrize("family, rope", [
    ("llama3.2", {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}),
    ("qwen2.5", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 1000000.0}),
])
def test_other_rope_scalings_export_with_matching_logits(family, rope, tmp_path):
    """The rope variants beyond each family's own, straight through the converter and the export's
    checks (the chain around them is the same as above)."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.models import load_causal_lm
    from stages.export import rounded_like_gguf, validate

    model = checkpoint(family, tmp_path / family, rope_scaling=rope)
    llamacpp.convert(model, tmp_path / "model.gguf", "f32", family, "auto", {})
    ids = torch.randint(10, 1000, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = rounded_like_gguf(load_causal_lm(model), "f32")(ids).logits
    check = compose_with("export.check.max_logit_diff=0.01").export.check
    report = validate(tmp_path / "model.gguf", "f32", AutoTokenizer.from_pretrained(model), [], check, reference, ids)
    assert report["max_logit_diff"] < 0.01 and report["top1_flips_beyond_ties"] == 0


def test_every_family_config_is_accepted():
    for family, (config, _, _) in FAMILIES.items():
        assert gguf_problems(config["architectures"][0], config, None, 64) == [], family


@pytest.mark.parametrize("arch, change, expected", [
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_type='dynamic' is not one llama.cpp applies to LlamaForCausalLM; it applies default, linear, yarn"),
    ("Qwen2ForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
    ("MistralForCausalLM", {"sliding_window": 32},
     "sliding_window=32 is smaller than data.seq_len=64, and llama.cpp runs MistralForCausalLM with full attention"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 16}, "sliding_window=16"),
    ("Gemma3ForCausalLM", {"layer_types": ["sliding_attention", "full_attention"]}, "every 6th layer full_attention"),
    ("OPTForCausalLM", {}, "llama.cpp's converter does not write OPTForCausalLM"),
])
def test_what_llama_cpp_cannot_run_is_named(arch, change, expected):
    family = {"LlamaForCausalLM": "llama3.2", "Qwen2ForCausalLM": "qwen2.5", "MistralForCausalLM": "mistral",
              "Gemma3ForCausalLM": "gemma3"}.get(arch, "llama2")
    config = {**FAMILIES[family][0], **change}
    problems = gguf_problems(arch, config, None, 64)
    assert len(problems) == 1 and expected in problems[0], problems
    # Qwen2 without use_sliding_window ignores its sliding_window, as transformers does.
    assert not gguf_problems("Qwen2ForCausalLM", {**FAMILIES["qwen2.5"][0], "sliding_window": 16}, None, 64)


def test_a_checkpoint_llama_cpp_would_run_differently_is_refused_before_training(tmp_path):
    model = checkpoint("mistral", tmp_path / "mistral", sliding_window=32)
    message = refused(tmp_path, "stage=all", "model=hf", f"model.name_or_path={model}", "data.seq_len=64")
    assert "sliding_window=32 is smaller than data.seq_len=64" in message and "data.seq_len<=32" in message
    # Without the export, nothing is refused: training alone is fine.
    from pipeline.preflight import preflight
    from tests.conftest import compose_with

    preflight(compose_with("stage=[prepare,train]", "model=hf", f"model.name_or_path={model}", "data.seq_len=64",
                           "train.precision=fp32", f"paths.artifacts={tmp_path}/elsewhere"))


def test_lora_targets_that_match_no_layer_are_refused_before_training(tmp_path):
    model = checkpoint("phi3", tmp_path / "phi3")
    message = refused(tmp_path, "stage=train", "model=hf", f"model.name_or_path={model}", "model.lora.enabled=true")
    assert message == ("model.lora.target_modules: q_proj, k_proj, v_proj match no Linear layer of Phi3ForCausalLM; "
                       "its Linear layers: down_proj, gate_up_proj, lm_head, o_proj, qkv_proj.")


def test_a_vocabulary_the_converter_cannot_write_is_refused(tmp_path):
    model = checkpoint("smollm2", tmp_path / "wordpiece")
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["model"] = {"type": "WordPiece", "unk_token": "<|endoftext|>", "vocab": tokenizer["model"]["vocab"]}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    problems = gguf_problems("LlamaForCausalLM", FAMILIES["smollm2"][0], str(model), 64)
    assert problems == [f"the tokenizer in {model} is WordPiece; llama.cpp's converter writes SentencePiece "
                        "(tokenizer.model) and byte-level BPE (tokenizer.json) vocabularies."]
