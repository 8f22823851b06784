#!/usr/bin/env bash
# The whole GPU check in one script, for a lent GPU machine (one H100 or H200, 16 cores, Ubuntu, Python 3.12 with
# torch + torchvision for CUDA 13, nvcc 13, cmake, ninja, scikit-build-core, pybind11, pytest; no package
# registry, no internet). It must finish within 8 minutes (480 s): each step has its own time limit and the
# benchmark gets what is left (--budget), so that the table is always printed, last.
#
#   1. env         what the machine has (GPU, driver, nvcc, python, torch, cmake)
#   2. deps        unpacks .gpucarry/debs (libjpeg-turbo, libspng, libwebp, zlib, pkgconf) with dpkg -x into a
#                  private prefix ($DEPS, /tmp/speciesclf-deps), never into /; points pkg-config, the compiler
#                  and the loader at it; compiles and runs a small C program against those libraries
#   3. nvjpeg      the toolkit's nvJPEG if it has one, else installs .gpucarry/wheels/nvidia_nvjpeg-13.0.*
#   4. build       python3 -m pip install --no-build-isolation --no-deps --no-index . with SPECIESCLF_CUDA=on
#   5. gpu-tests   tests/test_gpu*.py (marker `gpu`), with SPECIESCLF_SHARED=.gpucarry/shared
#   6. cpu-tests   a quick CPU sanity subset (API, parity with the reference, formats, the host-side GPU tests)
#   7. bench       benchmarks/cpu_vs_gpu.py sized to fit, table + JSON + the RESULTS.md section into $OUT
#
# Before: here, on a development machine, `bash scripts/prepare_gpu_carry.sh` (fills .gpucarry/, ~50 MiB).
# Then, from a session that was lent a GPU, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpucarry"], timeout_s=540)
# Output: $OUT/gpu_check.log (everything), build.log, gpu_tests.log, cpu_tests.log, cpu_vs_gpu.{md,json,log},
# RESULTS.md (the repo's file with the run recorded by --write-results, to copy back verbatim).
# Exit status: 0 when every step passed.
#
# Local rehearsal without a GPU (steps that need none): GPU_CHECK_STEPS="env deps" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
START=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE_S:-470}  # seconds after START by which everything, the table included, is done
STEPS=${GPU_CHECK_STEPS:-env deps nvjpeg build gpu-tests cpu-tests bench}
CARRY=$REPO/.gpucarry
DEPS=${DEPS:-/tmp/speciesclf-deps}
OUT=${OUT:-/tmp/gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

declare -A STATUS=()
ORDER=()
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE - $(elapsed) )); }
note() { echo "[gpu_check $(elapsed)s] $*"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
record() { STATUS[$1]=$2; ORDER+=("$1"); note "$1: $2"; }

export SPECIESCLF_SHARED=$CARRY/shared
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INDEX=1
[ -d "$SPECIESCLF_SHARED" ] || SPECIESCLF_SHARED=$REPO/../shared  # a rehearsal on a machine that has shared/

# ------------------------------------------------------------------------------------------------ 1. env
if want env; then
  note "machine: $(nproc) cores, $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"), $(uname -r)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  command -v nvcc >/dev/null && nvcc --version | tail -2 | head -1
  cmake --version 2>/dev/null | head -1
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "torchvision", "numpy", "PIL", "onnxruntime", "scikit_build_core", "pybind11", "pytest", "hypothesis"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), end="")
        if name == "torch":
            print(f" (CUDA {m.version.cuda}, available {m.cuda.is_available()})", end="")
        print()
    except Exception as e:
        print(name, "MISSING", type(e).__name__)
EOF
  record env ok
fi

# ----------------------------------------------------------------------------------------------- 2. deps
if want deps; then
  if ! ls "$CARRY"/debs/*.deb >/dev/null 2>&1; then
    record deps "FAILED: no $CARRY/debs/*.deb (run scripts/prepare_gpu_carry.sh first)"
  else
    rm -rf "$DEPS" && mkdir -p "$DEPS"
    for deb in "$CARRY"/debs/*.deb; do dpkg-deb -x "$deb" "$DEPS"; done
    # Debian's absolute symlinks (libz.so -> /lib/...) would point into this machine's own /lib
    find "$DEPS" -type l | while read -r link; do
      target=$(readlink "$link")
      if [[ $target == /* ]]; then ln -sfn "$DEPS$target" "$link"; fi
    done
    # the .pc files name /usr as their prefix; they must name the private one
    for pc in "$DEPS"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc "$DEPS"/usr/share/pkgconfig/*.pc; do
      [ -f "$pc" ] && sed -i -E "s#(=|-I|-L)/usr(/|\$| )#\1$DEPS/usr\2#g" "$pc"
    done
    LIBDIR=$DEPS/usr/lib/x86_64-linux-gnu
    export PKG_CONFIG_PATH=$LIBDIR/pkgconfig:$DEPS/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
    # zlib's runtime stays the system's (not on the loader path): only its headers and link name are borrowed
    export LD_LIBRARY_PATH=$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    # jconfig.h sits in Debian's multiarch include folder, which the compiler searches only under /usr
    export CPATH=$DEPS/usr/include/x86_64-linux-gnu:$DEPS/usr/include${CPATH:+:$CPATH}
    export LIBRARY_PATH=$LIBDIR${LIBRARY_PATH:+:$LIBRARY_PATH}
    if ! command -v pkg-config >/dev/null; then export PATH=$DEPS/usr/bin:$PATH; fi
    # CMake finds the codecs through pkg-config, but zlib (libspng's dependency) through FindZLIB
    CMAKE_EXTRA=""
    if [ ! -e /usr/include/zlib.h ]; then CMAKE_EXTRA="-DZLIB_ROOT=$DEPS/usr"; fi
    note "pkg-config: $(command -v pkg-config); libjpeg $(pkg-config --modversion libjpeg) at $(pkg-config --variable=libdir libjpeg), spng $(pkg-config --modversion spng), libwebp $(pkg-config --modversion libwebp)"
    probe=$DEPS/probe
    mkdir -p "$probe"
    cat > "$probe/probe.c" <<'EOF'
#include <stdio.h>
#include <jpeglib.h>
#include <spng.h>
#include <webp/decode.h>
int main(void) {
  struct jpeg_decompress_struct cinfo; struct jpeg_error_mgr err;
  cinfo.err = jpeg_std_error(&err); jpeg_create_decompress(&cinfo); jpeg_destroy_decompress(&cinfo);
  spng_ctx *ctx = spng_ctx_new(0); spng_ctx_free(ctx);
  printf("probe: libjpeg-turbo %d, spng %s, webp decoder 0x%06x\n", LIBJPEG_TURBO_VERSION_NUMBER, spng_version_string(), WebPGetDecoderVersion());
  return 0;
}
EOF
    # shellcheck disable=SC2046
    if cc -o "$probe/probe" "$probe/probe.c" $(pkg-config --cflags --libs libjpeg spng libwebp) && "$probe/probe" \
       && ldd "$probe/probe" | grep -E "jpeg|spng|webp" | sed 's/^/probe links: /' && ! ldd "$probe/probe" | grep -q "not found"; then
      record deps ok
    else
      record deps "FAILED: could not compile, link or run against the unpacked codecs"
    fi
  fi
fi

# --------------------------------------------------------------------------------------------- 3. nvjpeg
if want nvjpeg; then
  CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")}
  if ls "$CUDA_HOME"/include/nvjpeg.h "$CUDA_HOME"/targets/*/include/nvjpeg.h >/dev/null 2>&1; then
    record nvjpeg "ok (the toolkit's, $CUDA_HOME)"
  else
    wheel=$(ls "$CARRY"/wheels/nvidia_nvjpeg-13.0.*.whl 2>/dev/null | head -1)
    have=$("$PY" -c "import importlib.metadata as m; print(m.version('nvidia-nvjpeg'))" 2>/dev/null)
    if [ -n "$have" ]; then
      note "nvidia-nvjpeg $have already installed"
    elif [ -n "$wheel" ]; then
      "$PY" -m pip install -q --no-deps "$wheel"
    fi
    root=$("$PY" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
for folder in (spec.submodule_search_locations if spec else []):
    for header in sorted(pathlib.Path(folder).glob("cu*/include/nvjpeg.h")):
        print(header.parent.parent)
        raise SystemExit
EOF
)
    if [ -n "$root" ]; then
      CMAKE_EXTRA="${CMAKE_EXTRA:-} -DSPECIESCLF_NVJPEG_ROOT=$root"
      export LD_LIBRARY_PATH=$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      record nvjpeg "ok (wheel, $root)"
    else
      record nvjpeg "FAILED: the toolkit has no nvjpeg.h and no nvidia-nvjpeg wheel could be installed"
    fi
  fi
fi

# ---------------------------------------------------------------------------------------------- 4. build
if want build; then
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  # only this GPU's architecture: the full list of cache default costs build minutes the check does not have
  archs=${SPECIESCLF_CUDA_ARCHITECTURES:-${arch:+${arch}-real}}
  export CMAKE_ARGS="${CMAKE_EXTRA:-}${archs:+ -DSPECIESCLF_CUDA_ARCHITECTURES=$archs}"
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
  export SPECIESCLF_CUDA=on CMAKE_BUILD_PARALLEL_LEVEL
  note "building: SPECIESCLF_CUDA=on CMAKE_ARGS=$CMAKE_ARGS"
  timeout 240 "$PY" -m pip install -v --no-build-isolation --no-deps --no-index "$REPO" > "$OUT/build.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    INSTALLED=1
    grep -E "speciesclf: " "$OUT/build.log" | sed 's/^ *//' | sort -u
    (cd /tmp && "$PY" -c "import speciesclf, speciesclf.preprocessing.gpu as g; i = speciesclf.info(); print('installed:', speciesclf.__file__); print('codecs:', i.get('codecs'), '| cuda:', i.get('cuda')); print('cuda_status:', g.cuda_status())")
    if (cd /tmp && "$PY" -c "import speciesclf.preprocessing.gpu as g, sys; sys.exit(0 if g.cuda_status()[0] else 1)"); then
      record build ok
    else
      record build "FAILED: installed, but speciesclf.preprocessing.gpu.cuda_status() says the GPU path is not usable"
    fi
  else
    tail -40 "$OUT/build.log"
    record build "FAILED (pip exit $rc$([ $rc -eq 124 ] && echo ', over 240 s'); log: build.log)"
  fi
fi

INSTALLED=${INSTALLED:-$(want build || echo 1)}  # without the build step: whatever is installed already
run_pytest() {  # name, time limit, pytest arguments...
  local name=$1 limit=$2; shift 2
  if [ "$INSTALLED" != 1 ]; then record "$name" "SKIPPED: speciesclf was not installed"; return; fi
  timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -15 "$OUT/$name.log"
  case $rc in
    0) record "$name" ok ;;
    5) record "$name" "FAILED: no test collected" ;;
    124) record "$name" "FAILED: over its ${limit} s limit" ;;
    *) record "$name" "FAILED (pytest exit $rc; log: $name.log)" ;;
  esac
}

# ------------------------------------------------------------------------------------------ 5. gpu-tests
if want gpu-tests; then
  mapfile -t gpu_tests < <(ls tests/test_gpu*.py 2>/dev/null)
  if [ ${#gpu_tests[@]} -gt 0 ]; then
    # -rs: a GPU test that skips here (where a GPU is present) is itself a finding
    run_pytest gpu_tests 120 -rs "${gpu_tests[@]}"
  else
    run_pytest gpu_tests 120 -rs -m gpu tests
  fi
fi

# ------------------------------------------------------------------------------------------ 6. cpu-tests
if want cpu-tests; then
  mapfile -t cpu_tests < <(ls tests/test_api.py tests/test_parity.py tests/test_formats.py tests/test_fused_twin.py 2>/dev/null)
  run_pytest cpu_tests 90 "${cpu_tests[@]}"
fi

# ---------------------------------------------------------------------------------------------- 7. bench
if want bench; then
  remaining=$(left)
  # the script needs ~40 s outside its measuring (imports, 12 MP set, models, parity, report)
  budget=$(( remaining - 55 ))
  if [ "$INSTALLED" != 1 ]; then
    record bench "SKIPPED: speciesclf was not installed"
  elif [ "$budget" -lt 60 ]; then
    record bench "SKIPPED: only ${remaining} s left"
  else
    note "benchmark: --budget $budget s (of $remaining s left)"
    timeout $(( remaining - 5 )) "$PY" benchmarks/cpu_vs_gpu.py \
      --images 10000 --batches 1,32,256 --models mobilenet_v2,resnet50 --precision fp16 \
      --repeats 3 --seconds 1.0 --n12mp 16 --images-12mp 128 --batches-12mp 32 \
      --max-wait 5 --budget "$budget" --write-results --json "$OUT/cpu_vs_gpu.json" \
      --note "Run by benchmarks/gpu_check.sh on a lent GPU machine; speciesclf built there with SPECIESCLF_CUDA=on, CMAKE_ARGS='${CMAKE_ARGS:-}'." \
      > "$OUT/cpu_vs_gpu.md" 2> "$OUT/cpu_vs_gpu.log"
    rc=$?
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
    if [ $rc -eq 0 ]; then record bench ok; else tail -20 "$OUT/cpu_vs_gpu.log"; record bench "FAILED (exit $rc; log: cpu_vs_gpu.log)"; fi
  fi
fi

# -------------------------------------------------------------------------------------------- summary
failed=0
echo
echo "==================== gpu_check summary ($(elapsed) s of $DEADLINE) ===================="
for step in "${ORDER[@]}"; do
  echo "  $step: ${STATUS[$step]}"
  [[ ${STATUS[$step]} == ok* ]] || failed=1
done
if [ -s "$OUT/cpu_vs_gpu.md" ]; then
  echo
  echo "==================== cpu_vs_gpu.py ===================="
  cat "$OUT/cpu_vs_gpu.md"
fi
# let tee write the last lines to the log before the machine is handed back
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $failed
