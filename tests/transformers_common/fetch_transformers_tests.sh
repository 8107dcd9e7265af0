#!/usr/bin/env bash
# Fetch transformers' common model tests (tests/*.py of its source distribution on PyPI) for the
# INSTALLED transformers version into OUT (default .cache/transformers-tests, git-ignored):
#   OUT/transformers-<version>/tests/test_modeling_common.py & co., plus the sdist's LICENSE (Apache-2.0).
# Nothing is vendored; tests/test_transformers_common.py skips with the reason when this is absent.
# Idempotent (does nothing when the version's tests are there); a failed download warns and exits 0.
set -euo pipefail
PY=${PY:-python}
OUT=${1:-.cache/transformers-tests}
V=$("$PY" -c 'from importlib.metadata import version; print(version("transformers"))')
DEST="$OUT/transformers-$V"
if [ -f "$DEST/tests/test_modeling_common.py" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching transformers $V's common tests (source distribution) into $DEST"
if ! "$PY" -m pip download --quiet --no-deps --no-binary :all: "transformers==$V" -d "$tmp" \
    || ! tar -xzf "$tmp/transformers-$V.tar.gz" -C "$tmp" "transformers-$V/tests" "transformers-$V/LICENSE"; then
  echo "warning: could not fetch transformers $V's tests: tests/test_transformers_common.py will skip" >&2
  exit 0
fi
mkdir -p "$OUT"
rm -rf "$DEST"
mv "$tmp/transformers-$V" "$DEST"
# The sdist's tests/ is not a package, and lacks tests/generation/ (GenerationTesterMixin): the test
# module supplies that (see tests/test_transformers_common.py).
touch "$DEST/tests/__init__.py"
