"""Quality of a model against the trained (reference) model: the same numbers for every artifact."""

from __future__ import annotations

import numpy as np


def token_metrics(ref_logprobs, logits, input_ids) -> dict:
    """Per-token [batch, seq_len - 1] next-token NLL, KL(reference || model) and top-1 agreement."""
    import torch

    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ref = ref_logprobs[:, :-1]
    targets = input_ids[:, 1:]
    return {
        "nll": -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        "kl": (ref.exp() * (ref - logprobs)).sum(-1),
        "top1": (ref.argmax(-1) == logprobs.argmax(-1)).float(),
    }


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


def summarize(per_token: dict, mask, resamples: int, confidence: float) -> dict:
    """Perplexity, KL and top-1 agreement over the tokens in `mask`, with bootstrap intervals."""
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
    return out


def greedy(logits_fn, prompts, new_tokens: int):
    """Greedy continuations of `prompts` [n, p] using only a logits function (works for any format)."""
    import torch

    ids = prompts
    for _ in range(new_tokens):
        next_ids = logits_fn(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids[:, prompts.shape[1] :]


def prefix_agreement(reference, candidate) -> float:
    """Mean fraction of each continuation that matches the reference before the first difference."""
    same = (reference == candidate).int().cumprod(dim=1)
    return same.float().mean().item()
