"""The deployment choice, measured side by side: one fine-tune's AWQ W4A16 checkpoint served by vLLM
and its GGUF q4_k_m file served by llama-server, through the serve stage itself, under the same
GuideLLM load at 1, 2 and 4 streams, in interleaved rounds (shuffled anew each round): output
tokens/s and TTFT p50 with their intervals, and vLLM's throughput over llama-server's with the
report's interval (a t interval of the rounds' log ratios).

The offline default's chain up to the serve stage runs first in a scratch directory. Extra
arguments are pipeline overrides, e.g. `serve.rounds=5`. Needs `make install-vllm`.

    python benchmarks/serving_engines.py [override ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from pipeline.artifacts import read_json, stage_dir  # noqa: E402
from pipeline.config import register  # noqa: E402
from pipeline.preflight import preflight  # noqa: E402
from stages.report.stats import speed_ratio  # noqa: E402

SETTINGS = ["quantize.methods=[awq]", "export.sources=[trained]", "export.types=[q4_k_m]",
            "serve.engines=[llamacpp,vllm]", "serve.llamacpp.files=[trained.q4_k_m]", "serve.vllm.artifacts=[awq]",
            "serve.load.levels=[1,2,4]", "serve.rounds=3"]
ENGINES = {"awq": "vLLM", "trained.q4_k_m": "llama-server"}


def interval(level: dict, key: str) -> str:
    low, high = level[f"{key}_ci"]
    return f"{level[key]:.0f} [{low:.0f}, {high:.0f}]"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = [*SETTINGS, *sys.argv[1:], f"paths.artifacts={tmp}/artifacts"]
        result = subprocess.run([sys.executable, "-m", "pipeline", "stage=[prepare,train,quantize,export,serve]",
                                 *settings], cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if result.returncode:
            sys.exit(result.returncode)
        register()  # the config schemas, as `python -m pipeline` registers them
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=settings)
        preflight(cfg)  # resolves train.precision=auto, which the outputs' addresses name
        summary = read_json(stage_dir(cfg, "serve") / "summary.json")
    results, s = summary["results"], cfg.serve
    print(f"{s.load.requests} requests a level and round, {s.rounds} rounds, {s.load.prompt_tokens} prompt and "
          f"{s.load.output_tokens} output tokens; {s.confidence:.0%} intervals")
    for name, engine in ENGINES.items():
        quality = results[name].get("quality")
        extra = f", served perplexity ×{quality['perplexity_ratio']:.4f} of the checkpoint's" if quality else ""
        print(f"- {name} on {engine}: peak memory {results[name]['peak_rss_mb']:.0f} MB, {results[name]['size_mb']:.1f} MB{extra}")
    print("| streams | AWQ on vLLM tok/s | q4_k_m on llama-server tok/s | vLLM / llama-server | "
          "vLLM TTFT p50 ms | llama-server TTFT p50 ms |")
    print("|---|---|---|---|---|---|")
    for label in results["awq"]["levels"]:
        a, b = (results[n]["levels"][label] for n in ENGINES)
        ratio = speed_ratio(*({**x, "speed_rounds": x["rounds"]} for x in (a, b)), s.bootstrap, s.confidence)
        print(f"| {label[1:]} | {interval(a, 'output_tokens_per_s')} | {interval(b, 'output_tokens_per_s')} | "
              f"×{ratio['ratio']:.2f} [{ratio['ratio_ci'][0]:.2f}, {ratio['ratio_ci'][1]:.2f}] | "
              f"{interval(a, 'ttft_ms_p50')} | {interval(b, 'ttft_ms_p50')} |")


if __name__ == "__main__":
    main()
