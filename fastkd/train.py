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

from fastkd.train_config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    TrainConfig.add_flags(p)


def run(args: argparse.Namespace) -> int:
    from fastkd.trainer import train

    result = train(TrainConfig.from_args(args))
    if result.is_main:
        print(result.summary())
    return 0
