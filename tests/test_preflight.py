"""Fail before any work, in one line: the pre-flight report (stage=check), the dry run of the
deployment path on a user's checkpoint, and the known refusals, each exactly one `error:` line."""

import json
import os

import pytest

from pipeline import llamacpp
from tests.conftest import compose_with, pipeline, refused
from tests.families import FAMILIES, checkpoint


def one_line_error(result) -> str:
    """The run's error, which must be its only error line: no traceback, no Hydra hint."""
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def bpe_phi3(tmp_path):
    """A Phi-3 checkpoint whose byte-level BPE vocabulary does not say it is GPT-2's, as a save that
    dropped tokenizer_config.json's tokenizer_class leaves Phi-4-mini: llama.cpp's converter then
    asks for a tokenizer.model that cannot exist."""
    model = checkpoint("phi4-mini", tmp_path / "phi4-mini")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


class Payload:
    """Pickled, it calls os.system: what torch's safe loader exists to refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def pickle_checkpoint(tmp_path):
    import torch
    from safetensors.torch import load_file

    model = checkpoint("llama2", tmp_path / "pickled")
    weights = load_file(model / "model.safetensors")
    torch.save({**weights, "payload": Payload(tmp_path / "payload-ran")}, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return model


def test_the_report_lists_every_check_and_runs_nothing(tmp_path):
    model = bpe_phi3(tmp_path)
    result = pipeline(tmp_path, "stage=check", "model=hf", f"model.name_or_path={model}", "data.seq_len=64",
                      "train.precision=fp32", "model.lora.enabled=true", "serve.engines=[external]", check=False)
    lines = result.stdout.splitlines()
    listed = {line.split()[1]: line.split()[0] for line in lines if line.startswith("  ")}
    assert listed == {"settings": "passed", "precision": "passed", "group": "passed", "launch": "passed",
                      "output": "passed", "tracking": "passed", "prepare": "passed", "train": "FAILED", "quantize": "passed",
                      "export": "FAILED", "evaluate": "passed", "serve": "FAILED", "report": "passed",
                      "upstream": "passed"}, result.stdout
    # Phi-3's widths (256, 512) take auto's largest group size, and it says why.
    assert "quantize.group_size=auto: 128, the largest of 128, 64, 32" in result.stdout
    assert lines[-1] == "11 of 14 checks passed; failed: train, export, serve"
    assert "match no Linear layer of Phi3ForCausalLM" in result.stdout  # LoRA's default targets
    assert one_line_error(result) == "error: the pre-flight checks above failed; nothing was run."
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_passing_report_says_what_each_check_verified(tmp_path):
    result = pipeline(tmp_path, "stage=[check,prepare,train]")
    assert "passed  train" in result.stdout and "no user checkpoint" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("9 of 9 checks passed")
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("family", ["gemma2", "phi3", "llama2"])
def test_a_vocabulary_only_tokenizer_json_holds_passes_the_dry_run(family, tmp_path):
    """transformers 5 saves SentencePiece vocabularies as tokenizer.json alone: the converter gets the
    tokenizer.model they stand for (pipeline.tokenizer.sentencepiece_model), and llama.cpp then tokenizes
    as transformers does. The second check of the same checkpoint is read from the machine cache."""
    from stages.export import dry_run
    from tests.conftest import compose_with

    model = checkpoint(family, tmp_path / family)
    (model / "tokenizer.model").unlink()
    cfg = compose_with("model=hf", f"model.name_or_path={model}", "data.seq_len=64")
    arch = FAMILIES[family][0]["architectures"][0]
    first, again = dry_run(cfg, arch), dry_run(cfg, arch)
    assert "tokenizes the probe as transformers does" in first and again.endswith("(cached)")


def test_a_sentencepiece_model_written_from_tokenizer_json_encodes_as_transformers_does(tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    from pipeline.tokenizer import sentencepiece_model
    from tests.families import documents

    for family in ("llama2", "gemma2"):
        model = checkpoint(family, tmp_path / family)
        (model / "tokenizer.model").unlink()
        tokenizer = AutoTokenizer.from_pretrained(model)
        written = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model(tokenizer))
        text = "\n\n".join(documents()[:20]) + " Grüße 東京 🦙 x²"
        assert written.encode(text) == tokenizer(text, add_special_tokens=False)["input_ids"], family
    # A byte-level BPE (no byte fallback) is not SentencePiece: nothing is written for it.
    assert sentencepiece_model(AutoTokenizer.from_pretrained(checkpoint("smollm2", tmp_path / "smollm2"))) is None


def test_a_checkpoint_whose_vocabulary_llama_cpp_cannot_take_is_refused_before_training(tmp_path):
    model = bpe_phi3(tmp_path)
    message = refused(tmp_path, "stage=all", "model=hf", f"model.name_or_path={model}", "data.seq_len=64")
    assert message.startswith(f"export (dry run before training): llama.cpp's converter refuses the vocabulary of {model}")
    assert f"Missing {model}/tokenizer.model" in message and "tokenizer_class GPT2Tokenizer" in message


def test_known_refusals_are_one_line(tmp_path, pickle_checkpoint):
    """Each refusal a user meets first, through `python -m pipeline` as they run it."""
    payload = pipeline(tmp_path, "stage=[prepare,train]", "model=hf", f"model.name_or_path={pickle_checkpoint}",
                       check=False)
    line = one_line_error(payload)
    assert "pytorch_model.bin is a pickle that names posix.system" in line and "convert it to safetensors" in line
    assert not (tmp_path / "payload-ran").exists() and not (tmp_path / "artifacts").exists()

    converter = pipeline(tmp_path, "stage=all", "model=hf", f"model.name_or_path={bpe_phi3(tmp_path)}",
                         "data.seq_len=64", check=False)
    assert "llama.cpp's converter refuses the vocabulary" in one_line_error(converter)

    setting = pipeline(tmp_path, "stage=prepare", "verify=sometimes", check=False)
    assert one_line_error(setting) == "error: verify='sometimes' is not one of quick, full."


def test_the_converter_is_forked_only_for_valid_settings_that_export():
    """The runner forks llama.cpp's converter (importing torch and transformers first) only after the
    settings pass: a bad one is reported by the checks in a second, not after those imports."""
    from pipeline.runner import exports

    assert exports(compose_with("stage=all"))
    assert not exports(compose_with("stage=all", "train.max_steps=0"))
    assert not exports(compose_with("stage=[prepare,train]"))


def test_a_damaged_gguf_file_is_one_line(tmp_path):
    damaged = tmp_path / "model.gguf"
    damaged.write_bytes(b"GGUF" + os.urandom(1000))
    with pytest.raises(llamacpp.GGUFError) as error:
        llamacpp.load(damaged, n_ctx=64)
    assert "\n" not in str(error.value) and str(damaged) in str(error.value)


def test_a_stage_run_alone_without_its_required_input_is_refused_before_any_work(tmp_path):
    message = refused(tmp_path, "stage=evaluate")
    assert message.startswith("stage evaluate reads the prepare stage's output, and none exists for these settings")
    assert "stage=[prepare,evaluate]" in message


@pytest.mark.slow
def test_an_optional_input_that_moved_is_said_not_silently_skipped(chain, caplog):
    """stage=evaluate after a change of export settings: the export's address moved, so no GGUF file
    would be measured; the checks say so, and how to make one."""
    from pipeline.preflight import upstream_outputs
    from tests.conftest import SMALL_CHAIN

    cfg = compose_with(*SMALL_CHAIN, f"paths.artifacts={chain}/artifacts", "export.types=[q8_0]")
    with caplog.at_level("WARNING", logger="pipeline.preflight"):
        said = upstream_outputs(cfg, ["evaluate"])
    assert said == "read from earlier runs: prepare, train, quantize; missing, so left out: export"
    assert "stage evaluate: no export output for these settings" in caplog.text
    assert "is not measured; add export to the stages to make it, e.g. stage=[export,evaluate]" in caplog.text
