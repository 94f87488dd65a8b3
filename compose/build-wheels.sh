#!/usr/bin/env bash
# Builds meshvpn and every runtime dependency as wheels on the host, into compose/wheels/ (gitignored):
#   compose/wheels/project/  the meshvpn wheel (changes with every code change)
#   compose/wheels/deps/     its dependencies (change rarely: a separate Docker layer, so rebuilds stay cheap)
#
# Why on the host: the image build then needs no package index at all (`pip install --no-index`), so it works
# where containers cannot reach PyPI. The wheels must fit the image's Python: both default base images carry
# CPython 3.11, so build with a 3.11 interpreter (PYTHON=python3.11 if `python3` is another version).
#
# Usage: compose/build-wheels.sh [OUTDIR]    (default compose/wheels; PYTHON=/path/to/python3.11 to choose)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
PY=${PYTHON:-python3}

version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$version" != "3.11" ]; then
  echo "build-wheels: $PY is Python $version but the images run Python 3.11; set PYTHON=python3.11" >&2
  exit 1
fi

out=${1:-$here/wheels}
# Fixed timestamps inside the wheel: the same code gives the same bytes, so Docker reuses its cached layers.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}
staging=$(mktemp -d "${TMPDIR:-/tmp}/meshvpn-wheels.XXXXXX")
trap 'rm -rf "$staging"' EXIT

# Build from a clean copy of the source: setuptools builds in-tree and reuses build/ and *.egg-info, which
# could carry modules that no longer exist into the wheel, and two builds at once would share them.
mkdir -p "$staging/src"
tar -C "$repo" -c --exclude=.git --exclude=.venv --exclude=build --exclude=dist --exclude='*.egg-info' \
  --exclude=__pycache__ --exclude=compose/wheels --exclude=.pytest_cache --exclude=.ruff_cache \
  --exclude=.hypothesis --exclude=./var --exclude=./.lab . | tar -C "$staging/src" -x
"$PY" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$staging/all" "$staging/src" >"$staging/log" 2>&1 || {
  cat "$staging/log" >&2
  exit 1
}

mkdir -p "$out/project" "$out/deps"
rm -f "$out"/project/*.whl
mv "$staging"/all/meshvpn-*.whl "$out/project/"
# Replace the dependency set only where it changed, so Docker's layer cache (content-addressed) stays valid.
if ! diff -q <(cd "$staging/all" && ls) <(cd "$out/deps" && ls) >/dev/null 2>&1; then
  rm -f "$out"/deps/*.whl
  mv "$staging"/all/*.whl "$out/deps/"
fi
echo "build-wheels: $(ls "$out/project")  + $(ls "$out/deps" | wc -l) dependency wheels in $out"
