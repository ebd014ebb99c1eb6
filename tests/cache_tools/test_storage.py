"""Caches read from fsspec URLs (memory://, file://, and s3:// on a loopback moto server when it is
installed): the same sequences as the local folder, every digest still checked, a resume that
fetches only what it reads, a read-ahead that stays within its byte budget."""

import logging
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import fsspec
from fastkd.cache_tools import CacheError, CacheReader, CorruptCacheError
from fastkd.cache_tools.shard_read import FIRST_READ
from fastkd.cache_tools.storage import LocalStorage, RemoteStorage, read_ahead_bytes, refuse_url_for_writing
from fastkd.loader import CacheSource, PlanMaker, make_loader
from helpers import tensor_ranges, write_cache



def same_sequences(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.record_index, x.task) == (y.record_index, y.task)
        for name in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
        assert (x.counts is None) == (y.counts is None)
        assert sorted(x.hidden) == sorted(y.hidden)
        for layer in x.hidden:
            np.testing.assert_array_equal(x.hidden[layer], y.hidden[layer])


@pytest.fixture
def cache(tmp_path):
    return write_cache(tmp_path / "cache", count=30)


@pytest.fixture
def memory_url(cache):
    """The cache copied into fsspec's in-memory file system; removed afterwards."""
    fs = fsspec.filesystem("memory")
    path = f"/bucket-{uuid.uuid4().hex[:8]}/cache"
    fs.put(str(cache), path, recursive=True)
    yield f"memory://{path.lstrip('/')}"
    fs.rm(path, recursive=True)


def memory_path(url: str, name: str) -> str:
    return "/" + url.removeprefix("memory://") + "/" + name


@pytest.fixture(params=["memory", "file"])
def url(request, cache, memory_url):
    return memory_url if request.param == "memory" else f"file://{cache}"


# ----------------------------------------------------------------------------- same bytes, same checks

def test_urls_read_exactly_the_local_sequences(cache, url):
    local = CacheReader(cache)
    remote = CacheReader(url)
    assert isinstance(remote.storage, RemoteStorage) and isinstance(local.storage, LocalStorage)   # one read path
    assert remote.manifest == local.manifest and len(remote) == len(local)
    assert remote.block_table() == local.block_table()
    same_sequences(list(local), list(remote))
    order = np.random.default_rng(0).permutation(len(local))  # random access, block hopping
    same_sequences([local[int(i)] for i in order], [remote[int(i)] for i in order])
    logits_only = CacheReader(url, layers=[], verify=False)
    assert all(not s.hidden for s in logits_only)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_from_a_url_equal_the_local_ones(cache, memory_url, workers):
    def batches(path):
        source = CacheSource(path)
        plans = PlanMaker(source.lengths, source.shards, 4, seed=3)
        return [(e, i, [(b.record_indices, b.topk_logprobs, b.hidden[1]) for b in micro])
                for e, i, micro in make_loader(source, plans, 0, epochs=1, num_workers=workers)]

    local, remote = batches(cache), batches(memory_url)
    assert len(local) == len(remote) > 0
    for (e1, i1, m1), (e2, i2, m2) in zip(local, remote):
        assert (e1, i1) == (e2, i2)
        for (r1, lp1, h1), (r2, lp2, h2) in zip(m1, m2):
            assert r1 == r2 and torch.equal(lp1, lp2) and torch.equal(h1, h2)


def test_flipped_block_byte_on_the_memory_fs_is_refused_naming_shard_and_block(cache, memory_url):
    fs = fsspec.filesystem("memory")
    name = "shards/shard-00001.safetensors"
    lo, hi = tensor_ranges(cache / name)["block.00002.topk"]
    data = bytearray(fs.cat_file(memory_path(memory_url, name)))
    data[(lo + hi) // 2] ^= 0x20
    fs.pipe_file(memory_path(memory_url, name), bytes(data))
    reader = CacheReader(memory_url)  # header and index are untouched: it opens
    want = "shard shards/shard-00001.safetensors block 2 fails its digest"
    with pytest.raises(CorruptCacheError, match=want) as err:
        list(reader)
    assert (err.value.shard, err.value.block) == (name, 2)
    with pytest.raises(CorruptCacheError, match=want):
        CacheReader(memory_url)[22]  # shard 1 holds 12..23, block 2 is 20..23
    bad = CacheReader(memory_url).find_corrupt_blocks()
    assert [(r, "block 2" in m) for r, m in bad] == [(range(20, 24), True)]
    with pytest.raises(CorruptCacheError, match="block 2"):  # the training loader stops on it too
        list(make_loader(CacheSource(memory_url), PlanMaker(*_plan_args(memory_url)), 0, epochs=1))


def test_cache_verify_and_inspect_take_a_url(cache, memory_url, capsys):
    from fastkd.cli import main

    assert main(["cache", "verify", memory_url]) == 0
    assert main(["cache", "inspect", memory_url]) == 0
    assert "30" in capsys.readouterr().out
    fs = fsspec.filesystem("memory")
    name = "shards/shard-00001.safetensors"
    lo, hi = tensor_ranges(cache / name)["block.00001.topk"]
    data = bytearray(fs.cat_file(memory_path(memory_url, name)))
    data[lo + 3] ^= 0x01
    fs.pipe_file(memory_path(memory_url, name), bytes(data))
    assert main(["cache", "verify", memory_url]) == 1
    out = capsys.readouterr()
    assert "shards/shard-00001.safetensors block 1" in out.out + out.err


def _plan_args(url):
    source = CacheSource(url)
    return source.lengths, source.shards, 4, 0


def test_header_shard_size_and_manifest_damage_on_the_memory_fs_are_refused(cache, memory_url):
    fs = fsspec.filesystem("memory")
    name = "shards/shard-00000.safetensors"
    path = memory_path(memory_url, name)
    original = fs.cat_file(path)
    damaged = bytearray(original)
    damaged[20] ^= 0x01  # inside the JSON header
    fs.pipe_file(path, bytes(damaged))
    with pytest.raises(CorruptCacheError, match="shard shards/shard-00000.safetensors: header fails its sha256"):
        CacheReader(memory_url)
    fs.pipe_file(path, original[:-5])
    with pytest.raises(CorruptCacheError, match="shard-00000.safetensors: file has .* bytes, manifest.json says"):
        CacheReader(memory_url)
    fs.pipe_file(path, original)
    manifest = memory_path(memory_url, "manifest.json")
    text = fs.cat_file(manifest).decode()
    fs.pipe_file(manifest, text.replace('"complete": true', '"complete": false').encode())
    with pytest.raises(CacheError, match="does not match its digest"):
        CacheReader(memory_url)
    fs.rm(manifest)
    with pytest.raises(CacheError, match="no manifest.json"):
        CacheReader(memory_url)


# ----------------------------------------------------------------------------- resume and read-ahead

class RangeLog:
    """Records every (file, offset, length) a RemoteStorage fetches."""

    def __init__(self, storage):
        self.calls = []
        self.inside = False
        read_range, read_ranges = storage.read_range, storage.read_ranges

        def one(name, offset, length):
            if not self.inside:
                self.calls.append((name, offset, length))
            return read_range(name, offset, length)

        def many(name, ranges):
            self.calls.extend((name, o, n) for o, n in ranges)
            self.inside = True
            try:
                return read_ranges(name, ranges)
            finally:
                self.inside = False
        storage.read_range, storage.read_ranges = one, many


def block_of_range(cache: Path, name: str, offset: int) -> int | None:
    for tensor, (lo, hi) in tensor_ranges(cache / name).items():
        if tensor.startswith("block.") and lo <= offset < hi:
            return int(tensor.split(".")[1])
    return None


def test_resume_mid_epoch_fetches_only_the_blocks_it_still_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_CACHE_READ_AHEAD", "0")  # count exactly what the plan asks for
    cache = write_cache(tmp_path / "cache", count=96)   # 24 blocks of 4
    fs = fsspec.filesystem("memory")
    path = f"/resume-{uuid.uuid4().hex[:8]}/cache"
    fs.put(str(cache), path, recursive=True)
    memory_url = f"memory://{path.lstrip('/')}"
    local = CacheSource(cache)
    plans = PlanMaker(local.lengths, local.shards, 4, seed=1, shuffle_buffer=4, group_batches=1)
    plan = plans(0)
    start = len(plan) // 2
    source = CacheSource(memory_url)
    opened = source.reader.storage.bytes_read
    log = RangeLog(source.reader.storage)
    resumed = [b.record_indices for _, _, micro in make_loader(source, plans, 0, epochs=1, start=start)
               for b in micro]
    full = [b.record_indices for _, _, micro in make_loader(local, plans, 0, epochs=1) for b in micro]
    assert resumed == full[len(full) - len(resumed):] and len(resumed) == len(plan) - start

    fetched = {(name, block_of_range(cache, name, offset)) for name, offset, _ in log.calls}
    reader = CacheReader(cache)
    needed = set()
    for batch in plan[start:]:
        for p in batch:
            shard, block, _ = reader.locate(int(p))
            needed.add((reader.manifest["shards"][shard]["file"], block))
    assert fetched == needed                  # no block of the finished half, no header again
    assert len(log.calls) == len(needed)      # one range request per block
    all_block_bytes = sum(hi - lo for entry in reader.manifest["shards"]
                          for t, (lo, hi) in tensor_ranges(cache / entry["file"]).items() if t.startswith("block."))
    assert sum(n for _, _, n in log.calls) < all_block_bytes
    assert len(needed) < len(reader.blocks()) * 0.75   # the blocks of the first half are not fetched
    # opening: one listing, the manifest, one range per shard (header + index, small shards whole)
    assert source.reader.storage.requests - len(log.calls) == 2 + reader.num_shards
    assert opened <= len(Path(cache, "manifest.json").read_bytes()) + sum(min(e["bytes"], FIRST_READ)
                                                                          for e in reader.manifest["shards"])
    fs.rm(path, recursive=True)


def block_bytes(reader: CacheReader) -> list[int]:
    return [reader._block_item(shard, block)[1] for shard, block, _ in reader.block_table()]


@pytest.mark.parametrize("blocks_worth", [0.5, 1, 2.5, 100])
def test_read_ahead_never_holds_more_than_its_budget(memory_url, cache, blocks_worth):
    probe = CacheReader(memory_url, read_ahead=0)
    sizes = block_bytes(probe)
    budget = int(blocks_worth * max(sizes))
    reader = CacheReader(memory_url, read_ahead=budget)
    ahead = reader.read_ahead
    held = []
    want = ahead.want

    def watched(items):
        want(items)
        held.append(ahead.held)
    ahead.want = watched
    same_sequences(list(CacheReader(cache)), list(reader))
    assert ahead.peak <= budget and max(held) <= budget
    if blocks_worth >= 1:
        assert ahead.hits >= len(sizes) - 2   # a streaming read is served from the read-ahead
    else:
        assert ahead.hits <= sum(size <= budget for size in sizes)  # a block over the budget is read on the spot
    # announced order (a shuffled plan): fetched ahead in that order, still within the budget
    order = [(s, b) for s, b, _ in reader.block_table()]
    order = [order[i] for i in np.random.default_rng(2).permutation(len(order))]
    reader = CacheReader(memory_url, read_ahead=budget)
    reader.expect(order)
    got = [reader.read_block(s, b) for s, b in order]
    local = CacheReader(cache)
    same_sequences([x for seqs in got for x in seqs], [x for s, b in order for x in local.read_block(s, b)])
    assert reader.read_ahead.peak <= budget
    if blocks_worth >= 1:
        assert reader.read_ahead.hits >= len(order) - 1


def test_read_ahead_budget_from_the_environment(monkeypatch):
    assert read_ahead_bytes(1000) == 1000
    monkeypatch.setenv("FASTKD_CACHE_READ_AHEAD", "16MiB")
    assert read_ahead_bytes() == 16 << 20
    monkeypatch.setenv("FASTKD_CACHE_READ_AHEAD", "lots")
    with pytest.raises(CacheError, match="FASTKD_CACHE_READ_AHEAD='lots': expected a byte count"):
        read_ahead_bytes()


# ----------------------------------------------------------------------------- messages

def test_a_scheme_without_its_package_names_the_package(monkeypatch):
    def missing(protocol):
        raise ImportError("Please install gcsfs to access Google Storage")
    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(CacheError, match=r"^cache gs://b/c: gs:// needs the package gcsfs: pip install gcsfs"):
        CacheReader("gs://b/c")
    monkeypatch.undo()
    with pytest.raises(CacheError, match="fsspec knows no file system for nosuch://"):
        CacheReader("nosuch://b/c")
    with pytest.raises(CacheError, match="no manifest.json"):
        CacheReader(f"memory://nothing-{uuid.uuid4().hex[:6]}/here")


def test_writers_refuse_a_url(tmp_path, monkeypatch):
    from fastkd.cache_stage import cache_teacher
    from fastkd.cache_tools import CacheWriter
    from helpers import synthetic_settings

    refuse_url_for_writing("runs/cache")
    with pytest.raises(CacheError, match="cache-teacher --out s3://b/c: a cache is written to a local folder"):
        refuse_url_for_writing("s3://b/c")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CacheError, match="not a URL"):
        CacheWriter("s3://bucket/cache", synthetic_settings())
    with pytest.raises(CacheError, match="not a URL"):  # before any model or data is opened
        cache_teacher(dict(teacher="no-such-teacher", data="no-such-data.jsonl", out="gs://bucket/cache",
                           progress=False))
    assert not any(tmp_path.iterdir())  # no local folder named after the URL


def test_a_shuffled_training_epoch_is_fetched_ahead(cache, memory_url):
    """The loader announces each epoch's block order to a remote reader, so shuffled plans are read ahead too."""
    from fastkd.loader import CacheSource, PlanMaker, make_loader

    source = CacheSource(memory_url)
    source.reader.read_ahead.budget = 1 << 30  # room for every block
    plans = PlanMaker(source.lengths, source.shards, 4, seed=5, shuffle_buffer=8)
    got = [r for _, _, micro in make_loader(source, plans, 0, epochs=1) for b in micro for r in b.record_indices]
    local = CacheSource(cache)
    want = [r for _, _, micro in make_loader(local, plans, 0, epochs=1) for b in micro for r in b.record_indices]
    assert got == want
    ahead = source.reader.read_ahead
    assert ahead.hits >= len(source.shards) - 1 and ahead.misses <= 1


# ----------------------------------------------------------------------------- training from a URL

def _train(**overrides):
    from fastkd.train_config import TrainConfig
    from fastkd.trainer import train

    torch.set_num_threads(1)
    return train(TrainConfig.make(overrides={"progress": False, "tensorboard": False, "batch_size": 4, "epochs": 1,
                                        "eval_sequences": 4, "save_final": False, **overrides}))


def test_train_from_a_memory_url_equals_training_from_the_folder(tmp_path, tiny_tokenizer, student):
    cache = write_cache(tmp_path / "cache", tiny_tokenizer)
    fs = fsspec.filesystem("memory")
    path = f"/train-{uuid.uuid4().hex[:8]}/cache"
    fs.put(str(cache), path, recursive=True)
    local = _train(cache=str(cache), student=str(student), out=str(tmp_path / "local"))
    remote = _train(cache=f"memory://{path.lstrip('/')}", student=str(student), out=str(tmp_path / "remote"))
    fs.rm(path, recursive=True)
    assert remote.tokens == local.tokens > 0 and remote.steps == local.steps
    assert remote.after == pytest.approx(local.after, rel=1e-6)


# ----------------------------------------------------------------------------- a real S3 API (moto)

@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on loopback (skipped when moto[server], boto3 or s3fs is missing)."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="fastkd-test")
    yield {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
           "client_kwargs": {"region_name": "us-east-1"}}
    server.stop()


def test_s3_cache_on_a_loopback_server_reads_and_trains(tmp_path, tiny_tokenizer, student, s3_server, monkeypatch):
    import s3fs

    cache = write_cache(tmp_path / "cache", tiny_tokenizer)
    fs = s3fs.S3FileSystem(**s3_server)
    fs.put(str(cache), "fastkd-test/cache", recursive=True)
    url = "s3://fastkd-test/cache"
    reader = CacheReader(url, storage_options=s3_server)
    same_sequences(list(CacheReader(cache)), list(reader))
    assert reader.read_ahead.hits > 0
    # `fastkd train --cache s3://...` gets its endpoint and keys from fsspec's configuration
    # (FSSPEC_S3_ENDPOINT_URL, FSSPEC_S3_KEY, ... in the environment, or fsspec.config.conf)
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(s3_server))
    s3fs.S3FileSystem.clear_instance_cache()
    local = _train(cache=str(cache), student=str(student), out=str(tmp_path / "local"))
    remote = _train(cache=url, student=str(student), out=str(tmp_path / "s3"))
    assert remote.tokens == local.tokens > 0
    assert remote.after == pytest.approx(local.after, rel=1e-6)
    damaged = bytearray(fs.cat_file("fastkd-test/cache/shards/shard-00000.safetensors"))
    lo, hi = tensor_ranges(cache / "shards/shard-00000.safetensors")["block.00001.tokens"]
    damaged[lo] ^= 0x04
    fs.pipe_file("fastkd-test/cache/shards/shard-00000.safetensors", bytes(damaged))
    with pytest.raises(CorruptCacheError, match="shard shards/shard-00000.safetensors block 1 fails its digest"):
        list(CacheReader(url, storage_options=s3_server))
