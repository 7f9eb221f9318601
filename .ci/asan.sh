#!/usr/bin/env bash
# AddressSanitizer run: build collapsekit._C with -DCOLLAPSEKIT_ASAN=ON into a throwaway venv and run
# the tests of the C++ paths under ASan. Any out-of-bounds read/write, use-after-free or double free
# in the kernels or the bindings aborts the run with a report (exit status != 0).
#
#   .ci/asan.sh                  # venv /tmp/collapsekit-asan-venv, build dir /tmp/collapsekit-asan-build
#   .ci/asan.sh -k class_sums    # extra arguments go to pytest
#
# Python and torch are not instrumented, so the ASan runtime is preloaded (LD_PRELOAD); leak
# detection is off (CPython and torch keep allocations alive at exit on purpose) and
# PYTHONMALLOC=malloc sends Python objects through malloc so ASan sees them too. Triton is not
# installed in this venv, so the Triton-interpreter tests skip; the C++ kernels are what is checked.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${COLLAPSEKIT_ASAN_VENV:-/tmp/collapsekit-asan-venv}
BUILD=${COLLAPSEKIT_ASAN_BUILD:-/tmp/collapsekit-asan-build}
LIBASAN=$(${CXX:-g++} -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ] || [ "$LIBASAN" = "libasan.so" ]; then
  echo "asan.sh: the compiler has no libasan.so (install the GCC ASan runtime, e.g. apt-get install libasan8)" >&2
  exit 1
fi

python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q scikit-build-core pybind11 cmake ninja pytest hypothesis numpy matplotlib safetensors "transformers>=5.24,<6"  # the test extra (README usage, analyze-lm plots)
pip install -q --no-build-isolation \
  -C cmake.define.COLLAPSEKIT_ASAN=ON -C cmake.build-type=RelWithDebInfo -C build-dir="$BUILD" .

# the module must really be instrumented, else the run below proves nothing
SO=$(cd /tmp && python -c "import importlib.util as u; print(u.find_spec('collapsekit._C').origin)")
if ! grep -q __asan_init "$SO"; then
  echo "asan.sh: $SO is not built with AddressSanitizer" >&2
  exit 1
fi
# libstdc++ is preloaded too: python itself does not link it, so without it ASan's __cxa_throw
# interceptor finds no real __cxa_throw and the first C++ exception thrown inside torch (e.g. for
# torch.device("nonsense")) dies with "CHECK failed: asan_interceptors.cpp ... real___cxa_throw".
PRELOAD="$LIBASAN $(${CXX:-g++} -print-file-name=libstdc++.so)"
echo "asan.sh: testing $SO under $LIBASAN"

# run from /tmp against the installed package (not the source tree), with the repo's tests
TESTS=$PWD/tests
cd /tmp
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1

# canary: a kernel told to read one row past a torch tensor must be caught, else ASan is not active
# (e.g. the runtime was not preloaded) and a clean run below would mean nothing
CANARY='import torch, collapsekit._C as C
h = torch.ones(4, 4); out = torch.empty(5, 4)
a = C.NormalizeRowsArgs()
a.features, a.feature_dtype, a.R, a.D, a.fs0, a.fs1 = h.data_ptr(), 0, 5, 4, 4, 1
a.eps, a.scale, a.out, a.inv_norms, a.num_threads = 1e-12, 1.0, out.data_ptr(), 0, 1
C.normalize_rows(a)'
if (LD_PRELOAD="$PRELOAD" PYTHONMALLOC=malloc python -c "$CANARY"; exit $?) 2>/tmp/collapsekit-asan-canary.log; then
  echo "asan.sh: the canary out-of-bounds read was NOT detected; ASan is not working" >&2
  exit 1
fi
if ! grep -q "heap-buffer-overflow" /tmp/collapsekit-asan-canary.log; then
  echo "asan.sh: the canary failed, but not with an ASan report:" >&2
  tail -20 /tmp/collapsekit-asan-canary.log >&2
  exit 1
fi
echo "asan.sh: canary out-of-bounds read detected, as it must be"
LD_PRELOAD="$PRELOAD" PYTHONMALLOC=malloc \
  python -m pytest "$TESTS" -q -p no:cacheprovider -x -k "not triton" \
  --ignore="$TESTS/test_triton_compile.py" "$@"
