"""Quality of a model against the trained (reference) model: the same numbers for every artifact."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


# KL percentiles over tokens, as llama-perplexity's --kl-divergence prints them.
KL_PERCENTILES = {"kl_median": 50, "kl_p95": 95, "kl_p99": 99, "kl_p999": 99.9}


def token_metrics(ref_logprobs, logits, input_ids) -> dict:
    """Per-token [batch, seq_len - 1] next-token NLL, KL(reference || model), top-1 agreement and
    dp, the change in the probability of the token that came (llama-perplexity's Δp)."""
    import torch

    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ref = ref_logprobs[:, :-1]
    targets = input_ids[:, 1:].unsqueeze(-1)
    return {
        "nll": -logprobs.gather(-1, targets).squeeze(-1),
        "kl": (ref.exp() * (ref - logprobs)).sum(-1),
        "top1": (ref.argmax(-1) == logprobs.argmax(-1)).float(),
        "dp": (logprobs.gather(-1, targets).exp() - ref.gather(-1, targets).exp()).squeeze(-1),
    }


def own_metrics(ref_logprobs, input_ids) -> dict:
    """token_metrics of the reference against itself, exactly: its NLL, and zero KL and Δp, full
    top-1 agreement (log-probabilities normalised again would differ from themselves in the last bits)."""
    import torch

    nll = -ref_logprobs[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return {"nll": nll, "kl": torch.zeros_like(nll), "top1": torch.ones_like(nll), "dp": torch.zeros_like(nll)}


def batched_logprobs(logits_fn, ids, batch_size: int, widths=None):
    """Next-token log-probabilities [n, seq, vocab] of ids [n, seq], `batch_size` rows at a time;
    with `widths` (each row's real tokens, padding after them), each batch is run only up to its
    longest row, and the padding's positions hold zeros."""
    import torch

    return torch.cat([widened(torch.log_softmax(logits_fn(trimmed(ids, i, batch_size, widths)), -1), ids.shape[1])
                      for i in range(0, len(ids), batch_size)])


def trimmed(ids, start: int, batch_size: int, widths=None):
    """Rows start..start+batch_size of ids, without the columns that are padding in every one of them:
    a model's output at a position depends only on the positions before it, so dropping the padding
    after the last real token changes no real position's output and saves its compute (on chat data,
    most of a row of data.seq_len)."""
    rows = ids[start : start + batch_size]
    return rows if widths is None else rows[:, : max(1, int(widths[start : start + batch_size].max()))]


def widened(values, width: int, dim: int = 1):
    """values padded with zeros along `dim` to `width` (positions dropped as padding by trimmed)."""
    import torch.nn.functional as F

    missing = width - values.shape[dim]
    if missing <= 0:
        return values
    pad = [0, 0] * (values.dim() - dim - 1) + [0, missing]
    return F.pad(values, pad)


def mean_kl(ref_logits, logits) -> float:
    import torch

    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    return (ref.exp() * (ref - torch.log_softmax(logits.float(), dim=-1))).sum(-1).mean().item()


def bootstrap_ci(numerators: np.ndarray, denominators: np.ndarray, resamples: int, confidence: float,
                 transform=None, seed: int = 0) -> tuple[float, float]:
    """Interval of sum(numerators) / sum(denominators) (then `transform`), resampling sequences."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(numerators), size=(resamples, len(numerators)))
    stats = numerators[picks].sum(1) / np.maximum(denominators[picks].sum(1), 1e-12)
    if transform is not None:
        stats = transform(stats)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def binomial_ci(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a rate: it stays inside [0, 1] and is not degenerate at 0 or 1."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    rate, denominator = successes / trials, 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    half = z * ((rate * (1 - rate) + z * z / (4 * trials)) / trials) ** 0.5 / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


class Draws(NamedTuple):
    """A bootstrap's draws of measurements made in rounds, every replicate at once: `values[name]`
    [replicates, rounds, items] (NaN past a drawn round's own count of items) and `rounds`
    [replicates, rounds], which round each drawn one is."""
    values: dict
    rounds: np.ndarray


def round_replicates(rounds: list[dict], statistics: dict, resamples: int, seed: int = 0) -> dict:
    """Bootstrap replicates of each statistic of measurements made in rounds (a served format's
    requests, measured in several interleaved rounds): each replicate draws the rounds with
    replacement, then each drawn round's items with replacement, so that the drift between rounds
    widens an interval as well as the spread between requests. `rounds`: {name: per-item values}
    each; `statistics`: {name: function of the Draws, giving [resamples] values}. Drawn as arrays:
    a replicate at a time in Python, the smoke chain's serve stage spent about a second on them."""
    rng = np.random.default_rng(seed)
    sizes = np.array([len(next(iter(r.values()))) for r in rounds])
    which = rng.integers(0, len(rounds), (resamples, len(rounds)))
    count = sizes[which][..., None]
    slots = np.arange(max(sizes.max(), 1))
    picks = rng.integers(0, np.maximum(count, 1), (*which.shape, len(slots)))
    values = {}
    for key in rounds[0]:
        table = np.full((len(rounds), len(slots)), np.nan)
        for i, r in enumerate(rounds):
            table[i, : sizes[i]] = r[key]
        values[key] = np.where(slots < count, table[which[..., None], picks], np.nan)
    draws = Draws(values, which)
    return {name: statistic(draws) for name, statistic in statistics.items()}


def round_rate(rounds: list[dict]):
    """The statistic for round_replicates of a served rate measured in rounds ({"rate", "output_tokens",
    "latency_s"} each): a drawn round's resampled sum(output tokens) / sum(latency), scaled to that
    round's measured rate (which counts the requests in flight together), averaged over the draw."""
    scale = np.array([r["rate"] * sum(r["latency_s"]) / sum(r["output_tokens"]) for r in rounds])

    def rate(draws: Draws) -> np.ndarray:
        tokens, latency = (np.nansum(draws.values[k], -1) for k in ("output_tokens", "latency_s"))
        return (scale[draws.rounds] * tokens / latency).mean(-1)

    return rate


def nan_percentile(values: np.ndarray, q: float) -> np.ndarray:
    """np.nanpercentile(values, q, axis=-1) (its default, linear interpolation), NaN for a row of
    NaN alone: numpy computes it a row at a time in Python, 30 ms for a thousand replicates."""
    ordered = np.sort(values, axis=-1)  # NaN last
    count = (~np.isnan(values)).sum(-1)
    position = np.maximum(count - 1, 0) * q / 100
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, np.maximum(count - 1, 0))
    below, above = (np.take_along_axis(ordered, i[..., None], -1)[..., 0] for i in (low, high))
    return np.where(count > 0, below + (position - low) * (above - below), np.nan)


def percentile_interval(replicates, confidence: float) -> list[float]:
    tail = (1 - confidence) / 2 * 100
    return [float(v) for v in np.percentile(replicates, [tail, 100 - tail])]


def summarize(per_token: dict, mask, resamples: int, confidence: float) -> dict:
    """Perplexity, KL and top-1 agreement over the tokens in `mask`, with bootstrap intervals; the
    KL percentiles, RMS Δp and the same-top-token rate's binomial interval where they were measured."""
    mask = mask.float()
    counts = mask.sum(1).double().numpy()
    sums = {k: (v.double() * mask).sum(1).numpy() for k, v in per_token.items()}
    total = max(counts.sum(), 1e-12)
    out = {"tokens": int(counts.sum())}
    if out["tokens"] == 0:
        return out
    out["perplexity"] = float(np.exp(sums["nll"].sum() / total))
    out["perplexity_ci"] = bootstrap_ci(sums["nll"], counts, resamples, confidence, transform=np.exp)
    out["kl"] = float(sums["kl"].sum() / total)
    out["kl_ci"] = bootstrap_ci(sums["kl"], counts, resamples, confidence)
    out["top1"] = float(sums["top1"].sum() / total)
    out["top1_ci"] = bootstrap_ci(sums["top1"], counts, resamples, confidence)
    if "dp" in per_token:
        chosen = mask.bool()
        kl = per_token["kl"][chosen].double().numpy()
        out.update({key: float(np.percentile(kl, q)) for key, q in KL_PERCENTILES.items()})
        out["rms_dp"] = float(np.sqrt((per_token["dp"][chosen].double() ** 2).mean().item()))
        out["same_top_ci"] = binomial_ci(int(round(sums["top1"].sum())), out["tokens"], confidence)
    return out


def cached_greedy(model, prompts: list, new_tokens: int):
    """Greedy continuations [n, new_tokens] of `prompts` (1-D token id tensors of any lengths) by a
    torch causal LM, a token a step on its KV cache as a server decodes, all prompts in one batch:
    left-padded, the padding masked out and each row's positions counted from its first real token,
    so that a row decodes as it would alone. A step reads every weight whatever the batch (on 2 CPU
    cores, 0.1 s for SmolLM2-135M), so eight prompts cost what one does."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([p.new_zeros(width - len(p)), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    found, past = [], None
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True)
            past, ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            found.append(ids)
            mask, positions = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1), positions[:, -1:] + 1
    return torch.cat(found, dim=1)


def prefix_agreement(reference, candidate) -> float:
    """Mean fraction of each continuation that matches the reference before the first difference."""
    same = (reference == candidate).int().cumprod(dim=1)
    return same.float().mean().item()
