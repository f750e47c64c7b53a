"""export: real gguf writer, real llama.cpp (llama-cpp-python) on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import llamacpp
from pipeline.artifacts import read_json
from pipeline.models import load_causal_lm
from pipeline.llamacpp import PRE_TOKENIZERS
from pipeline.llamacpp import pre_tokenizer as pre_tokenizer_name
from tests.conftest import FAST, compose_with, only_dir, pipeline, refused, runs

EXPORT_ONLY = ["stage=[prepare,train,export]", "train.precision=fp32", *FAST, "export.sources=[trained]"]


def f16_matrices(model):
    """The f16 file holds matrices in f16 and vectors (norms) in f32."""
    for parameter in model.parameters():
        if parameter.ndim > 1:
            parameter.data = parameter.data.half().float()
    return model


def heldout_ids(cwd, n=2):
    ids = np.load(only_dir(cwd / "artifacts" / "prepare") / "heldout.npy")[: n * 128]
    return torch.from_numpy(ids.astype(np.int64)).view(n, 128)


def gguf_dir(cwd):
    return only_dir(cwd / "artifacts" / "export")


@pytest.mark.slow
def test_every_file_validated_with_the_requested_types(chain):
    manifest = read_json(gguf_dir(chain) / "manifest.json")
    assert set(manifest) == {"trained", "awq_smoothed"}
    for files in manifest.values():
        assert set(files) == {"f16", "q8_0", "q4_k_m", "q4_0", "q4_k_m-imat"}  # fp32 training: an f16 base file
        assert files["f16"]["top1_flips_beyond_ties"] == 0 and files["f16"]["top1_agreement"] > 0.99
        assert files["f16"]["max_logit_diff"] < 0.05
        assert files["q8_0"]["fallbacks"] == [] and files["q4_k_m"]["fallbacks"] == []
        assert files["q4_k_m"]["bytes"] < files["q8_0"]["bytes"] < files["f16"]["bytes"]
    types = llamacpp.tensor_types(gguf_dir(chain) / "trained" / "model-q8_0.gguf")
    assert {t for t, shape in types.values() if len(shape) > 1} == {"Q8_0"}
    assert {t for t, shape in types.values() if len(shape) == 1} == {"F32"}  # norms stay f32
    types = llamacpp.tensor_types(gguf_dir(chain) / "trained" / "model-q4_k_m.gguf")
    assert {t for t, shape in types.values() if len(shape) > 1} <= {"Q4_K", "Q6_K"}
    assert "Q4_K" in {t for t, _ in types.values()}
    # Q4_0 files keep the embeddings and the output head in the type export.embedding_types states.
    types = llamacpp.tensor_types(gguf_dir(chain) / "trained" / "model-q4_0.gguf")
    assert {n: t for n, (t, _) in types.items() if n in ("token_embd.weight", "output.weight")} == {
        "token_embd.weight": "Q8_0", "output.weight": "Q8_0"}
    assert {t for n, (t, shape) in types.items() if len(shape) > 1 and n.startswith("blk.")} == {"Q4_0"}


@pytest.mark.slow
def test_llama_cpp_matches_transformers_logits_and_tokens(chain):
    trained = only_dir(chain / "artifacts" / "train")
    model = f16_matrices(load_causal_lm(trained))
    ids = heldout_ids(chain)
    llm = llamacpp.load(gguf_dir(chain) / "trained" / "model-f16.gguf", n_ctx=128)
    ours = llamacpp.logits_fn(llm)(ids)
    with torch.no_grad():
        theirs = model(ids).logits
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert (ours - theirs).abs().max() < 0.05

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained)
    prepared = only_dir(chain / "artifacts" / "prepare")
    text = json.loads((prepared / "heldout.jsonl").read_text().splitlines()[-1])["text"]
    assert llamacpp.tokenize(llm, text) == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_transformers_reads_the_gguf_back(chain):
    from transformers import AutoModelForCausalLM

    trained = only_dir(chain / "artifacts" / "train")
    folder = gguf_dir(chain) / "trained"
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model-f16.gguf", dtype=torch.float32)
    model = f16_matrices(load_causal_lm(trained))
    ids = heldout_ids(chain, 1)
    with torch.no_grad():
        assert (from_gguf(ids).logits - model(ids).logits).abs().max() < 1e-3


@pytest.mark.slow
def test_gguf_files_are_evaluated_and_q8_beats_q4(chain):
    summary = read_json(only_dir(chain / "artifacts" / "evaluate") / "summary.json")
    for source in ("trained", "awq_smoothed"):
        assert summary[f"{source}.q8_0"]["kl"] < summary[f"{source}.q4_k_m"]["kl"]
        assert summary[f"{source}.f16"]["kl"] < summary[f"{source}.q8_0"]["kl"]
    evaluate = runs(chain, "evaluate")[0]  # the chain's own; later tests add more
    assert "eval/awq_smoothed.q4_k_m/kl_high" in evaluate.data.metrics
    (export,) = runs(chain, "export")
    assert export.data.metrics["export/trained.q4_k_m/fallback_tensors"] == 0


@pytest.mark.slow
def test_qwen2_exports_and_round_trips(run_pipeline, tmp_path):
    run_pipeline(*EXPORT_ONLY, "model.arch.model_type=qwen2", "export.types=[q8_0]")
    manifest = read_json(gguf_dir(tmp_path) / "manifest.json")
    assert manifest["trained"]["f16"]["top1_flips_beyond_ties"] == 0
    from transformers import AutoModelForCausalLM

    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_dir(tmp_path) / "trained", gguf_file="model-f16.gguf")
    assert type(from_gguf).__name__ == "Qwen2ForCausalLM"


@pytest.mark.slow
def test_fallback_types_are_kept_and_recorded_and_refused_only_where_asked(run_pipeline, tmp_path):
    """llama.cpp's usual fallback (rows that do not fill a K-quant block) keeps the file, with each
    tensor and the file's bits per weight in the manifest; export.allow_fallback=false refuses it."""
    narrow = ["model.arch.intermediate_size=640", "export.types=[q4_k_m]"]  # 640 rows: not a multiple of 256
    layers = compose_with().model.arch.num_hidden_layers
    strict = run_pipeline(*EXPORT_ONLY, *narrow, "export.allow_fallback=false", check=False)
    assert strict.returncode != 0
    assert f"llama.cpp fell back to other types for {layers} tensor(s)" in strict.stderr
    assert "blk.0.ffn_down.weight [640, 256]" in strict.stderr and "do not fill blocks of 256" in strict.stderr
    assert list((tmp_path / "artifacts" / "export").iterdir()) == []  # no file, not even a partial one

    run_pipeline(*EXPORT_ONLY, *narrow)
    kept = read_json(gguf_dir(tmp_path) / "manifest.json")["trained"]
    assert sorted(f["tensor"] for f in kept["q4_k_m"]["fallbacks"]) == [f"blk.{i}.ffn_down.weight" for i in range(layers)]
    # Q4_K is 4.5 bits a weight; the fallbacks and the Q6_K output head raise the file's figure.
    assert 4.5 < kept["q4_k_m"]["bits_per_weight"] < 16 <= kept["f16"]["bits_per_weight"] < 16.5  # f32 norms


@pytest.mark.slow
def test_damaged_gguf_is_rejected_clearly(chain, tmp_path):
    source = gguf_dir(chain) / "trained" / "model-q8_0.gguf"
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    for bad in (truncated, garbage):
        with pytest.raises(llamacpp.GGUFError, match="not a valid GGUF file"):
            llamacpp.load(bad, n_ctx=128)


def write_gguf(path: Path, shape: tuple[int, ...]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_header_is_parsed_once_a_file_and_again_once_rewritten(tmp_path):
    """The export checks a file in its unfinished folder and the rename into place keeps the file:
    evaluate's loads find its header parsed. A file written anew at the same path is read anew."""
    unfinished, final = tmp_path / "unfinished", tmp_path / "final"
    unfinished.mkdir()
    write_gguf(unfinished / "model.gguf", (2, 8))
    header = llamacpp._header(unfinished / "model.gguf")
    assert llamacpp.tensor_types(unfinished / "model.gguf") == {"token_embd.weight": ("F32", (8, 2))}
    unfinished.rename(final)
    assert llamacpp._header(final / "model.gguf") is header
    write_gguf(final / "model.gguf", (3, 8))
    assert llamacpp.tensor_types(final / "model.gguf") == {"token_embd.weight": ("F32", (8, 3))}


def test_unsupported_architecture_refused_before_writing(tmp_path, opt_checkpoint):
    message = refused(tmp_path, "stage=export", "model=hf", f"model.name_or_path={opt_checkpoint}")
    assert "llama.cpp's converter does not write OPTForCausalLM (config.json architectures); it writes" in message
    assert "Gemma3ForCausalLM" in message and "Qwen3ForCausalLM" in message


def test_one_llama_cpp_build_serves_the_tools_and_the_binding(tmp_path):
    """A second install reuses the build (nothing rebuilt) and puts the tools where the stages look;
    the binding loads the very library the tools run on, from that build."""
    from pipeline import llamacpp_build

    cache = llamacpp_build.build_cache()
    built = {path.name: path.stat().st_mtime_ns for path in llamacpp_build.built_files(cache)}
    assert llamacpp_build.build() == Path(sys.prefix) / "bin"
    assert {path.name: path.stat().st_mtime_ns for path in llamacpp_build.built_files(cache)} == built
    for name in llamacpp_build.TOOLS:
        assert llamacpp.tool(name).read_bytes() == (cache / name).read_bytes()
        ran = subprocess.run([llamacpp.tool(name), "--help"], capture_output=True, text=True)
        assert "usage" in (ran.stdout + ran.stderr).lower(), name
    # In a process of its own: the library this one loaded may be an earlier install's.
    loaded = subprocess.run([sys.executable, "-c", "import llama_cpp.llama_cpp as c; print(c._lib._name)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert Path(loaded).resolve().read_bytes() == (cache / "libllama.so").resolve().read_bytes()
    # The tools run on the same files: their libraries resolve to the binding's folder.
    server = subprocess.run(["ldd", llamacpp.tool("llama-server").resolve()], capture_output=True, text=True,
                            check=True).stdout
    assert f"libllama.so.0 => {Path(loaded).resolve().parent}/" in server


@pytest.mark.slow
def test_the_converter_process_is_a_fork_of_the_pipeline_s_and_writes_what_llama_cpp_loads(tmp_path):
    """Forked before the pipeline computes (in a process of its own here: this one has computed),
    the converter's process is that process's child, not a new interpreter; the installed gguf-py
    imported before the fork does not stop it from writing a file llama.cpp loads."""
    from tests.families import checkpoint

    model, out = checkpoint("llama2", tmp_path / "llama2"), tmp_path / "vocab.gguf"
    script = f"""
import os, sys
from pathlib import Path
import gguf  # the installed gguf-py, as the pipeline's process may hold it
from pipeline import llamacpp
llamacpp.ConverterProcess.fork_early()
converter = llamacpp.ConverterProcess.get()
llamacpp.convert(Path({str(model)!r}), Path({str(out)!r}), "f16", "llama2", "auto", {{}}, vocab_only=True)
assert llamacpp.ConverterProcess.get() is converter
with open(f"/proc/{{converter.pid}}/stat") as stat:
    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
with open(f"/proc/{{converter.pid}}/cmdline") as child, open("/proc/self/cmdline") as this:
    print(parent == os.getpid(), child.read() == this.read())  # a fork keeps its parent's command line
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.split() == ["True", "True"], ran.stdout
    assert llamacpp.load_vocabulary(out).n_vocab() == json.loads((model / "config.json").read_text())["vocab_size"]


def test_missing_llama_cpp_tools_are_refused_before_any_work(tmp_path, monkeypatch):
    message = refused(tmp_path, "stage=serve", "serve.llamacpp.server=/nowhere/llama-server")
    assert "llama.cpp's llama-server is not at /nowhere/llama-server: point the setting at an executable" in message
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))  # an environment the tools were never built into
    for stage, name in (("export", "llama-quantize"), ("evaluate", "llama-perplexity"), ("serve", "llama-server")):
        message = refused(tmp_path, f"stage={stage}")
        assert f"llama.cpp's {name} is not at {tmp_path}/env/bin/{name}: run `make install`" in message, message


def test_unknown_llama_cpp_type_names_the_valid_ones(tmp_path):
    message = refused(tmp_path, "export.types=[q4_k_x]")
    assert "'q4_k_x' is not a llama.cpp type" in message and "q4_k_m" in message


@pytest.mark.parametrize("pre_tokenizer, expected", [
    ({"type": "ByteLevel", "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": next(k for k, v in PRE_TOKENIZERS.items() if v == "llama-bpe")}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": next(k for k, v in PRE_TOKENIZERS.items() if v == "qwen2")}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
])
def test_pre_tokenizer_is_recognised_from_tokenizer_json(pre_tokenizer, expected):
    assert pre_tokenizer_name({"pre_tokenizer": pre_tokenizer}, "auto") == expected


def test_unknown_pre_tokenizer_asks_for_its_name_and_an_explicit_name_wins():
    unknown = {"pre_tokenizer": {"type": "Whitespace"}}
    with pytest.raises(ValueError, match="set export.pre_tokenizer to llama.cpp's name for it"):
        pre_tokenizer_name(unknown, "auto")
    assert pre_tokenizer_name(unknown, "deepseek-llm") == "deepseek-llm"


@pytest.mark.slow
def test_the_importance_matrix_comes_from_the_train_split_and_makes_a_second_file(tmp_path):
    # Documents that share no passage, each marked by a word of its own: which split a calibration
    # text comes from is then plain to see (pydoc topics share whole paragraphs between the splits).
    words = "the model reads every token of its text and learns what comes next in each line".split()
    (tmp_path / "corpus.txt").write_text("\n\n".join(
        " ".join(f"mark{i:03d}" if j % 9 == 0 else words[(i * 7 + j) % len(words)] for j in range(120))
        for i in range(80)))
    settings = [*EXPORT_ONLY, "data=text", "data.files=[corpus.txt]", "data.seq_len=64", "export.types=[q4_k_m]",
                "export.imatrix=[q4_k_m]"]
    pipeline(tmp_path, *settings)
    out = gguf_dir(tmp_path)
    files = read_json(out / "manifest.json")["trained"]
    assert set(files) == {"f16", "q4_k_m", "q4_k_m-imat"} and files["q4_k_m"]["sha256"] != files["q4_k_m-imat"]["sha256"]
    matrix = files["q4_k_m-imat"]["imatrix"]
    assert matrix["quantize.imatrix.file"] == "imatrix.gguf" and matrix["quantize.imatrix.chunks_count"] >= 2
    assert matrix["quantize.imatrix.dataset"] == "calibration.txt"
    assert matrix["quantize.imatrix.entries_count"] == 7 * compose_with().model.arch.num_hidden_layers  # every block's Linears
    assert llamacpp.metadata_value(out / "trained" / "model-q4_k_m.gguf", "quantize.imatrix.file") is None
    assert files["q4_k_m-imat"]["fallbacks"] == []
    # The calibration text is the train split's, never the held-out split's.
    prepared = only_dir(tmp_path / "artifacts" / "prepare")
    heldout = {w for line in (prepared / "heldout.jsonl").read_text().splitlines()
               for w in json.loads(line)["text"].split() if w.startswith("mark")}
    calibrated = {w for w in (out / "calibration.txt").read_text().split() if w.startswith("mark")}
    assert heldout and calibrated and not heldout & calibrated
    # Evaluate measures both files, and the report pairs the matrix's effect on the same sequences.
    pipeline(tmp_path, "stage=[evaluate,report]", *settings[1:], "evaluate.second_opinion.enabled=false")
    report = read_json(only_dir(tmp_path / "artifacts" / "report") / "report.json")
    (step,) = [s for s in report["waterfall"]["fp32"]["trained.q4_k_m-imat"] if s["step"] == "importance matrix"]
    assert step["from"] == "trained.q4_k_m" and step["ratio_ci"][0] <= step["ratio"] <= step["ratio_ci"][1]


def rope_permuted(weight, heads: int):
    """q/k rows in llama.cpp's rope layout, as its converter permutes them: applied to a model
    transformers runs, it stands for a file written without (or with twice) that permutation."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.slow
def test_the_logit_check_takes_a_bf16_file_and_refuses_a_wrong_rope_layout_or_scrambled_weights(chain, tmp_path):
    """The base file's check allows logits to move with their own spread: a correct bf16 file passes,
    and the same file against a model whose q/k rows are in another rope layout, or whose weights
    are scrambled, fails, with llama.cpp's real logits."""
    from stages.export import logit_agreement, rounded_like_gguf

    trained = only_dir(chain / "artifacts" / "train")
    bf16 = tmp_path / "model-bf16.gguf"
    llamacpp.convert(trained, bf16, "bf16", "tiny", "auto", {})
    ids = heldout_ids(chain, 4)
    logits = torch.from_numpy(llamacpp.inspect(bf16, [], logits_of=ids.numpy())["logits"])

    def reference(change=None):
        model = rounded_like_gguf(load_causal_lm(trained), "bf16")
        if change:
            change(model)
        with torch.no_grad():
            return model(ids).logits

    check = compose_with().export.check
    report = logit_agreement(logits, reference(), "bf16", check)
    assert report["top1_flips_beyond_ties"] == 0 and report["max_logit_diff_of_allowed"] < 1

    def wrong_rope(model):
        for layer in model.model.layers:
            attention, config = layer.self_attn, model.config
            attention.q_proj.weight.data = rope_permuted(attention.q_proj.weight.data, config.num_attention_heads)
            attention.k_proj.weight.data = rope_permuted(attention.k_proj.weight.data, config.num_key_value_heads)

    def scrambled(model):
        weight = model.model.layers[0].mlp.down_proj.weight
        weight.data = weight.data[:, torch.randperm(weight.shape[1], generator=torch.Generator().manual_seed(0))]

    for change in (wrong_rope, scrambled):
        with pytest.raises(ValueError, match="llama.cpp's logits differ from the source model's"):
            logit_agreement(logits, reference(change), "bf16", check)
