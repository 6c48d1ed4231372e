"""Hand-written bfloat16 kernels for compiled decoding on CPUs with AVX512-BF16.

A decode step reads every weight once for one token, so its speed is how fast one core streams
a weight row through multiply-adds. Inductor's fused row reduction converts each bfloat16
element to float32 and keeps one chain of additions per row; on this 2-core AMD EPYC it
streams ~43 GB/s with 2 threads where a plain ``sum`` over the same weights reaches ~48. The
matrix-vector kernel ``gemv_bf16`` reads four rows at a time with the ``vdpbf16ps`` instruction
(bfloat16 pairs multiplied and added into float32, eight independent accumulators): ~52 GB/s
on 8,192 x 2,048 weights. Products are exact and sums float32, as in the fused reduction; only
the order differs.

``attend_one_bf16`` is one query's attention over a key/value cache [batch, slots, kv_head,
d_head] (the query heads of one key/value head together): scores by ``vdpbf16ps``, a float32
softmax with a vectorised exp, the weighted sum of values in float32. Inductor's two fused
loops for the same took 183 us per layer (32 heads over 8, 1,024 slots, d_head 64), this 50.

The kernels are C++ built by ``torch.utils.cpp_extension`` the first time :func:`enable` is
called on a machine (~30 s, cached on disk by torch after that) and registered as custom ops
(``gptfn::gemv_bf16``, ``gptfn::attend_one_bf16``) that ``torch.compile`` calls from a compiled
graph. ``generate(..., compile=True)`` enables them; where they cannot be built (another CPU,
no compiler) or ``GPTFN_GEMV=0`` is set, compiled decoding keeps inductor's kernels.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <limits>
#include <vector>

static inline float tail_dot(const uint16_t* w, const uint16_t* x, int64_t from, int64_t n) {
  float s = 0.f;
  for (int64_t i = from; i < n; ++i) {
    uint32_t a = uint32_t(w[i]) << 16, b = uint32_t(x[i]) << 16;
    float fa, fb;
    std::memcpy(&fa, &a, 4);
    std::memcpy(&fb, &b, 4);
    s += fa * fb;
  }
  return s;
}

static inline __m512 dot(__m512 acc, const uint16_t* w, __m512bh x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), x);
}

torch::Tensor gemv_bf16(torch::Tensor w, torch::Tensor x) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16,
              "gemv_bf16: w must be a contiguous bfloat16 [out, in] matrix");
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous() && x.scalar_type() == at::kBFloat16 &&
              x.size(0) == w.size(1), "gemv_bf16: x must be a contiguous bfloat16 [in] vector");
  const int64_t O = w.size(0), I = w.size(1), I64 = I / 64 * 64;
  auto y = torch::empty({O}, w.options().dtype(at::kFloat));
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const uint16_t* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, (O + 3) / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o = block * 4, rows = std::min<int64_t>(4, O - o);
      const uint16_t* r[4];
      for (int64_t k = 0; k < 4; ++k) r[k] = W + (o + std::min<int64_t>(k, rows - 1)) * I;
      __m512 a[4], b[4];
      for (int k = 0; k < 4; ++k) a[k] = b[k] = _mm512_setzero_ps();
      for (int64_t i = 0; i < I64; i += 64) {
        const __m512bh xa = (__m512bh)_mm512_loadu_si512(X + i);
        const __m512bh xb = (__m512bh)_mm512_loadu_si512(X + i + 32);
        for (int k = 0; k < 4; ++k) {
          a[k] = dot(a[k], r[k] + i, xa);
          b[k] = dot(b[k], r[k] + i + 32, xb);
        }
      }
      for (int64_t k = 0; k < rows; ++k)
        Y[o + k] = _mm512_reduce_add_ps(_mm512_add_ps(a[k], b[k])) + tail_dot(r[k], X, I64, I);
    }
  });
  return y;
}

static inline __m512 exp_nonpositive(__m512 x) {  // e^x for x <= 0 (scores minus their max)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));  // e^-87 ~ 1e-38: a masked key's weight, ~0
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n ln2, in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);  // e^r on [-ln2/2, ln2/2], degree 7
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);  // times 2^n
}

static inline __m512 widen16(const uint16_t* p) {  // 16 bfloat16 -> float32
  const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}

// softmax of one query head's scores in place (masked ones are -inf)
static void softmax_row(float* s, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
    _mm512_storeu_ps(s + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  float total = _mm512_reduce_add_ps(sum);
  for (; i < n; ++i) total += (s[i] = std::exp(s[i] - mx));
  const float inv = 1.f / total;
  for (i = 0; i < n; ++i) s[i] *= inv;
}

torch::Tensor attend_one_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                              torch::Tensor mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes() && mask.dim() == 2,
              "attend_one_bf16: q [b, head, d], k and v [b, slots, kv_head, d], mask [b, slots]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), S = k.size(1), G = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && mask.size(0) == B && mask.size(1) == S &&
              D % 32 == 0 && D <= 256 && H % G == 0 && H / G <= 8, "attend_one_bf16: shapes");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
              mask.is_contiguous() && mask.scalar_type() == at::kBool &&
              q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
              v.scalar_type() == at::kBFloat16, "attend_one_bf16: contiguous bfloat16, bool mask");
  const int64_t R = H / G;
  auto z = torch::empty({B, H, D}, q.options().dtype(at::kFloat));
  const uint16_t* Q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const uint16_t* K = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const uint16_t* V = reinterpret_cast<const uint16_t*>(v.data_ptr());
  const bool* M = mask.data_ptr<bool>();
  float* Z = z.data_ptr<float>();
  const float sc = float(scale);
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(R * S);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      const bool* mb = M + b * S;
      for (int64_t r = 0; r < R; ++r) {  // scores of the R query heads that read head g
        const uint16_t* qr = Q + (b * H + g * R + r) * D;
        float* pr = p.data() + r * S;
        for (int64_t s = 0; s < S; ++s) {
          if (!mb[s]) { pr[s] = -std::numeric_limits<float>::infinity(); continue; }
          const uint16_t* kr = K + ((b * S + s) * G + g) * D;
          __m512 acc = _mm512_setzero_ps();
          for (int64_t i = 0; i < D; i += 32)
            acc = dot(acc, kr + i, (__m512bh)_mm512_loadu_si512(qr + i));
          pr[s] = _mm512_reduce_add_ps(acc) * sc;
        }
        softmax_row(pr, S);
      }
      __m512 acc[8][16];  // [query head of the group][16 floats of d_head]
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < D / 16; ++j) acc[r][j] = _mm512_setzero_ps();
      for (int64_t s = 0; s < S; ++s) {  // each value row read once for the R heads
        if (!mb[s]) continue;
        const uint16_t* vr = V + ((b * S + s) * G + g) * D;
        for (int64_t j = 0; j < D / 16; ++j) {
          const __m512 x = widen16(vr + j * 16);
          for (int64_t r = 0; r < R; ++r)
            acc[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * S + s]), x, acc[r][j]);
        }
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < D / 16; ++j)
          _mm512_storeu_ps(Z + (b * H + g * R + r) * D + j * 16, acc[r][j]);
    }
  });
  return z;
}
"""

_STATE: dict[str, Any] = {"module": None, "tried": False}


def _cpu_has_bf16_dot() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def enable() -> bool:
    """Build and load the kernel once per process (torch caches the build on disk); True when
    it is in use. Never raises: a failed build warns once and leaves inductor's kernel."""
    if not _STATE["tried"]:
        _STATE["tried"] = True
        if os.environ.get("GPTFN_GEMV", "1") != "0" and _cpu_has_bf16_dot():
            from torch.utils.cpp_extension import load_inline

            try:
                _STATE["module"] = load_inline(
                    "gptfn_decode_kernels", cpp_sources=_SOURCE,
                    functions=["gemv_bf16", "attend_one_bf16"],
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512bf16",
                                  "-fopenmp"],
                    extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP in the header
                )  # fmt: skip
            except Exception as err:  # no compiler, headers, ... : keep inductor's kernel
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                warnings.warn(
                    f"gptfn: the bfloat16 decode kernels were not built ({first})", stacklevel=2
                )
    return _STATE["module"] is not None


def available() -> bool:
    """Whether :func:`enable` built the kernel in this process."""
    return _STATE["module"] is not None


@torch.library.custom_op("gptfn::gemv_bf16", mutates_args=())
def gemv_bf16(w: Tensor, x: Tensor) -> Tensor:
    """``w @ x`` in float32 for a contiguous bfloat16 ``w`` [out, in] and ``x`` [in]."""
    if _STATE["module"] is None:
        raise RuntimeError("gptfn.model.decode_kernels.enable() has not built the kernels")
    return _STATE["module"].gemv_bf16(w, x)


@gemv_bf16.register_fake
def _(w: Tensor, x: Tensor) -> Tensor:
    return w.new_empty((w.shape[0],), dtype=torch.float32)


@torch.library.custom_op("gptfn::attend_one_bf16", mutates_args=())
def attend_one_bf16(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """One query's attention, float32 [batch, head, d_head], for bfloat16 ``q`` [batch, head,
    d_head] over a cache ``k``, ``v`` [batch, slots, kv_head, d_head], ``mask`` [batch, slots]
    (True = may attend; query head i reads key/value head i // (head / kv_head))."""
    if _STATE["module"] is None:
        raise RuntimeError("gptfn.model.decode_kernels.enable() has not built the kernels")
    return _STATE["module"].attend_one_bf16(q, k, v, mask, scale)


@attend_one_bf16.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)


def attention_fits(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> bool:
    """Whether :func:`attend_one_bf16` is built and takes this one-query step: ``q`` [b, head,
    1, d], ``k``/``v`` [b, kv_head, slots, d] views of contiguous caches, one mask row per batch
    row ([b, 1, 1, slots]), d_head a multiple of 32 up to 256, at most 8 query heads a kv head."""
    heads, groups, d_head = q.shape[1], k.shape[1], q.shape[-1]
    return (
        available()
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and d_head % 32 == 0
        and d_head <= 256
        and heads % groups == 0
        and heads // groups <= 8
        and mask.dtype == torch.bool
        and mask.ndim == 4
        and mask.shape[1] == mask.shape[2] == 1
        and k.transpose(1, 2).is_contiguous()
        and v.transpose(1, 2).is_contiguous()
    )
