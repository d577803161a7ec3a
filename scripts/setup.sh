#!/usr/bin/env bash
# Idempotent set-up of everything equibench needs on a fresh Debian/Ubuntu machine (CPU).
#
#   * system: gfortran (py3nj, escnn's Clebsch-Gordan backend, is Fortran), via apt-get;
#   * .venv with Python 3.11 (python3.11 or python3);
#   * torch 2.13.0 CPU build FIRST, so no later requirement can pull a multi-GB CUDA build;
#   * numpy < 2 (lie_learn 0.0.2, needed by escnn, is incompatible with numpy 2);
#   * py3nj and lie_learn are built WITHOUT build isolation (their builds call numpy/meson from
#     the environment, which pip's isolated build environment cannot provide);
#   * the package itself, editable, with the escnn, data, test, bench and reference extras;
#   * equiadapt (no deps) with torchvision 0.15.2 as pure Python, torch-scatter from source;
#   * cgenn's fused geometric-product kernel, compiled with g++ (torch's cpp_extension);
#   * the isolated environment of the mace method (mace-torch pins e3nn 0.4.4).
# A stamp file keyed on this script and pyproject.toml makes a second call a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${EQUIBENCH_VENV:-$ROOT/.venv}
STAMP="$VENV/.equibench-setup-$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ]; then
  exit 0
fi
say() { echo "[setup] $*" >&2; }

if ! command -v gfortran >/dev/null 2>&1; then
  say "installing gfortran (apt-get)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gfortran >/dev/null
fi

PY=$(command -v python3.11 || command -v python3)
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
export PATH="$VENV/bin:$PATH"   # meson/ninja for py3nj's build

say "torch 2.13.0 (CPU build) and build tools"
"${PIP[@]}" "torch==2.13.0" "numpy<2" "setuptools>=69" wheel cython meson-python meson ninja
if ! "$VENV/bin/python" -c "import py3nj, lie_learn.representations.SO3.irrep_bases" 2>/dev/null; then
  say "building py3nj and lie_learn (no build isolation)"
  "${PIP[@]}" --no-build-isolation "py3nj==0.2.1" "lie_learn==0.0.2" "numpy<2"
fi
say "equibench and its extras"
"${PIP[@]}" -e ".[escnn,data,test,bench,reference]" "numpy<2" "torch==2.13.0"
# equiadapt 0.1.2 without its declared torchvision requirement (see pyproject's "reference" extra):
# it only uses torchvision.transforms (Pad, CenterCrop, Resize, rotate), pure tensor code that
# torchvision 0.15.2 provides without its compiled ops; torch-scatter is built from its source.
if ! "$VENV/bin/python" -c "import equiadapt, torchvision.transforms" 2>/dev/null; then
  say "equiadapt 0.1.2 and torchvision 0.15.2 (no dependencies: torch stays 2.13.0 CPU)"
  "${PIP[@]}" --no-deps "equiadapt==0.1.2" "torchvision==0.15.2"
fi
if ! "$VENV/bin/python" -c "import torch_scatter" 2>/dev/null; then
  say "building torch-scatter 2.1.2 from source (a few minutes, once)"
  "${PIP[@]}" --no-build-isolation "torch-scatter==2.1.2"
fi
"$VENV/bin/python" -W ignore -c "import equibench, escnn, e3nn, torch_geometric, equiadapt, nequip, egnn_pytorch, \
torch_scatter, cuequivariance_torch, frame_averaging_pytorch, equiformer_pytorch; from equiadapt.images.canonicalization import discrete_group" >/dev/null
# cgenn's fused geometric-product kernel (equibench/methods/blocks/clifford_kernel.py), compiled here once
# into torch's extension directory so that no timed point pays the build
say "the fused Clifford product kernel of cgenn (g++, about a minute, once)"
"$VENV/bin/python" -c "from equibench.methods.blocks import clifford as cl, clifford_kernel as ck
assert ck.extension(cl.pair_table()[0]) is not None, 'the kernel did not build'"
# mace-torch pins e3nn 0.4.4: its points run in a layered environment of their own (equibench.engine.envs),
# built here once so the first `equibench run ... --methods mace` and the mace tests find it ready
say "the isolated environment of the mace method (mace-torch 0.3.16 with e3nn 0.4.4)"
"$VENV/bin/python" -m equibench.engine.envs build mace
rm -f "$VENV"/.equibench-setup-*
touch "$STAMP"
say "done ($VENV)"
