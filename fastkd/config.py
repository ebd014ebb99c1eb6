"""One configuration style for every stage: a dataclass whose fields (default + help) make the flags, read `--config`
YAML and are saved with the output; options every stage has are made once each (DEVICE(), DTYPE() ...)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import operator
from pathlib import Path

from fastkd.errors import UserError

# the attribute of an argparse action holding the default its help shows (its real default is SUPPRESS)
SHOWN_DEFAULT = "shown_default"
# a field's annotation -> (its value type, whether it is a list)
_TYPES = {"int": (int, False), "float": (float, False), "str": (str, False), "bool": (bool, False),
          "list[int]": (int, True), "list[str]": (str, True)}
# the bounds a numeric field may have (inclusive, or exclusive as JSON Schema's): metadata key -> (shown as, test)
BOUNDS = {"minimum": (">=", operator.ge), "exclusive_minimum": (">", operator.gt),
          "maximum": ("<=", operator.le), "exclusive_maximum": ("<", operator.lt)}


def option(default, help: str, **extra):
    """A config field: its default and help text; optional `choices`, `required`, `metavar`, the BOUNDS
    (`minimum`, `exclusive_minimum`, `maximum`, `exclusive_maximum`) and `once` (an action for this run only,
    --resume or --overwrite: saved as its default, so replaying a saved config never continues or deletes by itself)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def DEVICE():
    return option("auto", "auto (cuda when available), cpu, cuda, cuda:1 ...")


def DTYPE(what: str = "model"):
    return option("auto", f"{what} dtype: auto (float32 on CPU; on CUDA the checkpoint's own, bfloat16 for eval), "
                          f"bfloat16, float16, float32", choices=["auto", "bfloat16", "float16", "float32"])


def SEED(what: str = "sampling"):
    return option(0, f"seed for {what}", minimum=0, maximum=2**32 - 1)   # numpy's seeds are 32-bit


def PROGRESS():
    return option(True, "show progress bars")


def CHAT_TEMPLATE():
    return option(False, "wrap the prompt in the tokenizer's chat template (user turn + generation prompt)")


class StageConfig:
    """Base of every stage's config dataclass: flags, YAML and saving, made the same way for all."""

    def __post_init__(self):
        """Each field's own rules (required, not null, choices, bounds), however the config was built."""
        for name, f in self.fields().items():
            value, choices = self.coerce(name, getattr(self, name)), f.metadata.get("choices")
            setattr(self, name, value)   # a config built in Python (fastkd.hf, train(TrainConfig(...))) is checked too
            if value in (None, "") and f.metadata.get("required"):  # "" too: `--out "$UNSET"` is not the cwd
                raise UserError(f"give {_flag(name)}: {f.metadata['help']}")
            if value is None and not _nullable(f):
                raise UserError(_null_message(name))
            if value is None:
                continue
            if choices and value not in choices:
                raise UserError(f"option {name}: {value!r} is not one of {', '.join(map(str, choices))}")
            bounds = [(sign, test, f.metadata[key]) for key, (sign, test) in BOUNDS.items() if key in f.metadata]
            if isinstance(value, (int, float)) and not all(test(value, bound) for _, test, bound in bounds):
                wanted = " and ".join(f"{sign} {bound}" for sign, _, bound in bounds)
                raise UserError(f"{_flag(name)} must be {wanted}, got {value}")

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
        return cls(**values).validate()   # __post_init__ coerces and checks each value

    @classmethod
    def load(cls, path: str | Path) -> dict:
        """Options from a YAML file (keys as the fields, dashes or underscores); each given once, null only where
        the field allows None."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        given = _read_yaml(path) or {}   # an empty file: no options
        if not isinstance(given, dict):
            raise UserError(f"--config {path}: expected a mapping of option: value")
        values = {}
        for key, value in given.items():   # `top-k` and `top_k` are one option
            name = str(key).replace("-", "_")
            if name in values:
                raise UserError(f"--config {path}: option {name} is given twice")
            values[name] = value
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
        for name, value in values.items():
            if value is None and not _nullable(cls.fields()[name]):
                raise UserError(f"--config {path}: {_null_message(name)}")
        try:
            return {name: cls.coerce(name, value) for name, value in values.items()}
        except UserError as err:
            raise UserError(f"--config {path}: {err}") from None

    def save(self, path: str | Path) -> None:
        """The resolved config as YAML, which `--config` reads back."""
        import yaml

        try:
            Path(path).write_text(yaml.safe_dump(self.as_dict(), sort_keys=False), encoding="utf-8")
        except OSError as err:   # a full disk: the message names config.yaml
            err.filename = err.filename or str(path)
            raise

    def as_dict(self) -> dict:
        """The config as saved with the output: `once` options at their defaults."""
        fields = self.fields()
        return {k: fields[k].default if fields[k].metadata.get("once") else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def coerce(cls, name: str, value):
        """A value as its field's type (YAML reads `1e-4` as a string, for one)."""
        if value is None:
            return None
        kind, many = _kind(cls.fields()[name])
        try:
            if many:
                return [_as(kind, x) for x in (value if isinstance(value, (list, tuple)) else str(value).split(","))]
            return _as(kind, value)
        except (TypeError, ValueError):
            raise UserError(f"option {name}: {value!r} is not a valid {_annotation(cls.fields()[name])}") from None


def _read_yaml(path: Path):
    """A --config file read with a safe loader; one that is not UTF-8, not YAML, or gives a key twice in a mapping is
    refused in one line naming the file."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key} is given twice (line {key_node.start_mark.line + 1})")
                    seen.add(key)
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeys)
    except UnicodeDecodeError as err:
        raise UserError(f"--config {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                        f"{err.start})") from None
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: invalid YAML: {str(err).splitlines()[0]}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _null_message(name: str) -> str:
    return f"option {name} is null; give a value or leave it out"


def _as(kind: type, value):
    """`value` as `kind`, refusing what would change its meaning: null, a bool as a number, a number other than 0/1
    as a bool, a fraction as an int, an infinite or NaN float."""
    if value is None:
        raise ValueError(value)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise ValueError(value)
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    out = kind(value)
    if kind is float and not math.isfinite(out):
        raise ValueError(value)
    return out


def _nullable(f: dataclasses.Field) -> bool:
    return _annotation(f).endswith(" | None")


def _kind(f: dataclasses.Field) -> tuple[type, bool]:
    return _TYPES[_annotation(f).replace(" | None", "")]


def _annotation(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
