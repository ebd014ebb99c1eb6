"""`fastkd demo` end to end at a toy size: every stage runs on the embedded teacher and writes
what the README promises (caches that verify, three students, BBH runs, table, plot, summary)."""

import json

import pytest

from fastkd.demo import DEMO_TASKS, DemoConfig, demo


def demo_loop(out, **size):
    return demo(DemoConfig.make(overrides=dict(out=str(out), **size)))


@pytest.mark.usefixtures("bbh_dir")
def test_demo_loop_runs_every_stage(tmp_path, capsys, monkeypatch):
    from fastkd import cli
    from fastkd.cache_tools.verify import verify_cache

    def no_argv(argv=None):
        raise AssertionError(f"the demo calls functions, not the command line: {argv}")

    monkeypatch.setattr(cli, "main", no_argv)

    summary = demo_loop(tmp_path / "demo", records_per_task=6, steps=3, eval_items_per_task=2, max_new_tokens=24)
    work = tmp_path / "demo"
    records = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
    assert len(records) == 6 * len(DEMO_TASKS)
    for cache in ("cache-cot", "cache-answers"):
        manifest = json.loads((work / cache / "manifest.json").read_text())
        assert manifest["counts"]["sequences"] == len(records)
        report = verify_cache(work / cache)
        assert report.ok and report.sequences == len(records) and not report.warnings
    assert set(summary["students"]) == {"SFT", "KD", "KD+CoT"}
    assert {s["after"].get("kl") is not None for n, s in summary["students"].items() if n != "SFT"} == {True}
    assert len(summary["runs"]) == 5
    for run in summary["runs"]:
        res = json.loads(open(f"{run}/results.json").read())
        assert set(res["tasks"]) == set(DEMO_TASKS)
        assert sum(t["n"] for t in res["tasks"].values()) == 2 * len(DEMO_TASKS)
    assert (work / "comparison.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "KD+CoT" in printed and "held-out KL" in printed and "BBH accuracy (strict), against SFT" in printed
    # a second run into the same folder at another size: the caches are rebuilt, the students retrained
    again = demo_loop(tmp_path / "demo", records_per_task=7, steps=2, eval_items_per_task=1, max_new_tokens=8)
    manifest = json.loads((work / "cache-cot" / "manifest.json").read_text())
    assert manifest["counts"]["sequences"] == 7 * len(DEMO_TASKS)
    assert {s["after"].get("ce") is not None for s in again["students"].values()} == {True}
