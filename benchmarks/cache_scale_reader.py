"""Reader throughput from a URL vs a local folder: the same cache read from a folder (local file reads),
file:// and memory:// (fsspec), all by byte ranges through the one read path, and, when moto[server] and s3fs are installed, s3://
on a loopback moto server; every read checks every digest (the default).

    python benchmarks/cache_scale_reader.py [--sequences 64] [--width 1024] [--reps 3]

Two access patterns per source: `stream` (cache order, the read-ahead fetches the next blocks)
and `shuffled` (whole blocks in a random order, as a training epoch reads them, no read-ahead
hint). `reader_rows()` returns the table as dicts for benchmarks/cache_scale.py.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_io import make_sequences  # noqa: E402  (benchmarks/ is not a package)

from fastkd.cache_tools import CacheReader, CacheWriter  # noqa: E402


def write_cache(root: Path, sequences: int, width: int) -> int:
    """A synthetic cache (700 tokens, 500 loss positions per sequence, k=64, one hidden layer);
    returns its loss positions."""
    seqs = make_sequences(sequences, width)
    settings = {"tokenizer": {"vocab_size": 151_936}, "k": 64, "layers": [10] if width else [],
                "hidden_widths": [width] if width else []}
    with CacheWriter(root, settings, sequences_per_shard=16) as writer:
        for s in seqs:
            writer.add(s)
    return sum(int(s.loss_mask.sum()) for s in seqs)


def start_moto():
    """(storage options, stop function) for moto's S3 server in its own process on loopback (so
    its request handling does not share this process's GIL), or None when not installed."""
    import importlib.util
    import socket
    import subprocess

    if not all(importlib.util.find_spec(m) for m in ("boto3", "s3fs", "moto", "flask")):
        return None
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="fastkd-bench")
    options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
               "client_kwargs": {"region_name": "us-east-1"}}

    def stop():
        server.terminate()
        server.wait(timeout=10)
    return options, stop


def _read(source: str, options: dict | None, pattern: str, read_ahead) -> tuple[float, float, int, int]:
    """(open seconds, read seconds, bytes fetched, requests) of one full read of the cache."""
    t = time.perf_counter()
    reader = CacheReader(source, storage_options=options, read_ahead=read_ahead)
    opened = time.perf_counter() - t
    t = time.perf_counter()
    if pattern == "stream":
        for _ in reader:
            pass
    else:
        table = reader.block_table()
        for j in np.random.default_rng(0).permutation(len(table)):
            reader.read_block(table[j][0], table[j][1])
    seconds = time.perf_counter() - t
    storage = reader.storage
    return opened, seconds, storage.bytes_read, storage.requests


def reader_rows(sequences: int = 64, width: int = 1024, reps: int = 3, s3: bool = True,
                read_ahead=None, patterns=("stream", "shuffled")) -> list[dict]:
    """Rows {source, pattern, positions/s, MB/s, ratio vs local folder, open s, requests}: one cache
    read whole from each source, median of `reps`; MB/s counts the cache's shard bytes (what a
    reader must fetch), the ratio is this source's positions/s over the local folder's."""
    import fsspec

    tmp = Path(tempfile.mkdtemp(prefix="fastkd-reader-bench-"))
    root = tmp / "cache"
    positions = write_cache(root, sequences, width)
    cache_bytes = sum(p.stat().st_size for p in (root / "shards").iterdir())
    memory = f"/bench-{uuid.uuid4().hex[:8]}/cache"
    fsspec.filesystem("memory").put(str(root), memory, recursive=True)
    sources = [("local folder", str(root), None), ("file://", f"file://{root}", None),
               ("memory://", f"memory://{memory.lstrip('/')}", None)]
    moto = start_moto() if s3 else None
    if moto is not None:
        import s3fs

        s3fs.S3FileSystem(**moto[0]).put(str(root), "fastkd-bench/cache", recursive=True)
        sources.append(("s3:// (moto, loopback)", "s3://fastkd-bench/cache", moto[0]))
    rows = []
    try:
        for pattern in patterns:
            base = None
            for label, url, options in sources:
                runs = [_read(url, options, pattern, read_ahead) for _ in range(reps)]
                seconds = statistics.median(r[1] for r in runs)
                rate = positions / seconds
                base = base or rate
                rows.append({"source": label, "pattern": pattern, "positions/s": rate,
                             "MB/s": cache_bytes / seconds / 1e6, "ratio vs local folder": rate / base,
                             "open s": statistics.median(r[0] for r in runs),
                             "requests": runs[-1][3] if url.count("://") else None})
    finally:
        if moto is not None:
            moto[1]()
        fsspec.filesystem("memory").rm(memory, recursive=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'source':<24}{'pattern':<10}{'positions/s':>13}{'MB/s':>9}{'vs local':>10}{'open s':>9}{'requests':>10}"]
    for r in rows:
        lines.append(f"{r['source']:<24}{r['pattern']:<10}{r['positions/s']:>13,.0f}{r['MB/s']:>9.1f}"
                     f"{r['ratio vs local folder']:>10.3f}{r['open s']:>9.3f}{'-' if r['requests'] is None else r['requests']:>10}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=64, help="sequences in the cache (16 per shard)")
    ap.add_argument("--width", type=int, default=1024, help="hidden width (0: no hidden states)")
    ap.add_argument("--reps", type=int, default=3, help="full reads per source (median)")
    ap.add_argument("--read-ahead", default=None, help="read-ahead budget of the URL readers, e.g. 16MiB (default: 16 MiB for s3://, off for file:// and memory://)")
    ap.add_argument("--no-s3", action="store_true", help="skip the moto S3 server even when installed")
    args = ap.parse_args()
    rows = reader_rows(args.sequences, args.width, args.reps, s3=not args.no_s3, read_ahead=args.read_ahead)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
