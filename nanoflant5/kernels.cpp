// CPU kernels for decoding a few rows at a time, each reading the weight once, in order, with software prefetch:
// - rows_linear(x (..., K), w (N, K)) = x @ w.T for float32 x of 1-4 rows;
// - int8_linear(x (..., K), w (N, K), scale (N,)) = x @ (scale[:, None] * w).T for float32 x of any rows and int8 w
//   (weight-only int8, quantize.py), each weight block read once and multiplied with 4 rows of x at a time;
// - int8_rows(x (M, K), w (N, K)) = x @ w.T exactly in int32 for int8 x of 1-8 rows and int8 w (the greedy output
//   layer's int8 screen), where the CPU has AVX-512 VNNI;
// - w8a8_linear(x (..., K), w (N, K), scale (N,)): x's rows quantized to int8 (each row's own scale), multiplied with
//   int8 w exactly in int32 by torch's _int_mm (oneDNN: AMX or VNNI), then times both scales (quantize.py's w8a8);
// - rms_norm(x (..., D), w (D,), eps) = w * (x * rsqrt(mean(x^2) + eps)) for float32, T5's layer norm in one call
//   (torch's rms_norm on CPU is some 20 operator calls).
// Built on first use by nanoflant5/kernels.py (torch.utils.cpp_extension); see there for why and how much.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)  // (implies __AVX512F__: immintrin.h is in)
#define INT8_ROWS 1
#endif

namespace {

typedef float vfloat __attribute__((vector_size(64)));  // 16 lanes: one AVX-512 register, two AVX2 ones
constexpr int64_t L = 16;
constexpr int64_t AHEAD = 12288;  // bytes prefetched ahead in each weight row's stream (measured best: 8-16 KB)
constexpr int NB = 4;             // weight rows read side by side

inline vfloat load(const float* p) { vfloat v; std::memcpy(&v, p, sizeof v); return v; }

// The output of a linear layer with N outputs for x (..., K): (..., N), float32 like x.
at::Tensor linear_output(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return at::empty(shape, x.options());
}
inline float lanes_sum(vfloat v) {  // a fixed order, so results do not depend on the thread that computes them
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a, b; std::memcpy(&a, &v, 32); std::memcpy(&b, reinterpret_cast<char*>(&v) + 32, 32); a += b;
  v4 c, d; std::memcpy(&c, &a, 16); std::memcpy(&d, reinterpret_cast<char*>(&a) + 16, 16); c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// y[r, n:n+nb] for rows r < R of x (R, K) and weight rows n..n+nb of w (N, K)
template <int R, int nb>
inline void block(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n) {
  vfloat acc[R][nb] = {};
  const float* wn = w + n * K;
  for (int64_t k = 0; k < K; k += L) {
    vfloat wv[nb];
    for (int b = 0; b < nb; b++) {
      wv[b] = load(wn + b * K + k);
      __builtin_prefetch(reinterpret_cast<const char*>(wn + b * K + k) + AHEAD);
    }
    for (int r = 0; r < R; r++) {
      vfloat xv = load(x + r * K + k);
      for (int b = 0; b < nb; b++) acc[r][b] += xv * wv[b];
    }
  }
  for (int r = 0; r < R; r++)
    for (int b = 0; b < nb; b++) y[r * N + n + b] = lanes_sum(acc[r][b]);
}

template <int R>
void rows(const float* x, const float* w, float* y, int64_t K, int64_t N) {
  at::parallel_for(0, N / NB, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) block<R, NB>(x, w, y, K, N, b * NB);
  });
  for (int64_t n = N / NB * NB; n < N; n++) block<R, 1>(x, w, y, K, N, n);
}

at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.device().is_cpu() &&
              w.device().is_cpu(), "rows_linear: float32 CPU tensors expected");
  int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && x.size(-1) == K && K % L == 0,
              "rows_linear: a contiguous (N, K) weight with K a multiple of 16, and x (..., K) expected");
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  at::Tensor y = linear_output(x, N);
  const float* xp = x2.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (x2.size(0)) {
    case 1: rows<1>(xp, wp, yp, K, N); break;
    case 2: rows<2>(xp, wp, yp, K, N); break;
    case 3: rows<3>(xp, wp, yp, K, N); break;
    case 4: rows<4>(xp, wp, yp, K, N); break;
    default: TORCH_CHECK(false, "rows_linear: 1-4 rows expected, got ", x2.size(0));
  }
  return y;
}

#ifdef __AVX512F__
inline vfloat load_int8(const int8_t* p) {  // 16 int8 -> 16 float32
  return vfloat(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
}
#else
typedef int8_t v16i8 __attribute__((vector_size(16)));
inline vfloat load_int8(const int8_t* p) { v16i8 v; std::memcpy(&v, p, sizeof v); return __builtin_convertvector(v, vfloat); }
#endif

// y[r, n:n+nb] for rows r < R of x (R, K) and int8 weight rows n..n+nb of w (N, K), times their scales
template <int R, int nb>
inline void block_int8(const float* x, const int8_t* w, const float* scale, float* y, int64_t K, int64_t N,
                       int64_t n) {
  vfloat acc[R][nb] = {};
  const int8_t* wn = w + n * K;
  for (int64_t k = 0; k < K; k += L) {
    vfloat wv[nb];
    for (int b = 0; b < nb; b++) {
      wv[b] = load_int8(wn + b * K + k);
      __builtin_prefetch(wn + b * K + k + AHEAD);
    }
    for (int r = 0; r < R; r++) {
      vfloat xv = load(x + r * K + k);
      for (int b = 0; b < nb; b++) acc[r][b] += xv * wv[b];
    }
  }
  for (int r = 0; r < R; r++)
    for (int b = 0; b < nb; b++) y[r * N + n + b] = lanes_sum(acc[r][b]) * scale[n + b];
}

// rows m0.. of x, up to 4 of them, times weight rows n..n+nb
template <int nb>
inline void rows_int8(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                      int64_t n) {
  for (int64_t m = 0; m < M; m += 4) {  // the weight block stays in L1 between the chunks of rows
    const float* xm = x + m * K;
    float* ym = y + m * N;
    switch (M - m < 4 ? M - m : 4) {
      case 1: block_int8<1, nb>(xm, w, scale, ym, K, N, n); break;
      case 2: block_int8<2, nb>(xm, w, scale, ym, K, N, n); break;
      case 3: block_int8<3, nb>(xm, w, scale, ym, K, N, n); break;
      default: block_int8<4, nb>(xm, w, scale, ym, K, N, n);
    }
  }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat &&
              x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(),
              "int8_linear: float32 x, int8 weight and float32 scale on CPU expected");
  int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && scale.is_contiguous() && scale.numel() == N && x.size(-1) == K &&
              K % L == 0, "int8_linear: a contiguous (N, K) weight with K a multiple of 16, (N,) scales and x (..., K)"
              " expected");
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  at::Tensor y = linear_output(x, N);
  const float* xp = x2.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t M = x2.size(0);
  at::parallel_for(0, N / NB, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) rows_int8<NB>(xp, wp, sp, yp, M, K, N, b * NB);
  });
  for (int64_t n = N / NB * NB; n < N; n++) rows_int8<1>(xp, wp, sp, yp, M, K, N, n);
  return y;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.device().is_cpu() &&
              w.device().is_cpu() && w.dim() == 1 && w.is_contiguous() && x.size(-1) == w.size(0),
              "rms_norm: float32 x (..., D) and weight (D,) on CPU expected");
  const int64_t D = w.size(0);
  at::Tensor x2 = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t M = x2.numel() / D;
  const float* xp = x2.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++) {
      const float* row = xp + m * D;
      vfloat acc = {};
      int64_t k = 0;
      for (; k + L <= D; k += L) { const vfloat v = load(row + k); acc += v * v; }
      float sum = lanes_sum(acc);
      for (; k < D; k++) sum += row[k] * row[k];
      const float r = 1.0f / std::sqrt(sum / float(D) + float(eps));
      for (k = 0; k < D; k++) yp[m * D + k] = wp[k] * (row[k] * r);
    }
  });
  return y;
}

#ifdef INT8_ROWS
// y[r, n:n+nb] for rows r < R of x (R, K) and int8 weight rows n..n+nb of w (N, K), with x given as x + 128 (uint8):
// VNNI multiplies uint8 by int8 (vpdpbusd: four products added into each int32 lane, exactly), so it computes
// (x + 128) . w_n and, with a vector of ones, 128 sum(w_n), the difference being x . w_n. |(x + 128) . w_n| <=
// K * 255 * 127 stays within int32 for K <= 65536 (checked below).
template <int R, int nb>
inline void block8(const uint8_t* xu, const int8_t* w, int32_t* y, int64_t K, int64_t N, int64_t n) {
  __m512i acc[R][nb], sums[nb];
  const __m512i ones = _mm512_set1_epi8(1);
  for (int b = 0; b < nb; b++) {
    sums[b] = _mm512_setzero_si512();
    for (int r = 0; r < R; r++) acc[r][b] = _mm512_setzero_si512();
  }
  const int8_t* wn = w + n * K;
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 in = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;  // the last block's tail
    __m512i wv[nb];
    for (int b = 0; b < nb; b++) {
      wv[b] = _mm512_maskz_loadu_epi8(in, wn + b * K + k);
      _mm_prefetch(reinterpret_cast<const char*>(wn + b * K + k) + AHEAD, _MM_HINT_T0);
      sums[b] = _mm512_dpbusd_epi32(sums[b], ones, wv[b]);
    }
    for (int r = 0; r < R; r++) {
      const __m512i xv = _mm512_maskz_loadu_epi8(in, xu + r * K + k);
      for (int b = 0; b < nb; b++) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], xv, wv[b]);
    }
  }
  for (int b = 0; b < nb; b++) {
    const int32_t offset = 128 * _mm512_reduce_add_epi32(sums[b]);
    for (int r = 0; r < R; r++) y[r * N + n + b] = _mm512_reduce_add_epi32(acc[r][b]) - offset;
  }
}

template <int R>
void rows8(const uint8_t* x, const int8_t* w, int32_t* y, int64_t K, int64_t N) {
  constexpr int nb = R <= 4 ? NB : 2;  // 5-8 rows: 2 weight rows side by side, so the sums stay in registers
  at::parallel_for(0, N / nb, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) block8<R, nb>(x, w, y, K, N, b * nb);
  });
  for (int64_t n = N / nb * nb; n < N; n++) block8<R, 1>(x, w, y, K, N, n);
}

// int8 x + 128 as uint8, what int8_rows' kernels take (see block8)
std::vector<uint8_t> plus_128(const int8_t* x, int64_t n) {
  std::vector<uint8_t> xu(n);
  for (int64_t i = 0; i < n; i++) xu[i] = uint8_t(int(x[i]) + 128);
  return xu;
}

void rows8_of(const uint8_t* xu, const int8_t* w, int32_t* y, int64_t M, int64_t K, int64_t N) {
  switch (M) {
    case 1: rows8<1>(xu, w, y, K, N); break;
    case 2: rows8<2>(xu, w, y, K, N); break;
    case 3: rows8<3>(xu, w, y, K, N); break;
    case 4: rows8<4>(xu, w, y, K, N); break;
    case 5: rows8<5>(xu, w, y, K, N); break;
    case 6: rows8<6>(xu, w, y, K, N); break;
    case 7: rows8<7>(xu, w, y, K, N); break;
    default: rows8<8>(xu, w, y, K, N);
  }
}

at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kChar && w.scalar_type() == at::kChar && x.device().is_cpu() &&
              w.device().is_cpu(), "int8_rows: int8 CPU tensors expected");
  int64_t K = w.size(1), N = w.size(0), M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.is_contiguous() && x.size(1) == K && K <= 65536,
              "int8_rows: x (M, K) and a contiguous weight (N, K) with K <= 65536 expected");
  at::Tensor xc = x.contiguous();
  const int8_t* xp = xc.data_ptr<int8_t>();
  const std::vector<uint8_t> xu = plus_128(xp, M * K);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kInt));
  TORCH_CHECK(M >= 1 && M <= 8, "int8_rows: 1-8 rows expected, got ", M);
  rows8_of(xu.data(), w.data_ptr<int8_t>(), y.data_ptr<int32_t>(), M, K, N);
  return y;
}
#endif

// Each row of x as int8 q and a scale s (max |x| / 127, 1 for a zero row) with x ~ s q, q = x / s rounded to nearest
// even; then y = (float(q . w_n) * s) * scale_n. The same arithmetic, step by step, as quantize.w8a8_reference.
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat &&
              x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(),
              "w8a8_linear: float32 x, int8 weight and float32 scale on CPU expected");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && scale.is_contiguous() && scale.numel() == N && x.size(-1) == K,
              "w8a8_linear: a contiguous (N, K) weight, (N,) scales and x (..., K) expected");
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  std::vector<float> sx(M);
  const float* xp = x2.data_ptr<float>();
  int8_t* qp = xq.data_ptr<int8_t>();
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++) {
      const float* row = xp + m * K;
      int8_t* q = qp + m * K;
      float amax = 0.0f;
      int64_t k = 0;
#ifdef __AVX512F__
      __m512 vmax = _mm512_setzero_ps();
      for (; k + L <= K; k += L) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
      amax = _mm512_reduce_max_ps(vmax);  // (max is exact in any order)
#endif
      for (; k < K; k++) amax = std::max(amax, std::fabs(row[k]));
      const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
      k = 0;
#ifdef __AVX512F__
      const __m512 vs = _mm512_set1_ps(s);
      for (; k + L <= K; k += L) {  // IEEE division and round-to-nearest-even, as the scalar loop
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + k), vs),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
      }
#endif
      for (; k < K; k++) q[k] = int8_t(std::nearbyint(row[k] / s));
      sx[m] = s;
    }
  });
  at::Tensor y = linear_output(x, N);
  float* yp = y.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  // y[:, n0:n0+nc] from the exact int32 sums of those columns
  auto scale_into = [&](const at::Tensor& acc, int64_t n0, int64_t nc) {
    const int32_t* ap = acc.data_ptr<int32_t>();
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; m++)
        for (int64_t n = 0; n < nc; n++) yp[m * N + n0 + n] = (float(ap[m * nc + n]) * sx[m]) * sp[n0 + n];
    });
  };
#ifdef INT8_ROWS
  if (M <= 8 && K <= 65536) {  // few rows: the weight streamed once (int8_rows), faster than oneDNN's GEMM there
    const std::vector<uint8_t> xu = plus_128(qp, M * K);
    at::Tensor acc = at::empty({M, N}, x.options().dtype(at::kInt));
    rows8_of(xu.data(), w.data_ptr<int8_t>(), acc.data_ptr<int32_t>(), M, K, N);
    scale_into(acc, 0, N);
    return y;
  }
#endif
  // oneDNN's int8 GEMM slows down 3x past ~1536 columns for encoder-sized inputs (4096 rows): 1024 at a time there
  const int64_t chunk = M >= 512 ? 1024 : N;
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nc = std::min(chunk, N - n0);
    scale_into(at::_int_mm(xq, w.narrow(0, n0, nc).t()), n0, nc);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(nanoflant5_cpu, m) {
  m.def("rows_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
#ifdef INT8_ROWS
  m.def("int8_rows(Tensor x, Tensor weight) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(nanoflant5_cpu, CPU, m) {
  m.impl("rows_linear", &rows_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("rms_norm", &rms_norm);
#ifdef INT8_ROWS
  m.impl("int8_rows", &int8_rows);
#endif
}
