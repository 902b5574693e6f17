#!/usr/bin/env bash
# PyTorch into a venv, the build chosen by TORCH_VARIANT (`make` calls this first):
#   cpu (default)  a wheel on this machine's pip find-links, if there is one (installed at
#                  once, no index asked: machines that reach only PyPI carry it), else
#                  PyTorch's CPU build (`+cpu`) from its CPU index: never the multi-GB CUDA
#                  build that PyPI's plain `torch` is on Linux;
#   cu128, cu126 … PyTorch's CUDA build from that index (a GPU machine).
# Usage: install_torch.sh PYTHON   (TORCH_VERSION overrides the pinned version)
set -euo pipefail
PY="${1:?usage: install_torch.sh PYTHON}"
VERSION="${TORCH_VERSION:-2.13.0}"
VARIANT="${TORCH_VARIANT:-cpu}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl}"
case "$VARIANT" in
  cpu|cu[0-9]*|rocm[0-9]*) ;;
  *) echo "TORCH_VARIANT is cpu, cuNNN or rocmN.N, not '$VARIANT'" >&2; exit 2 ;;
esac
# already there (any build of the pinned version): nothing to do
if "$PY" -c "import sys, importlib.metadata as m; sys.exit(m.version('torch').split('+')[0] != '$VERSION')" 2> /dev/null; then
  exit 0
fi
# a wheel on the find-links of this machine's pip configuration (torch alone: its
# dependencies come from the index as usual)
if [ "$VARIANT" = cpu ] && "$PY" -m pip install -q --dry-run --no-index --no-deps \
     "torch==$VERSION" > /dev/null 2>&1; then
  echo ">> torch $VERSION from a local wheel"
  exec "$PY" -m pip install -q "torch==$VERSION"
fi
echo ">> torch $VERSION, $VARIANT build, from $TORCH_INDEX/$VARIANT"
"$PY" -m pip install -q "torch==$VERSION" --index-url "$TORCH_INDEX/$VARIANT" \
  --extra-index-url https://pypi.org/simple
