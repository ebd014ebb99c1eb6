"""Train a student from a teacher cache (offline KD), a live teacher (online KD) or records (SFT).

Every option lives in `TrainConfig`; a YAML file (--config) sets any of them and command-line
flags override the file. The resolved config is saved as <out>/config.yaml. Examples:

  fastkd train --cache cache/ --student Qwen/Qwen2.5-0.5B --out runs/kd
  fastkd train --data records.jsonl --student S --teacher T --out runs/online    (online KD)
  fastkd train --cache cache/ --student S --kl-weight 0 --out runs/sft           (SFT baseline)
  torchrun --nproc-per-node 4 -m fastkd train --config run.yaml                  (DDP)
"""

from __future__ import annotations

import argparse

from fastkd.train_config import (FIELDS, TrainConfig, _annotation, _arg_type, coerce, load_config_file,  # noqa: F401
                                 make_config, save_config)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; a flag not given is absent from args, so the config file wins.

    The field's default is shown by the CLI's help formatter (fastkd.cli.HelpFormatter), as for every
    other command: each flag carries it as `shown_default`, since its argparse default is SUPPRESS."""
    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML file with any of the options below; flags override it")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = _arg_type(_annotation(f))
        help_text = f.metadata["help"]
        if kind is bool:
            action = p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                    help=help_text)
        elif kind == "list[int]":
            action = p.add_argument(flag, dest=name, type=int, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            action = p.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS,
                                    choices=f.metadata.get("choices"), help=help_text)
        action.shown_default = f.default  # fastkd.cli.SHOWN_DEFAULT


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    overrides = {name: getattr(args, name, None) for name in FIELDS}
    return make_config(file_values, overrides)


def run(args: argparse.Namespace) -> int:
    from fastkd.trainer import train

    result = train(config_from_args(args))
    if result.is_main:
        print(result.summary())
    return 0
