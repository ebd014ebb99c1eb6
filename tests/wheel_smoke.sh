#!/usr/bin/env bash
# The product a user installs, tested the way a user gets it (`make wheel-smoke`, part of `make test`):
#   1. build the wheel from a copy of the checkout (the checkout itself gets no build/ or egg-info);
#   2. a fresh virtualenv: the pinned CPU torch first, then the wheel with its dependencies;
#   3. from a folder outside the checkout: every package folder of the checkout is in the wheel, every
#      public module imports, `--help` of every command and subcommand (walked from the installed CLI,
#      so a new one is covered without editing this file), the demo on a tiny size, and
#      `fastkd cache inspect|verify` on the caches it made.
# Environment: PYTHON (the interpreter of the fresh venv, default python3), TORCH_PIN (default
# torch==2.13.0, the CPU wheel), FASTKD_BBH_DIR (default: ../shared/bbh beside the checkout),
# KEEP_SMOKE=1 keeps the temp folder. pip's cache makes a second run much faster than the first.
set -euo pipefail

started=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
BBH_DIR="${FASTKD_BBH_DIR:-$ROOT/../shared/bbh}"
[ -d "$BBH_DIR" ] || { echo "wheel smoke: no BIG-Bench Hard folder at $BBH_DIR (set FASTKD_BBH_DIR)" >&2; exit 1; }
BBH_DIR="$(cd "$BBH_DIR" && pwd)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastkd-wheel-smoke.XXXXXX")"
cleanup() { if [ "${KEEP_SMOKE:-0}" = 1 ]; then echo "wheel smoke: kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/logs" "$WORK/run"

# The installed product only: nothing from the checkout or the caller's environment on sys.path.
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PYTHONSTARTUP
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
export MPLBACKEND=Agg

say() { printf '[wheel smoke %4ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() { echo "wheel smoke: FAILED: $*" >&2; exit 1; }

# step NAME CMD...: run CMD with its output in logs/NAME.log; a non-zero exit or a traceback fails the
# smoke and shows the end of the log.
step() {
    local name="$1" log="$WORK/logs/$1.log" rc=0
    shift
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ] || grep -q "^Traceback (most recent call last)" "$log"; then
        tail -n 40 "$log" >&2
        fail "$name: '$*' exited with $rc$(grep -q '^Traceback' "$log" && echo ' and printed a traceback')"
    fi
}

# --- 1. the wheel -----------------------------------------------------------------------------
say "copying the checkout (tracked and untracked, not ignored files) to build the wheel from"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z -co --exclude-standard) |
        (cd "$ROOT" && while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done) |
        tar -C "$ROOT" --null -T - -cf - | tar -C "$WORK/src" -xf -
else
    tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude=runs --exclude=build --exclude=dist \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$WORK/src" -xf -
fi

say "fresh virtualenv ($("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
FASTKD="$WORK/venv/bin/fastkd"

say "building the wheel (pip wheel --no-deps)"
step build-wheel "$VPY" -m pip wheel --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/fastkd-*.whl)"
say "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"

say "installing $TORCH_PIN, then the wheel and its dependencies"
step install-torch "$VPY" -m pip install -q "$TORCH_PIN"
step install-wheel "$VPY" -m pip install -q "$WHEEL"
step pip-check "$VPY" -m pip check

# --- 2. the installed product, from outside the checkout ---------------------------------------
cd "$WORK/run"

where="$("$VPY" -c 'import fastkd; print(fastkd.__file__)')"
case "$where" in
    "$WORK/venv/"*) say "fastkd imports from $where" ;;
    *) fail "fastkd imports from $where, not from the fresh venv" ;;
esac

say "every package folder of the checkout is in the wheel; every public module imports"
cat >"$WORK/modules.py" <<'PY'
"""Compare the built source's package folders and modules with the installed fastkd; import each public module."""
import importlib
import os
import pkgutil
import re
import sys
import traceback
from pathlib import Path

src = Path(sys.argv[1])
text = (src / "pyproject.toml").read_text(encoding="utf-8")
try:
    import tomllib
    package_dir = tomllib.loads(text)["tool"]["setuptools"].get("package-dir", {})
except ImportError:  # Python 3.10
    line = re.search(r"^package-dir\s*=\s*\{(.*)\}", text, re.M).group(1)
    package_dir = dict(re.findall(r'"([^"]+)"\s*=\s*"([^"]+)"', line))
package_dir = package_dir or {"fastkd": "fastkd"}

expected_packages, expected_modules = set(), set()
for package, folder in package_dir.items():
    base = src / folder
    for here, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = Path(here).relative_to(base)
        name = ".".join([package, *rel.parts])
        if "__init__.py" not in files:
            continue
        if any(not (base / Path(*rel.parts[:i]) / "__init__.py").is_file() for i in range(len(rel.parts))):
            continue  # under a folder that is no package: not importable as one
        expected_packages.add(name)
        expected_modules.update(f"{name}.{f[:-3]}" for f in files if f.endswith(".py") and f != "__init__.py")

import fastkd  # noqa: E402

installed_root = Path(fastkd.__file__).parent
installed, broken = set(), []


def note(name):
    broken.append((name, traceback.format_exc(limit=1).strip().splitlines()[-1]))


for info in pkgutil.walk_packages(fastkd.__path__, "fastkd.", onerror=note):
    installed.add(info.name)
installed.add("fastkd")
missing = sorted((expected_packages | expected_modules) - installed)
if missing:
    sys.exit("in the source but not in the installed wheel: " + ", ".join(missing)
             + "\n  (a package missing from [tool.setuptools] packages in pyproject.toml?)")

assets = src / "fastkd" / "assets"
for f in sorted(p for p in assets.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
    got = installed_root / "assets" / f.relative_to(assets)
    if not got.is_file() or got.stat().st_size != f.stat().st_size:
        sys.exit(f"package data missing or different in the wheel: {got}")

public = sorted(n for n in installed if not any(part.startswith("_") for part in n.split(".")))
for name in public:
    try:
        importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - every failure is reported
        note(name)
if broken:
    sys.exit("modules that do not import:\n" + "\n".join(f"  {n}: {e}" for n, e in broken))
print(f"{len(expected_packages)} packages, {len(public)} public modules imported, assets present")
PY
step modules "$VPY" "$WORK/modules.py" "$WORK/src"
say "$(tail -n 1 "$WORK/logs/modules.log")"

say "fastkd --help, --version and --help of every command (walked from the installed CLI)"
step version "$FASTKD" --version
grep -q "^fastkd [0-9]" "$WORK/logs/version.log" || fail "fastkd --version printed: $(cat "$WORK/logs/version.log")"
"$VPY" - >"$WORK/commands.txt" <<'PY'
import argparse

from fastkd.cli import build_parser


def walk(parser, path):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, [*path, name])


for path in walk(build_parser(), []):
    print(" ".join(path))
PY
n_commands=0
while read -r -a words; do
    label="help-${words[*]:-fastkd}"
    label="${label// /-}"
    step "$label" "$FASTKD" ${words[@]+"${words[@]}"} --help
    if grep -q "(default: None)\|(default: SUPPRESS)\|(default: ==SUPPRESS==)" "$WORK/logs/$label.log"; then
        fail "fastkd ${words[*]} --help shows a default of None: $(grep -m1 'default: None\|SUPPRESS' "$WORK/logs/$label.log")"
    fi
    n_commands=$((n_commands + 1))
done <"$WORK/commands.txt"
grep -qx "data synth" "$WORK/commands.txt" || fail "fastkd data synth is not among the installed commands"
say "$n_commands help texts: $(sed "s/^$/(fastkd)/" "$WORK/commands.txt" | paste -sd, - | sed "s/,/, /g")"

rc=0
"$FASTKD" train --steps 5 >"$WORK/logs/misspelled.log" 2>&1 || rc=$?
[ "$rc" -eq 2 ] && grep -q "^fastkd train: error: unrecognized argument --steps (did you mean --max-steps?)" \
    "$WORK/logs/misspelled.log" || fail "fastkd train --steps 5 (exit $rc): $(cat "$WORK/logs/misspelled.log")"

# --- 3. the demo on a tiny size, and the cache tools on what it made -------------------------------
say "fastkd demo --quick on a tiny size (BBH from $BBH_DIR)"
step demo env FASTKD_BBH_DIR="$BBH_DIR" "$FASTKD" demo --quick --steps 3 --records-per-task 12 \
    --eval-items-per-task 2 --max-new-tokens 24 --out demo
[ -f demo/summary.json ] || fail "the demo wrote no demo/summary.json"
tail -n 12 "$WORK/logs/demo.log" | sed 's/^/    /'
for cache in cache-cot cache-answers; do
    step "inspect-$cache" "$FASTKD" cache inspect "demo/$cache"
    step "verify-$cache" "$FASTKD" cache verify --no-progress "demo/$cache"
    say "cache $cache: inspect and verify pass ($(grep -m1 '^sequences' "$WORK/logs/inspect-$cache.log" | tr -s ' '))"
done

say "wall time $((SECONDS - started)) s"
echo "wheel smoke: OK: $(basename "$WHEEL") installed in a fresh venv; $n_commands help texts, imports, demo and cache tools pass from outside the checkout"
