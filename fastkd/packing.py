"""--packing: whole sequences concatenated into rows of --max-length tokens (planned in fastkd.plans), their position
ids restarting per sequence, and the model arguments that keep attention inside each sequence."""

from __future__ import annotations

import numpy as np
import torch

from fastkd.batching import labels_from_mask
from fastkd.errors import UserError
from fastkd.loader import IGNORE_INDEX, Batch, make_batch
from fastkd.plans import best_fit_decreasing


def check_rows_fit(source, positions: np.ndarray | None, row_length: int, where: str) -> None:
    """Refuse (one line, naming the first) sequences longer than a packed row: packing never splits a sequence."""
    positions = np.arange(len(source.lengths)) if positions is None else np.asarray(positions, dtype=np.int64)
    lengths = np.asarray(source.lengths)[positions]
    over = np.flatnonzero(lengths > row_length)
    if not len(over):
        return
    first = int(positions[over[0]])
    record = getattr(source[first], "record_index", first)
    raise UserError(f"{where}: record {record} has {int(lengths[over[0]])} tokens, longer than a packed row "
                    f"(--max-length {row_length}; {len(over)} sequences are, the longest {int(lengths.max())}); "
                    f"--packing never splits a sequence (its teacher rows were made with all of it as context): "
                    f"raise --max-length to at least {int(lengths.max())}, or train without --packing")


def collate_packed(rows: list[list], pad_id: int) -> Batch:
    """Rows of sequences -> one right-padded Batch, each row its sequences concatenated: position ids and labels per
    sequence (its last token predicts nothing), teacher rows in the same row-major order."""
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    shape = (len(rows), width)
    ids, attn = np.full(shape, pad_id, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    loss = np.zeros(shape, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    sequences, segments, starts = [], [], []
    for r, row in enumerate(rows):
        t = 0
        for s in row:
            x, m = np.asarray(s.input_ids, dtype=np.int64), np.asarray(s.loss_mask, dtype=np.int64)
            n = len(x)
            ids[r, t:t + n], attn[r, t:t + n], positions[r, t:t + n] = x, 1, np.arange(n)
            loss[r, t + 1:t + n] = m[1:]  # a sequence's first token is predicted by nothing of its own
            if n:
                starts.append(r * width + t)
            sequences.append(s)
            segments.append((r, t, n))
            t += n
        if t < width:  # the padding: a segment of its own, after every real token (so never attended to)
            positions[r, t:] = np.arange(width - t)
            starts.append(r * width + t)
    cu_seqlens = np.asarray(starts + [len(rows) * width], dtype=np.int32)
    ids, attn, loss = map(torch.from_numpy, (ids, attn, loss))   # labels: a first token and padding have loss 0
    return make_batch(sequences, ids, attn, loss, labels_from_mask(ids, loss, IGNORE_INDEX),
                      position_ids=torch.from_numpy(positions), cu_seqlens=torch.from_numpy(cu_seqlens),
                      max_seqlen=int(np.diff(cu_seqlens).max()), segments=segments)


def pack_sequences(sequences: list, pad_id: int, row_length: int) -> Batch:
    """Sequences (a library collator's micro-batch) packed best-fit-decreasing into rows of `row_length` tokens."""
    lengths = np.asarray([len(s.input_ids) for s in sequences], dtype=np.int64)
    over = np.flatnonzero(lengths > row_length)
    if len(over):
        s = sequences[int(over[0])]
        raise UserError(f"record {getattr(s, 'record_index', int(over[0]))} has {int(lengths[over[0]])} tokens, "
                        f"longer than the packed row length {row_length}; packing never splits a sequence")
    rows = best_fit_decreasing(np.arange(len(sequences)), lengths, row_length)
    return collate_packed([[sequences[i] for i in row] for row in rows], pad_id)


def unpack(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, loss_mask) of a packed batch's sequences, one right-padded row each, in the
    batch's order (so their loss rows come in the packed batch's order): for a model run without packing."""
    longest = max((n for _, _, n in batch.segments), default=0)
    shape = (len(batch.segments), longest)
    ids = torch.zeros(shape, dtype=batch.input_ids.dtype, device=batch.input_ids.device)
    attn, loss = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (r, t, n) in enumerate(batch.segments):
        ids[i, :n] = batch.input_ids[r, t:t + n]
        attn[i, :n] = 1
        loss[i, :n] = batch.loss_mask[r, t:t + n]
    return ids, attn, loss


def packed_attention(config, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                     max_seqlen: int | None = None) -> dict:
    """A packed batch's attention arguments: no 2-D mask, the restarting position ids (masking_utils builds the
    block-diagonal mask from them), and for flash attention the sequence boundaries of every row."""
    from transformers.utils.generic import is_flash_attention_requested

    kwargs = {"attention_mask": None, "position_ids": position_ids}
    if cu_seqlens is not None and is_flash_attention_requested(config):
        kwargs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen,
                      max_length_k=max_seqlen)
    return kwargs


@torch.no_grad()
def check_packed_attention(model, device, context, where: str) -> None:
    """Refuse a model whose attention crosses sequence boundaries under packing: two sequences packed in one row
    must give the logits each gives alone (up to a tenth of what attending across would change)."""
    g = torch.Generator().manual_seed(0)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    a, b = (torch.randint(0, vocab, (1, n), generator=g).to(device) for n in (5, 7))
    both = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    seqs = [{"input_ids": a}, {"input_ids": both, **packed_attention(model.config, positions)}, {"input_ids": b},
            {"input_ids": both}]
    was_training = model.training
    model.eval()
    try:
        with context:
            alone_a, packed, alone_b, across = (model(**kw, use_cache=False).logits.float() for kw in seqs)
    finally:
        model.train(was_training)
    error = max((packed[:, :5] - alone_a).abs().max().item(), (packed[:, 5:] - alone_b).abs().max().item())
    leak = (across[:, 5:] - alone_b).abs().max().item()
    if error > max(0.1 * leak, 1e-4 * alone_b.abs().max().item()):
        impl = getattr(model.config, "_attn_implementation", None)
        raise UserError(f"--packing: {where} attends across packed sequences with attention implementation "
                        f"{impl!r} (packed logits differ from the sequence alone by {error:.3g}); use an attention "
                        f"that reads packed position ids (sdpa, eager, flex_attention, flash_attention_2) or train "
                        f"without --packing")
