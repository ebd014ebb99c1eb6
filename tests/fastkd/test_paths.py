"""What a model name or a missing data folder means to an installed fastkd: embedded models by name,
clear errors for paths that do not exist or hold no model, and where BBH is looked for."""

import json

import pytest

from fastkd import paths
from fastkd.errors import UserError
from fastkd.teacher import load_causal_lm, load_tokenizer


def test_embedded_names_resolve_to_the_packaged_teacher():
    for name in ("embedded", "embedded-teacher"):
        assert paths.resolve_model(name) == str(paths.EMBEDDED_TEACHER)
    assert (paths.EMBEDDED_TEACHER / "config.json").is_file()


def test_the_embedded_student_is_built_once_and_the_same_every_time(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    first = paths.resolve_model("embedded-student")
    assert first.startswith(str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    second = paths.resolve_model("embedded-student")
    a, b = load_file(f"{first}/model.safetensors"), load_file(f"{second}/model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    model = load_causal_lm("embedded-student", dtype="float32", device="cpu", role="student")
    assert 0.4e6 < sum(p.numel() for p in model.parameters()) < 0.7e6
    teacher_tok, student_tok = load_tokenizer("embedded"), load_tokenizer("embedded-student")
    assert teacher_tok.get_vocab() == student_tok.get_vocab()
    assert not list((tmp_path / "b").rglob(".embedded-student*"))  # no temporary folder left behind


@pytest.mark.parametrize("name", ["./no-such-model", "runs/kd/fnal", "/abs/missing", "~/missing-model", "dir/"])
def test_a_missing_local_path_is_no_such_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "kd").mkdir(parents=True)
    with pytest.raises(UserError, match="no such folder"):
        paths.resolve_model(name, "--student")


def test_a_name_whose_first_part_is_a_local_folder_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="'runs/final': no such folder"):
        paths.resolve_model("runs/final", "--student")
    assert paths.resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id is left to the hub


def test_a_folder_or_file_that_is_not_a_model_says_so_in_full(tmp_path, records_jsonl):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_causal_lm(str(tmp_path / "empty"), device="cpu", role="teacher")
    msg = str(err.value)
    assert "without config.json" in msg and "save_pretrained" in msg and "\n" not in msg and msg.endswith("hub id")
    with pytest.raises(UserError, match="is a file"):
        load_causal_lm(str(records_jsonl), device="cpu")
    with pytest.raises(UserError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))


def test_a_tokenizer_json_the_library_cannot_build_is_a_one_line_error(tmp_path, tiny_tokenizer):
    """A merge whose result moved from the vocabulary to the added tokens: tokenizers raises a bare Exception."""
    tiny_tokenizer.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    merge = spec["model"]["merges"][0]
    merged = "".join(merge.split(" ") if isinstance(merge, str) else merge)
    token_id = spec["model"]["vocab"].pop(merged)
    spec["added_tokens"].append({"id": token_id, "content": merged, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": True, "special": False})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError) as err:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "out of vocabulary" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- BBH lookup order

def _bbh_folder(root, task="navigate"):
    (root / "bbh").mkdir(parents=True)
    (root / "bbh" / f"{task}.json").write_text(json.dumps({"examples": [{"input": "q", "target": "a"}]}))
    return root


def test_bbh_is_looked_for_in_flag_env_user_dir_then_checkout(tmp_path, monkeypatch):
    flag, env, home, checkout = (_bbh_folder(tmp_path / n) for n in ("flag", "env", "home/bbh", "shared/bbh"))
    monkeypatch.setattr(paths, "source_checkout", lambda: tmp_path / "project")
    monkeypatch.setenv(paths.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setenv(paths.BBH_ENV, str(env))
    assert paths.resolve_bbh_dir(flag, ["navigate"]) == flag
    assert paths.resolve_bbh_dir(None, ["navigate"]) == env
    monkeypatch.delenv(paths.BBH_ENV)
    assert paths.resolve_bbh_dir(None, ["navigate"]) == home
    monkeypatch.setenv(paths.HOME_ENV, str(tmp_path / "nowhere"))
    assert paths.resolve_bbh_dir(None, ["navigate"]) == checkout
    monkeypatch.setattr(paths, "source_checkout", lambda: None)  # an installed package: no checkout to look beside
    assert paths.resolve_bbh_dir(None, ["navigate"]) is None
    assert paths.resolve_bbh_dir(None, []) is None


def test_a_flag_folder_without_the_tasks_is_an_error_that_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.HOME_ENV, str(tmp_path / "home"))
    with pytest.raises(UserError) as err:
        paths.resolve_bbh_dir(tmp_path, ["navigate", "snarks"])
    msg = str(err.value)
    assert "navigate, snarks" in msg and "git clone" in msg and str(tmp_path / "home" / "bbh") in msg


def test_an_out_folder_holds_one_kind_of_output(tmp_path):
    """Each kind refuses a file and a folder holding another kind (named with its marker files), not a folder of the
    user's own files nor one of its own kind."""
    folders = {}
    for kind, markers in paths.OUTPUT_MARKERS.items():
        folder = folders[kind] = tmp_path / kind.replace(" ", "-")
        folder.mkdir()
        (folder / markers[0]).write_text("")
        (folder / "config.yaml").write_text("")      # a cache and a run both save one: no marker
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("mine")
    (tmp_path / "file").write_text("")
    for kind in paths.OUTPUT_MARKERS:
        with pytest.raises(UserError, match=f"--out .*file is a file; give a folder for the {kind}"):
            paths.check_out_folder(tmp_path / "file", kind)
        assert paths.check_out_folder(mine, kind) == mine and paths.check_out_folder(folders[kind], kind)
        assert paths.check_out_folder(tmp_path / "new", kind) == tmp_path / "new"
        for other, folder in folders.items():
            if other != kind:
                marker = paths.OUTPUT_MARKERS[other][0]
                with pytest.raises(UserError, match=f"holds a {other} \\({marker}\\), not a {kind}"):
                    paths.check_out_folder(folder, kind)


def test_the_output_markers_are_the_names_their_writers_use():
    from fastkd import bbh_results, checkpoint
    from fastkd.cache_tools.format import MANIFEST, SHARD_DIR
    from fastkd.cache_tools.units import UNIT_DIR

    assert paths.OUTPUT_MARKERS["teacher cache"] == (MANIFEST, SHARD_DIR, UNIT_DIR)
    assert set(paths.OUTPUT_MARKERS["training run"]) <= set(checkpoint.RUN_FILES) - {"config.yaml"}
    assert set(paths.OUTPUT_MARKERS["BBH evaluation"]) <= set(bbh_results.RUN_FILES)
