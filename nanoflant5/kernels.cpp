// CPU kernels for decoding a few rows at a time, each reading the weight once, in order, with software prefetch:
// - rows_linear(x (..., K), w (N, K)) = x @ w.T for float32 x of 1-4 rows;
// - int8_linear(x (..., K), w (N, K), scale (N,)) = x @ (scale[:, None] * w).T for float32 x of any rows and int8 w
//   (weight-only int8, quantize.py), each weight block read once and multiplied with 4 rows of x at a time;
// - int8_rows(x (M, K), w (N, K)) = x @ w.T exactly in int32 for int8 x of 1-8 rows and int8 w (the greedy output
//   layer's int8 screen), where the CPU has AVX-512 VNNI;
// - w8a8_linear(x (..., K), w (N, K), scale (N,)): x's rows quantized to int8 (each row's own scale), multiplied with
//   int8 w exactly in int32 by torch's _int_mm (oneDNN: AMX or VNNI), then times both scales (quantize.py's w8a8);
// - rms_norm(x (..., D), w (D,), eps) = w * (x * rsqrt(mean(x^2) + eps)) for float32, T5's layer norm in one call
//   (torch's rms_norm on CPU is some 20 operator calls), and rms_norm_backward, its gradients in one call;
// - gated_gelu(h (..., 2F)) = gelu_tanh(h[..., :F]) * h[..., F:], FLAN-T5's gated feed-forward activation on the
//   fused wi output, and gated_gelu_backward, the gradient of h in one call;
// - token_losses(logits (N, V), labels (N,)): each row's cross-entropy, and token_losses_backward, its gradient;
// - seeded_dropout(x, dropped, seed): dropout with the mask a function of the seed and the element's index.
// Built on first use by nanoflant5/kernels.py (torch.utils.cpp_extension); see there for why and how much.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
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

// rms_norm's gradients for the output's gradient g: with r = rsqrt(mean(x^2) + eps), d/dx = r g w - x r^3 mean(g w x)
// and d/dw = the sum over rows of g x r (only when weight_grad: a frozen norm skips it). The rows go in parts, 4 a
// thread; each part sums its rows' d/dw, and the parts' sums are added in order.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                     double eps, bool weight_grad) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
              x.device().is_cpu() && w.dim() == 1 && w.is_contiguous() && x.size(-1) == w.size(0) &&
              g.sizes() == x.sizes(), "rms_norm_backward: float32 g and x (..., D) and weight (D,) on CPU expected");
  const int64_t D = w.size(0);
  at::Tensor xc = x.contiguous(), gc = g.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const int64_t M = xc.numel() / D;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(), M));  // of the rows
  const int64_t per = (M + parts - 1) / parts;  // rows per part
  at::Tensor partial = at::zeros({weight_grad ? parts : 0, D}, w.options());
  const float* xp = xc.data_ptr<float>();
  const float* gp = gc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
      for (int64_t m = p * per; m < std::min(M, (p + 1) * per); m++) {
        const float* xr = xp + m * D;
        const float* gr = gp + m * D;
        float* dr = dp + m * D;
        float ss = 0, dot = 0;
#pragma omp simd reduction(+ : ss, dot)
        for (int64_t k = 0; k < D; k++) { ss += xr[k] * xr[k]; dot += gr[k] * wp[k] * xr[k]; }
        const float r = 1.0f / std::sqrt(ss / float(D) + float(eps));
        const float c = r * r * r * dot / float(D);
#pragma omp simd
        for (int64_t k = 0; k < D; k++) dr[k] = r * gr[k] * wp[k] - c * xr[k];
        if (weight_grad) {
          float* pr = pp + p * D;
#pragma omp simd
          for (int64_t k = 0; k < D; k++) pr[k] += gr[k] * xr[k] * r;
        }
      }
    }
  });
  return {dx, weight_grad ? partial.sum(0) : at::empty({0}, w.options())};
}

// exp on 16 lanes (Cephes' expf: 2^n e^r with |r| <= ln 2 / 2, e^r a degree-7 polynomial; within 2 float32 ulps),
// 0 below e^-87.3 (and for -inf), at most e^88 (callers: x - max <= 0, and a sigmoid that is 0 there anyway).
typedef int32_t vint __attribute__((vector_size(64)));

inline vfloat vexp(vfloat x) {
  const vint low = x < -87.3f;  // e^x below float32's normal range (and -inf): 0
  x = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);  // (2^n stays finite: n <= 127)
  const vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const vfloat r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vfloat p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vfloat e = (p * r * r + r + 1.0f) * (vfloat)((__builtin_convertvector(n, vint) + 127) << 23);  // * 2^n
  return low ? vfloat{} : e;
}

// gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (Hendrycks & Gimpel 2016, transformers' gelu_new),
// computed as x sigmoid(2u) = x / (1 + e^(-2u)) with u = sqrt(2 / pi) (x + 0.044715 x^3): the same function, without
// 1 + tanh's cancellation for negative x. Its slope is s + 2 x s (1 - s) du/dx with s = sigmoid(2u).
constexpr float GELU_K0 = 0.7978845608028654f, GELU_K1 = 0.044715f;

template <typename T>  // vfloat (16 lanes, vexp) or float (the tail, std::exp)
inline T gelu_exp(T x) {  // e^(-2u), so that sigmoid(2u) = 1 / (1 + e^(-2u)) and 1 - sigmoid(2u) = e^(-2u) sigmoid(2u)
  const T u2 = (x + x * x * x * GELU_K1) * (-2.0f * GELU_K0);
  if constexpr (std::is_same_v<T, float>) return std::exp(std::min(u2, 88.0f));  // (as vexp: finite)
  else return vexp(u2);
}

template <typename T>
inline T gelu_sigmoid(T x) { return 1.0f / (1.0f + gelu_exp(x)); }

void check_gated(const at::Tensor& h) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.device().is_cpu() && h.dim() >= 1 && h.size(-1) % 2 == 0,
              "gated_gelu: float32 h (..., 2F) on CPU expected");
}

at::Tensor gated_gelu(const at::Tensor& h) {
  check_gated(h);
  const int64_t F = h.size(-1) / 2, M = F ? h.numel() / (2 * F) : 0;
  at::Tensor hc = h.contiguous();
  at::Tensor y = linear_output(h, F);
  const float* hp = hc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++) {
      const float* gate = hp + m * 2 * F;
      const float* lin = gate + F;
      float* out = yp + m * F;
      int64_t j = 0;
      for (; j + L <= F; j += L) {
        const vfloat x = load(gate + j), v = x * gelu_sigmoid(x) * load(lin + j);
        std::memcpy(out + j, &v, sizeof v);
      }
      for (; j < F; j++) out[j] = gate[j] * gelu_sigmoid(gate[j]) * lin[j];
    }
  });
  return y;
}

// d/d gate = g lin gelu'(gate), d/d lin = g gelu(gate), written side by side as h is laid out
template <typename T>
inline void gated_gelu_grads(T x, T lin, T g, T& dgate, T& dlin) {
  const T e = gelu_exp(x), s = 1.0f / (1.0f + e);
  dlin = g * x * s;
  dgate = g * lin * (s + x * s * (e * s) * (2.0f * GELU_K0) * (1.0f + x * x * (3.0f * GELU_K1)));
}

at::Tensor gated_gelu_backward(const at::Tensor& g, const at::Tensor& h) {
  check_gated(h);
  const int64_t F = h.size(-1) / 2, M = F ? h.numel() / (2 * F) : 0;
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.numel() == M * F, "gated_gelu_backward: float32 g (..., F) expected");
  at::Tensor hc = h.contiguous(), gc = g.contiguous();
  at::Tensor dh = at::empty(h.sizes(), h.options());
  const float* hp = hc.data_ptr<float>();
  const float* gp = gc.data_ptr<float>();
  float* dp = dh.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++) {
      const float* gate = hp + m * 2 * F;
      const float* lin = gate + F;
      const float* gr = gp + m * F;
      float* dgate = dp + m * 2 * F;
      float* dlin = dgate + F;
      int64_t j = 0;
      for (; j + L <= F; j += L) {
        vfloat dg, dl;
        gated_gelu_grads(load(gate + j), load(lin + j), load(gr + j), dg, dl);
        std::memcpy(dgate + j, &dg, sizeof dg);
        std::memcpy(dlin + j, &dl, sizeof dl);
      }
      for (; j < F; j++) gated_gelu_grads(gate[j], lin[j], gr[j], dgate[j], dlin[j]);
    }
  });
  return dh;
}

// The largest of a row's n floats.
inline float row_max(const float* row, int64_t n) {
  vfloat m = vfloat{} - INFINITY;
  int64_t v = 0;
  for (; v + L <= n; v += L) { const vfloat x = load(row + v); m = x > m ? x : m; }
  float mx = -INFINITY;
  for (int i = 0; i < L; i++) mx = std::max(mx, m[i]);
  for (; v < n; v++) mx = std::max(mx, row[v]);
  return mx;
}

void check_token_losses(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.device().is_cpu() && logits.dim() == 2 &&
              logits.is_contiguous() && labels.scalar_type() == at::kLong && labels.dim() == 1 &&
              labels.size(0) == logits.size(0), "token_losses: float32 logits (N, V) and int64 labels (N,) expected");
}

// Each row's cross-entropy, log(sum(exp(logits))) - logits[label] (0 where label is ignore_index), and its
// log-sum-exp: one read of the logits, where log_softmax writes them all again.
std::tuple<at::Tensor, at::Tensor> token_losses(const at::Tensor& logits, const at::Tensor& labels,
                                                int64_t ignore_index) {
  check_token_losses(logits, labels);
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor loss = at::empty({N}, logits.options()), lse = at::empty({N}, logits.options());
  at::Tensor lab = labels.contiguous();
  const float* xp = logits.data_ptr<float>();
  const int64_t* lp = lab.data_ptr<int64_t>();
  float* op = loss.data_ptr<float>();
  float* sp = lse.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      const float* row = xp + n * V;
      const float mx = row_max(row, V);
      vfloat acc = {};
      int64_t v = 0;
      for (; v + L <= V; v += L) acc += vexp(load(row + v) - mx);
      float sum = lanes_sum(acc);
      for (; v < V; v++) sum += std::exp(row[v] - mx);
      sp[n] = mx + std::log(sum);
      const int64_t label = lp[n];
      TORCH_CHECK(label == ignore_index || (label >= 0 && label < V), "token_losses: label ", label, " out of range");
      op[n] = label == ignore_index ? 0.0f : sp[n] - row[label];
    }
  });
  return {loss, lse};
}

// The gradient of token_losses' rows for their gradient g (N,): g * (softmax(logits) - onehot(label)), in one pass.
at::Tensor token_losses_backward(const at::Tensor& g, const at::Tensor& logits, const at::Tensor& labels,
                                 const at::Tensor& lse, int64_t ignore_index) {
  check_token_losses(logits, labels);
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor gc = g.contiguous(), lab = labels.contiguous(), dx = at::empty(logits.sizes(), logits.options());
  const float* xp = logits.data_ptr<float>();
  const float* gp = gc.data_ptr<float>();
  const float* sp = lse.data_ptr<float>();
  const int64_t* lp = lab.data_ptr<int64_t>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      const float* row = xp + n * V;
      float* out = dp + n * V;
      const float gn = lp[n] == ignore_index ? 0.0f : gp[n], s = sp[n];
      int64_t v = 0;
      for (; v + L <= V; v += L) {
        const vfloat d = vexp(load(row + v) - s) * gn;
        std::memcpy(out + v, &d, sizeof d);
      }
      for (; v < V; v++) out[v] = std::exp(row[v] - s) * gn;
      if (lp[n] != ignore_index) out[lp[n]] -= gn;
    }
  });
  return dx;
}

// Dropout whose mask is a function of (seed, element index): 16 bits an element from SplitMix64's output function
// (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators"; the generator passes BigCrush) of
// seed + k * golden ratio, four elements to a 64-bit word. An element is dropped when its bits are below `dropped`
// (p = dropped / 65536), the others are scaled by 65536 / (65536 - dropped). The backward regenerates the mask from
// the seed: nothing is saved, and mask, draw and product are one pass.
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

at::Tensor seeded_dropout(const at::Tensor& x, int64_t dropped, int64_t seed) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && dropped >= 0 && dropped < 65536,
              "seeded_dropout: float32 x on CPU and 0 <= dropped < 65536 expected");
  at::Tensor xc = x.contiguous(), y = at::empty(x.sizes(), x.options());
  const int64_t words = (xc.numel() + 3) / 4, n = xc.numel();
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float scale = 65536.0f / float(65536 - dropped);
  const uint64_t base = uint64_t(seed), threshold = uint64_t(dropped);
  at::parallel_for(0, words, 4096, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; w++) {
      const uint64_t bits = splitmix64(base + uint64_t(w + 1) * 0x9E3779B97F4A7C15ull);
      for (int64_t j = 0; j < 4 && 4 * w + j < n; j++) {
        const uint64_t b = (bits >> (16 * j)) & 0xFFFF;
        yp[4 * w + j] = b >= threshold ? xp[4 * w + j] * scale : 0.0f;
      }
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
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, float eps, bool weight_grad) -> (Tensor, Tensor)");
  m.def("gated_gelu(Tensor h) -> Tensor");
  m.def("gated_gelu_backward(Tensor grad, Tensor h) -> Tensor");
  m.def("seeded_dropout(Tensor x, int dropped, int seed) -> Tensor");
  m.def("token_losses(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  m.def("token_losses_backward(Tensor grad, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor");
#ifdef INT8_ROWS
  m.def("int8_rows(Tensor x, Tensor weight) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(nanoflant5_cpu, CPU, m) {
  m.impl("rows_linear", &rows_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("gated_gelu", &gated_gelu);
  m.impl("gated_gelu_backward", &gated_gelu_backward);
  m.impl("token_losses", &token_losses);
  m.impl("seeded_dropout", &seeded_dropout);
  m.impl("token_losses_backward", &token_losses_backward);
#ifdef INT8_ROWS
  m.impl("int8_rows", &int8_rows);
#endif
}
