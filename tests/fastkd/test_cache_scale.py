"""Scale out of `cache-teacher`: gloo ranks write work units that merge into the cache one process
writes; kills and resumes with another rank count; resume on other records refused; a device map
over CPU (with disk offload); the vLLM adapter against a stand-in engine."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch


from fastkd.cache_tools import CacheError, CacheReader
from fastkd.errors import UserError
from helpers import random_records, run_cache, slow_cli

ROOT = Path(__file__).resolve().parents[2]
ARGS = dict(top_k=8, layers="1,-1", sequences_per_shard=3, batch_size=2)


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale") / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in random_records(22, seed=7)))
    return path


@pytest.fixture(scope="module")
def reference(tiny_qwen_dir, recs, tmp_path_factory):
    """The one-process cache, one thread (as each rank runs)."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cache(tiny_qwen_dir, recs, out, **ARGS)
    finally:
        torch.set_num_threads(threads)
    return out


def assert_same_cache(a, b):
    """Sequence by sequence: ids, mask, top-k ids, log-probs, tail, hidden states; each record once."""
    ra, rb = CacheReader(a), CacheReader(b)
    assert len(ra) == len(rb) and sorted(ra.record_indices.tolist()) == sorted(rb.record_indices.tolist())
    assert len(set(rb.record_indices.tolist())) == len(rb)
    one = {s.record_index: s for s in ra}
    for s in rb:
        t = one[s.record_index]
        for name in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail"):
            np.testing.assert_array_equal(getattr(s, name), getattr(t, name), err_msg=f"record {s.record_index} {name}")
        assert set(s.hidden) == set(t.hidden)
        for layer in s.hidden:
            np.testing.assert_array_equal(s.hidden[layer], t.hidden[layer])
    assert rb.manifest["complete"] is True


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_args(teacher, data, out, extra=()):
    return ["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--top-k", str(ARGS["top_k"]), "--layers", ARGS["layers"], "--sequences-per-shard",
            str(ARGS["sequences_per_shard"]), "--batch-size", str(ARGS["batch_size"]), "--no-progress", *extra]


def start_ranks(world, teacher, data, out, slow=0.0, extra=()):
    """`world` gloo ranks on loopback, as torchrun starts them (RANK, WORLD_SIZE, MASTER_*), one thread each."""
    port = _port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        command = slow_cli(slow) if slow else [sys.executable, "-m", "fastkd"]
        procs.append(subprocess.Popen([*command, *_cli_args(teacher, data, out, extra)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_all(procs, timeout=240):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        outs.append((p.returncode, out, err))
    return outs


def test_two_ranks_equal_one_process(tiny_qwen_dir, recs, reference, tmp_path):
    out = tmp_path / "two"
    results = wait_all(start_ranks(2, tiny_qwen_dir, recs, out))
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    assert "by 2 ranks" in results[0][1] and results[1][1] == ""          # rank 0 prints the summary
    assert_same_cache(reference, out)
    m = json.loads((out / "manifest.json").read_text())
    assert [e["unit"] for e in m["shards"]] == list(range(8))             # 22 records, units of 3
    assert sum(p["sequences_written"] for p in m["summary"]["per_rank"]) == 22
    assert not list((out / "units").iterdir()) and not list(out.glob(".lock*"))


@pytest.mark.slow
def test_three_ranks_equal_one_process(tiny_qwen_dir, recs, reference, tmp_path):
    out = tmp_path / "three"
    results = wait_all(start_ranks(3, tiny_qwen_dir, recs, out))
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    assert_same_cache(reference, out)


@pytest.mark.slow
def test_three_ranks_with_skipped_records_equal_one_process(tiny_qwen_dir, tmp_path):
    """Each rank reads and tokenises only its own units (cut on the raw records): skipped records, a unit with
    none kept and a blank line give the same cache and the same counts with 3 ranks as with one process."""
    records = random_records(22, seed=9)
    for i in (3, 4, 5, 13):                      # unit 1 (records 3-5) has no usable record, unit 4 one fewer
        del records[i]["target"]
    lines = [json.dumps(r) for r in records]
    lines.insert(17, "")
    data = tmp_path / "recs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_cache(tiny_qwen_dir, data, one, skip_bad=True, **ARGS)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "three"
    results = wait_all(start_ranks(3, tiny_qwen_dir, data, out, extra=["--skip-bad"]))
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    assert_same_cache(one, out)
    m = json.loads((out / "manifest.json").read_text())
    assert 1 not in [e["unit"] for e in m["shards"]] and m["records"] == CacheReader(one).manifest["records"]
    assert "18 kept, 0 truncated, skipped {'missing': 4}" in results[0][1]         # every rank's counts
    first = single.report.pop("first_errors")
    assert single.report == {"kept": 18, "truncated": 0, "skipped": {"missing": 4}} and len(first) == 4
    assert all(f"skipped: {m}" in results[0][1] for m in first)                   # whichever rank read them


@pytest.mark.slow
def test_a_bad_record_on_one_rank_stops_every_rank_with_its_message(tiny_qwen_dir, tmp_path):
    records = random_records(22, seed=4)
    del records[16]["target"]                     # unit 5 of units of 3: rank 1's of 2, the only rank that reads it
    data = tmp_path / "recs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    results = wait_all(start_ranks(2, tiny_qwen_dir, data, tmp_path / "c"), timeout=120)
    for rc, _, err in results:
        assert rc == 2 and "record 16" in err and "'target'" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "c" / "shards").exists()          # stopped before the cache was opened


def _receipted(out: Path) -> int:
    units = list((out / "units").glob("unit-*.json")) if (out / "units").exists() else []
    listed = len(json.loads((out / "manifest.json").read_text())["shards"]) if (out / "manifest.json").exists() else 0
    return len(units) + listed


def test_kill_one_rank_then_resume_with_other_rank_counts(tiny_qwen_dir, recs, reference, tmp_path):
    """SIGKILL rank 1 of 2 part-way; resume with 3 ranks is then killed too; one process finishes it."""
    out = tmp_path / "killed"
    procs = start_ranks(2, tiny_qwen_dir, recs, out, slow=0.4)
    deadline = time.time() + 180
    while time.time() < deadline and _receipted(out) < 2 and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    for p in procs:               # rank 0 loses its peer at the barrier; torchrun would stop it: so do we
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
        p.communicate()
    done = _receipted(out)
    assert 0 < done < 8, "the kill should land part-way"
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    # resume with 3 ranks, then kill all of them part-way
    procs = start_ranks(3, tiny_qwen_dir, recs, out, slow=0.4)
    while time.time() < deadline and _receipted(out) < done + 1 and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.communicate()
    summary = run_cache(tiny_qwen_dir, recs, out, **ARGS)   # one process finishes it
    assert summary.sequences_resumed > 0 and summary.sequences_resumed + summary.sequences_written == 22
    assert_same_cache(reference, out)
    from fastkd.cache_tools.verify import verify_cache

    assert verify_cache(out).ok


def test_resume_on_changed_records_refused(tiny_qwen_dir, tmp_path):
    data = tmp_path / "recs.jsonl"
    records = random_records(9, seed=2)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "cache"
    run_cache(tiny_qwen_dir, data, out, top_k=4, sequences_per_shard=3)
    records[4]["rationale"] = "a different rationale"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(CacheError, match=r"cannot resume on other data: the records differ .*9 records.*same --data"):
        run_cache(tiny_qwen_dir, data, out, top_k=4, sequences_per_shard=3)
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:8]))        # one record fewer
    with pytest.raises(CacheError, match=r"9 records.*this run: 8 records"):
        run_cache(tiny_qwen_dir, data, out, top_k=4, sequences_per_shard=3)


def test_stale_and_unreceipted_units_are_rewritten(tiny_qwen_dir, tmp_path):
    """A shard without its receipt (killed in between), a receipt from other settings, a corrupt
    receipt: each unit is written again; a sound receipt is merged, not rewritten."""
    from fastkd.cache_tools.units import receipt_file
    from fastkd.cache_tools.writing import shard_file
    from fastkd.cache_tools.integrity import canonical_json, seal

    data = tmp_path / "recs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in random_records(12, seed=3)))
    full = tmp_path / "full"
    run_cache(tiny_qwen_dir, data, full, top_k=4, sequences_per_shard=3)
    out = tmp_path / "part"
    run_cache(tiny_qwen_dir, data, out, top_k=4, sequences_per_shard=3)
    m = json.loads((out / "manifest.json").read_text())
    entries = m["shards"]
    m["shards"], m["complete"] = entries[:1], False                  # as if only unit 0 had been merged
    (out / "manifest.json").write_text(json.dumps(seal(m)))
    good = seal({"format": "fastkd-teacher-cache-unit", "settings_sha256": None, "entry": entries[1]})
    from fastkd.cache_tools.units import settings_digest
    from fastkd.cache_tools.format import settings_of

    good = seal(dict(good, settings_sha256=settings_digest(settings_of(m))))
    (out / receipt_file(1)).write_bytes(canonical_json(good))                        # sound: merged
    (out / receipt_file(2)).write_bytes(canonical_json(seal(dict(good, settings_sha256="0" * 64))))  # stale
    (out / receipt_file(3)).write_text("{\"format\": \"fastkd-teacher-cache-unit\"")  # cut short
    summary = run_cache(tiny_qwen_dir, data, out, top_k=4, sequences_per_shard=3)
    assert summary.sequences_resumed == 6 and summary.sequences_written == 6
    assert (out / shard_file(2)).exists() and not list((out / "units").iterdir())
    assert_same_cache(full, out)


def test_a_live_rank_of_another_run_blocks_the_coordinator(tiny_qwen_dir, recs, tmp_path):
    out = tmp_path / "c"
    run_cache(tiny_qwen_dir, recs, out, top_k=4, sequences_per_shard=3)
    (out / ".lock.rank-1").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(CacheError, match=r"rank 1 of an earlier run .* is still writing"):
        run_cache(tiny_qwen_dir, recs, out, top_k=4, sequences_per_shard=3)
    (out / ".lock.rank-1").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    again = run_cache(tiny_qwen_dir, recs, out, top_k=4, sequences_per_shard=3)
    assert again.sequences_written == 0 and not (out / ".lock.rank-1").exists()


def test_work_unit_belongs_to_the_cache(tiny_qwen_dir, recs, tmp_path):
    out = tmp_path / "c"
    run_cache(tiny_qwen_dir, recs, out, top_k=4, sequences_per_shard=5)
    again = run_cache(tiny_qwen_dir, recs, out, top_k=4, sequences_per_shard=7)
    assert again.sequences_written == 0 and again.sequences_resumed == 22
    assert CacheReader(out).manifest["work_unit"] == 5


# ----------------------------------------------------------------------------- device map

def test_device_map_split_with_disk_offload_equals_one_device(tiny_qwen_dir, recs, reference, tmp_path):
    """The teacher's modules spread over cpu and disk (accelerate hooks run every layer): the same cache, hidden
    states included."""
    pytest.importorskip("accelerate")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}
    out = tmp_path / "mapped"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cache(tiny_qwen_dir, recs, out, device_map=json.dumps(device_map),
                  offload_folder=str(tmp_path / "offload"), dtype="float32", **ARGS)
    finally:
        torch.set_num_threads(threads)
    from fastkd.teacher import load_causal_lm

    model = load_causal_lm(str(tiny_qwen_dir), device_map=json.dumps(device_map), offload_folder=str(tmp_path / "o"))
    assert "disk" in model.hf_device_map.values()
    assert any(p.device.type == "meta" for p in model.model.layers[1].parameters())    # loaded only while it runs
    ra, rb = CacheReader(reference), CacheReader(out)
    assert rb.manifest["layers"] == [1, 2]
    one = {s.record_index: s for s in ra}
    for s in rb:
        t = one[s.record_index]
        np.testing.assert_array_equal(s.topk_ids, t.topk_ids)
        np.testing.assert_allclose(s.tail, t.tail, atol=1e-6)
        for layer in (1, 2):
            np.testing.assert_allclose(s.hidden[layer], t.hidden[layer], atol=1e-5)


def test_max_memory_split(tiny_qwen_dir, recs, tmp_path):
    pytest.importorskip("accelerate")
    from fastkd.teacher import load_causal_lm

    model = load_causal_lm(str(tiny_qwen_dir), device_map="auto", max_memory="cpu=400KB",
                           offload_folder=str(tmp_path / "off"))
    placed = set(model.hf_device_map.values())
    assert "disk" in placed and "cpu" in placed, model.hf_device_map
    out = tmp_path / "c"
    run_cache(tiny_qwen_dir, recs, out, top_k=4, layers="-1", device_map="auto", max_memory="cpu=400KB",
              offload_folder=str(tmp_path / "off2"))
    assert len(CacheReader(out)) == 22


def test_bad_device_map_and_max_memory(tiny_qwen_dir):
    from fastkd.teacher import parse_device_map, parse_max_memory

    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    with pytest.raises(UserError, match="device=amount"):
        parse_max_memory("70GiB")
    with pytest.raises(UserError, match="JSON object"):
        parse_device_map("everywhere")


# ----------------------------------------------------------------------------- vLLM adapter

class StandInEngine:
    """Returns what vllm.LLM.generate returns with prompt_logprobs=k: per request a RequestOutput
    whose prompt_logprobs is [None, {id: Logprob(logprob, rank, decoded_token)}, ...] holding the
    top k ids plus the prompt token itself; computed here from the tiny HF model."""

    def __init__(self, model_dir, k):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.k = k
        self.calls = 0

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls += 1
        outs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            with torch.no_grad():
                logits = self.model(torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            plp = [None]
            for t in range(1, len(ids)):
                row = logp[t - 1]
                order = torch.argsort(row, descending=True)
                ranks = torch.empty_like(order)
                ranks[order] = torch.arange(1, len(order) + 1)
                chosen = set(order[: self.k].tolist()) | {ids[t]}
                plp.append({int(i): SimpleNamespace(logprob=float(row[i]), rank=int(ranks[i]), decoded_token=None)
                            for i in sorted(chosen, key=lambda i: -float(row[i]))})
            outs.append(SimpleNamespace(prompt_token_ids=list(ids), prompt_logprobs=plp, outputs=[]))
        return outs


def test_vllm_backend_with_a_stand_in_engine_matches_hf(tiny_qwen_dir, recs, tmp_path):
    hf = tmp_path / "hf"
    run_cache(tiny_qwen_dir, recs, hf, top_k=8, sequences_per_shard=5)
    out = tmp_path / "vllm"
    engine = StandInEngine(tiny_qwen_dir, 8)
    run_cache(tiny_qwen_dir, recs, out, top_k=8, sequences_per_shard=5,
              backend="vllm", vllm_engine=engine, vllm_max_logprobs=8)
    assert engine.calls > 0
    rv = CacheReader(out)
    assert rv.manifest["teacher"]["backend"] == "vllm" and rv.manifest["layers"] == []
    one = {s.record_index: s for s in CacheReader(hf)}
    for s in rv:
        t = one[s.record_index]
        np.testing.assert_array_equal(s.input_ids, t.input_ids)
        np.testing.assert_array_equal(np.sort(s.topk_ids, 1), np.sort(t.topk_ids, 1))
        np.testing.assert_allclose(np.sort(s.topk_logprobs, 1), np.sort(t.topk_logprobs, 1), atol=2e-3)
        np.testing.assert_allclose(s.tail, t.tail, atol=2e-6)
    from fastkd.cache_tools.verify import verify_cache

    assert verify_cache(out).ok


def test_vllm_backend_refusals(tiny_qwen_dir, recs, tmp_path):
    engine = StandInEngine(tiny_qwen_dir, 8)
    kw = dict(backend="vllm", vllm_engine=engine)
    with pytest.raises(UserError, match="hidden states, which vLLM does not return"):
        run_cache(tiny_qwen_dir, recs, tmp_path / "a", top_k=8, layers="-1", **kw)
    with pytest.raises(UserError, match=r"--top-k 16 is above the vLLM engine's max_logprobs 8.*--vllm-max-logprobs"):
        run_cache(tiny_qwen_dir, recs, tmp_path / "b", top_k=16, vllm_max_logprobs=8, **kw)
    with pytest.raises(UserError, match="--sample"):
        run_cache(tiny_qwen_dir, recs, tmp_path / "c", sample=4, **kw)
    with pytest.raises(UserError, match=r"returned [89] log-probs, 12 were asked"):   # an engine that gives fewer
        run_cache(tiny_qwen_dir, recs, tmp_path / "d", top_k=12, vllm_max_logprobs=12, **kw)


def test_vllm_missing_says_how_to_install(tiny_qwen_dir, recs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)
    from fastkd.cli import main

    rc = main(["cache-teacher", "--teacher", str(tiny_qwen_dir), "--data", str(recs), "--out", str(tmp_path / "c"),
               "--backend", "vllm", "--top-k", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and ("fastkd cache-teacher: error: --backend vllm: the vllm package is not installed; "
                        "pip install vllm") in err
    assert len(err.strip().splitlines()) == 1


def test_vllm_missing_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    from fastkd.cache_stage import CacheConfig
    from fastkd.teacher_vllm import start_engine

    config = CacheConfig.make(overrides=dict(teacher="some/model", data="d", out="o", backend="vllm", top_k=8))
    with pytest.raises(UserError, match=r"vllm package is not installed; pip install vllm"):
        start_engine(config)


def test_exact_tail_from_top_k_only():
    from fastkd.teacher_vllm import exact_tail

    # mass near 1: the tail is 1e-9, far below float32's spacing at 1
    p = np.array([1 - 1e-9 - 0.25, 0.25])
    lp = np.log(p)[None]
    np.testing.assert_allclose(exact_tail(lp), [1e-9], rtol=1e-6)
    # tiny top-k mass: the tail is 1 - 3e-30
    np.testing.assert_allclose(exact_tail(np.log([[1e-30, 2e-30]])), [1.0], rtol=0)
    # rounding that pushes the top-k mass past 1 is clamped; -inf slots count as zero
    assert exact_tail(np.array([[0.0, -1e-7]]))[0] == 0.0
    assert exact_tail(np.array([[np.log(0.5), -np.inf]]))[0] == pytest.approx(0.5, abs=1e-15)
    assert exact_tail(np.full((1, 3), -np.inf))[0] == 1.0
