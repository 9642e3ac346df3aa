#!/usr/bin/env bash
# Builds and runs bench/decode_kernel.cpp (one core's ns per key of the decode kernel, per KV
# format, cache in L2 and from memory), with the venv's torch headers and -O3 -march=native
# as the kernels' own build. Options go to the program: --context N, --rounds N, --format F.
#   bench/decode_kernel.sh [--context 2048]
#   bench/decode_kernel.sh --ab /path/to/other/src/ferrolm/kernels [--format int4]   # B / A
# B_FLAGS adds compiler flags to the other tree's build (e.g. -DPROBE for a timing-only
# variant guarded by #ifdef in a copy of the kernels).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
other=""
if [[ ${1:-} == --ab ]]; then
  other=$(cd "$2" && pwd)
  shift 2
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
inc=$("$py" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
lib=$("$py" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
flags=(-O3 -march=native -fno-math-errno -std=c++17 $inc)
g++ "${flags[@]}" -I"$root/src/ferrolm/kernels" -DBENCH_FN=bench_a -c "$root/bench/decode_kernel.cpp" -o "$out/a.o" &
objs=("$out/a.o")
ab=()
if [[ -n $other ]]; then
  g++ "${flags[@]}" ${B_FLAGS:-} -I"$other" -Dferrolm_attention=ferrolm_attention_b -DBENCH_FN=bench_b \
    -c "$root/bench/decode_kernel.cpp" -o "$out/b.o" &
  objs+=("$out/b.o")
  ab=(-DBENCH_AB)
fi
wait
g++ -O2 -std=c++17 "${ab[@]}" "$root/bench/decode_kernel.cpp" "${objs[@]}" -o "$out/decode_kernel" \
  -L"$lib" -lc10 -Wl,-rpath,"$lib"
"$out/decode_kernel" "$@"
