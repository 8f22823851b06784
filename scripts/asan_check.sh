#!/usr/bin/env bash
# Builds speciesclf._native with AddressSanitizer into a scratch folder and runs the given test files
# (default: the native-heavy ones) against it. Exit 0 only if the tests pass and ASan reported nothing.
#   bash scripts/asan_check.sh [SCRATCH_DIR] [TEST_FILE...]
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=${1:-/tmp/speciesclf-asan}
shift || true
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_synthetic.py tests/test_formats.py tests/test_robustness.py)

rm -rf "$scratch/wheel" "$scratch/site" "$scratch"/report.*
mkdir -p "$scratch"
python3 -m pip wheel --no-deps --no-build-isolation -q -w "$scratch/wheel" \
  -Ccmake.define.CMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer -g" \
  -Ccmake.define.SPECIESCLF_CUDA=off \
  -Ccmake.build-type=RelWithDebInfo -Cinstall.strip=false -Cbuild-dir="$scratch/build" .
python3 -c "import glob, sys, zipfile; zipfile.ZipFile(glob.glob(sys.argv[1] + '/wheel/*.whl')[0]).extractall(sys.argv[1] + '/site')" "$scratch"

# Python itself is not instrumented: preload the ASan runtime, and libstdc++ so that ASan can
# intercept C++ throws. Reports go to files, because pytest captures stderr.
export PYTHONPATH="$scratch/site"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$scratch/report"
python3 -c "import speciesclf, sys; assert speciesclf.__file__.startswith(sys.argv[1]), speciesclf.__file__" "$scratch"
status=0
python3 -m pytest -q -p no:cacheprovider "${tests[@]}" || status=$?
if compgen -G "$scratch/report.*" > /dev/null; then
  echo "AddressSanitizer reports:" >&2
  cat "$scratch"/report.* >&2
  status=1
fi
exit $status
