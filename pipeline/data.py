"""Token-id files written by the prepare stage, cut into the fixed-length sequences every stage uses."""

from __future__ import annotations

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
