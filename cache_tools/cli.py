"""`fastkd cache inspect | verify | stats`: look at a teacher cache without writing to it."""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from .codecs import spell_codec
from .reader import CacheReader, load_manifest
from .stats import METRICS, QUANTILES, cache_stats
from .storage import open_storage
from .verify import verify_cache

SUMMARY_KEYS = ("teacher", "tokenizer", "template", "k", "mode", "sample_n", "capture", "layers", "hidden_widths",
                "codecs", "max_length")   # shown as the manifest holds them


def add_inspect_arguments(parser) -> None:
    parser.add_argument("cache", help="cache folder (holds manifest.json and shards/), or an fsspec URL (s3://, gs://, "
                                      "hf://, file://)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def cache_summary(root) -> dict:
    """Counts, bytes per loss position by part, and the teacher/tokenizer/template of a cache (its
    manifest, checked as every reader checks it; the shards are not opened)."""
    storage = open_storage(root)
    m = load_manifest(storage)
    c = m["counts"]
    parts = c["payload_bytes"]   # a cache with no shard yet may lack a part
    positions = c["loss_positions"]
    logits = parts.get("topk", 0) + parts.get("rows", 0)

    def per(x):
        return x / positions if positions else None

    return {
        "cache": storage.label, "format_version": m["format_version"], "complete": m["complete"],
        **{key: m.get(key) for key in SUMMARY_KEYS}, "shards": len(m["shards"]),
        **{key: c[key] for key in ("sequences", "tokens", "loss_positions", "bytes")},
        "bytes_per_loss_position": {
            "total": per(c["bytes"]), "logits": per(logits), "hidden": per(parts.get("hidden", 0)),
            "hidden_by_layer": {layer: per(v) for layer, v in c["hidden_bytes"].items()},
            "tokens": per(parts.get("tokens", 0)),
            "index_and_headers": per(c["bytes"] - logits - parts.get("hidden", 0) - parts.get("tokens", 0)),
        },
        "mean_loss_positions_per_sequence": positions / c["sequences"] if c["sequences"] else None,
        "summary": m["summary"],
    }


def _fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def _brief(value, width: int = 72) -> str:
    """A manifest value on one short line: digests cut to their first 12 hex digits (--json has them whole)."""
    if isinstance(value, str) and len(value) >= 32 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    text = value if isinstance(value, str) and value.isprintable() else json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def identity_lines(title: str, ident) -> list[str]:
    """An identity object (the tokenizer's) as one line per field, nested objects as dotted names; fields
    that are null inside a nested object (unset special tokens) are left out."""
    if not isinstance(ident, dict):
        return [f"{title:<16}{_brief(ident)}"]
    rows = []

    def walk(prefix: str, obj: dict) -> None:
        for key, value in obj.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                walk(name + ".", value)
            elif value is not None or not prefix:
                rows.append((name, _brief(value)))
    walk("", ident)
    width = max((len(name) for name, _ in rows), default=0) + 2
    return [title] + [f"  {name:<{width}}{value}" for name, value in rows]


def run_inspect(args) -> int:
    s = cache_summary(args.cache)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    b = s["bytes_per_loss_position"]
    teacher = s["teacher"] if not isinstance(s["teacher"], dict) else s["teacher"].get("path", s["teacher"])
    layers = ", ".join(f"{l} (width {w})" for l, w in zip(s["layers"], s["hidden_widths"])) or "none"
    codecs = s["codecs"]
    lines = [
        f"cache           {s['cache']}  (format {s['format_version']}, "
        f"{'complete' if s['complete'] else 'INCOMPLETE'})",
        f"teacher         {teacher}",
        *identity_lines("tokenizer", s["tokenizer"]),
        f"template        {json.dumps(s['template'])}",
        f"signal          mode {s['mode']}, k {s['k']}"
        + (f", sample_n {s['sample_n']}" if s["mode"] == "sample" else "")
        + (f", teacher kept at {s['capture']['share']:.0%} of loss positions (by {s['capture']['by']})"
           if s["capture"] else ""),
        f"hidden layers   {layers}",
        f"codecs          logits {spell_codec(codecs['topk'])}, hidden {spell_codec(codecs['hidden'])}",
        f"shards          {s['shards']:,}",
        f"sequences       {s['sequences']:,}",
        f"tokens          {s['tokens']:,}",
        f"loss positions  {s['loss_positions']:,}  ({_fmt(s['mean_loss_positions_per_sequence'])} per sequence)",
        f"size            {_human(s['bytes'])}",
        "bytes per loss position:",
        f"  total         {_fmt(b['total'])}",
        f"  logits        {_fmt(b['logits'])}",
        f"  hidden        {_fmt(b['hidden'])}"
        + "".join(f"   [layer {l}: {_fmt(v)}]" for l, v in b["hidden_by_layer"].items()),
        f"  tokens        {_fmt(b['tokens'])}",
        f"  index/headers {_fmt(b['index_and_headers'])}",
    ]
    print("\n".join(lines))
    return 0


def add_verify_arguments(parser) -> None:
    add_inspect_arguments(parser)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar (on stderr; never with --json)")


def _progress(args, desc: str, unit: str):
    return None if not args.progress or args.json else (lambda xs: tqdm(xs, desc=desc, unit=unit, file=sys.stderr))


def run_verify(args) -> int:
    report = verify_cache(args.cache, progress=_progress(args, "verify", "shard"))
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        for p in report.problems:
            what = f"shard {p.shard}" if p.shard.startswith("shards/") else p.shard   # or teacher_tokenizer/<name>
            print(f"BAD {args.cache}: {what}" + (f" block {p.block}" if p.block is not None else "") + f": {p.message}")
        state = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
        print(f"{state}: {report.shards} shards, {report.blocks} blocks, {report.sequences:,} sequences, "
              f"{report.loss_positions:,} loss positions checked in {args.cache}")
    return 0 if report.ok else 1


def _positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse names the option in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_stats_arguments(parser) -> None:
    add_verify_arguments(parser)
    parser.add_argument("--max-sequences", type=_positive_int, default=None, metavar="N",
                        help="only the first N sequences (default: all)")


def run_stats(args) -> int:
    reader = CacheReader(args.cache, layers=[])  # hidden states are not needed
    s = cache_stats(reader, args.max_sequences, _progress(args, "stats", "seq"))
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    kept = "" if s["loss_positions_with_teacher"] == s["loss_positions"] else \
        f" ({s['loss_positions_with_teacher']:,} hold the teacher: the metrics are over those)"
    print(f"{s['cache']}: {s['sequences']:,} sequences, {s['loss_positions']:,} loss positions{kept}, "
          f"mode {s['mode']}, k {s['k']}, vocab {s['vocab_size']:,}; entropies in nats")
    print(f"{'metric':<14}{'mean':>9}" + "".join(f"{'q' + format(q, 'g'):>9}" for q in QUANTILES))
    for name in METRICS:
        row = s["metrics"][name]
        print(f"{name:<14}{_fmt(row['mean'], 4):>9}"
              + "".join(f"{_fmt(row['quantiles'][str(q)], 4):>9}" for q in QUANTILES))
    return 0
