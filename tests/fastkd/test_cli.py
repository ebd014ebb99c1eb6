"""The `fastkd` command itself, at the parser level (no model is loaded):

- a stage whose module cannot be imported fails loudly, with one line naming it, and never disappears;
- every --help states each default once, in words (no "(default: None)", on/off for switches);
- an option a command does not know is that command's error, with the closest option it does know.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from fastkd import cli
from fastkd.config import SHOWN_DEFAULT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _in_a_temp_folder(tmp_path, monkeypatch):
    """A command line that parses after all runs in a temp folder, not in the checkout."""
    monkeypatch.chdir(tmp_path)


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `fastkd argv`, whether main returns or argparse exits."""
    try:
        rc = cli.main(argv)
    except SystemExit as stop:
        rc = stop.code
    out, err = capsys.readouterr()
    return rc, out, err


def all_parsers(parser=None, path=()):
    """(command words, parser) for fastkd and every command and subcommand below it."""
    parser = parser or cli.build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, (*path, name))


def rendered_help(parser, action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def break_import(monkeypatch, module: str, missing: str) -> None:
    """Make the CLI's import of `module` fail as if `missing` were not installed."""
    real = cli.import_module

    def load(name):
        if name == module:
            raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)
        return real(name)

    monkeypatch.setattr(cli, "import_module", load)


@pytest.fixture
def synth_broken(monkeypatch):
    """fastkd.synth missing, as from a wheel that left it out."""
    break_import(monkeypatch, "fastkd.synth", "fastkd.synth")


# ----------------------------------------------------------------------------- a broken stage

def test_every_command_is_listed_and_help_exits_0(capsys):
    rc, out, err = run_cli(["--help"], capsys)
    assert rc == 0 and not err
    for name, _, _ in cli.COMMANDS:
        assert name in out
    for group, _, members in cli.GROUPS:
        assert group in out
        rc, out_group, _ = run_cli([group, "--help"], capsys)
        assert rc == 0 and all(name in out_group for name, _, _ in members)


def test_a_stage_that_cannot_be_imported_makes_help_fail_with_one_line(synth_broken, capsys):
    rc, out, err = run_cli(["--help"], capsys)
    assert rc == 2
    assert "data" in out  # the help itself is still printed
    lines = err.strip().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("fastkd data synth: error:")
    assert "fastkd.synth" in line and "ModuleNotFoundError" in line and "reinstall fastkd" in line


@pytest.mark.parametrize("argv", [
    ["data", "synth", "--n", "3", "--out", "x.jsonl"],
    ["data", "synth", "--help"],
    ["data", "synth"],
])
def test_the_broken_command_fails_with_one_line_whatever_it_is_given(synth_broken, capsys, argv):
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and not out
    assert len(err.strip().splitlines()) == 1
    assert "fastkd.synth" in err and "reinstall fastkd" in err


def test_the_broken_command_stays_listed_in_its_group(synth_broken, capsys):
    rc, out, err = run_cli(["data", "--help"], capsys)
    assert rc == 2
    assert "synth" in out and "BROKEN" in out
    assert "fastkd.synth" in err


def test_other_commands_still_work_beside_a_broken_one(synth_broken, capsys):
    rc, out, _ = run_cli(["train", "--help"], capsys)
    assert rc == 0 and "--max-steps" in out
    rc, out, _ = run_cli(["cache", "--help"], capsys)
    assert rc == 0 and "inspect" in out
    args = cli.build_parser().parse_args(["cache", "inspect", "some/cache"])
    assert args.cache == "some/cache" and callable(args._run)


def test_a_missing_third_party_module_is_reported_too(monkeypatch, capsys):
    break_import(monkeypatch, "fastkd.demo", "matplotlib")
    rc, _, err = run_cli(["demo", "--quick"], capsys)
    assert rc == 2
    assert "fastkd demo: error:" in err and "fastkd.demo" in err and "matplotlib" in err and "reinstall" in err


# ----------------------------------------------------------------------------- help texts

def test_no_help_shows_a_default_of_none_or_a_bare_boolean():
    for path, parser in all_parsers():
        for action in parser._actions:
            text = rendered_help(parser, action)
            where = f"fastkd {' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            assert "(default: None)" not in text, where
            assert "SUPPRESS" not in text, where
            assert "(default: True)" not in text and "(default: False)" not in text, where


def test_no_help_states_a_default_twice():
    for path, parser in all_parsers():
        for action in parser._actions:
            text = rendered_help(parser, action)
            own = len(re.findall(r"\bdefault", action.help or "", re.IGNORECASE))
            shown = len(re.findall(r"\bdefault", text, re.IGNORECASE))
            where = f"fastkd {' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            if own:  # the text states its default: nothing is appended
                assert shown == own, (where, text)
            else:
                assert shown <= 1, (where, text)


def test_every_command_uses_the_fastkd_formatter():
    for path, parser in all_parsers():
        assert parser.formatter_class is cli.HelpFormatter, path


def option_help(argv, option, capsys) -> str:
    """The help entry of `option` in `fastkd argv --help`, joined to one line."""
    rc, out, _ = run_cli([*argv, "--help"], capsys)
    assert rc == 0
    entries = re.split(r"\n(?=  -)", out.split("options:", 1)[1])
    entry = next(e for e in entries if re.match(rf"\s*{re.escape(option)}\b", e.strip() + " ")
                 or f", {option}" in e.split("\n")[0])
    return " ".join(entry.split())


def test_train_help_states_its_dataclass_defaults_like_every_command(capsys):
    assert option_help(["train"], "--lr", capsys).endswith("(default: 0.0001)")
    assert option_help(["train"], "--progress", capsys).endswith("(default: on)")
    assert option_help(["train"], "--gradient-checkpointing", capsys).endswith("(default: off)")
    assert "default" not in option_help(["train"], "--student", capsys)           # None: nothing to say
    max_steps = option_help(["train"], "--max-steps", capsys)
    assert max_steps.count("default") == 1 and "(default: --epochs worth)" in max_steps
    assert option_help(["train"], "--tokenizer", capsys).count("default") == 1


def test_switches_say_on_or_off_and_required_options_say_so(capsys):
    progress = option_help(["generate-rationales"], "--no-progress", capsys)   # one entry: --progress, --no-progress
    assert progress.startswith("--progress, --no-progress") and progress.endswith("(default: on)")
    assert progress.count("default") == 1
    chat = option_help(["generate-rationales"], "--chat-template", capsys)
    assert chat.endswith("(default: off)") and chat.count("default") == 1
    teacher = option_help(["generate-rationales"], "--teacher", capsys)
    assert "default" not in teacher and teacher.endswith("(required)")
    steps = option_help(["demo"], "--steps", capsys)
    assert steps.count("default") == 1 and "with --quick" in steps


def test_the_formatter_rules_on_a_parser_of_its_own():
    p = cli.Parser(prog="x")
    p.add_argument("--none", help="nothing")
    p.add_argument("--number", type=int, default=3, help="a number")
    p.add_argument("--flag", action="store_true", help="a flag")
    p.add_argument("--on-flag", action="store_true", default=True, help="already on")
    p.add_argument("--no-thing", dest="thing", action="store_false", help="turn the thing off")
    p.add_argument("--pair", action=argparse.BooleanOptionalAction, default=True, help="a pair")
    p.add_argument("--off-pair", action=argparse.BooleanOptionalAction, default=False, help="another pair")
    p.add_argument("--py310", action=argparse.BooleanOptionalAction, default=False,
                   help="as Python 3.10 writes it (default: %(default)s)")
    p.add_argument("--req", required=True, default="x", help="required")
    p.add_argument("--said", default=5, help="five things (default: five)")
    p.add_argument("--items", action="append", default=[], help="repeatable")
    p.add_argument("--pct", default="50%", help="a share")
    shown = {a.dest: rendered_help(p, a) for a in p._actions}
    assert shown["none"] == "nothing"
    assert shown["number"] == "a number (default: 3)"
    assert shown["flag"] == "a flag"
    assert shown["on_flag"] == "already on (default: on)"
    assert shown["thing"] == "turn the thing off"
    assert shown["pair"] == "a pair (default: on)"
    assert shown["off_pair"] == "another pair (default: off)"
    assert shown["py310"] == "as Python 3.10 writes it (default: off)"
    assert shown["req"] == "required"
    assert shown["said"] == "five things (default: five)"
    assert shown["items"] == "repeatable"
    assert shown["pct"] == "a share (default: 50%)"
    # SUPPRESS-default flags (every config dataclass's) show the default they carry in fastkd.config.SHOWN_DEFAULT
    q = cli.Parser(prog="y")
    action = q.add_argument("--k", type=int, default=argparse.SUPPRESS, help="k")
    setattr(action, SHOWN_DEFAULT, 64)
    assert rendered_help(q, action) == "k (default: 64)"


# ----------------------------------------------------------------------------- unknown options

def test_an_option_of_another_command_is_refused_by_the_command_with_a_suggestion(capsys):
    rc, out, err = run_cli(["train", "--steps", "5"], capsys)
    assert rc == 2 and not out
    assert err.strip().splitlines()[-1] == "fastkd train: error: unrecognized argument --steps (did you mean --max-steps?)"
    assert "fastkd: error" not in err


def test_a_misspelled_option_of_a_subcommand(capsys):
    rc, _, err = run_cli(["cache", "inspect", "some/cache", "--jsn"], capsys)
    assert rc == 2
    assert err.strip().splitlines()[-1] == \
        "fastkd cache inspect: error: unrecognized argument --jsn (did you mean --json?)"
    rc, _, err = run_cli(["demo", "--stepz=3"], capsys)  # (--step=3 would be argparse's abbreviation of --steps)
    assert rc == 2 and err.strip().endswith("fastkd demo: error: unrecognized argument --stepz (did you mean --steps?)")


def test_several_unknown_arguments_and_no_far_fetched_suggestion(capsys):
    rc, _, err = run_cli(["train", "--steps", "5", "--zqxv", "1"], capsys)
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last == "fastkd train: error: unrecognized arguments: --steps (did you mean --max-steps?), --zqxv"
    rc, _, err = run_cli(["cache", "inspect", "a", "b"], capsys)
    assert rc == 2 and err.strip().endswith("fastkd cache inspect: error: unrecognized argument b")


def test_a_long_usage_does_not_bury_the_error(capsys):
    rc, _, err = run_cli(["train", "--steps", "5"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 2
    assert err.startswith("usage: fastkd train [options]") and "fastkd train --help" in err


# ----------------------------------------------------------------------------- the example


# ----------------------------------------------------------------------------- one configuration style

def test_shared_options_have_one_spelling_and_one_text():
    """--chat-template, --progress/--no-progress, --device, --dtype, --seed: no command spells them another way
    (--chat, --quiet), switches are --x/--no-x pairs, and the stages (made by fastkd.config) share their texts."""
    texts: dict[str, set] = {}
    stages = {name for name, _, _ in cli.COMMANDS}
    for path, parser in all_parsers():
        options = {o: a for a in parser._actions for o in a.option_strings}
        assert not {"--chat", "--quiet"} & set(options), path
        for option in ("--chat-template", "--progress"):
            assert ("--no-" + option[2:] in options) == (option in options), (path, option)
            if option in options:
                assert options["--no-" + option[2:]] is options[option], (path, option)
        if path and path[0] in stages:
            for option in ("--chat-template", "--device", "--progress"):
                if option in options:
                    texts.setdefault(option, set()).add(options[option].help)
            for option, prefix in (("--dtype", "dtype: auto"), ("--seed", "seed for ")):
                if option in options:
                    assert prefix in options[option].help, (path, option)
    assert {o: len(t) for o, t in texts.items()} == {"--chat-template": 1, "--device": 1, "--progress": 1}


def _stage_configs():
    from fastkd.cache_stage import CacheConfig
    from fastkd.demo import DemoConfig
    from fastkd.evaluate import EvalConfig
    from fastkd.rationales import RationalesConfig
    from fastkd.train_config import TrainConfig

    return {"train": TrainConfig, "eval-bbh": EvalConfig, "generate-rationales": RationalesConfig,
            "demo": DemoConfig, "cache-teacher": CacheConfig}


@pytest.mark.parametrize("argv, changed", [
    (["train", "--cache", "c", "--student", "s", "--lr", "0.02", "--student-layers", "1", "2", "--no-progress",
      "--mode", "renorm", "--chat-template"], {"lr": 0.02, "student_layers": [1, 2], "progress": False}),
    (["eval-bbh", "--model", "m", "--tasks", "navigate", "--limit", "3", "--chat-template", "--no-plot",
      "--dtype", "float32"], {"limit": 3, "chat_template": True, "plot": False, "name": "m"}),
    (["eval-bbh", "--compare", "a", "b", "--metric", "lenient"], {"compare": ["a", "b"], "out": None}),
    (["generate-rationales", "--teacher", "t", "--data", "d.jsonl", "--out", "o.jsonl", "--n", "2",
      "--temperature", "1.3", "--no-progress", "--chat-template"], {"n": 2, "temperature": 1.3, "progress": False}),
    (["demo", "--quick", "--steps", "3", "--seed", "5", "--threads", "1"],
     {"steps": 3, "records_per_task": 150, "seed": 5}),
    (["cache-teacher", "--teacher", "t", "--data", "d", "--out", "o", "--top-k", "8", "--no-cot", "--no-progress"],
     {"top_k": 8, "cot": False, "progress": False}),
])
def test_each_stage_config_round_trips_through_its_saved_file(argv, changed, tmp_path):
    """flags -> config -> save -> --config file -> the same config, for every stage."""
    kind = _stage_configs()[argv[0]]
    parser = cli.build_parser()
    config = kind.from_args(parser.parse_args(argv))
    assert {name: getattr(config, name) for name in changed} == changed
    config.save(tmp_path / "config.yaml")
    again = kind.from_args(parser.parse_args([argv[0], "--config", str(tmp_path / "config.yaml")]))
    assert again == config
    flag_wins = parser.parse_args([argv[0], "--config", str(tmp_path / "config.yaml"), "--out", "elsewhere"])
    assert kind.from_args(flag_wins) == dataclasses.replace(config, out="elsewhere")


def test_field_rules_hold_however_a_config_is_built():
    """minimum, choices and required are checked by make() (flags, YAML, Python) and by the constructor alike."""
    from fastkd.errors import UserError
    from fastkd.evaluate import EvalConfig
    from fastkd.rationales import RationalesConfig

    with pytest.raises(UserError, match="--batch-size must be >= 1, got 0"):
        EvalConfig.make(overrides={"model": "m", "batch_size": 0})
    with pytest.raises(UserError, match="--limit must be >= 1, got 0"):
        EvalConfig(model="m", limit=0)
    with pytest.raises(UserError, match="option prompt_format: 'cott' is not one of cot, direct"):
        EvalConfig.make(overrides={"model": "m", "prompt_format": "cott"})
    with pytest.raises(UserError, match="give one of --model, --predictions or --compare, not --model and --compare"):
        EvalConfig.make(overrides={"model": "m", "compare": ["a"]})
    with pytest.raises(UserError, match="give one of --model, --predictions or --compare$"):
        EvalConfig.make()
    with pytest.raises(UserError, match="give --data"):
        RationalesConfig.make(overrides={"teacher": "t", "out": "o"})


def test_stage_errors_are_one_line_with_exit_2(capsys):
    rc, out, err = run_cli(["eval-bbh", "--model", "m", "--predictions", "p.jsonl"], capsys)
    assert rc == 2 and err.strip() == ("fastkd eval-bbh: error: give one of --model, --predictions or --compare, "
                                       "not --model and --predictions")
    rc, _, err = run_cli(["demo", "--steps", "0"], capsys)
    assert rc == 2 and err.strip() == "fastkd demo: error: --steps must be >= 1, got 0"
    rc, _, err = run_cli(["generate-rationales", "--teacher", "t", "--out", "o.jsonl"], capsys)
    assert rc == 2 and err.strip().startswith("fastkd generate-rationales: error: give --data")


# ----------------------------------------------------------------------------- option values and --config files

@pytest.mark.parametrize("option, value, message", [
    ("max_length", -3, "--max-length must be >= 1, got -3"),
    ("lr", 0.0, "--lr must be > 0, got 0.0"),
    ("lr", -1.0, "--lr must be > 0, got -1.0"),
    ("adam_beta1", 1.0, "--adam-beta1 must be >= 0 and < 1, got 1.0"),
    ("adam_beta2", -0.1, "--adam-beta2 must be >= 0 and < 1, got -0.1"),
    ("adam_eps", 0.0, "--adam-eps must be > 0, got 0.0"),
    ("weight_decay", -1.0, "--weight-decay must be >= 0, got -1.0"),
    ("min_lr_ratio", 5.0, "--min-lr-ratio must be >= 0 and <= 1, got 5.0"),
    ("warmup_steps", -5, "--warmup-steps must be >= 0, got -5"),
    ("kl_weight", -1.0, "--kl-weight must be >= 0, got -1.0"),
    ("temperature", 0.0, "--temperature must be > 0, got 0.0"),
    ("epochs", 0.0, "--epochs must be > 0, got 0.0"),
    ("max_grad_norm", -1.0, "--max-grad-norm must be >= 0, got -1.0"),
    ("log_every", -1, "--log-every must be >= 0, got -1"),
    ("group_batches", -1, "--group-batches must be >= 0, got -1"),
    ("eval_batches", -3, "--eval-batches must be >= 1, got -3"),
    ("seed", -1, "--seed must be >= 0 and <= 4294967295, got -1"),
    ("lr", float("nan"), "option lr: nan is not a valid float"),
    ("epochs", float("inf"), "option epochs: inf is not a valid float"),
])
def test_train_refuses_an_out_of_range_value_before_anything_is_loaded(option, value, message, capsys):
    from fastkd.errors import UserError
    from fastkd.train_config import TrainConfig

    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        TrainConfig.make(overrides={"cache": "c", "student": "s", option: value})
    rc, _, err = run_cli(["train", "--cache", "c", "--student", "s", "--out", "run", _flag(option), str(value)], capsys)
    assert (rc, err) == (2, f"fastkd train: error: {message}\n") and not Path("run").exists()


def _flag(name):
    return "--" + name.replace("_", "-")


def test_the_edges_of_a_range_are_accepted():
    from fastkd.train_config import TrainConfig

    edges = dict(adam_beta1=0.0, adam_beta2=0.999, min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.0, kl_weight=0.0,
                 ce_weight=0.0, max_grad_norm=0.0, lr=1e-12, temperature=1e-3, seed=2**32 - 1, max_length=1)
    config = TrainConfig.make(overrides={"cache": "c", "student": "s", **edges})
    assert {name: getattr(config, name) for name in edges} == edges
    assert TrainConfig.make(overrides={"cache": "c", "student": "s", "min_lr_ratio": 0.0}).min_lr_ratio == 0.0


@pytest.mark.parametrize("command, yaml_text, option", [
    ("cache-teacher", "teacher: t\ndata: d\ntop_k: null\n", "top_k"),
    ("cache-teacher", "teacher: t\ndata: d\nbatch-size: ~\n", "batch_size"),
    ("train", "cache: c\nstudent: s\nlr: null\n", "lr"),
    ("eval-bbh", "model: m\nprompt_format: null\n", "prompt_format"),
])
def test_a_null_for_an_option_that_needs_a_value_is_refused_naming_the_file(command, yaml_text, option, capsys):
    Path("run.yaml").write_text(yaml_text)
    rc, _, err = run_cli([command, "--config", "run.yaml", "--out", "out"], capsys)
    assert (rc, err) == (2, f"fastkd {command}: error: --config run.yaml: option {option} is null; give a value or "
                            "leave it out\n")
    assert not Path("out").exists()


def test_a_null_is_kept_where_the_option_allows_none_and_refused_in_python_where_not():
    from fastkd.errors import UserError
    from fastkd.train_config import TrainConfig

    Path("run.yaml").write_text("cache: c\nstudent: s\nmax_length: null\nmax_steps: null\n")
    args = cli.build_parser().parse_args(["train", "--config", "run.yaml"])
    assert (TrainConfig.from_args(args).max_length, TrainConfig.from_args(args).max_steps) == (None, None)
    with pytest.raises(UserError, match="^option lr is null; give a value or leave it out$"):
        TrainConfig(cache="c", student="s", lr=None)
    with pytest.raises(UserError, match="^option top_k is null"):
        TrainConfig.make({"cache": "c", "student": "s", "top_k": None})


def test_a_config_file_that_is_not_utf8_is_one_line(capsys):
    Path("bad.yaml").write_bytes(b"\xff\xfe top_k: 8\n")
    for command in (["cache-teacher", "--teacher", "t", "--data", "d"], ["train", "--cache", "c", "--student", "s"]):
        rc, _, err = run_cli([*command, "--config", "bad.yaml", "--out", "out"], capsys)
        assert (rc, err) == (2, f"fastkd {command[0]}: error: --config bad.yaml: not UTF-8 text (byte 0xff at offset "
                                "0)\n")
    assert not Path("out").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ("top_k: true\n", "option top_k: True is not a valid int"),
    ("capture_share: false\n", "option capture_share: False is not a valid float"),
    ("cot: 2\n", "option cot: 2 is not a valid bool"),
    ("cot: 0.0\n", "option cot: 0.0 is not a valid bool"),
    ("top_k: 8\ntop_k: 16\n", "invalid YAML: key top_k is given twice (line 4)"),
    ("top-k: 8\ntop_k: 16\n", "option top_k is given twice"),
])
def test_a_config_value_that_would_change_meaning_or_a_key_given_twice_is_refused(yaml_text, message, capsys):
    Path("run.yaml").write_text("teacher: t\ndata: d\n" + yaml_text)
    rc, _, err = run_cli(["cache-teacher", "--config", "run.yaml", "--out", "out"], capsys)
    assert (rc, err) == (2, f"fastkd cache-teacher: error: --config run.yaml: {message}\n")


def test_yaml_bools_and_numbers_that_keep_their_meaning_are_read():
    from fastkd.cache_stage import CacheConfig
    from fastkd.errors import UserError
    from fastkd.train_config import TrainConfig

    Path("run.yaml").write_text("teacher: t\ndata: d\nout: o\ncot: 0\nchat_template: yes\ntop_k: 8.0\ncapture_share: 1\n")
    config = CacheConfig.make(CacheConfig.load("run.yaml"))
    assert (config.cot, config.chat_template, config.top_k, config.capture_share) == (False, True, 8, 1.0)
    with pytest.raises(UserError, match=re.escape("option student_layers: [1, True] is not a valid list[int]")):
        TrainConfig.make(overrides={"cache": "c", "student": "s", "student_layers": [1, True]})


@pytest.mark.parametrize("value, message", [("-3", "must be >= 1, got -3"), ("0", "must be >= 1, got 0"),
                                            ("x", "must be a whole number >= 1, got 'x'")])
def test_cache_stats_refuses_a_max_sequences_below_one(value, message, capsys):
    rc, out, err = run_cli(["cache", "stats", "no-cache", "--max-sequences", value], capsys)
    assert rc == 2 and not out
    assert err.splitlines()[-1] == f"fastkd cache stats: error: argument --max-sequences: {message}"


# ----------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_in_a_stage_is_one_line_before_the_error_types_are_imported(monkeypatch, capsys):
    """A Ctrl-C that stops `import torch` half-way must not lead main to import the lower layers (for their error
    types) on top of the half-made module: that was a 40-line AttributeError traceback, exit 1."""
    from fastkd import synth

    def stopped(args):
        raise KeyboardInterrupt

    def imports_torch():
        raise AssertionError("main imported the error types while handling a Ctrl-C")

    monkeypatch.setattr(synth, "run_synth", stopped)
    monkeypatch.setattr(cli, "user_errors", imports_torch)
    rc, out, err = run_cli(["data", "synth", "--out", "x.jsonl"], capsys)
    assert rc == 130 and err == "fastkd data: interrupted; re-run the same command to resume\n"


def test_ctrl_c_while_the_commands_are_built_leaves_at_once_in_one_line(monkeypatch, capsys):
    """SIGINT during build_parser (the stage imports) exits 130 with one line, and main restores the handler."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    left = []

    def building():
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)

    monkeypatch.setattr(cli, "build_parser", building)
    monkeypatch.setattr(cli.os, "_exit", lambda code: left.append(code) or (_ for _ in ()).throw(SystemExit(code)))
    rc, out, err = run_cli(["train", "--help"], capsys)
    assert rc == 130 and left == [130] and err == "fastkd: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is before


def test_a_config_built_in_python_is_checked_like_flags_and_yaml():
    """fastkd.hf and train(TrainConfig(...)) build configs without make(): the same types and bounds hold."""
    from fastkd.errors import UserError
    from fastkd.train_config import TrainConfig

    assert TrainConfig(temperature="2").temperature == 2.0 and TrainConfig(chunk_size=3.0).chunk_size == 3
    for bad in (dict(temperature=float("inf")), dict(kl_weight=True), dict(chunk_size=2.5), dict(lr="fast")):
        with pytest.raises(UserError):
            TrainConfig(**bad)


def test_resume_and_overwrite_are_saved_off_so_a_replayed_config_never_deletes_a_run(tmp_path):
    """A run made with --overwrite saves overwrite: false (and resume: false): `--config` of it into the same folder
    is refused like any second run, never a silent delete; the eval's results.json config likewise."""
    from fastkd.evaluate import EvalConfig
    from fastkd.train_config import TrainConfig

    config = TrainConfig.make(overrides=dict(cache="c", student="s", out=str(tmp_path), overwrite=True))
    config.save(tmp_path / "config.yaml")
    again = TrainConfig.make(TrainConfig.load(tmp_path / "config.yaml"))
    assert config.overwrite and not again.overwrite and not again.resume and again.cache == "c"
    assert EvalConfig.make(overrides=dict(model="m", overwrite=True)).as_dict()["overwrite"] is False
