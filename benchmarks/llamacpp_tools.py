"""llama.cpp's own tools against what they replace, on one GGUF file of the offline default:

  - serving: llama-server (the serve stage's engine: a slot per stream, continuous batching)
    against llama-cpp-python's server (one request at a time), with the same GuideLLM load at 1, 2
    and 4 streams: output tokens/s and TTFT p50, and their ratios;
  - scoring: our evaluate code on a GGUF file (llama-cpp-python logits, then perplexity, KL and
    top-1 on the second half of each window) against llama-perplexity --kl-divergence on the same
    file and the same token ids, and the whole evaluate stage for scale.

The chain (prepare, train, export of the trained model's q8_0 file) runs first in a scratch
directory. Extra arguments are pipeline overrides, e.g. `data=stdlib`.

    python benchmarks/llamacpp_tools.py [override ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from pipeline.config import register  # noqa: E402
from pipeline.preflight import preflight  # noqa: E402
from pipeline.formats import gguf_files  # noqa: E402

SETTINGS = ["export.sources=[trained]", "export.types=[q8_0]", "serve.llamacpp.files=[trained.q8_0]",
            "serve.load.levels=[1,2,4]"]
FILE = "trained.q8_0"


def pipeline(cwd: Path, *overrides: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", *overrides], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    return time.perf_counter() - started


def serving(cfg, folder: Path) -> dict:
    """Both servers on the same file under the same GuideLLM load: {engine: {level: numbers}}."""
    import httpx
    from transformers import AutoTokenizer

    from pipeline import llamacpp
    from pipeline.artifacts import stage_dir
    from pipeline.server import Server, free_port
    from stages.serve import held_out_prompts, run_guidellm, server_command, summarize

    tokenizer_dir = stage_dir(cfg, "train")
    prompts = held_out_prompts(cfg, AutoTokenizer.from_pretrained(tokenizer_dir), cfg.serve.load.requests)
    requests = folder / "requests.jsonl"
    requests.write_text("".join(json.dumps({"prompt": p, "prompt_tokens_count": cfg.serve.load.prompt_tokens,
                                            "output_tokens_count": cfg.serve.load.output_tokens}) + "\n" for p in prompts))
    path = dict(gguf_files(stage_dir(cfg, "export")))[FILE]
    threads = str(cfg.serve.llamacpp.threads)
    commands = {
        "llama-server": lambda port: server_command(cfg, "llamacpp", FILE, path, port),
        # As the serve stage ran it before: without --interrupt_requests false a new request cancels the stream in flight.
        "llama-cpp-python": lambda port: [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias",
                                          FILE, "--host", "127.0.0.1", "--port", str(port), "--n_threads", threads,
                                          "--n_ctx", str(cfg.data.seq_len * 2), "--interrupt_requests", "false"],
    }
    results = {}
    for engine, command in commands.items():
        port = free_port()
        with Server(command(port), port, folder / f"{engine}.log", 120, ready_path="/v1/models") as server:
            # How many tokens a request really gets: llama-cpp-python streams no counts, so GuideLLM
            # takes the requested number; this shows whether that holds.
            body = {"model": FILE, "prompt": prompts[0], "max_tokens": cfg.serve.load.output_tokens, "ignore_eos": True}
            got = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["usage"]["completion_tokens"]
            report = folder / f"{engine}.json"
            run_guidellm(server.url, FILE, cfg, tokenizer_dir, requests, report, server)
        levels = summarize(json.loads(report.read_text()), cfg.serve.slo)
        results[engine] = {"completion_tokens": got, "levels": levels}
    return results


def scoring(cfg, folder: Path) -> dict:
    """Seconds for our GGUF scoring and for llama-perplexity on the same file and token ids."""
    import torch
    from transformers import AutoTokenizer

    from pipeline import llamacpp
    from pipeline.artifacts import stage_dir
    from pipeline.data import load_sequences, pad_id
    from stages.evaluate import base_reference, second_half

    tokenizer = AutoTokenizer.from_pretrained(stage_dir(cfg, "train"))
    files = dict(gguf_files(stage_dir(cfg, "export")))
    base = next(n for n in files if n != FILE)
    held_out = load_sequences(stage_dir(cfg, "prepare"), "heldout", cfg.data.seq_len, False, pad_id(tokenizer))
    held_out = held_out[: cfg.evaluate.max_sequences]
    text, kl_base, log = folder / "heldout.txt", folder / "base.kld", folder / "llama-perplexity.log"
    text.write_text(tokenizer.decode(held_out.ids[held_out.real]))
    n_ctx = cfg.data.seq_len
    llamacpp.perplexity(files[base], text, n_ctx, len(held_out), kl_base, log)
    windows = torch.from_numpy(llamacpp.kl_base_tokens(kl_base)).long()

    started = time.perf_counter()
    theirs = llamacpp.perplexity(files[FILE], text, n_ctx, len(held_out), kl_base, log)
    tool_s = time.perf_counter() - started

    started = time.perf_counter()
    # As the stage does for one file: the base's log-probabilities, then the file's, compared.
    reference = base_reference(llamacpp.load(files[base], n_ctx), windows, cfg.evaluate.batch_size)
    artifact_logits = llamacpp.logits_fn(llamacpp.load(files[FILE], n_ctx))
    ours = second_half(reference, artifact_logits, windows, cfg.evaluate.batch_size)
    ours_s = time.perf_counter() - started
    return {"tokens": int(windows.numel()), "ours_s": ours_s, "llama_perplexity_s": tool_s, "ours": ours,
            "llama_perplexity": theirs}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = [*SETTINGS, *sys.argv[1:], f"paths.artifacts={tmp}/artifacts"]
        pipeline(tmp, "stage=[prepare,train,export]", *settings)
        register()  # the config schemas, as `python -m pipeline` registers them
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=settings)
        preflight(cfg)  # resolves train.precision=auto, which the outputs' addresses name
        served = serving(cfg, tmp)
        scored = scoring(cfg, tmp)
        scored["evaluate_stage_s"] = pipeline(tmp, "stage=evaluate", *settings)
    fast, slow = served["llama-server"]["levels"], served["llama-cpp-python"]["levels"]
    print(f"Served {FILE}, {cfg.serve.load.requests} requests a level, {cfg.serve.load.prompt_tokens} prompt and "
          f"{cfg.serve.load.output_tokens} output tokens (really given: llama-server "
          f"{served['llama-server']['completion_tokens']}, llama-cpp-python {served['llama-cpp-python']['completion_tokens']})")
    print("| streams | llama-server tok/s | llama-cpp-python tok/s | ratio | llama-server TTFT p50 ms | llama-cpp-python TTFT p50 ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for level in fast:
        a, b = fast[level], slow[level]
        print(f"| {level[1:]} | {a['output_tokens_per_s']:.0f} | {b['output_tokens_per_s']:.0f} | "
              f"{a['output_tokens_per_s'] / b['output_tokens_per_s']:.2f} | {a['ttft_ms_p50']:.1f} | {b['ttft_ms_p50']:.1f} | "
              f"{a['ttft_ms_p50'] / b['ttft_ms_p50']:.2f} |")
    print(f"\nScoring {FILE} on {scored['tokens']} tokens: ours {scored['ours_s']:.2f} s, llama-perplexity "
          f"{scored['llama_perplexity_s']:.2f} s (ratio {scored['ours_s'] / scored['llama_perplexity_s']:.2f}); "
          f"the whole evaluate stage {scored['evaluate_stage_s']:.1f} s")
    for key in ("perplexity", "kl", "top1"):
        print(f"  {key}: ours {scored['ours'][key]:.6g} ± {scored['ours'][key + '_se']:.2g}, llama-perplexity "
              f"{scored['llama_perplexity'][key]:.6g} ± {scored['llama_perplexity'][key + '_se']:.2g}")


if __name__ == "__main__":
    main()
