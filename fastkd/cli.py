"""The `fastkd` command: one subcommand per stage of the flow.

Each stage module exposes `add_arguments(parser)` and `run(args) -> int`; this file only
wires them together, so `fastkd X --help` is the stage's own documentation.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (command, module, one-line help); nested groups list their own subcommands
COMMANDS = [
    ("generate-rationales", "fastkd.rationales", "have the teacher write n chains of thought per record, keep those reaching the target"),
    ("cache-teacher", "fastkd.cache_stage", "run the teacher once over a dataset and cache its top-k log-probs, tail mass and hidden states"),
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, keep the stage docstring's own line breaks."""


def _load(module: str):
    return importlib.import_module(module)


def _add(sub, name: str, module: str, help_text: str) -> None:
    try:
        mod = _load(module)
    except ImportError as err:
        if not err.name or not err.name.startswith("fastkd"):
            raise
        return  # stage not built yet
    adder = getattr(mod, f"add_{name.replace('-', '_')}_arguments", None) or mod.add_arguments
    runner = getattr(mod, f"run_{name.replace('-', '_')}", None) or mod.run
    p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                       formatter_class=_HelpFormatter)
    adder(p)
    p.set_defaults(_run=runner)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastkd",
        description="White-box knowledge distillation of chain-of-thought reasoning from a cached teacher. "
                    "Flow: cache-teacher (once) -> train (many epochs, from the cache) -> eval-bbh.",
    )
    from fastkd import __version__

    parser.add_argument("--version", action="version", version=f"fastkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        _add(sub, name, module, help_text)
    for group, help_text, members in GROUPS:
        gp = sub.add_parser(group, help=help_text, description=help_text)
        gsub = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        for name, module, member_help in members:
            _add(gsub, name, module, member_help)
        gp.set_defaults(_run=lambda args, gp=gp: (gp.print_help(), 2)[1])
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from fastkd.errors import UserError

    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"fastkd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, file too large, permissions: the system's words, then what to do
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        again = "re-run with --resume" if args.command == "train" else "re-run the same command to resume"
        print(f"fastkd {args.command}: error: {err.strerror or err}{where}. What was finished before is kept; "
              f"fix this and {again}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastkd {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
