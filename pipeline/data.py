"""Token-id files written by the prepare stage, cut into the fixed-length sequences every stage uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def load_blocks(prepared: Path, split: str, seq_len: int):
    """[n, seq_len] int64 tensor of consecutive tokens; the ragged tail is dropped."""
    import numpy as np
    import torch

    ids = np.load(Path(prepared) / f"{split}.npy")
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"The {split} split has {len(ids)} tokens, fewer than one sequence of {seq_len}.")
    return torch.from_numpy(ids[: n * seq_len].astype(np.int64)).view(n, seq_len)


def calibration_blocks(prepared: Path, calibration, seed: int):
    """The calibration samples every calibrated quantizer sees (llm-compressor's, llama-imatrix's):
    `calibration.samples` blocks of `calibration.seq_len` tokens of the train split, drawn with the
    run's seed, in their order there. Never the held-out split, which the quality is measured on."""
    import torch

    blocks = load_blocks(prepared, "train", calibration.seq_len)
    picks = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[: calibration.samples]
    return blocks[picks.sort().values]


@dataclass
class Sequences:
    """Rows of token ids [n, seq_len] and, per token: whether it is a target of the loss and of the
    metrics (every token of plain text; the answers of chat data), whether it is real (not padding),
    and its position within its example. Positions restart at each packed example, which makes
    transformers keep attention within it (block-diagonal, when no attention mask is given)."""
    ids: object
    targets: object
    real: object
    positions: object

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index) -> Sequences:
        return Sequences(self.ids[index], self.targets[index], self.real[index], self.positions[index])

    def to(self, device) -> Sequences:
        return Sequences(*(t.to(device) for t in (self.ids, self.targets, self.real, self.positions)))

    def model_inputs(self, loss_on_all: bool) -> dict:
        """Keyword arguments of a causal LM's forward that give the loss on the targets (on every
        real token with `loss_on_all`)."""
        labels = self.ids.masked_fill(~(self.real if loss_on_all else self.targets), -100)
        # A cache would make transformers skip the packed-sequence attention mask.
        return {"input_ids": self.ids, "position_ids": self.positions, "labels": labels, "use_cache": False}


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_sequences(prepared: Path, split: str, seq_len: int, packing: bool, pad_id: int) -> Sequences:
    """Plain text: consecutive blocks, every token a target. Chat data (prepare wrote
    <split>_lengths.npy): its conversations, several to a row in order (each whole) with
    `packing`, else one to a row; rows padded at the end."""
    import numpy as np
    import torch

    prepared = Path(prepared)
    if not (prepared / f"{split}_lengths.npy").exists():
        ids = load_blocks(prepared, split, seq_len)
        ones = torch.ones_like(ids, dtype=torch.bool)
        return Sequences(ids, ones, ones, torch.arange(seq_len).expand_as(ids).contiguous())
    ids = np.load(prepared / f"{split}.npy").astype(np.int64)
    targets = np.load(prepared / f"{split}_targets.npy").astype(bool)
    lengths = np.load(prepared / f"{split}_lengths.npy")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows: list[list[int]] = []
    used = 0  # tokens in the last row
    for i, length in enumerate(lengths):
        if packing and rows and used + length <= seq_len:
            rows[-1].append(i)
            used += length
        else:
            rows.append([i])
            used = length
    out = {"ids": np.full((len(rows), seq_len), pad_id, dtype=np.int64), "targets": np.zeros((len(rows), seq_len), bool),
           "real": np.zeros((len(rows), seq_len), bool), "positions": np.tile(np.arange(seq_len), (len(rows), 1))}
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            span, n = slice(starts[i], starts[i] + lengths[i]), lengths[i]
            out["ids"][r, at : at + n] = ids[span]
            out["targets"][r, at : at + n] = targets[span]
            out["real"][r, at : at + n] = True
            out["positions"][r, at : at + n] = np.arange(n)
            at += n
        # Padding continues the last example's positions, so it adds no example of its own.
        out["positions"][r, at:] = np.arange(n, n + seq_len - at)
    return Sequences(*(torch.from_numpy(out[k]) for k in ("ids", "targets", "real", "positions")))
