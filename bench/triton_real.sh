#!/usr/bin/env bash
# A real Triton server on the bundle's triton/ repository (`make triton-check`), as far as this machine allows:
# nvidia-pytriton's wheel (PyPI) bundles tritonserver with the Python backend only (no onnxruntime backend),
# so tests/unit/test_triton.py::test_real_tritonserver_serves_the_same_answers runs the ensemble, the
# tokenizer and postprocess model.py files and dynamic batching in tritonserver, with the ONNX step swapped
# for a Python stand-in running ONNX Runtime on the same config and model.onnx. The backend stub needs
# numpy<2, so it gets its own small virtualenv. Output: bench/results/<stamp>-triton-real.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
work=runs/triton-real
mkdir -p "$work" bench/results
wheel=$(ls "$work"/nvidia_pytriton-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  .venv/bin/pip download -q --no-deps nvidia-pytriton==0.7.0 -d "$work"
  wheel=$(ls "$work"/nvidia_pytriton-*.whl | head -1)
fi
if [ ! -x "$work/home/bin/tritonserver" ]; then
  rm -rf "$work/x" "$work/home"
  .venv/bin/python -m zipfile -e "$wheel" "$work/x"
  cp -r "$work/x/pytriton/tritonserver" "$work/home"
  py=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  cp "$work/x/pytriton/tritonserver/python_backend_stubs/$py/triton_python_backend_stub" "$work/home/backends/python/"
  chmod +x "$work/home/bin/tritonserver" "$work/home/backends/python/triton_python_backend_stub"
fi
if [ ! -x "$work/env/bin/python" ]; then
  python3 -m venv "$work/env"
  "$work/env/bin/pip" install -q "numpy<2" tokenizers onnxruntime
fi
out=bench/results/$(date +%Y%m%d-%H%M)-triton-real.txt
{
  echo "command: bash bench/triton_real.sh"
  echo "git commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!bench/results' || echo ' (working tree had changes)')"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p')"
  echo "tritonserver: $(ls "$work"/nvidia_pytriton-*.whl | xargs -n1 basename) (bundled tritonserver, Python backend only)"
  echo "stub python: $("$work/env/bin/python" -c 'import numpy, tokenizers, onnxruntime; print("numpy", numpy.__version__, "tokenizers", tokenizers.__version__, "onnxruntime", onnxruntime.__version__)')"
  echo
  EDGEFT_TRITONSERVER_HOME="$work/home" EDGEFT_TRITONSERVER_LIBS="$work/x/nvidia_pytriton.libs" \
    EDGEFT_TRITON_PYTHON="$work/env/bin/python" \
    .venv/bin/pytest -q -p no:warnings tests/unit/test_triton.py -k real_tritonserver -rA 2>&1 | tail -n 8
} | tee "$out"
grep -q "1 passed" "$out"
