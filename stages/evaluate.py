"""evaluate: every artifact of the run measured the same way against the trained model.

On the same held-out sequences (for chat data: the held-out conversations, scored on their
answer tokens only, and greedy answers to their rendered prompts): perplexity, KL divergence from
the trained model's next-token distribution (reference computed once, in fp32), top-1 agreement with it, each with a bootstrap
confidence interval over sequences; greedy-continuation agreement on fixed prompts; size on disk.
The same metrics on edge-case slices where precision loss hides: rare tokens, late positions,
digit / punctuation tokens.

A second opinion on the GGUF files: llama.cpp's llama-perplexity on the same held-out text, in
windows of data.seq_len tokens of which it scores the second half. Its perplexity, KL divergence
against the trained model's 16-bit file and same-top-token rate sit beside ours on its token ids
and positions against the same file, and the stage fails where they disagree beyond
evaluate.second_opinion.

Outputs: metrics/<artifact>.json for each artifact, summary.json and summary.md (a table),
llama-perplexity.log. A new artifact format plugs in by adding a loader to LOADERS and its files
to `artifacts()`.
"""

from __future__ import annotations

import string
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from omegaconf import DictConfig

from pipeline.artifacts import atomic_dir, disk_bytes, fp32_reference, read_json, references, require_stage_output, stage_dir, write_json
from pipeline import llamacpp
from pipeline.chat import heldout_chat_prompts, is_chat, prompt_ids
from pipeline.data import load_sequences, pad_id
from pipeline.metrics import (batched_logprobs, cached_greedy, own_metrics, prefix_agreement, summarize, token_metrics,
                              trimmed, widened)
from pipeline.models import load_causal_lm, model_logits, starting_checkpoint
from pipeline.config import BASE_TYPES
from pipeline.formats import MANIFEST, METHODS, gguf_files, quantized_checkpoints
from pipeline.contract import PipelineError, Stage, declared

STAGE = Stage("evaluate", settings=("evaluate", "export.pre_tokenizer"), reads=("prepare", "train", "quantize", "export"),
              references=("train",),
              # The artifact name of a LoRA fine-tune's model before its adapter was merged (not a deployed
              # one); the file of the starting weights' grid effect (grid_effect()).
              names={"unmerged": "lora", "grid_effect": "grid_effect.json"})

SLICES = ("all", "rare", "late", "digits_punct")
HEADLINE = ("perplexity", "kl", "top1")


def check(cfg: DictConfig) -> None:
    e = cfg.evaluate
    if e.prompt_tokens + e.continuation_tokens > cfg.data.seq_len:
        raise ValueError(f"evaluate.prompt_tokens + continuation_tokens ({e.prompt_tokens + e.continuation_tokens}) "
                         f"must fit in data.seq_len={cfg.data.seq_len}.")
    if e.second_opinion.enabled:
        llamacpp.tool("llama-perplexity")
    if e.grid_effect is not None:
        llamacpp.file_type(e.grid_effect, "evaluate.grid_effect")
    for name, path in e.extra.items():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"evaluate.extra.{name}={path!r} is not a Hugging Face checkpoint directory.")
    # An explicitly chosen reference (the noise-floor run's) must exist; the implicit one, the
    # fp32 run of the same seed, is used where it exists.
    if e.reference_seed is not None and e.reference_seed != cfg.seed:
        reference = stage_dir(fp32_reference(cfg), "train")
        if not reference.is_dir():
            raise FileNotFoundError(
                f"evaluate.reference_seed={e.reference_seed}: no fp32-trained model for seed {e.reference_seed} at "
                f"{reference}. Run `python -m pipeline stage=train train.precision=fp32 seed={e.reference_seed}` "
                "with the same settings first, or drop evaluate.reference_seed.")


class Scorer(NamedTuple):
    """A loaded artifact: `logits` maps token ids [batch, seq] to logits [batch, seq, vocab];
    `greedy` maps prompts (1-D token id tensors) and a count to the greedy continuations [n, count]."""
    logits: Callable
    greedy: Callable


def model_scorer(model) -> Scorer:
    """A torch model's Scorer: greedy continuations on its KV cache, every prompt in one batch."""
    return Scorer(model_logits(model), partial(cached_greedy, model))


def hf_scorer(path: Path, seq_len: int) -> Scorer:
    return model_scorer(load_causal_lm(path))


def peft_scorer(path: Path, seq_len: int) -> Scorer:
    """A LoRA adapter on its base, unmerged: the model as it was trained."""
    from peft import PeftModel

    base = read_json(path / "adapter_config.json")["base_model_name_or_path"]
    return model_scorer(PeftModel.from_pretrained(load_causal_lm(base), path).eval())


def gguf_model(path: Path, n_ctx: int):
    # The export stage loaded each of its files as it wrote them, and the runner has verified its
    # output unchanged since: reading their headers again would cost 0.2 s a file.
    return llamacpp.load(path, n_ctx=n_ctx, threads=llamacpp.cpu_threads(), checked=True)


def gguf_logits(path: Path, seq_len: int):
    return llamacpp.logits_fn(gguf_model(path, seq_len))


def gguf_scorer(path: Path, seq_len: int) -> Scorer:
    llm = gguf_model(path, seq_len)
    return Scorer(llamacpp.logits_fn(llm), llamacpp.greedy_fn(llm))


def gguf_layout(cfg: DictConfig, name: str) -> dict:
    """A GGUF file's bits per weight and how many tensors llama.cpp stored in other types than its
    own (rows that do not fill the type's blocks), as the export stage recorded them."""
    source, _, kind = name.partition(".")
    info = read_json(stage_dir(cfg, "export") / MANIFEST)[source][kind]
    return {"bits_per_weight": info.get("bits_per_weight"), "fallback_tensors": len(info.get("fallbacks", []))}


# Artifact kind -> loader(path, seq_len) returning its Scorer.
LOADERS = {"hf": hf_scorer, "peft": peft_scorer, "gguf": gguf_scorer}


def artifacts(cfg: DictConfig) -> list[tuple[str, str, Path]]:
    """(name, kind, path) of everything this run produced, the trained model first."""
    found = [("trained", "hf", require_stage_output(cfg, "train"))]
    adapter = found[0][2] / declared("train").names["adapter"]
    if adapter.is_dir():
        found.append((STAGE.names["unmerged"], "peft", adapter))
    found += [(m, "hf", path) for m, path in quantized_checkpoints(stage_dir(cfg, "quantize")).items()]
    found += [(name, "gguf", path) for name, path in gguf_files(stage_dir(cfg, "export"))]
    found += [(name, "hf", Path(path)) for name, path in cfg.evaluate.extra.items()]
    return found


def slice_masks(ids, scored, train_ids: np.ndarray, tokenizer) -> dict:
    """Boolean [batch, seq_len - 1] masks over predicted tokens for each slice, within `scored`
    (the predicted tokens that count: every one, or the answers of chat data)."""
    import torch

    targets = ids[:, 1:]
    vocab = max(len(tokenizer), int(ids.max()) + 1)
    frequency = torch.from_numpy(np.bincount(train_ids, minlength=vocab)[:vocab])
    target_freq = frequency[targets]
    # the tenth of held-out predictions whose token is rarest in the train split
    rare = target_freq <= torch.quantile(target_freq[scored].double(), 0.1)
    positions = torch.arange(1, ids.shape[1]).expand_as(targets)
    late = positions >= ids.shape[1] * 3 // 4
    symbols = set(string.digits + string.punctuation)
    is_symbol = torch.tensor([(t := tokenizer.decode([i]).strip()) != "" and set(t) <= symbols for i in range(vocab)])
    return {"all": scored, "rare": rare & scored, "late": late & scored, "digits_punct": is_symbol[targets] & scored}


def greedy_prompts(cfg: DictConfig, prepared: Path, ids, tokenizer) -> list:
    """Prompts [p] whose greedy continuations are compared: the start of held-out sequences, or for
    chat data each held-out conversation's prompt before its last answer, as the template renders it."""
    import torch

    e = cfg.evaluate
    if not is_chat(cfg.data):
        return list(ids[: e.prompts, : e.prompt_tokens])
    prompts = []
    for messages in heldout_chat_prompts(prepared):
        prompt = prompt_ids(tokenizer, messages)
        if len(prompt) + e.continuation_tokens <= cfg.data.seq_len:
            prompts.append(torch.tensor(prompt))
        if len(prompts) == e.prompts:
            break
    return prompts


def measure(scorer: Scorer | None, ids, ref_logprobs, masks, prompts, ref_continuation, e: DictConfig, others=None,
            widths=None) -> dict:
    """Metrics of one artifact; with `others` ({suffix: log-probabilities}), also its KL and top-1
    against those trained models: the fp32-trained reference, which puts every training precision
    on one scale, and for a QAT run the same run without QAT. The per-sequence NLL sums let the
    report test differences between artifacts pairwise. scorer=None measures the reference itself,
    from its log-probabilities and continuations (a second pass of the model would repeat them)."""
    import torch

    others = others or {}
    per_token = {k: [] for k in ("nll", "kl", "top1", "dp")}
    versus = {suffix: {k: [] for k in ("nll", "kl", "top1")} for suffix in others}
    for i in range(0, len(ids), e.batch_size):
        batch_ids = trimmed(ids, i, e.batch_size, widths)
        width, scored = batch_ids.shape[1], ids.shape[1] - 1
        ref = ref_logprobs[i : i + e.batch_size, :width]
        logits = scorer.logits(batch_ids) if scorer else ref
        found = token_metrics(ref, logits, batch_ids) if scorer else own_metrics(ref, batch_ids)
        for key, value in found.items():
            per_token[key].append(widened(value, scored))
        for suffix, logprobs in others.items():
            for key, value in token_metrics(logprobs[i : i + e.batch_size, :width], logits, batch_ids).items():
                if key in versus[suffix]:
                    versus[suffix][key].append(widened(value, scored))
    per_token = {k: torch.cat(v) for k, v in per_token.items()}
    result = {name: summarize(per_token, mask, e.bootstrap, e.confidence) for name, mask in masks.items()}
    result["sequence_nll"] = (per_token["nll"].double() * masks["all"]).sum(1).tolist()
    for suffix, found in versus.items():
        found = summarize({k: torch.cat(v) for k, v in found.items()}, masks["all"], e.bootstrap, e.confidence)
        result["all"].update({f"{k}_vs_{suffix}{ci}": found[f"{k}{ci}"] for k in ("kl", "top1") for ci in ("", "_ci")})
    if prompts:
        own = scorer.greedy(prompts, e.continuation_tokens) if scorer else ref_continuation
        result["all"]["greedy_agreement"] = prefix_agreement(ref_continuation, own)
    return result


def second_half(reference, logits_fn, windows, batch_size: int) -> dict:
    """Our perplexity, KL against the base and top-1 agreement with it, each with its standard
    error, on the positions llama-perplexity scores: the second half of each window.
    `reference(i)`: the base's log-probabilities on windows[i : i + batch_size] from that half on."""
    import torch

    first = windows.shape[1] // 2
    per_token = {"nll": [], "kl": [], "top1": []}
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        # logits at first.. predict the tokens at first + 1..
        metrics = token_metrics(reference(i), logits_fn(batch)[:, first:], batch[:, first:])
        for key in per_token:
            per_token[key].append(metrics[key].reshape(-1).double())
    result = {}
    for key, values in per_token.items():
        values = torch.cat(values)
        mean, se = values.mean().item(), (values.std() / (len(values) - 1) ** 0.5).item()
        if key == "nll":  # as llama-perplexity gives it: exp(mean NLL), its error propagated
            key, mean, se = "perplexity", float(np.exp(mean)), float(np.exp(mean)) * se
        result[key], result[f"{key}_se"] = mean, se
    return result


def base_reference(llm, windows, batch_size: int, keep_bytes: int = 2**31):
    """`reference` for second_half from the base file's model: kept in memory up to 2 GiB, else
    computed again for each file. SmolLM2's (64 windows, 64 scored positions, 49,152 tokens) is
    805 MB: computing it again for each of 10 files took 19 minutes on 2 cores."""
    import torch

    logits, first = llamacpp.logits_fn(llm), windows.shape[1] // 2

    def reference(i):
        return torch.log_softmax(logits(windows[i : i + batch_size])[:, first:].float(), -1)

    if len(windows) * (windows.shape[1] - first) * llm.n_vocab() * 4 > keep_bytes:
        return reference
    return {i: reference(i) for i in range(0, len(windows), batch_size)}.__getitem__


def agreement(ours: dict, theirs: dict, tolerance: DictConfig) -> dict:
    """Whether our perplexity and mean KL agree with llama-perplexity's: within `sigmas` combined
    standard errors, a relative difference, or (KL) the resolution the tool prints and stores."""
    result = {}
    for key in ("perplexity", "kl"):
        allowed = max(tolerance.sigmas * float(np.hypot(ours[f"{key}_se"], theirs[f"{key}_se"])),
                      tolerance.rel * max(abs(ours[key]), abs(theirs[key])), tolerance.kl_abs if key == "kl" else 0.0)
        difference = abs(ours[key] - theirs[key])
        result[key] = {"difference": difference, "allowed": allowed, "agrees": difference <= allowed}
    return result


def second_opinions(cfg: DictConfig, found: list, held_out, tokenizer, folder: Path, log: Path) -> dict:
    """{GGUF artifact: llama-perplexity's numbers, ours on its token ids and positions, whether they
    agree}, all against the trained model's base file; empty without one."""
    import torch

    files = {name: path for name, kind, path in found if kind == "gguf"}
    base = next((n for n in files if n.split(".")[0] == "trained" and n.split(".")[1] in BASE_TYPES), None)
    if not cfg.evaluate.second_opinion.enabled or base is None:
        return {}
    held_out = held_out[: cfg.evaluate.second_opinion.windows]
    n_ctx = held_out.ids.shape[1]
    text = folder / "heldout.txt"
    text.write_text(tokenizer.decode(held_out.ids[held_out.real]))
    kl_base = folder / "base.kld"
    theirs = {name: llamacpp.perplexity(files[name], text, n_ctx, len(held_out), kl_base, log)
              for name in [base, *(n for n in files if n != base)]}
    base_llm = gguf_model(files[base], n_ctx)
    # Our logits on the very ids the tool read from the text, with the BOS it puts first in each window.
    windows = torch.from_numpy(llamacpp.kl_base_tokens(kl_base)).long()
    if (bos := llamacpp.perplexity_bos(base_llm)) is not None:
        windows[:, 0] = bos
    reference, results = base_reference(base_llm, windows, cfg.evaluate.batch_size), {}
    for name, path in files.items():
        ours = second_half(reference, gguf_logits(path, n_ctx), windows, cfg.evaluate.batch_size)
        results[name] = {"ours": ours, "llama_perplexity": theirs[name],
                         **agreement(ours, theirs[name], cfg.evaluate.second_opinion)}
    return results


def grid_effect(cfg: DictConfig, results: dict, ids, masks, widths, scratch: Path) -> dict | None:
    """Where the fine-tune started from a quantized GGUF file (model.gguf): evaluate.grid_effect's
    type made from the starting weights as the export made it from the trained ones (llama.cpp's
    converter to f32, then llama-quantize), its KL and top-1 against the starting model beside the
    trained file's against the trained model, on the same sequences. None where it does not apply:
    no GGUF start, or the type not exported."""
    e, kind = cfg.evaluate, cfg.evaluate.grid_effect
    trained = results.get(f"trained.{kind}") if kind else None
    if cfg.model.get("gguf") is None or trained is None:
        return None
    start = Path(starting_checkpoint(cfg))
    full, quantized = scratch / "starting-f32.gguf", scratch / f"starting-{kind}.gguf"
    llamacpp.convert(start, full, "f32", cfg.model.name, cfg.export.pre_tokenizer, {"source": "starting weights"})
    llamacpp.quantize(full, quantized, kind)
    full.unlink()
    llamacpp.inspect(quantized, [])  # loaded in a child first: an abort there ends the child, not the run
    reference = batched_logprobs(model_logits(load_causal_lm(start)), ids, e.batch_size, widths)
    scorer = Scorer(llamacpp.logits_fn(llamacpp.load(quantized, n_ctx=cfg.data.seq_len, threads=llamacpp.cpu_threads(),
                                                     checked=True)), None)
    starting = measure(scorer, ids, reference, {"all": masks["all"]}, [], None, e, widths=widths)["all"]
    keys = ("kl", "kl_ci", "top1", "top1_ci", "perplexity", "perplexity_ci")
    return {"type": kind, "starting": {k: starting[k] for k in keys if k in starting},
            "trained": {k: trained["all"][k] for k in keys if k in trained["all"]}}


def reference_pairs(models: dict, held_out, batch_size: int) -> dict:
    """Each trained model's per-sequence NLL (on the scored tokens) over `held_out`, shortest first:
    {"tokens": [...], "nll": {name: [...]}} for `models` ({name: checkpoint directory})."""
    import torch

    widths = held_out.real.sum(1)
    order = torch.argsort(widths, stable=True)
    held_out, widths = held_out[order], widths[order]
    nll = {}
    for name, path in models.items():
        logits = model_logits(load_causal_lm(path)) if len(held_out) else None
        nll[name] = sequence_sums(lambda i, batch: torch.log_softmax(logits(batch), -1), held_out, widths, batch_size)
    return {"tokens": held_out.targets[:, 1:].sum(1).tolist(), "nll": nll}


def sequence_sums(logprobs_of, held_out, widths, batch_size: int) -> list[float]:
    """Per-sequence NLL over the scored tokens of `held_out`, `batch_size` rows at a time, each batch
    up to its longest row (`widths`: each row's real tokens); logprobs_of(i, batch) gives the
    log-probabilities [n, width, vocab] of the batch of rows i.. ."""
    sums = []
    for i in range(0, len(held_out), batch_size):
        batch = trimmed(held_out.ids, i, batch_size, widths)
        token_nll = own_metrics(logprobs_of(i, batch), batch)["nll"].double()
        sums += (token_nll * held_out.targets[i : i + batch_size, 1 : batch.shape[1]]).sum(1).tolist()
    return sums


def reference_logprobs(path: Path, ids, batch_size: int, seq_len: int, widths=None):
    """The trained model at `path` as a Scorer, and its log-probabilities on ids."""
    reference = hf_scorer(path, seq_len)
    return reference, batched_logprobs(reference.logits, ids, batch_size, widths)


def run(cfg: DictConfig, tracker) -> None:
    import torch
    from transformers import AutoTokenizer

    e = cfg.evaluate
    prepared = require_stage_output(cfg, "prepare")
    found = artifacts(cfg)
    trained = found[0][2]
    tokenizer = AutoTokenizer.from_pretrained(trained)
    # One conversation a row: packing would let a row's tokens depend on which others share it.
    every = load_sequences(prepared, "heldout", cfg.data.seq_len, packing=False, pad_id=pad_id(tokenizer))
    held_out = every[: e.max_sequences]
    # Shortest first, so that a batch's rows are of about one length and little of it is padding
    # (measure runs each batch up to its longest row): a stable order, the same for every artifact
    # and every run, which pairs the per-sequence numbers the report compares.
    widths = held_out.real.sum(1)
    if not bool(held_out.real.all()):
        held_out = held_out[torch.argsort(widths, stable=True)]
        widths = held_out.real.sum(1)
    ids = held_out.ids
    masks = slice_masks(ids, held_out.targets[:, 1:], np.load(prepared / "train.npy"), tokenizer)
    prompts = greedy_prompts(cfg, prepared, ids, tokenizer)
    scored = "answer tokens" if is_chat(cfg.data) else "all tokens"

    # The references, once each, in fp32: this run's trained model and, unless this run is it,
    # the fp32-trained model of otherwise identical settings (at evaluate.reference_seed) and, for a QAT
    # run, the same run without QAT, where they exist.
    reference, ref_logprobs = reference_logprobs(trained, ids, e.batch_size, cfg.data.seq_len, widths)
    ref_continuation = reference.greedy(prompts, e.continuation_tokens)
    others, computed, paired = {}, {}, {}
    for suffix, settings in references(cfg).items():
        other = stage_dir(settings, "train")
        if other != trained and other.is_dir():
            if other not in computed:  # a fp32 QAT run's two references are one model
                computed[other] = reference_logprobs(other, ids, e.batch_size, cfg.data.seq_len, widths)[1]
            others[suffix] = computed[other]
            paired[suffix] = other
    # This trained model and each reference on every held-out sequence, in torch: two trained
    # models (two seeds above all, the noise floor) differ by a few percent, which max_sequences,
    # sized for the artifacts' passes, cannot resolve. On the default, two seeds' fine-tunes stood
    # x1.041 [0.961, 1.134] apart on the first 32 conversations and x1.016 [0.972, 1.063] on all 119.
    # The sequences the artifacts are measured on come from the passes above; the rest, from new ones.
    pairs = None
    if paired:
        pairs = reference_pairs({"trained": trained, **paired}, every[len(held_out):], e.batch_size)
        measured = {"trained": ref_logprobs, **{suffix: others[suffix] for suffix in paired}}
        for name, logprobs in measured.items():
            pairs["nll"][name][:0] = sequence_sums(lambda i, batch: logprobs[i : i + len(batch), : batch.shape[1]],
                                                   held_out, widths, e.batch_size)
        pairs["tokens"][:0] = held_out.targets[:, 1:].sum(1).tolist()

    results = {}
    for name, kind, path in found:
        scorer = None if path == trained else LOADERS[kind](path, cfg.data.seq_len)  # the reference is the trained model
        result = measure(scorer, ids, ref_logprobs, masks, prompts, ref_continuation, e, others, widths)
        result["all"]["size_mb"] = disk_bytes(path) / 2**20
        if kind == "gguf":  # what llama.cpp stored: its bits a weight, and the tensors it kept in other types
            result["all"].update(gguf_layout(cfg, name))
        result["source"] = {"kind": kind, "path": str(path)}
        if name in METHODS:  # what a CPU can measure of a format it does not run natively
            result["source"]["measured_as"] = METHODS[name].measured_as
        results[name] = result

    sequence_nll = {n: r.pop("sequence_nll") for n, r in results.items()}
    out = stage_dir(cfg, "evaluate")
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory() as scratch:
        for name, opinion in second_opinions(cfg, found, held_out, tokenizer, Path(scratch), tmp / "llama-perplexity.log").items():
            results[name]["second_opinion"] = opinion
        (tmp / "metrics").mkdir()
        for name, result in results.items():
            write_json(tmp / "metrics" / f"{name}.json", result)
        write_json(tmp / "summary.json", {n: r["all"] for n, r in results.items()})
        # The same held-out sequences for every artifact, in order: the report pairs them.
        write_json(tmp / "per_sequence.json", {"tokens": masks["all"].sum(1).tolist(), "nll": sequence_nll, "scored": scored,
                                               **({"references": pairs} if pairs else {})})
        (tmp / "summary.md").write_text(table(results, e.confidence))
        if (grid := grid_effect(cfg, results, ids, masks, widths, Path(scratch))) is not None:
            write_json(tmp / STAGE.names["grid_effect"], grid)
    record(cfg, tracker)


def record(cfg: DictConfig, tracker) -> None:
    """Logs the measurements; where ours and llama-perplexity's disagree, the stage fails, also when
    the output is reused."""
    out = stage_dir(cfg, "evaluate")
    metrics, disagreements = {}, []
    for path in sorted((out / "metrics").glob("*.json")):
        name, result = path.stem, read_json(path)
        if opinion := result.get("second_opinion"):
            for key in ("perplexity", "kl", "top1"):
                metrics[f"eval/{name}/llama_perplexity/{key}"] = opinion["llama_perplexity"][key]
                metrics[f"eval/{name}/llama_perplexity/ours_{key}"] = opinion["ours"][key]
            metrics[f"eval/{name}/llama_perplexity/agrees"] = float(opinion["perplexity"]["agrees"] and opinion["kl"]["agrees"])
            disagreements += [f"{name} {key}: ours {opinion['ours'][key]:.6g}, llama-perplexity "
                              f"{opinion['llama_perplexity'][key]:.6g} (allowed difference {opinion[key]['allowed']:.3g})"
                              for key in ("perplexity", "kl") if not opinion[key]["agrees"]]
        for slice_name in SLICES:
            prefix = f"eval/{name}" if slice_name == "all" else f"eval/{name}/{slice_name}"
            for key, value in result[slice_name].items():
                if isinstance(value, (list, tuple)):  # a confidence interval
                    base = key.removesuffix("_ci")
                    metrics[f"{prefix}/{base}_low"], metrics[f"{prefix}/{base}_high"] = value
                else:
                    metrics[f"{prefix}/{key}"] = value
    tracker.log_metrics(metrics)
    tracker.log_artifacts(out, "evaluation")
    if disagreements:
        raise PipelineError("evaluate: our numbers and llama-perplexity's disagree on the same tokens and positions, "
                            "a sign of a metric or alignment error: " + "; ".join(disagreements) +
                            f" (details: {out / 'metrics'}, {out / 'llama-perplexity.log'}).")


def table(results: dict, confidence: float) -> str:
    level = f"{confidence:.0%}"
    lines = [f"| artifact | slice | perplexity ({level} CI) | KL vs trained ({level} CI) | top-1 agreement | greedy agreement | size MB |",
             "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        for slice_name in SLICES:
            s = result[slice_name]
            if "perplexity" not in s:
                continue
            greedy_cell = f"{s['greedy_agreement']:.3f}" if "greedy_agreement" in s else ""
            size_cell = f"{s['size_mb']:.1f}" if "size_mb" in s else ""
            lines.append(
                f"| {name} | {slice_name} | {s['perplexity']:.3f} [{s['perplexity_ci'][0]:.3f}, {s['perplexity_ci'][1]:.3f}] "
                f"| {s['kl']:.2e} [{s['kl_ci'][0]:.2e}, {s['kl_ci'][1]:.2e}] | {s['top1']:.4f} | {greedy_cell} | {size_cell} |")
    opinions = {name: r["second_opinion"] for name, r in results.items() if "second_opinion" in r}
    if opinions:
        lines += ["", "Second opinion: llama-perplexity and ours on the second half of each window, against the trained "
                  "model's 16-bit file (ours / theirs).", "",
                  "| GGUF file | perplexity | KL | top-1 | agree |", "|---|---|---|---|---|"]
        for name, o in opinions.items():
            ours, theirs = o["ours"], o["llama_perplexity"]
            lines.append(f"| {name} | {ours['perplexity']:.3f} / {theirs['perplexity']:.3f} | {ours['kl']:.2e} / "
                         f"{theirs['kl']:.2e} | {ours['top1']:.4f} / {theirs['top1']:.4f} | "
                         f"{'yes' if o['perplexity']['agrees'] and o['kl']['agrees'] else 'NO'} |")
    return "\n".join(lines) + "\n"
