"""A fused CPU kernel for the channel-wise weighted geometric product of ``blocks/clifford.py``.

The product is, per element m and channel c of two multivector stacks ``x, y [M, C, 8]``,

    out_o = sum_a  K[c, a, o] x_a y_{b(a, o)}                       (64 terms per element)

where b(a, o) is the unique blade with blade_a blade_b = +-blade_o (``clifford.pair_table``) and
K[c, a, o] = sign(a, b, o) w[c, path(a, b, o)] carries the Cayley sign and the path weight
(``GeometricProductLayer``). Its gradients are

    dL/dx_a = sum_o K[a, o] g_o y_{b(a, o)},   dL/dy_b = sum_{(a, o): b(a, o) = b} K[a, o] g_o x_a,
    dL/dK[c, a, o] = sum_m x_a y_{b(a, o)} g_o.

Written with tensor operations these 64 products per element become ``[M, C, 64]`` intermediates
that are written to and read back from memory several times in the forward and backward passes;
on a 2-core CPU that traffic, not the arithmetic, is what a CGENN train step spends most of its
time on. The kernel below keeps the 64 products in registers: one pass over x and y forward, one
over x, y and g backward. The table b(a, o) is generated from the Cayley table, not typed in.

It is compiled once with ``torch.utils.cpp_extension.load_inline`` (g++, and ninja from the
environment) into torch's extension directory (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``; the module name carries a hash of the source, so a changed kernel
is a new build). ``scripts/setup.sh`` builds it, so no timed point pays the compile (about a
minute on 2 cores). It runs on float32 and float64 CPU tensors. Everywhere else (CUDA, other
dtypes, ``EQUIBENCH_CLIFFORD_KERNEL=0``, or a failed build, which warns once) the same formula
runs as tensor operations (``product_torch``); ``tests/test_cgenn.py`` checks the two agree,
gradients included. A backward pass that must itself be differentiable (``create_graph=True``, e.g. forces
as -dE/dx in training) takes the tensor-operation route for its gradients.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import warnings
from typing import Any

import torch

ENV_SWITCH = "EQUIBENCH_CLIFFORD_KERNEL"  # "0": never use the compiled kernel
DIM = 8
#: b(a, o) for a * 8 + o, the layout ``pair`` arguments below take (``clifford.pair_table``)
Pair = tuple[int, ...]


def product_torch(x: torch.Tensor, y: torch.Tensor, k: torch.Tensor, pair: Pair) -> torch.Tensor:
    """The product as tensor operations: ``x, y [..., C, 8]``, ``k [C, 8, 8]`` -> ``[..., C, 8]``."""
    b = torch.tensor(pair, device=y.device)
    yb = y[..., b].unflatten(-1, (DIM, DIM))  # [..., C, a, o]: y_{b(a, o)}
    return (x.unsqueeze(-1) * yb * k).sum(-2)


_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <mutex>
#include <vector>

namespace {
constexpr int PAIR[64] = {%(pair)s};

template <typename T>
void forward_rows(const T* x, const T* y, const T* k, T* out, int64_t begin, int64_t end, int64_t C) {
  for (int64_t m = begin; m < end; ++m) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t at = (m * C + c) * 8;
      const T* xv = x + at;
      const T* yv = y + at;
      const T* kc = k + c * 64;
      T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int a = 0; a < 8; ++a) {
        const T xa = xv[a];
        for (int o = 0; o < 8; ++o) acc[o] += kc[a * 8 + o] * xa * yv[PAIR[a * 8 + o]];
      }
      for (int o = 0; o < 8; ++o) out[at + o] = acc[o];
    }
  }
}

template <typename T>
void backward_rows(const T* x, const T* y, const T* k, const T* g, T* gx, T* gy, T* gk,
                   int64_t begin, int64_t end, int64_t C) {
  for (int64_t m = begin; m < end; ++m) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t at = (m * C + c) * 8;
      const T* xv = x + at;
      const T* yv = y + at;
      const T* gv = g + at;
      const T* kc = k + c * 64;
      T* gkc = gk + c * 64;
      T ga[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      T gb[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int a = 0; a < 8; ++a) {
        const T xa = xv[a];
        for (int o = 0; o < 8; ++o) {
          const int b = PAIR[a * 8 + o];
          const T yb = yv[b];
          const T go = gv[o];
          const T kg = kc[a * 8 + o] * go;
          ga[a] += kg * yb;
          gb[b] += kg * xa;
          gkc[a * 8 + o] += xa * yb * go;
        }
      }
      for (int i = 0; i < 8; ++i) {
        gx[at + i] = ga[i];
        gy[at + i] = gb[i];
      }
    }
  }
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}
}  // namespace

torch::Tensor product_forward(torch::Tensor x, torch::Tensor y, torch::Tensor k) {
  check(x, "x"); check(y, "y"); check(k, "k");
  TORCH_CHECK(x.dim() == 3 && x.size(2) == 8 && y.sizes() == x.sizes(), "x, y must be [M, C, 8]");
  TORCH_CHECK(k.dim() == 3 && k.size(0) == x.size(1) && k.size(1) == 8 && k.size(2) == 8, "k must be [C, 8, 8]");
  auto out = torch::empty_like(x);
  const int64_t M = x.size(0), C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "clifford_product_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) { forward_rows(xp, yp, kp, op, begin, end, C); });
  });
  return out;
}

std::vector<torch::Tensor> product_backward(torch::Tensor x, torch::Tensor y, torch::Tensor k, torch::Tensor g) {
  check(x, "x"); check(y, "y"); check(k, "k"); check(g, "g");
  TORCH_CHECK(g.sizes() == x.sizes(), "g must have x's shape");
  auto gx = torch::empty_like(x);
  auto gy = torch::empty_like(y);
  auto gk = torch::zeros_like(k);
  const int64_t M = x.size(0), C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "clifford_product_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gyp = gy.data_ptr<scalar_t>();
    scalar_t* gkp = gk.data_ptr<scalar_t>();
    std::mutex merge;
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> local(C * 64, scalar_t(0));  // this range's dL/dK, added to gk once
      backward_rows(xp, yp, kp, gp, gxp, gyp, local.data(), begin, end, C);
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t i = 0; i < C * 64; ++i) gkp[i] += local[i];
    });
  });
  return {gx, gy, gk};
}
"""


def source(pair: Pair) -> str:
    """The C++ source with the table b(a, o) filled in."""
    if sorted(pair) != sorted(list(range(DIM)) * DIM):
        raise ValueError("pair must map each (a, o) to a blade, each blade 8 times")
    return _SOURCE % {"pair": ", ".join(str(b) for b in pair)}


@functools.cache
def extension(pair: Pair) -> Any:
    """The compiled module (built on first use, then loaded from torch's extension directory), or
    None when it is switched off or cannot be built (one warning)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if shutil.which("ninja") is None:  # pip's ninja sits beside the interpreter, which may not be on PATH
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load_inline
        code = source(pair)
        name = "equibench_clifford_product_" + hashlib.sha256(code.encode()).hexdigest()[:12]
        return load_inline(name=name, cpp_sources=[code], functions=["product_forward", "product_backward"],
                           extra_cflags=["-O3"], verbose=False)
    except Exception as err:  # no compiler, no ninja, a failed build: the tensor-operation route
        warnings.warn(f"the fused Clifford product kernel is unavailable ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); using tensor operations", stacklevel=2)
        return None


class _FusedProduct(torch.autograd.Function):
    """The kernel's forward and backward; a differentiable backward (create_graph) recomputes the
    gradients through ``product_torch``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, k: torch.Tensor, pair: Pair) -> torch.Tensor:
        ctx.save_for_backward(x, y, k)
        ctx.pair = pair
        return extension(pair).product_forward(x, y, k)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, y, k = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: gradients as differentiable functions of x, y, k
            inputs = [t for t in (x, y, k) if t.requires_grad]
            grads = iter(torch.autograd.grad(product_torch(x, y, k, ctx.pair), inputs, g, create_graph=True))
            return (*(next(grads) if t.requires_grad else None for t in (x, y, k)), None)
        return (*extension(ctx.pair).product_backward(x, y, k, g.contiguous()), None)


def uses_kernel(x: torch.Tensor, pair: Pair) -> bool:
    """Whether ``channelwise_product`` on tensors like ``x`` runs the compiled kernel."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and extension(pair) is not None


def channelwise_product(x: torch.Tensor, y: torch.Tensor, k: torch.Tensor, pair: Pair) -> torch.Tensor:
    """sum_a K[c, a, o] x_a y_{b(a, o)} for ``x, y [..., C, 8]``, ``k [C, 8, 8]`` (module docstring)."""
    if not uses_kernel(x, pair) or y.dtype != x.dtype or k.dtype != x.dtype:
        return product_torch(x, y, k, pair)
    lead, c = x.shape[:-2], x.shape[-2]
    out = _FusedProduct.apply(x.reshape(-1, c, DIM).contiguous(), y.reshape(-1, c, DIM).contiguous(),
                              k.contiguous(), pair)
    return out.reshape(*lead, c, DIM)
