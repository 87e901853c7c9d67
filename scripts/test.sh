#!/usr/bin/env bash
# Installs everything the tests need into the current Python environment, then runs them all.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
#   TORCH_INDEX_URL  where torch's CPU build is found (default: PyTorch's CPU wheel index)
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian tools for three test groups, when we may install them: g++ builds pixelgen's native
# CPU kernels (marker `native`), shellcheck lints launch/ (marker `launch`), chromium and its
# driver run the browser demo's test (tests/test_demo.py). Without them those tests are
# skipped with the reason.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
python -m pip install --quiet --upgrade pip
# torch's CPU build first (a bare `torch` would bring the CUDA one); then the package, its
# test extras and libtpu (tests/test_aot.py compiles for a TPU topology on this host); then OpenAI's `DALL-E` (the dVAE parity test) without its deps, which pin
# torchvision, mypy and blobfile that nothing here uses.
python -m pip install --quiet torch==2.13.0 \
  --extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
python -m pip install --quiet -e '.[test,tpu]'
python -m pip install --quiet --no-deps DALL-E==0.1
python -m pytest -q -n auto --dist loadfile "$@"
