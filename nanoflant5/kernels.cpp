// A CPU kernel for decoding a few rows at a time: rows_linear(x (..., K), w (N, K)) = x @ w.T for float32 x of 1-4
// rows, reading the weight once, in order, with software prefetch. Built on first use by nanoflant5/kernels.py
// (torch.utils.cpp_extension); see there for why and how much.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

namespace {

typedef float vfloat __attribute__((vector_size(64)));  // 16 lanes: one AVX-512 register, two AVX2 ones
constexpr int64_t L = 16;
constexpr int64_t AHEAD = 12288;  // bytes prefetched ahead in each weight row's stream (measured best: 8-16 KB)
constexpr int NB = 4;             // weight rows read side by side

inline vfloat load(const float* p) { vfloat v; std::memcpy(&v, p, sizeof v); return v; }
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
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
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

}  // namespace

TORCH_LIBRARY(nanoflant5_cpu, m) {
  m.def("rows_linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoflant5_cpu, CPU, m) {
  m.impl("rows_linear", &rows_linear);
}
