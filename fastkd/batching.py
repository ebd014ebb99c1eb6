"""Token ids -> padded batches: length-sorted batches, padding with masks, labels from loss masks."""

from __future__ import annotations

from typing import Iterable


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Group indices into batches of similar length (longest first, so OOM shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(sequences: Iterable[list[int]], pad_id: int, side: str = "right", masks: Iterable[list[int]] | None = None):
    """Pad token lists into (input_ids, attention_mask[, loss_mask]) LongTensors."""
    import torch

    seqs = [list(s) for s in sequences]
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss, masks = torch.zeros_like(attn), None if masks is None else list(masks)
    for row, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[row, sl] = torch.tensor(s, dtype=torch.long)
        attn[row, sl] = 1
        if masks is not None:
            loss[row, sl] = torch.tensor(masks[row], dtype=torch.long)
    return (ids, attn, loss) if masks is not None else (ids, attn)


def labels_from_mask(input_ids, loss_mask, ignore_index: int = -100):
    """Next-token labels for each position: labels[t] = input_ids[t+1] where loss_mask[t+1]."""
    import torch

    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(~loss_mask[:, 1:].bool(), ignore_index)
    return labels
