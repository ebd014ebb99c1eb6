"""Cache write and read throughput (positions/s) and size, on synthetic sequences.

    python benchmarks/cache_io.py [--sequences 32] [--width 2048]

Each sequence: 700 tokens with 500 loss positions, k=64, V=151,936, one hidden layer stored
with the format's default codecs (random data: an upper bound on hidden bytes, real activations
compress better). Every read runs with the digests checked (the default) and unchecked
(verify=False), alternating, median of --reps; the last column is checked / unchecked time.
"""

import argparse
import statistics
import tempfile
import time

import numpy as np

from fastkd.cache_tools import CachedSequence, CacheReader, CacheWriter


def make_sequences(count: int, width: int, vocab: int = 151_936, k: int = 64, length: int = 700, loss: int = 500, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        mask = np.zeros(length, np.uint8)
        mask[length - loss:] = 1
        logprobs = np.sort(np.log(rng.dirichlet(np.ones(k * 4), size=loss)[:, :k]), axis=1)[:, ::-1].astype(np.float32)
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(loss)])
        tail = (1 - np.exp(logprobs.astype(np.float64)).sum(1)).astype(np.float32)
        hidden = {10: rng.standard_normal((loss, width)).astype(np.float32)} if width else {}
        out.append(CachedSequence(i, "t", rng.integers(0, vocab, length).astype(np.int32), mask, ids, logprobs, tail, None, hidden))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--width", type=int, default=2048, help="hidden width (0: no hidden states)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each read (median)")
    args = ap.parse_args()
    seqs = make_sequences(args.sequences, args.width)
    settings = {"tokenizer": {"vocab_size": 151_936}, "k": 64, "layers": [10] if args.width else [],
                "hidden_widths": [args.width] if args.width else []}
    positions = sum(int(s.loss_mask.sum()) for s in seqs)
    root = tempfile.mkdtemp()
    t = time.perf_counter()
    with CacheWriter(root, settings, sequences_per_shard=16) as writer:
        for s in seqs:
            writer.add(s)
    write_s = time.perf_counter() - t
    print(f"{'what':<28}{'positions/s':>14}{'unchecked':>14}{'time ratio':>12}")
    print(f"{'write':<28}{positions / write_s:>14,.0f}")

    def stream(layers, verify):
        for _ in CacheReader(root, layers=layers, verify=verify):
            pass

    def random_reads(layers, verify):
        reader = CacheReader(root, layers=layers, verify=verify)
        for i in np.random.default_rng(1).permutation(len(reader)):
            reader[int(i)]

    for run, layers, label in [(stream, None, "stream read, with hidden"), (stream, [], "stream read, logits only"),
                               (random_reads, None, "random read, with hidden")]:
        times = {True: [], False: []}
        for _ in range(args.reps):
            for verify in (True, False):
                t = time.perf_counter()
                run(layers, verify)
                times[verify].append(time.perf_counter() - t)
        checked, unchecked = statistics.median(times[True]), statistics.median(times[False])
        print(f"{label:<28}{positions / checked:>14,.0f}{positions / unchecked:>14,.0f}{checked / unchecked:>12.3f}")
    reader = CacheReader(root)
    print(f"bytes per loss position: {reader.manifest['counts']['bytes'] / positions:,.1f}")


if __name__ == "__main__":
    main()
