"""Where fastkd finds what it is not handed as a path: the models shipped inside the package,
BIG-Bench Hard, and the user's data and cache folders; and what a model name given by a user means."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fastkd.errors import UserError

PACKAGE = Path(__file__).resolve().parent
EMBEDDED_TEACHER = PACKAGE / "assets" / "teacher"
# names that stand for a model shipped with (or built by) fastkd, usable wherever a model is asked for
EMBEDDED_NAMES = ("embedded", "embedded-teacher", "embedded-student")
BBH_ENV = "FASTKD_BBH_DIR"
HOME_ENV = "FASTKD_HOME"
BBH_HUB_DATASET = "lukaemon/bbh"
BBH_DIR_LOOKUP = ("$FASTKD_BBH_DIR, then <user data dir>/bbh (~/.local/share/fastkd/bbh), "
                  "then a source checkout's ../shared/bbh")


def user_data_dir() -> Path:
    """$FASTKD_HOME, else $XDG_DATA_HOME/fastkd, else ~/.local/share/fastkd: data a user puts there once (BBH)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "fastkd"


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/fastkd or ~/.cache/fastkd: things fastkd can rebuild (the embedded student)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fastkd"


def source_checkout() -> Path | None:
    """The project folder when fastkd runs from its source checkout (editable install), else None."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "kernels").is_dir() else None


class BBHError(UserError):
    """BBH data that is missing or does not match what was asked for."""


def bbh_get_hint() -> str:
    return (f"get it once with `git clone https://github.com/suzgunmirac/BIG-Bench-Hard {user_data_dir() / 'bbh'}` "
            f"(found there from then on), or pass its folder with --bbh-dir or ${BBH_ENV}, or go online so the "
            f"hub copy ({BBH_HUB_DATASET}) can load")


def bbh_candidates(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Folders to look in, first wins: the option, $FASTKD_BBH_DIR, <user data dir>/bbh, and from a
    source checkout its ../shared/bbh."""
    checkout = source_checkout()
    beside = checkout.parent / "shared" / "bbh" if checkout else None
    found = (explicit, os.environ.get(BBH_ENV), user_data_dir() / "bbh", beside)
    return [Path(p).expanduser() for p in found if p]


def bbh_task_file(root: Path, task: str) -> Path | None:
    """A task's items: <root>/bbh/<task>.json as in the authors' repository, or <root>/<task>.json."""
    return next((p for p in (Path(root) / "bbh" / f"{task}.json", Path(root) / f"{task}.json") if p.is_file()), None)


def resolve_bbh_dir(explicit: str | os.PathLike | None = None, tasks=()) -> Path | None:
    """The first candidate folder holding every asked-for task file (any when none is named), else None; an explicit
    folder that lacks them is an error, so a typo does not fall through to another copy."""
    for i, root in enumerate(bbh_candidates(explicit)):
        if tasks:
            missing = [t for t in tasks if bbh_task_file(root, t) is None]
        else:
            missing = [] if any(root.glob("*.json")) or any(root.glob("bbh/*.json")) else ["any task"]
        if not missing:
            return root
        if i == 0 and explicit:
            more = " ..." if len(missing) > 5 else ""
            raise BBHError(f"{root}: no BBH task files for {', '.join(missing[:5])}{more} "
                            f"(looked for {root}/bbh/<task>.json and {root}/<task>.json); {bbh_get_hint()}")
    return None


# the files that mark what a fastkd output folder holds (one kind per folder): cache_tools' MANIFEST, SHARD_DIR and
# UNIT_DIR; fastkd.checkpoint's checkpoint folders, final/ and metrics.jsonl; fastkd.bbh_results' per-run files
OUTPUT_MARKERS = {"teacher cache": ("manifest.json", "shards", "units"),
                  "training run": ("checkpoint", ".checkpoint.old", "final", "metrics.jsonl"),
                  "BBH evaluation": ("results.json", "items.jsonl")}


def check_out_folder(out: str | os.PathLike, kind: str) -> Path:
    """--out for one kind of output (a key of OUTPUT_MARKERS): refused when it is a file or a folder holding
    another kind; a folder of unrelated files is fine."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the {kind}")
    for other, markers in OUTPUT_MARKERS.items():
        found = [m for m in markers if other != kind and os.path.lexists(folder / m)]
        if found:
            raise UserError(f"--out {out} holds a {other} ({', '.join(found)}), not a {kind}: one folder holds one "
                            f"kind of output; choose another --out")
    return folder


def resolve_model(name: str | os.PathLike, role: str = "model", need: str = "model") -> str:
    """An embedded name, an existing local folder (checked to hold a model or tokenizer, as `need` says) or a hub id;
    a name that can only be a local path and does not exist is an error saying so, not the hub's repo-id rules."""
    text = os.fspath(name)
    if text in EMBEDDED_NAMES:
        return str(embedded_student() if text == "embedded-student" else EMBEDDED_TEACHER)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{role} {text!r} is a file; give the folder a model was saved to with save_pretrained")
        wanted = ("config.json",) if need == "model" else ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                             "tokenizer.model")
        if not any((path / f).is_file() for f in wanted):
            raise UserError(f"{role} {text!r} is a folder without {' or '.join(wanted)}, so it holds no "
                            f"{'model' if need == 'model' else 'tokenizer'} saved with save_pretrained; "
                            f"give the folder that does, or a hub id")
        return str(path)
    if _looks_local(text):
        raise UserError(f"{role} {text!r}: no such folder (and not a hub id, which is 'name' or 'org/name'); "
                        f"check the path, or use 'embedded' for the teacher shipped with fastkd")
    return text


def _looks_local(text: str) -> bool:
    """A name that cannot be a hub id ('name' or 'org/name' of letters, digits, -_.), or whose folder part exists."""
    if text.startswith(("/", "./", "../", "~")) or "\\" in text or text.endswith("/") or text.count("/") > 1:
        return True
    head, sep, _ = text.partition("/")
    return bool(sep) and Path(head).is_dir()


def embedded_student(seed: int = 0) -> Path:
    """A randomly initialised 0.55M-parameter Llama sharing the embedded teacher's tokenizer (the
    demo's student), built once into the user cache folder; the same weights for the same seed."""
    from fastkd.tiny import make_student_init

    folder = user_cache_dir() / f"embedded-student-seed{seed}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        make_student_init(EMBEDDED_TEACHER, tmp, seed)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
