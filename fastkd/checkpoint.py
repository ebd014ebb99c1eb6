"""Training checkpoints without pickle: `<run>/checkpoint/` holds state.safetensors (every tensor) and checkpoint.json
(the state's structure, the file's sha256, a seal); both digests are checked before use, a pickled state.pt refused."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import socket
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastkd.cache_tools.errors import CacheError
from fastkd.cache_tools.format import LOCK, atomic_write_bytes, fsync_dir, reject_constant
from fastkd.cache_tools.integrity import file_digest, seal, seal_matches
from fastkd.cache_tools.lock import acquire_lock, read_holder, release_lock
from fastkd.errors import UserError
from fastkd.paths import check_out_folder

if TYPE_CHECKING:  # type names only: the run's pieces import this module, not the other way round
    from torch import nn

    from fastkd.runtime import Env
    from fastkd.student import StudentWithLoss
    from fastkd.train_config import TrainConfig

CHECKPOINT = "checkpoint"
READABLE = (CHECKPOINT, f".{CHECKPOINT}.old")   # where a complete checkpoint may be, newest first
TENSORS = "state.safetensors"
INDEX = "checkpoint.json"
FORMAT = "fastkd-checkpoint"
FORMAT_VERSION = 1


def encode_tree(obj, tensors: dict[str, torch.Tensor], seen: dict, path: str = "state"):
    """JSON for a nested state, its tensors put in `tensors`; TypeError naming the path of anything else (so a state
    that cannot be stored fails when saved, not when resumed)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = (obj.device, obj.dtype, tuple(obj.shape), tuple(obj.stride()), obj.data_ptr())
        if key not in seen:  # tied weights are stored once
            seen[key] = f"t{len(tensors)}"
            t = obj.detach().to("cpu").contiguous()
            storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if storage in seen or t.numel() * t.element_size() != storage[1]:
                t = t.clone()  # safetensors stores each tensor in storage of its own
            seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = True
            tensors[seen[key]] = t
        return {"__tensor__": seen[key]}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{path}: numpy array of dtype {obj.dtype} cannot be stored")
        return {"__ndarray__": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}
    if isinstance(obj, np.generic):
        return encode_tree(obj.item(), tensors, seen, path)
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, seen, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, seen, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, seen, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode_tree(k, tensors, seen, f"{path} key"), encode_tree(v, tensors, seen, f"{path}[{k!r}]")]
                              for k, v in obj.items()]}
    raise TypeError(f"{path}: a {type(obj).__name__} cannot be stored in a checkpoint")


def decode_tree(obj, tensors: dict[str, torch.Tensor], path: str = "state"):
    """Inverse of encode_tree; ValueError naming the path for anything malformed."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        name = obj["__tensor__"]
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is not in {TENSORS}")
        return tensors[name]
    if "__float__" in obj:
        if obj["__float__"] not in ("nan", "inf", "-inf"):
            raise ValueError(f"{path}: {obj['__float__']!r} is not a special float")
        return float(obj["__float__"])
    if "__ndarray__" in obj:
        dtype = np.dtype(obj["__ndarray__"])
        if dtype.kind not in "biuf":
            raise ValueError(f"{path}: numpy dtype {dtype} is not allowed")
        return np.asarray(obj["data"], dtype=dtype).reshape(obj["shape"])
    if "__tuple__" in obj:
        return tuple(decode_tree(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj["__tuple__"]))
    if "__items__" in obj:
        return {decode_tree(k, tensors, path): decode_tree(v, tensors, f"{path}[{k!r}]")
                for k, v in obj["__items__"]}
    return {k: decode_tree(v, tensors, f"{path}.{k}") for k, v in obj.items()}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])   # tuples come back as tuples (encode_tree's __tuple__)
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    """Write <run>/checkpoint atomically: a temporary folder (files fsynced), then a rename over
    the old one; a kill at any moment leaves the old or the new checkpoint, whole."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    final, tmp, old = run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.tmp", run_dir / f".{CHECKPOINT}.old"
    tensors: dict[str, torch.Tensor] = {}
    tree = encode_tree(state, tensors, {})
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / TENSORS))
        with open(tmp / TENSORS, "rb+") as fh:
            os.fsync(fh.fileno())
        digest, size = file_digest(tmp / TENSORS)
        index = seal({"format": FORMAT, "format_version": FORMAT_VERSION,
                      "files": {TENSORS: {"sha256": digest, "bytes": size}}, "state": tree})
        atomic_write_bytes(tmp / INDEX, json.dumps(index, allow_nan=False).encode())
        atomic_write_bytes(tmp / "progress.json", json.dumps({"step": state.get("step"), "epoch": state.get("epoch"),
                                                              "position": state.get("position")}).encode())
    except Exception as err:  # noqa: BLE001 - disk full (OSError or safetensors' own error), permissions
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final}: {err}; free space, then {how_to_continue(run_dir)}") from None
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> dict:
    """The latest complete checkpoint (a crash between the two renames leaves the previous one as
    .old), every file checked against its digest first; UserError saying what is wrong."""
    from safetensors.torch import load_file

    folder = _newest(Path(run_dir))
    index, where = _read_index(folder), f"--resume: checkpoint {folder}"
    try:
        expected = index["files"][TENSORS]
        digest, size = file_digest(folder / TENSORS)
    except (OSError, KeyError, TypeError) as err:
        raise UserError(f"{where}: {TENSORS} cannot be read ({err})") from None
    if size != expected.get("bytes") or digest != expected.get("sha256"):
        raise UserError(f"{where}: {TENSORS} fails its sha256 check against {INDEX} (truncated or corrupted); "
                        f"resume from an earlier copy or start a new run folder")
    try:
        return decode_tree(index["state"], load_file(str(folder / TENSORS)))
    except Exception as err:  # noqa: BLE001 - a digest-checked but malformed state
        raise UserError(f"{where}: the state cannot be rebuilt ({err})") from None


def saved_settings(run_dir: Path) -> dict:
    """The newest checkpoint's config, world and step, from its sealed index alone (no tensor is read): what a
    resume is checked against before anything is loaded."""
    folder = _newest(Path(run_dir))
    try:
        state = _read_index(folder)["state"]
        return {key: decode_tree(state.get(key), {}) for key in ("config", "world", "step")}
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"--resume: checkpoint {folder}: {INDEX} holds no readable settings ({err})") from None


def _newest(run_dir: Path) -> Path:
    """The folder of the newest complete checkpoint; UserError when there is none (or only a pickled one)."""
    for name in READABLE:
        folder = run_dir / name
        if (folder / INDEX).exists():
            return folder
        if (folder / "state.pt").exists():
            raise UserError(f"--resume: {folder / 'state.pt'} is a pickled checkpoint of a pre-release fastkd, which "
                            f"fastkd never unpickles (that could run code); start a new run folder, or start from "
                            f"its weights with --student")
    raise UserError(f"--resume: no checkpoint in {run_dir} (expected {run_dir / CHECKPOINT}/{INDEX}); "
                    f"run without --resume to start from the beginning")


def _read_index(folder: Path) -> dict:
    """The checkpoint's index, parsed and its seal and version checked; UserError saying what is wrong."""
    where = f"--resume: checkpoint {folder}"
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"), parse_constant=reject_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"{where}: {INDEX} cannot be read ({err}); it is corrupt") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{where}: {INDEX} is not a fastkd checkpoint index (field 'format')")
    if seal_matches(index) is not True:
        raise UserError(f"{where}: {INDEX} does not match its digest (corrupted or edited); resume from an "
                        f"earlier copy or start a new run folder")
    if index.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{where}: format version {index.get('format_version')!r}, this fastkd reads {FORMAT_VERSION}")
    return index


def full_state(module: nn.Module, optimizer, config: TrainConfig, env: Env) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state; under FSDP every rank takes part in gathering it."""
    if env.world > 1 and config.distributed == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if optimizer is None:
            return get_model_state_dict(module, options=options), None
        return get_state_dict(module, optimizer, options=options)
    if not env.is_main:
        return {}, None
    return module.state_dict(), optimizer.state_dict() if optimizer is not None else None


def load_full_state(module: nn.Module, optimizer, model_state: dict, optim_state: dict, config: TrainConfig,
                    env: Env) -> None:
    if env.world > 1 and config.distributed == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True))
        return
    module.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


# what a run writes into its folder: a folder holding any of them holds a run
RUN_FILES = ("config.yaml", "metrics.jsonl", *READABLE, f".{CHECKPOINT}.tmp", "final", "tensorboard")


def lock_run(run_dir: Path) -> dict:
    """Rank 0, before --out is checked: take <out>/.lock (the folder made first if missing) so that a second run
    into the folder is refused, naming the first's pid (a dead run's lock is taken over). Returns {"made": the
    folders made}, for unlock_run."""
    check_out_folder(run_dir, "training run")   # never a lock in a cache's or an evaluation's folder
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        acquire_lock(run_dir / LOCK)
    except OSError as err:
        unlock_run(run_dir, made, held=False)
        raise UserError(f"--out {run_dir}: cannot create the run folder or its lock file {LOCK} "
                        f"({err.strerror or err}); choose another --out or fix its permissions") from None
    except CacheError:
        unlock_run(run_dir, made, held=False)
        raise UserError(f"--out {run_dir}: another run ({_lock_holder(run_dir / LOCK)}) is writing into this folder "
                        f"(lock {run_dir / LOCK}); wait for it to end or stop it, or choose another --out") from None
    return {"made": made}


def _lock_holder(path: Path) -> str:
    """Who holds the lock, for the refusal: a pid (and host, if another)."""
    try:
        holder = read_holder(path) or {}
        pid, host = int(holder["pid"]), holder.get("host")
    except (ValueError, KeyError, TypeError):
        return "a process that is taking the lock now"
    if host != socket.gethostname():
        return f"pid {pid} on host {host}; if no run is, delete the lock file"
    return f"pid {pid}"


def unlock_run(run_dir: Path, made: list[Path], held: bool = True) -> None:
    """Release lock_run's lock, then remove the folders it made if they hold nothing (a run that failed before it
    wrote anything leaves nothing behind)."""
    if held:
        release_lock(run_dir / LOCK)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return


def has_checkpoint(run_dir: Path) -> bool:
    """Whether --resume has a checkpoint to start from (or to refuse: a pickled one)."""
    return any((run_dir / name / f).exists() for name in READABLE for f in (INDEX, "state.pt"))


def how_to_continue(run_dir: Path) -> str:
    """The command that continues a run stopped now: --resume from its checkpoint, or, before the first one,
    --overwrite (a run without a checkpoint cannot be resumed, and is never replaced without being asked)."""
    if has_checkpoint(run_dir):
        return f"continue it with --resume (its checkpoint in {run_dir} is kept)"
    return (f"start it over with --overwrite: {run_dir} holds no checkpoint yet (the run stopped before its first), so "
            f"--resume has nothing to continue from")


def existing_run(run_dir: Path, config: TrainConfig) -> list[Path]:
    """The run files already in --out, checked against --resume / --overwrite before anything is loaded:
    a run is continued (--resume), deleted first (--overwrite), or refused, never mixed with a new one."""
    check_out_folder(run_dir, "training run")   # a file, or a cache's or an evaluation's folder, is refused
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if config.resume:
        if not has_checkpoint(run_dir):
            what = "holds a run that stopped before its first checkpoint" if found else "holds no run"
            raise UserError(f"--resume: {run_dir} {what} (no {run_dir / CHECKPOINT / INDEX}); start it over with "
                            f"--overwrite instead of --resume")
    elif found and not config.overwrite:
        advice = ("continue it with --resume, delete it and start over with --overwrite" if has_checkpoint(run_dir)
                  else "it stopped before its first checkpoint: delete it and start over with --overwrite")
        raise UserError(f"--out {run_dir} already holds a run ({', '.join(p.name for p in found)}); {advice}, or "
                        f"choose another --out")
    return found


def clear_run(found: list[Path]) -> None:
    """--overwrite: delete the old run's files (only those fastkd writes) before the new run writes any."""
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# What a resume may change: refused (REFUSED says why), or allowed from the checkpoint's step on with a warning.
DATA_ORDER_KEYS = ("cache", "data", "seed", "batch_size", "grad_accum", "shuffle_buffer", "group_batches",
                   "eval_sequences", "max_length", "cot", "packing")
OPTIMIZER_KEYS = ("lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps")
MODEL_KEYS = ("lora_rank", "lora_alpha", "lora_targets", "student_layers", "teacher_layers")
REFUSED = ((DATA_ORDER_KEYS + ("world",), "data-order settings", "the saved position would mean other data"),
           (OPTIMIZER_KEYS, "optimizer settings", "its optimizer state restores those and would ignore new ones"),
           (MODEL_KEYS + ("hidden_weight > 0",), "model settings", "it holds the weights of that model"))
FROM_HERE_KEYS = ("max_steps", "epochs", "schedule", "warmup_steps", "min_lr_ratio", "ce_weight", "kl_weight",
                  "hidden_weight", "temperature", "mode", "top_k", "teacher", "cross_tokenizer", "max_grad_norm",
                  "lora_dropout", "precision")


def check_resumable(saved: dict, config: TrainConfig, env: Env, run_dir: Path) -> dict:
    """Refuse to resume with settings the checkpoint fixes (REFUSED); return the FROM_HERE_KEYS that differ,
    {key: [checkpoint's, now]}, for the caller to warn about and record."""
    def settings(config: dict, world) -> dict:
        return dict(config, world=world, **{"hidden_weight > 0": bool(config.get("hidden_weight"))})  # a projector

    old = settings(saved.get("config") or {}, saved.get("world", 1))
    now = settings(asdict(config), env.world)
    for keys, what, why in REFUSED:
        diffs = [f"{key}: checkpoint {old[key]!r}, now {now[key]!r}" for key in keys if key in old and old[key] != now[key]]
        if diffs:
            raise UserError(f"--resume {run_dir}: the checkpoint was made with other {what} ({'; '.join(diffs)}), "
                            f"and {why}; resume with the same ones or start a new run folder")
    if config.max_steps is not None and config.max_steps < (saved.get("step") or 0):
        raise UserError(f"--resume {run_dir}: --max-steps {config.max_steps} is below the checkpoint's step "
                        f"{saved['step']}; give at least {saved['step']}")
    return {key: [old[key], now[key]] for key in FROM_HERE_KEYS if key in old and old[key] != now[key]}


def save_final(module: StudentWithLoss, tokenizer, out: Path, extra: dict, model_state: dict) -> Path:
    """save_pretrained the student + its tokenizer (loadable by plain transformers), and the projector."""
    try:
        _write_final(module, tokenizer, out, extra, model_state)
    except Exception as err:  # noqa: BLE001 - disk full: an OSError, safetensors' or tokenizers' own error
        if not (isinstance(err, OSError) or type(err).__name__ in ("SafetensorError", "Exception")):
            raise
        raise UserError(f"cannot write the final model {out}: {str(err).splitlines()[0]}; free space, then "
                        f"{how_to_continue(out.parent)}") from None
    return out


def _write_final(module: StudentWithLoss, tokenizer, out: Path, extra: dict, model_state: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if hasattr(module.student, "peft_config"):  # LoRA: the adapter (PeftModel.from_pretrained(base, out) loads it)
        module.student.save_pretrained(out)
        merged = copy.deepcopy(module.student).merge_and_unload()  # <out>/merged: a plain transformers model
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
    else:
        student_state = {k[len("student."):]: v for k, v in model_state.items() if k.startswith("student.")}
        module.student.save_pretrained(out, state_dict=student_state)
    tokenizer.save_pretrained(out)
    projector = {k[len("projector."):]: v.detach().cpu().contiguous() for k, v in model_state.items()
                 if k.startswith("projector.")}
    if projector:
        save_file(projector, str(out / "projector.safetensors"))
    (out / "fastkd_train.json").write_text(json.dumps(extra, indent=2, default=str))

