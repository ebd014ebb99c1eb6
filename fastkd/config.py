"""One configuration style for every stage: a dataclass whose fields (default + help) make the flags, read `--config`
YAML and are saved with the output; options every stage has are made once each (DEVICE(), DTYPE() ...)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fastkd.errors import UserError

# the attribute of an argparse action holding the default its help shows (its real default is SUPPRESS)
SHOWN_DEFAULT = "shown_default"
# a field's annotation -> (its value type, whether it is a list)
_TYPES = {"int": (int, False), "float": (float, False), "str": (str, False), "bool": (bool, False),
          "list[int]": (int, True), "list[str]": (str, True)}


def option(default, help: str, **extra):
    """A config field: its default and help text; optional `choices`, `minimum`, `required`, `metavar`."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def DEVICE():
    return option("auto", "auto (cuda when available), cpu, cuda, cuda:1 ...")


def DTYPE(what: str = "model"):
    return option("auto", f"{what} dtype: auto (float32 on CPU; on CUDA the checkpoint's own, bfloat16 for eval), "
                          f"bfloat16, float16, float32", choices=["auto", "bfloat16", "float16", "float32"])


def SEED(what: str = "sampling"):
    return option(0, f"seed for {what}")


def PROGRESS():
    return option(True, "show progress bars")


def CHAT_TEMPLATE():
    return option(False, "wrap the prompt in the tokenizer's chat template (user turn + generation prompt)")


class StageConfig:
    """Base of every stage's config dataclass: flags, YAML and saving, made the same way for all."""

    def __post_init__(self):
        """Each field's own rules (required, choices, minimum), however the config was built."""
        for name, f in self.fields().items():
            value, choices, minimum = getattr(self, name), f.metadata.get("choices"), f.metadata.get("minimum")
            if value in (None, "") and f.metadata.get("required"):  # "" too: `--out "$UNSET"` is not the cwd
                raise UserError(f"give {_flag(name)}: {f.metadata['help']}")
            if value is None:
                continue
            if choices and value not in choices:
                raise UserError(f"option {name}: {value!r} is not one of {', '.join(map(str, choices))}")
            if minimum is not None and isinstance(value, (int, float)) and not value >= minimum:
                raise UserError(f"{_flag(name)} must be >= {minimum}, got {value}")

    def validate(self):
        """Cross-field checks a stage adds; returns self."""
        return self

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """`--config` and one flag per field; a flag not given is absent from the parsed args, so a config file wins."""
        parser.add_argument("--config", default=argparse.SUPPRESS,
                            help="YAML file with any of the options below; flags override it")
        for name, f in cls.fields().items():
            kind, many = _kind(f)
            text = f.metadata["help"] + (" (required)" if f.metadata.get("required") else "")
            common = {"dest": name, "default": argparse.SUPPRESS, "help": text}
            if kind is bool:
                action = parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **common)
            else:
                action = parser.add_argument(_flag(name), type=kind, nargs="+" if many else None,
                                             choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"),
                                             **common)
            setattr(action, SHOWN_DEFAULT, f.default if f.default is not dataclasses.MISSING else f.default_factory())

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        file_values = cls.load(args.config) if getattr(args, "config", None) else {}
        return cls.make(file_values, {name: getattr(args, name, None) for name in cls.fields()})

    @classmethod
    def make(cls, file_values: dict | None = None, overrides: dict | None = None):
        """Defaults < config file < overrides (values that are not None), each checked against its field's type."""
        values = dict(file_values or {})
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise UserError(f"unknown option(s) {', '.join(unknown)}")
        return cls(**{k: cls.coerce(k, v) for k, v in values.items()}).validate()

    @classmethod
    def load(cls, path: str | Path) -> dict:
        """Options from a YAML file (keys as the fields, dashes or underscores)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"--config {path}: invalid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise UserError(f"--config {path}: expected a mapping of option: value")
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
        return values

    def save(self, path: str | Path) -> None:
        """The resolved config as YAML, which `--config` reads back."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.as_dict(), sort_keys=False))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, name: str, value):
        """A value as its field's type (YAML reads `1e-4` as a string, for one)."""
        if value is None:
            return None
        kind, many = _kind(cls.fields()[name])
        try:
            if many:
                return [kind(x) for x in (value if isinstance(value, (list, tuple)) else str(value).split(","))]
            return _as(kind, value)
        except (TypeError, ValueError):
            raise UserError(f"option {name}: {value!r} is not a valid {_annotation(cls.fields()[name])}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _as(kind: type, value):
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    if kind is bool and not isinstance(value, (bool, int)):
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return kind(value)


def _kind(f: dataclasses.Field) -> tuple[type, bool]:
    return _TYPES[_annotation(f).replace(" | None", "")]


def _annotation(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
