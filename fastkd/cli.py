"""The `fastkd` command: one subcommand per stage module (its `add_arguments` / `run`); a stage that cannot be
imported stays listed and fails loudly in one line, and an unknown option is refused with the closest known one."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import sys
import threading
from importlib import import_module

from fastkd import __version__
from fastkd.config import SHOWN_DEFAULT
from fastkd.errors import user_errors

# (command, module, one-line help); nested groups list their own subcommands
COMMANDS = [
    ("generate-rationales", "fastkd.rationales",
     "have the teacher write n chains of thought per record, keep those reaching the target"),
    ("cache-teacher", "fastkd.cache_stage",
     "run the teacher once over a dataset and cache its top-k log-probs, tail mass and hidden states"),
    ("train", "fastkd.train", "train a student from a teacher cache (or online / SFT baselines)"),
    ("eval-bbh", "fastkd.evaluate", "score a model (or saved predictions) on BIG-Bench Hard with the published recipe"),
    ("demo", "fastkd.demo", "the whole loop on the embedded default: cache, train, evaluate, print a summary"),
]
GROUPS = [
    ("cache", "inspect, verify and summarise a teacher cache", [
        ("inspect", "fastkd.cache_tools.cli", "summary: counts, bytes per loss position, teacher, template"),
        ("verify", "fastkd.cache_tools.cli", "check every shard's digest and that every block decodes"),
        ("stats", "fastkd.cache_tools.cli", "distribution of tail mass, top-1 probability and entropy bounds"),
    ]),
    ("data", "make and inspect training records", [
        ("synth", "fastkd.synth", "generate BBH-format records with step-by-step rationales for algorithmic tasks"),
    ]),
]

_STATES_DEFAULT = re.compile(r"\bdefault", re.IGNORECASE)


def default_note(action: argparse.Action, help_text: str) -> str:
    """What `--help` appends to an option's text about its default: '' when there is nothing to say
    (no default, a required option, an off switch) or when the text already states it."""
    if "%(default)" in help_text or _STATES_DEFAULT.search(help_text):
        return ""
    default = getattr(action, SHOWN_DEFAULT, action.default)
    if default is None or default is argparse.SUPPRESS or action.required:
        return ""
    if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
        return ""
    if isinstance(action, argparse.BooleanOptionalAction):
        return " (default: on)" if default else " (default: off)"
    if action.nargs == 0:  # store_true / store_false / store_const
        return " (default: on)" if default == getattr(action, "const", object()) else ""
    listed = isinstance(default, (list, tuple))
    if listed and not default:  # an empty list (action="append"): nothing given, nothing to say
        return ""
    shown = " ".join(str(x) for x in default) if listed else str(default) or "''"
    return f" (default: {shown.replace('%', '%%')})"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the stage docstring's line breaks; states each option's default once, in words (default_note)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action, argparse.BooleanOptionalAction):  # Python 3.10 appends its own default
            text = text.replace(" (default: %(default)s)", "")
        return text + default_note(action, text)


class Parser(argparse.ArgumentParser):
    """The parser of `fastkd` and every subcommand: `broken` (its stage cannot be imported) exits 2 with that line
    whatever it is given; its help lists `broken_stages` and exits 2; an unknown argument names the closest option."""

    def __init__(self, *args, broken: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.broken = broken
        self.broken_stages: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        if self.broken:
            self.exit(2, f"{self.prog}: error: {self.broken}\n")
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(unrecognized_message(self, extras))
        return namespace, extras

    def error(self, message: str):
        """argparse's error, with a one-line usage when the full one would bury it (fastkd train has ~60 options)."""
        usage = self.format_usage()
        if usage.count("\n") > 4:
            usage = f"usage: {self.prog} [options]   (all of them: {self.prog} --help)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")

    def print_help(self, file=None) -> None:
        super().print_help(file)
        for message in self.broken_stages:
            print(message, file=sys.stderr)
        if self.broken_stages:
            self.exit(2)


def closest_option(parser: argparse.ArgumentParser, word: str) -> str | None:
    """The option of `parser` closest to `word` (compared without the dashes every option shares)."""
    known = {option.lstrip("-"): option for action in parser._actions if action.help is not argparse.SUPPRESS
             for option in action.option_strings if option.startswith("--") and option != "--help"}
    close = difflib.get_close_matches(word.split("=", 1)[0].lstrip("-"), list(known), n=1, cutoff=0.6)
    return known[close[0]] if close else None


def unrecognized_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """'unrecognized argument --steps (did you mean --max-steps?)'; the words after an unknown option
    are taken as its values and not listed again."""
    listed, after_option = [], False
    for word in extras:
        if word.startswith("-") and len(word) > 1 and word != "--":
            name = word.split("=", 1)[0]
            close = closest_option(parser, name)
            listed.append(f"{name} (did you mean {close}?)" if close else name)
            after_option = True
        elif not after_option:
            listed.append(word)
    noun = "argument" if len(listed) == 1 else "arguments:"
    return f"unrecognized {noun} {', '.join(listed)}"


def _add(sub, name: str, module: str, help_text: str, broken_stages: list[list[str]]) -> None:
    try:
        mod = import_module(module)
    except ImportError as err:
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        message = (f"cannot import the module {module} ({detail}); this fastkd installation is incomplete: reinstall "
                   f"fastkd (pip install --force-reinstall fastkd, or `make setup` in a source checkout)")
        p = sub.add_parser(name, help=f"{help_text} [BROKEN: cannot import {module}; reinstall fastkd]",
                           description=help_text, broken=message)
        for stages in broken_stages:
            stages.append(f"{p.prog}: error: {message}")
        return
    adder = getattr(mod, f"add_{name.replace('-', '_')}_arguments", None) or mod.add_arguments
    runner = getattr(mod, f"run_{name.replace('-', '_')}", None) or mod.run
    p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
    adder(p)
    p.set_defaults(_run=runner)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fastkd",
        description="White-box knowledge distillation of chain-of-thought reasoning from a cached teacher.\n"
                    "Flow: cache-teacher (once) -> train (many epochs, from the cache) -> eval-bbh.",
    )
    parser.add_argument("--version", action="version", version=f"fastkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, module, help_text in COMMANDS:
        _add(sub, name, module, help_text, [parser.broken_stages])
    for group, help_text, members in GROUPS:
        gp = sub.add_parser(group, help=help_text, description=help_text)
        gsub = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=Parser)
        for name, module, member_help in members:
            _add(gsub, name, module, member_help, [parser.broken_stages, gp.broken_stages])
        gp.set_defaults(_run=lambda args, gp=gp: (gp.print_help(), 2)[1])
    return parser


def _leave_now(signum, frame) -> None:
    """Ctrl-C while the stages are imported (torch, transformers): nothing is written yet, so leave in one line
    (an import stopped half-way leaves a module half made, and the next import a traceback)."""
    sys.stderr.write("fastkd: interrupted\n")
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _leave_now) if main_thread else None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        rc = int(args._run(args) or 0)
    except KeyboardInterrupt:  # first: the next clause imports the lower layers, maybe the very import stopped here
        print(f"fastkd {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except user_errors() as err:
        print(f"fastkd {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)   # a run stopped by a signal: 128 + its number
    except OSError as err:  # disk full, file too large, permissions: the system's words, then what to do
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"fastkd {args.command}: error: {err.strerror or err}{where}. What was finished before is kept; "
              f"fix this and re-run the same command to resume", file=sys.stderr)   # train says its own (trainer)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # a torchrun rank whose work is done and on disk (the process group destroyed): leave without the
        # interpreter's teardown, where gloo's threads now and then abort with "terminate called" and exit status 134
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
