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
import itertools
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

ENV_SWITCH = "EQUIBENCH_CLIFFORD_KERNEL"  # "0": never use the compiled kernel
DIM = 8
#: b(a, o) for a * 8 + o, the layout ``pair`` arguments below take (``clifford.pair_table``)
Pair = tuple[int, ...]
#: blades of grade k are [GRADE_STARTS[k], GRADE_STARTS[k + 1]) in short-lex order: binomial(3, k) each
GRADE_STARTS = tuple(itertools.accumulate((math.comb(3, k) for k in range(4)), initial=0))
FUNCTIONS = ("product", "grade_norm", "gate")


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

// ---- grade-wise normalisation and the quadratic gate: per element and channel, grade k's blades are
// [GSTART[k], GSTART[k + 1]); per-(channel, grade) parameters are [C, 4] ----
namespace {
constexpr int GSTART[5] = {%(gstart)s};

template <typename T>
T grade_square(const T* v, int k) {
  T q = 0;
  for (int i = GSTART[k]; i < GSTART[k + 1]; ++i) q += v[i] * v[i];
  return q;
}

template <typename T>
void reduce_into(std::mutex& merge, T* out, const std::vector<T>& local) {
  std::lock_guard<std::mutex> lock(merge);
  for (size_t i = 0; i < local.size(); ++i) out[i] += local[i];
}
}  // namespace

// y = x / (s_k (n_k - 1) + 1 + eps), n_k = (q_k^2 + 1e-16)^(1/4), q_k = |x^(k)|^2
torch::Tensor grade_norm_forward(torch::Tensor x, torch::Tensor s, double eps) {
  check(x, "x"); check(s, "s");
  auto y = torch::empty_like(x);
  const int64_t M = x.size(0), C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "clifford_grade_norm_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) for (int64_t c = 0; c < C; ++c) {
        const int64_t at = (m * C + c) * 8;
        for (int k = 0; k < 4; ++k) {
          const scalar_t q = grade_square(xp + at, k);
          const scalar_t n = std::pow(q * q + scalar_t(1e-16), scalar_t(0.25));
          const scalar_t d = sp[c * 4 + k] * (n - 1) + 1 + scalar_t(eps);
          for (int i = GSTART[k]; i < GSTART[k + 1]; ++i) yp[at + i] = xp[at + i] / d;
        }
      }
    });
  });
  return y;
}

std::vector<torch::Tensor> grade_norm_backward(torch::Tensor x, torch::Tensor s, double eps, torch::Tensor g) {
  check(x, "x"); check(s, "s"); check(g, "g");
  auto gx = torch::empty_like(x);
  auto gs = torch::zeros_like(s);
  const int64_t M = x.size(0), C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "clifford_grade_norm_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    std::mutex merge;
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> local(C * 4, scalar_t(0));
      for (int64_t m = begin; m < end; ++m) for (int64_t c = 0; c < C; ++c) {
        const int64_t at = (m * C + c) * 8;
        for (int k = 0; k < 4; ++k) {
          const scalar_t q = grade_square(xp + at, k);
          const scalar_t r = q * q + scalar_t(1e-16);
          const scalar_t n = std::pow(r, scalar_t(0.25));
          const scalar_t sk = sp[c * 4 + k];
          const scalar_t d = sk * (n - 1) + 1 + scalar_t(eps);
          scalar_t t = 0;
          for (int i = GSTART[k]; i < GSTART[k + 1]; ++i) t += gp[at + i] * xp[at + i];
          const scalar_t dd = -t / (d * d);                                          // dL/dd
          const scalar_t coef = dd * sk * scalar_t(0.5) * q / std::pow(r, scalar_t(0.75)) * 2;  // dd * dd/dq * 2
          for (int i = GSTART[k]; i < GSTART[k + 1]; ++i) gxp[at + i] = gp[at + i] / d + coef * xp[at + i];
          local[c * 4 + k] += dd * (n - 1);
        }
      }
      reduce_into(merge, gs.data_ptr<scalar_t>(), local);
    });
  });
  return {gx, gs};
}

// y = x^(k) sigmoid(a_k f_k + b_k), f_0 = x_0, f_k = q_k (k >= 1)
torch::Tensor gate_forward(torch::Tensor x, torch::Tensor a, torch::Tensor b) {
  check(x, "x"); check(a, "a"); check(b, "b");
  auto y = torch::empty_like(x);
  const int64_t M = x.size(0), C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "clifford_gate_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) for (int64_t c = 0; c < C; ++c) {
        const int64_t at = (m * C + c) * 8;
        for (int k = 0; k < 4; ++k) {
          const scalar_t f = k == 0 ? xp[at] : grade_square(xp + at, k);
          const scalar_t sg = 1 / (1 + std::exp(-(ap[c * 4 + k] * f + bp[c * 4 + k])));
          for (int i = GSTART[k]; i < GSTART[k + 1]; ++i) yp[at + i] = xp[at + i] * sg;
        }
      }
    });
  });
  return y;
}

std::vector<torch::Tensor> gate_backward(torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor g) {
  check(x, "x"); check(a, "a"); check(b, "b"); check(g, "g");
  auto gx = torch::empty_like(x);
  auto ga = torch::zeros_like(a);
  auto gb = torch::zeros_like(b);
  const int64_t M = x.size(0), C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "clifford_gate_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    std::mutex merge;
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> la(C * 4, scalar_t(0)), lb(C * 4, scalar_t(0));
      for (int64_t m = begin; m < end; ++m) for (int64_t c = 0; c < C; ++c) {
        const int64_t at = (m * C + c) * 8;
        for (int k = 0; k < 4; ++k) {
          const scalar_t f = k == 0 ? xp[at] : grade_square(xp + at, k);
          const scalar_t ak = ap[c * 4 + k];
          const scalar_t sg = 1 / (1 + std::exp(-(ak * f + bp[c * 4 + k])));
          scalar_t t = 0;
          for (int i = GSTART[k]; i < GSTART[k + 1]; ++i) t += gp[at + i] * xp[at + i];
          const scalar_t gz = t * sg * (1 - sg);  // dL/dz
          la[c * 4 + k] += gz * f;
          lb[c * 4 + k] += gz;
          const scalar_t gf = gz * ak;            // dL/df
          for (int i = GSTART[k]; i < GSTART[k + 1]; ++i)
            gxp[at + i] = gp[at + i] * sg + (k == 0 ? gf : gf * 2 * xp[at + i]);
        }
      }
      reduce_into(merge, ga.data_ptr<scalar_t>(), la);
      reduce_into(merge, gb.data_ptr<scalar_t>(), lb);
    });
  });
  return {gx, ga, gb};
}
"""


def source(pair: Pair) -> str:
    """The C++ source with the table b(a, o) and the grades' blade ranges filled in."""
    if sorted(pair) != sorted(list(range(DIM)) * DIM):
        raise ValueError("pair must map each (a, o) to a blade, each blade 8 times")
    return _SOURCE % {"pair": ", ".join(str(b) for b in pair), "gstart": ", ".join(map(str, GRADE_STARTS))}


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
        return load_inline(name=name, cpp_sources=[code], extra_cflags=["-O3"], verbose=False,
                           functions=[f"{f}_{d}" for f in FUNCTIONS for d in ("forward", "backward")])
    except Exception as err:  # no compiler, no ninja, a failed build: the tensor-operation route
        warnings.warn(f"the fused Clifford product kernel is unavailable ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); using tensor operations", stacklevel=2)
        return None


class _Fused(torch.autograd.Function):
    """One kernel's forward and backward (``op`` in ``FUNCTIONS``; ``args``: tensors, then plain
    numbers passed through); a differentiable backward (create_graph) recomputes the gradients
    through ``fallback``, the same function as tensor operations."""

    @staticmethod
    def forward(ctx: Any, op: str, pair: Pair, fallback: Callable[..., torch.Tensor],
                *args: Any) -> torch.Tensor:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*tensors)
        ctx.op, ctx.pair, ctx.fallback, ctx.numbers = op, pair, fallback, args[len(tensors):]
        return getattr(extension(pair), f"{op}_forward")(*args)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        tensors = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: gradients as differentiable functions of the inputs
            inputs = [t for t in tensors if t.requires_grad]
            found = iter(torch.autograd.grad(ctx.fallback(*tensors, *ctx.numbers), inputs, g, create_graph=True))
            grads: list[Any] = [next(found) if t.requires_grad else None for t in tensors]
        else:
            grads = list(getattr(extension(ctx.pair), f"{ctx.op}_backward")(*tensors, *ctx.numbers, g.contiguous()))
        return (None, None, None, *grads, *(None for _ in ctx.numbers))


def uses_kernel(x: torch.Tensor, pair: Pair) -> bool:
    """Whether the functions below run the compiled kernels on tensors like ``x``."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and extension(pair) is not None


def _run(op: str, pair: Pair, fallback: Callable[..., torch.Tensor], x: torch.Tensor,
         params: tuple[torch.Tensor, ...], numbers: tuple[float, ...] = ()) -> torch.Tensor:
    """``op`` on ``x [..., C, 8]`` with per-channel ``params`` (kernel when it applies, else ``fallback``)."""
    if not uses_kernel(x, pair) or any(p.dtype != x.dtype for p in params):
        return fallback(x, *params, *numbers)
    lead, c = x.shape[:-2], x.shape[-2]
    flat = x.reshape(-1, c, DIM)
    tensors = [flat.contiguous()] + [p.reshape(-1, c, DIM).contiguous() if p.shape == x.shape else p.contiguous()
                                     for p in params]
    out = _Fused.apply(op, pair, fallback, *tensors, *numbers)
    return out.reshape(*lead, c, DIM)


def channelwise_product(x: torch.Tensor, y: torch.Tensor, k: torch.Tensor, pair: Pair) -> torch.Tensor:
    """sum_a K[c, a, o] x_a y_{b(a, o)} for ``x, y [..., C, 8]``, ``k [C, 8, 8]`` (module docstring)."""
    if y.shape != x.shape:
        raise ValueError(f"x and y must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return _run("product", pair, functools.partial(product_torch, pair=pair), x, (y, k))


def grade_norm(x: torch.Tensor, s: torch.Tensor, eps: float, pair: Pair,
               fallback: Callable[..., torch.Tensor]) -> torch.Tensor:
    """x^(k) / (s_ck (|x^(k)| - 1) + 1 + eps), |x^(k)| = (q_k^2 + 1e-16)^(1/4), for ``s [C, 4]``;
    ``fallback(x, s, eps)`` computes the same with tensor operations."""
    return _run("grade_norm", pair, fallback, x, (s,), (float(eps),))


def quadratic_gate(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pair: Pair,
                   fallback: Callable[..., torch.Tensor]) -> torch.Tensor:
    """x^(k) sigmoid(a_ck f_k + b_ck), f_0 = x^(0), f_k = q(x^(k)) (k >= 1), for ``a, b [C, 4]``;
    ``fallback(x, a, b)`` computes the same with tensor operations."""
    return _run("gate", pair, fallback, x, (a, b))
