"""fastkd in other training loops: the cache as a torch Dataset / IterableDataset, a collator, and a
`transformers.Trainer` whose compute_loss is the StudentWithLoss `fastkd train` runs (docs/library.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import Trainer

from fastkd.errors import UserError
from fastkd.loader import CacheSource, collate
from fastkd.packing import pack_sequences
from fastkd.plans import epoch_stream
from fastkd.student import StudentWithLoss, batch_inputs, causal_lm
from fastkd.train_config import TrainConfig
from fastkd.train_data import check_cache_tokenizer


def _open_cache(path: str, layers: list[int] | None, verify: bool, tokenizer) -> CacheSource:
    """The cache as a CacheSource; with a `tokenizer`, the cache's ids must mean what the student's tokenizer means."""
    if layers is not None and not (isinstance(layers, (list, tuple)) and all(isinstance(x, int) for x in layers)):
        raise UserError(f"cache {path}: layers= takes a list of layer indices (e.g. [-1]) or None, got {layers!r}")
    if tokenizer is not None and not hasattr(tokenizer, "get_vocab"):
        raise UserError(f"cache {path}: tokenizer= takes a loaded tokenizer (AutoTokenizer.from_pretrained(...)), "
                        f"got {type(tokenizer).__name__}")
    source = CacheSource(path, layers=layers, verify=verify)
    if tokenizer is not None:
        check_cache_tokenizer(source.manifest, tokenizer, f"cache {path}")
    return source


class CacheDataset(torch.utils.data.Dataset):
    """A teacher cache (folder or fsspec URL) as a map-style Dataset: item i is the i-th cached sequence,
    every block checked against its digests before it is decoded. `layers=[]` skips hidden states."""

    def __init__(self, path: str, *, layers: list[int] | None = None, verify: bool = True, tokenizer=None):
        self.source = _open_cache(path, layers, verify, tokenizer)
        self.manifest = self.source.manifest

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "CacheDataset":
        """transformers-style constructor (a folder or URL, not a hub id)."""
        return cls(path, **kwargs)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        n, i = len(self.source), int(i)
        if not -n <= i < n:
            raise IndexError(f"CacheDataset index {i} is outside a cache of {n} sequences")
        return self.source[i % n]


class CacheIterableDataset(torch.utils.data.IterableDataset):
    """A cache streamed in `fastkd train`'s seeded block-local order, each sequence to one (rank, worker), resumable
    without re-reading: `state_dict(consumed)` is where to continue (`load_state_dict`, or start=). `batch_size`: the
    DataLoader's; its workers take whole batches in turn, so batches arrive in plan order and a resume is exact.
    `set_epoch(e)` (the HF Trainer calls it) gives epoch e's order."""

    def __init__(self, path: str, *, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 epoch: int = 0, start: int = 0, shuffle: bool = True, shuffle_buffer: int = 256,
                 batch_size: int = 1, layers: list[int] | None = None, verify: bool = True, tokenizer=None):
        if (rank is None) != (world_size is None):
            raise UserError("CacheIterableDataset: give rank and world_size together (or neither: the initialised "
                            "process group's, else one process)")
        if int(start) < 0 or int(epoch) < 0 or int(batch_size) < 1:
            raise UserError(f"CacheIterableDataset: start and epoch must be >= 0 and batch_size >= 1, got start "
                            f"{start}, epoch {epoch}, batch_size {batch_size}")
        self.source = _open_cache(path, layers, verify, tokenizer)
        self.seed, self.epoch, self.start, self.batch_size = seed, int(epoch), int(start), int(batch_size)
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        if rank is None:
            import torch.distributed as dist

            ready = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        if not 0 <= rank < world_size:
            raise UserError(f"CacheIterableDataset: rank {rank} is outside 0..{world_size - 1}")
        self.rank, self.world = rank, world_size
        self.consumed = 0

    def mine(self, epoch: int) -> np.ndarray:
        """This rank's share (items rank, rank + world, ...) of the epoch's seeded order, the same on every rank."""
        order, _ = epoch_stream(self.source.lengths, self.source.shards, seed=self.seed, epoch=epoch,
                                shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer)
        return order[self.rank::self.world]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        positions = self.mine(self.epoch)[self.start:]
        for i, position in enumerate(positions):
            if i // self.batch_size % workers == worker:  # the DataLoader reads workers' batches round robin
                yield self.source[int(position)]

    def set_epoch(self, epoch: int) -> None:
        """Stream epoch `epoch`'s order from its start (a new epoch starts where a resumed one left off: at 0)."""
        if int(epoch) != self.epoch:
            self.epoch, self.start = int(epoch), 0

    def __len__(self) -> int:
        return max(0, len(self.mine(self.epoch)) - self.start)

    def state_dict(self, consumed: int) -> dict:
        """Where to continue after `consumed` items of this epoch were trained on."""
        return {"epoch": self.epoch, "start": self.start + int(consumed), "seed": self.seed, "rank": self.rank,
                "world_size": self.world}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("seed"), state.get("rank"), state.get("world_size")) != (self.seed, self.rank, self.world):
            raise UserError(f"CacheIterableDataset.load_state_dict: the state is for seed/rank/world "
                            f"{state.get('seed')}/{state.get('rank')}/{state.get('world_size')}, this dataset is "
                            f"{self.seed}/{self.rank}/{self.world}")
        self.epoch, self.start = int(state["epoch"]), int(state["start"])


@dataclass
class DistillCollator:
    """Cached sequences -> StudentWithLoss's keyword arguments: input_ids, attention_mask, labels (-100 off the
    response), the teacher's rows in row-major order of the loss rows, teacher_hidden and loss_index.
    `pack_length`: the micro-batch's sequences packed into rows of that many tokens (+ position_ids, cu_seqlens,
    max_seqlen: attention kept inside each sequence); a longer sequence is refused."""

    pad_token_id: int
    teacher_layers: tuple[int, ...] = ()
    pack_length: int | None = None

    def __post_init__(self):
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool):
            raise UserError(f"DistillCollator: pad_token_id must be a token id (tokenizer.pad_token_id, or its "
                            f"eos_token_id when it has no pad token), got {self.pad_token_id!r}")

    def __call__(self, sequences: list) -> dict:
        if not sequences:
            raise UserError("DistillCollator: got an empty batch")
        if self.pack_length:
            batch = pack_sequences(list(sequences), self.pad_token_id, self.pack_length)
        else:
            batch = collate(list(sequences), self.pad_token_id)
        return batch_inputs(batch, list(self.teacher_layers))


def loss_settings(**overrides) -> TrainConfig:
    """The loss options of `fastkd train` (mode, ce_weight, kl_weight, temperature, hidden_weight, loss_impl,
    chunk_size), as the TrainConfig the loss module reads; everything else keeps its default."""
    unknown = sorted(set(overrides) - set(TrainConfig.fields()))
    if unknown:
        raise UserError(f"unknown fastkd option(s) {', '.join(unknown)}")
    return TrainConfig(**overrides)


class DistillTrainer(Trainer):
    """`transformers.Trainer` with fastkd's loss from a CacheDataset and a DistillCollator (`fastkd_config`: the
    loss options, see `loss_settings`); the mean is over the micro-batch's loss rows (docs/library.md)."""

    def __init__(self, *args, fastkd_config: TrainConfig | dict | None = None, vocab_size: int | None = None,
                 **kwargs):
        config = fastkd_config if isinstance(fastkd_config, TrainConfig) else loss_settings(**(fastkd_config or {}))
        if config.hidden_weight:   # the projections fastkd train learns beside the student are not built here
            raise UserError("DistillTrainer trains CE + KL from the cache; a hidden-state loss (hidden_weight) needs "
                            "the projections `fastkd train --hidden-weight` learns with the student: use fastkd train, "
                            "or hidden_weight=0")
        args_obj = kwargs.get("args", args[1] if len(args) > 1 else None)
        if args_obj is not None and getattr(args_obj, "remove_unused_columns", False):
            args_obj.remove_unused_columns = False  # the teacher columns are not the model's arguments
        super().__init__(*args, **kwargs)
        self.fastkd_config = config
        tokenizer = getattr(self, "processing_class", None)
        self.fastkd_vocab = vocab_size or (len(tokenizer) if tokenizer is not None else None) or \
            causal_lm(self.model).get_output_embeddings().weight.shape[0]
        self._loss_module = None
        self.last_terms = None

    def loss_module(self, model) -> StudentWithLoss:
        core = self.accelerator.unwrap_model(model)
        if self._loss_module is None or self._loss_module.student is not core:
            self._loss_module = StudentWithLoss(core, self.fastkd_vocab, self.fastkd_config)
        return self._loss_module

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        module = self.loss_module(model)
        terms = module(**inputs, runner=None if model is module.student else model)
        self.last_terms = {name: float(getattr(terms, name)) for name in ("ce", "kl", "hidden")}
        return (terms.total, {"terms": terms}) if return_outputs else terms.total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Held-out loss with fastkd's loss (no logits are gathered: they are never materialised)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None


__all__ = ["CacheDataset", "CacheIterableDataset", "DistillCollator", "DistillTrainer", "loss_settings"]
