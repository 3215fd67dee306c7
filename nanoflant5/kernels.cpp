// CPU kernels for decoding a few rows at a time, each reading the weight once, in order, with software prefetch:
// - rows_linear(x (..., K), w (N, K)) = x @ w.T for float32 (or bfloat16) x and w of 1-4 rows;
// - panel_linear(x (..., K), packed w, N) = x @ w.T for float32 x of 5-64 rows, w packed in panels of 64 columns;
//   bf16_panel_linear the same for bfloat16 x and w on AVX512-BF16 (vdpbf16ps), w packed in pairs of k;
// - decode_attention(q, k, v, bias, rows): attention of a decoding step's few queries a row;
// - full_attention(q, k, v, bias, key_mask): attention of whole sequences (the encoder's), T5's bias in a compact form;
// - decoder_block(x, ...): a T5 decoder block's decoding step in one call, on the kernels above (or torch's packed
//   GEMMs);
// - screen_bounds(product, ...): the greedy output layer's int8 screen's bounds from its int8 product, in one pass;
// - int8_linear(x (..., K), w (N, K), scale (N,)) = x @ (scale[:, None] * w).T for float32 x of any rows and int8 w
//   (weight-only int8, quantize.py), each weight block read once and multiplied with 4 rows of x at a time;
// - int8_rows(x (M, K), w (N, K)) = x @ w.T exactly in int32 for int8 x of 1-8 rows and int8 w (the greedy output
//   layer's int8 screen), where the CPU has AVX-512 VNNI or AVX2; amx_rows the same for any rows on AMX tiles, w
//   packed ahead by amx_pack, where the CPU has AMX;
// - w8a8_linear(x (..., K), w (N, K), scale (N,)): x's rows quantized to int8 (each row's own scale), multiplied with
//   int8 w exactly in int32 (int8_rows' loops for up to 8 rows, else torch's _int_mm: oneDNN's AMX or VNNI), then
//   times both scales (quantize.py's w8a8);
//   w8a16_linear the same with x's rows quantized to 16 bits, as two int8 digits (weight-only int8 past a few rows);
// - rms_norm(x (..., D), w (D,), eps) = w * (x * rsqrt(mean(x^2) + eps)) for float32, T5's layer norm in one call
//   (torch's rms_norm on CPU is some 20 operator calls), and rms_norm_backward, its gradients in one call;
// - gated_gelu(h (..., 2F)) = gelu_tanh(h[..., :F]) * h[..., F:], FLAN-T5's gated feed-forward activation on the
//   fused wi output, and gated_gelu_backward, the gradient of h in one call;
// - token_losses(logits (N, V), labels (N,)): each row's cross-entropy, and token_losses_backward, its gradient;
// - seeded_dropout(x, dropped, seed): dropout with the mask a function of the seed and the element's index.
// Built on first use by nanoflant5/kernels.py (torch.utils.cpp_extension); see there for why and how much.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/BFloat16.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)  // (implies __AVX512F__: immintrin.h is in)
#define INT8_ROWS 1
#elif defined(__AVX2__)  // int8_rows on AVX2's vpmaddwd (AMD Zen 2/3, Intel's client CPUs)
#define INT8_ROWS 2
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define AMX_ROWS 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// A vector of L floats: one register. GCC lowers a vector wider than the CPU's registers through memory (an AVX2
// build with 16 lanes ran 1.4-7x slower than MKL), so an AVX2 build (AMD Zen 2/3, Intel's client CPUs) has 8 lanes.
#ifdef __AVX512F__
constexpr int64_t L = 16;
#else
constexpr int64_t L = 8;
#endif
typedef float vfloat __attribute__((vector_size(4 * L)));
typedef int32_t vint __attribute__((vector_size(4 * L)));
// Bytes prefetched ahead in each weight row's stream (measured best: 8-16 KB), into L2 (prefetcht1): on AMD EPYC
// (Zen 4) flan-t5-base's decoder linears at 1 row streamed at 24-25 GB/s with prefetcht0 and 29-31 with prefetcht1
// (the int8 screen's 25 MB 1.37 -> 0.81 ms); the same on Intel's Xeon (27.5 GB/s either way).
constexpr int64_t AHEAD = 12288;
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
  v8 a;
  std::memcpy(&a, &v, 32);
  if constexpr (L == 16) {
    v8 b; std::memcpy(&b, reinterpret_cast<char*>(&v) + 32, 32); a += b;
  }
  v4 c, d; std::memcpy(&c, &a, 16); std::memcpy(&d, reinterpret_cast<char*>(&a) + 16, 16); c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// L bfloat16 -> L float32, exactly (a bfloat16 is a float32's upper 16 bits)
inline vfloat load(const c10::BFloat16* p) {
  typedef uint16_t vu16 __attribute__((vector_size(2 * L)));
  typedef uint32_t vu32 __attribute__((vector_size(4 * L)));
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32 bits = __builtin_convertvector(h, vu32) << 16;
  vfloat f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// y[r, n:n+nb] for rows r < R of x (R, K) and weight rows n..n+nb of w (N, K) (float32 or bfloat16, widened)
// INT_SUM: the lanes' sums are whole numbers below 2^24 (w8a8_float_linear's), added as int32: exactly
template <int R, int nb, typename T, bool INT_SUM = false>
inline void block(const float* x, const T* w, float* y, int64_t K, int64_t N, int64_t n) {
  vfloat acc[R][nb] = {};
  const T* wn = w + n * K;
  for (int64_t k = 0; k < K; k += L) {
    vfloat wv[nb];
    for (int b = 0; b < nb; b++) {
      wv[b] = load(wn + b * K + k);
      __builtin_prefetch(reinterpret_cast<const char*>(wn + b * K + k) + AHEAD, 0, 2);
    }
    for (int r = 0; r < R; r++) {
      vfloat xv = load(x + r * K + k);
      for (int b = 0; b < nb; b++) acc[r][b] += xv * wv[b];
    }
  }
  for (int r = 0; r < R; r++)
    for (int b = 0; b < nb; b++) {
      if constexpr (INT_SUM) {
        const vint lanes = __builtin_convertvector(acc[r][b], vint);
        int32_t sum = 0;
        for (int i = 0; i < L; i++) sum += lanes[i];
        y[r * N + n + b] = float(sum);
      } else {
        y[r * N + n + b] = lanes_sum(acc[r][b]);
      }
    }
}

// Weight rows side by side for R rows of x: NB with AVX-512's 32 registers; with AVX2's 16, as many as keep the R x
// nb sums, the weights and x in registers.
template <int R>
constexpr int side_by_side() { return L == 16 || R <= 2 ? NB : R == 3 ? 3 : 2; }

template <int R, typename T>
void rows(const float* x, const T* w, float* y, int64_t K, int64_t N) {
  constexpr int nb = side_by_side<R>();
  at::parallel_for(0, N / nb, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) block<R, nb>(x, w, y, K, N, b * nb);
  });
  for (int64_t n = N / nb * nb; n < N; n++) block<R, 1>(x, w, y, K, N, n);
}

template <typename T>
void rows_of(const float* x, const T* w, float* y, int64_t M, int64_t K, int64_t N) {
  switch (M) {
    case 1: rows<1>(x, w, y, K, N); break;
    case 2: rows<2>(x, w, y, K, N); break;
    case 3: rows<3>(x, w, y, K, N); break;
    case 4: rows<4>(x, w, y, K, N); break;
    default: TORCH_CHECK(false, "rows_linear: 1-4 rows expected, got ", M);
  }
}

// bfloat16 x and w (the bfloat16 mode): widened to float32 (exactly), multiplied and summed in float32, the result
// rounded to bfloat16 (to nearest even) once, as oneDNN's bfloat16 GEMM does; the weight read at half the bytes.
at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& w) {
  const bool bf16 = x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || (x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat)) && x.device().is_cpu() &&
              w.device().is_cpu(), "rows_linear: float32 (or bfloat16) CPU tensors expected");
  int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && x.size(-1) == K && K % 16 == 0,
              "rows_linear: a contiguous (N, K) weight with K a multiple of 16, and x (..., K) expected");
  at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  at::Tensor y = linear_output(x2, N);
  const float* xp = x2.data_ptr<float>();
  if (bf16) rows_of(xp, w.data_ptr<c10::BFloat16>(), y.data_ptr<float>(), x2.size(0), K, N);
  else rows_of(xp, w.data_ptr<float>(), y.data_ptr<float>(), x2.size(0), K, N);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.view(shape).to(x.scalar_type());
}

// panel_linear: x @ w.T for 5-64 rows of float32 x, with w packed ahead in panels of 64 output columns
// (speed.pack_panels: (ceil(N / 64), K, 64), a panel's weights k by k, zeros past N). Each panel is computed by
// blocks of up to 6 rows: 24 accumulators in registers, each step over k loading the panel's 4 vectors of weights once
// and broadcasting each row's x[r, k] against them (the register-blocked GEMM micro-kernel of Goto & van de Geijn
// 2008, "Anatomy of high-performance matrix multiplication"), with no sums across lanes. k goes in chunks: while a
// chunk is multiplied with every block of rows, the blocks take turns fetching the weights further on, so that
// reading the panel (one stream) and the arithmetic overlap. Each output is one sum over k in order, so results differ
// from MKL's in the last bits, as MKL's own kernels do from one another.
constexpr int64_t PANEL = 64;  // output columns a panel: 4 vectors
// rows and columns a block: AVX-512 6 x 64 (6 x 4 accumulators + 4 weight vectors: 28 of its 32 registers), AVX2
// 2 x 32 (2 x 4 + 4 of its 16; 6 x 64 would spill to memory), half a panel after the other
constexpr int BLOCK_ROWS = L == 16 ? 6 : 2;
constexpr int64_t BLOCK_COLS = L == 16 ? PANEL : PANEL / 2;
constexpr int64_t KC = 64;     // k a chunk (16 KB of a panel)
// weights fetched this far ahead in k, into L2 (prefetcht1): flan-t5-base's decoder linears streamed from memory, 8
// and 16 rows, 7-10% faster than into L1 (prefetcht0, whose misses wait in L1's few fill buffers); 32 rows the same
constexpr int64_t AHEAD_K = 64;

template <int R>  // (w, acc_buf: at the block's first column; acc_buf's rows ld floats apart)
inline void panel_block(const float* x, int64_t K, const float* w, float* acc_buf, int64_t ld, int64_t k0,
                        int64_t k1, int64_t fetch_k, int64_t fetch_step) {
  constexpr int NV = BLOCK_COLS / L;
  vfloat acc[R][NV];
  for (int r = 0; r < R; r++)
    for (int j = 0; j < NV; j++) acc[r][j] = k0 == 0 ? vfloat{} : load(acc_buf + r * ld + j * L);
  for (int64_t k = k0; k < k1; k++) {
    vfloat wv[NV];
    for (int j = 0; j < NV; j++) wv[j] = load(w + k * PANEL + j * L);
    if (k == fetch_k) {  // this block's share of the weights ahead (past K: the next panel's, which follow)
      for (int j = 0; j < NV; j++) __builtin_prefetch(w + (k + AHEAD_K) * PANEL + j * L, 0, 2);  // (into L2)
      fetch_k += fetch_step;
    }
    for (int r = 0; r < R; r++) {
      const float xr = x[r * K + k];
      for (int j = 0; j < NV; j++) acc[r][j] += xr * wv[j];
    }
  }
  for (int r = 0; r < R; r++)
    for (int j = 0; j < NV; j++) std::memcpy(acc_buf + r * ld + j * L, &acc[r][j], sizeof(vfloat));
}

// A panel's sums for r (1 to BLOCK_ROWS) rows of x over k0..k1, a block of columns after the other
inline void panel_rows(int64_t r, const float* x, int64_t K, const float* w, float* acc_buf, int64_t ld, int64_t k0,
                       int64_t k1, int64_t fetch_k, int64_t fetch_step) {
  for (int64_t c0 = 0; c0 < PANEL; c0 += BLOCK_COLS) {
    const float* wc = w + c0;
    float* ac = acc_buf + c0;
    switch (r) {
      case 1: panel_block<1>(x, K, wc, ac, ld, k0, k1, fetch_k, fetch_step); break;
      case 2: panel_block<2>(x, K, wc, ac, ld, k0, k1, fetch_k, fetch_step); break;
      case 3: panel_block<3>(x, K, wc, ac, ld, k0, k1, fetch_k, fetch_step); break;
      case 4: panel_block<4>(x, K, wc, ac, ld, k0, k1, fetch_k, fetch_step); break;
      case 5: panel_block<5>(x, K, wc, ac, ld, k0, k1, fetch_k, fetch_step); break;
      default: panel_block<6>(x, K, wc, ac, ld, k0, k1, fetch_k, fetch_step); break;
    }
  }
}

// The loop of the panel GEMMs (panel_linear, bf16_panel_linear): threads take panels; a panel's k goes in chunks of
// kc steps, each chunk multiplied with every block of rows (at most BLOCK_ROWS, as even as can be: 32 rows 6, 6, 5,
// 5, 5, 5), the blocks taking turns fetching the weights further on, into the panel's float32 sums (M x PANEL), which
// store(p, sums) then writes out. rows(r, r0, p, sums of row r0, k0, k1, fetch_k, fetch_step): rows r0..r0 + r - 1
// over panel p's steps k0..k1.
template <typename Rows, typename Store>
void over_panels(int64_t M, int64_t panels, int64_t steps, int64_t kc, const Rows& rows, const Store& store) {
  const int64_t blocks = (M + BLOCK_ROWS - 1) / BLOCK_ROWS, size = M / blocks, larger = M % blocks;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> acc(M * PANEL);  // the panel's outputs for all rows, summed chunk by chunk
    for (int64_t p = p0; p < p1; p++) {
      for (int64_t k0 = 0; k0 < steps; k0 += kc) {
        const int64_t k1 = std::min(steps, k0 + kc);
        for (int64_t b = 0, r0 = 0; b < blocks; b++) {
          const int64_t r = size + (b < larger);
          rows(r, r0, p, acc.data() + r0 * PANEL, k0, k1, k0 + b, blocks);
          r0 += r;
        }
      }
      store(p, acc.data());
    }
  });
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat && x.device().is_cpu() &&
              packed.device().is_cpu(), "panel_linear: float32 CPU tensors expected");
  const int64_t K = packed.size(1), panels = packed.size(0);
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == PANEL && packed.is_contiguous() && x.size(-1) == K && N > 0 &&
              (N + PANEL - 1) / PANEL == panels,
              "panel_linear: x (..., K) and a weight packed by pack_panels expected");
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  at::Tensor y = linear_output(x, N);
  const int64_t M = x2.size(0);
  if (M == 0) return y;
  const float* xp = x2.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_panels(M, panels, K, KC,
              [&](int64_t r, int64_t r0, int64_t p, float* acc, int64_t k0, int64_t k1, int64_t fetch_k,
                  int64_t fetch_step) {
                panel_rows(r, xp + r0 * K, K, wp + p * K * PANEL, acc, PANEL, k0, k1, fetch_k, fetch_step);
              },
              [&](int64_t p, const float* acc) {
                const int64_t n0 = p * PANEL, cols = std::min(PANEL, N - n0);
                for (int64_t m = 0; m < M; m++) std::memcpy(yp + m * N + n0, acc + m * PANEL, cols * sizeof(float));
              });
  return y;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define BF16_PANELS 1
// bf16_panel_linear: panel_linear for the bfloat16 mode, x (..., K) and w bfloat16, on AVX512-BF16's vdpbf16ps (AMD
// Zen 4, Intel Cooper Lake and Sapphire Rapids on): w packed ahead (speed.pack_bf16_panels) as (ceil(N / 64),
// ceil(K / 2), 64, 2), a panel's 64 columns' weights a pair of k's at a time, so that one vector holds 16 columns'
// pairs; each pair of x[r] broadcast, vdpbf16ps adds x[r, 2k] w[n, 2k] + x[r, 2k + 1] w[n, 2k + 1] into float32 sums
// (products exact; bfloat16 inputs flushed to zero below float32's normal range, as the instruction does). The sums
// are rounded to bfloat16 once, as oneDNN's bfloat16 GEMM (which choose_packer measures it against) does. Blocks of 6
// rows x 64 columns in panel_linear's loop (over_panels), a step of k being a pair.
template <int R>
inline void bf16_block(const c10::BFloat16* x, int64_t K, const c10::BFloat16* w, float* acc_buf, int64_t k0,
                       int64_t k1, int64_t fetch_k, int64_t fetch_step) {
  __m512 acc[R][4];
  for (int r = 0; r < R; r++)
    for (int j = 0; j < 4; j++)
      acc[r][j] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_buf + r * PANEL + j * 16);
  for (int64_t k = k0; k < k1; k++) {  // k: a pair of x's k's
    __m512i wv[4];
    for (int j = 0; j < 4; j++) wv[j] = _mm512_loadu_si512(w + k * 2 * PANEL + j * 32);
    if (k == fetch_k) {
      for (int j = 0; j < 4; j++) __builtin_prefetch(w + (k + AHEAD_K) * 2 * PANEL + j * 32, 0, 2);
      fetch_k += fetch_step;
    }
    for (int r = 0; r < R; r++) {
      int32_t pair = 0;
      if (2 * k + 1 < K) std::memcpy(&pair, x + r * K + 2 * k, 4);
      else std::memcpy(&pair, x + r * K + 2 * k, 2);  // an odd K's last k, paired with 0
      const __m512i xr = _mm512_set1_epi32(pair);
      for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)xr, (__m512bh)wv[j]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int j = 0; j < 4; j++) _mm512_storeu_ps(acc_buf + r * PANEL + j * 16, acc[r][j]);
}

at::Tensor bf16_panel_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16 && x.device().is_cpu() &&
              packed.device().is_cpu(), "bf16_panel_linear: bfloat16 CPU tensors expected");
  const int64_t K = x.size(-1), K2 = packed.size(1), panels = packed.size(0);
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == PANEL && packed.size(3) == 2 && packed.is_contiguous() &&
              K2 == (K + 1) / 2 && N > 0 && (N + PANEL - 1) / PANEL == panels,
              "bf16_panel_linear: x (..., K) and a weight packed by pack_bf16_panels expected");
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  at::Tensor y = linear_output(x, N);
  const int64_t M = x2.size(0);
  if (M == 0) return y;
  const c10::BFloat16* xp = x2.data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = packed.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  over_panels(M, panels, K2, KC / 2,  // (BLOCK_ROWS: 6 with AVX-512)
              [&](int64_t r, int64_t r0, int64_t p, float* acc, int64_t k0, int64_t k1, int64_t fetch_k,
                  int64_t fetch_step) {
                const c10::BFloat16* xr = xp + r0 * K;
                const c10::BFloat16* w = wp + p * K2 * 2 * PANEL;
                switch (r) {
                  case 1: bf16_block<1>(xr, K, w, acc, k0, k1, fetch_k, fetch_step); break;
                  case 2: bf16_block<2>(xr, K, w, acc, k0, k1, fetch_k, fetch_step); break;
                  case 3: bf16_block<3>(xr, K, w, acc, k0, k1, fetch_k, fetch_step); break;
                  case 4: bf16_block<4>(xr, K, w, acc, k0, k1, fetch_k, fetch_step); break;
                  case 5: bf16_block<5>(xr, K, w, acc, k0, k1, fetch_k, fetch_step); break;
                  default: bf16_block<6>(xr, K, w, acc, k0, k1, fetch_k, fetch_step); break;
                }
              },
              [&](int64_t p, const float* acc) {  // rounded to nearest even
                const int64_t n0 = p * PANEL, cols = std::min(PANEL, N - n0);
                for (int64_t m = 0; m < M; m++)
                  for (int64_t c = 0; c < cols; c++) yp[m * N + n0 + c] = c10::BFloat16(acc[m * PANEL + c]);
              });
  return y;
}
#endif

#ifdef __AVX512F__
inline vfloat load_int8(const int8_t* p) {  // 16 int8 -> 16 float32
  return vfloat(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
}
#elif defined(__AVX2__)  // (GCC's generic conversion takes the 8 int8 one at a time: int8 b1 3.9x slower)
inline vfloat load_int8(const int8_t* p) {  // 8 int8 -> 8 float32
  return vfloat(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
}
#else
typedef int8_t vi8 __attribute__((vector_size(L)));
inline vfloat load_int8(const int8_t* p) {  // L int8 -> L float32
  vi8 v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, vfloat);
}
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
      __builtin_prefetch(wn + b * K + k + AHEAD, 0, 2);
    }
    for (int r = 0; r < R; r++) {
      vfloat xv = load(x + r * K + k);
      for (int b = 0; b < nb; b++) acc[r][b] += xv * wv[b];
    }
  }
  for (int r = 0; r < R; r++)
    for (int b = 0; b < nb; b++) y[r * N + n + b] = lanes_sum(acc[r][b]) * scale[n + b];
}

// Weight rows side by side for chunks of 4 rows of x: AVX2's 16 registers hold 4 x 3 sums, 3 weights and x (3
// rather than side_by_side's 2: flan-t5-small's int8 step as an AVX2 CPU, 1 / 4 / 32 rows 1.74 / 3.25 / 29.0 ->
// 1.58 / 3.17 / 25.6 ms; the same sums)
constexpr int INT8_NB = L == 16 ? NB : 3;

// rows m0.. of x, up to 4 of them, times weight rows n..n+nb (INT_SUM: see block)
template <int nb, bool INT_SUM = false>
inline void rows_int8(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
                      int64_t n) {
  // Past 4 rows the block's weights are widened once for all the chunks of rows, not again for each (same results);
  // up to 4 they are widened as they stream in (widening into a buffer first: 1.6 -> 2.6 ms a flan-t5-small step)
  if (M > 4 || INT_SUM) {
    thread_local std::vector<float> wide;
    wide.resize(nb * K);
    for (int b = 0; b < nb; b++)
      for (int64_t k = 0; k < K; k += L) {
        const vfloat v = load_int8(w + (n + b) * K + k);
        std::memcpy(wide.data() + b * K + k, &v, sizeof v);
      }
    for (int64_t m = 0; m < M; m += 4) {
      const float* xm = x + m * K;
      float* ym = y + m * N + n;
      const int R = M - m < 4 ? M - m : 4;
      switch (R) {
        case 1: block<1, nb, float, INT_SUM>(xm, wide.data(), ym, K, N, 0); break;
        case 2: block<2, nb, float, INT_SUM>(xm, wide.data(), ym, K, N, 0); break;
        case 3: block<3, nb, float, INT_SUM>(xm, wide.data(), ym, K, N, 0); break;
        default: block<4, nb, float, INT_SUM>(xm, wide.data(), ym, K, N, 0);
      }
      for (int r = 0; r < R; r++)
        for (int b = 0; b < nb; b++) ym[r * N + b] *= scale[n + b];
    }
    return;
  }
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

// y (M, N) = x (M, K) times int8 w (N, K), times scale: rows_int8 over blocks of INT8_NB weight rows
template <bool INT_SUM = false>
void int8_products(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N) {
  constexpr int nb = INT8_NB;
  at::parallel_for(0, N / nb, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) rows_int8<nb, INT_SUM>(x, w, scale, y, M, K, N, b * nb);
  });
  for (int64_t n = N / nb * nb; n < N; n++) rows_int8<1, INT_SUM>(x, w, scale, y, M, K, N, n);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat &&
              x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(),
              "int8_linear: float32 x, int8 weight and float32 scale on CPU expected");
  int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && scale.is_contiguous() && scale.numel() == N && x.size(-1) == K &&
              K % 16 == 0, "int8_linear: a contiguous (N, K) weight with K a multiple of 16, (N,) scales and x (..., K)"
              " expected");
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  at::Tensor y = linear_output(x, N);
  const float* xp = x2.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  int8_products(xp, wp, sp, yp, x2.size(0), K, N);
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

// exp on L lanes (Cephes' expf: 2^n e^r with |r| <= ln 2 / 2, e^r a degree-7 polynomial; within 2 float32 ulps),
// 0 below e^-87.3 (and for -inf), at most e^88 (callers: x - max <= 0, and a sigmoid that is 0 there anyway).
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

template <typename T>  // vfloat (L lanes, vexp) or float (the tail, std::exp)
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

// A row's n floats r replaced by e^(r - mx) (softmax's numerators); returns their sum.
inline float exp_row(float* r, int64_t n, float mx) {
  vfloat acc = {};
  int64_t s = 0;
  for (; s + L <= n; s += L) {
    const vfloat e = vexp(load(r + s) - mx);
    std::memcpy(r + s, &e, sizeof e);
    acc += e;
  }
  float sum = lanes_sum(acc);
  for (; s < n; s++) sum += (r[s] = std::exp(r[s] - mx));
  return sum;
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

// Attention of a few queries a row, as a decoding step has (one token a row; beam search's cross-attention: the beams
// of an input as queries of one row):
//   out[b, h, m] = softmax(q[b, h, m] . k[r, h, s] + bias[b, h, m, s] over s) v[r, h, s]
// with r = b, or r = rows[s, b] where given (beam search's self-attention: row b's history lies in other rows of the
// cache), so the gather of the history is no copy. No 1/sqrt(d) scaling (T5's). Any strides, the last dimension's 1;
// the bias broadcast (size 1: stride 0). torch's SDPA spends most of such a call on per-(b, h) set-up (flan-t5-base,
// 32 rows: ~1 ms a call); here a row's heads go together, position by position: one pass over their keys (dot
// products, bias), a softmax per head and query (vexp; two passes, in float32), one pass over their values. The cache
// holds a row's heads side by side at each position, so a position's keys are one run of H * D floats where a head at
// a time read runs of D floats B * 2 * H * D apart (flan-t5-base, 32 rows, 12 layers from memory: self-attention
// over 64 positions 10.0 -> 7.3 ms, cross-attention 7.6 -> 5.9 ms). Rows are split between threads (rows' groups of
// heads where there are fewer than 4 rows a thread). The output is (B, M, H, D) in memory (returned as its
// (B, H, M, D) view), which the caller's transpose and reshape read as is. bfloat16 q, k, v and bias (the bfloat16
// mode) are widened on load, the arithmetic the same, the result rounded once (torch's bfloat16 SDPA took ~2 ms a
// call at 32 rows on an AMD EPYC).
constexpr int U = 16 / L;  // vectors in 16 floats
constexpr int64_t AHEAD_KEYS = 8;  // keys fetched ahead (8: ~5% faster than none for the cache and the encoder output)

template <int C, typename T>  // C chunks of L lanes: D = L C; T float or bfloat16 (widened, exactly)
void attend_rows(const T* qp, const T* kp, const T* vp, const T* bp, const int64_t* rp, float* op,
                 int64_t B, int64_t H, int64_t M, int64_t S, const int64_t* qs, const int64_t* ks, const int64_t* vs,
                 const int64_t* bs, const int64_t* rs, int64_t heads) {
  const int64_t groups = (H + heads - 1) / heads;  // a task: one row's group of `heads` heads
  at::parallel_for(0, B * groups, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(heads * M * S), inv(heads * M);
    std::vector<vfloat> out(heads * M * C);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / groups, h0 = i % groups * heads, nh = std::min(heads, H - h0);
      // the cache row that holds row b's position s (rows[s, b] where given)
      auto row = [&](int64_t s) { return rp ? rp[s * rs[0] + b * rs[1]] : b; };
      // position s's keys or values of the group's heads, fetched AHEAD_KEYS positions ahead
      auto fetch = [&](const T* base, const int64_t* st, int64_t s) {
        if (s >= S) return;
        const T* at_s = base + row(s) * st[0] + s * st[2];
        for (int64_t h = h0; h < h0 + nh; h++)
          for (int c = 0; c < C; c += 64 / (sizeof(T) * L)) __builtin_prefetch(at_s + h * st[1] + c * L);
      };
      for (int64_t s = 0; s < S; s++) {  // scores: position by position, the group's heads side by side
        fetch(kp, ks, s + AHEAD_KEYS);
        const T* key = kp + row(s) * ks[0] + s * ks[2];
        for (int64_t j = 0; j < nh; j++) {
          const int64_t h = h0 + j;
          vfloat kc[C];
          for (int c = 0; c < C; c++) kc[c] = load(key + h * ks[1] + c * L);
          for (int64_t m = 0; m < M; m++) {
            const T* qm = qp + b * qs[0] + h * qs[1] + m * qs[2];
            // lane i of acc[u] sums what lane u L + i of 16 lanes does: the order of an AVX-512 build, to the bit
            vfloat acc[U] = {};
            for (int c = 0; c < C; c++) acc[c % U] += load(qm + c * L) * kc[c];
            if constexpr (U == 2) acc[0] += acc[1];
            p[(j * M + m) * S + s] = lanes_sum(acc[0]) + float(bp[b * bs[0] + h * bs[1] + m * bs[2] + s]);
          }
        }
      }
      for (int64_t jm = 0; jm < nh * M; jm++) {  // softmax's numerators and 1 / their sum
        float* r = p.data() + jm * S;
        const float mx = row_max(r, S);
        inv[jm] = 1.0f / exp_row(r, S, mx);
      }
      std::fill(out.begin(), out.begin() + nh * M * C, vfloat{});
      for (int64_t s = 0; s < S; s++) {  // the values, the same way
        fetch(vp, vs, s + AHEAD_KEYS);
        const T* value = vp + row(s) * vs[0] + s * vs[2];
        for (int64_t j = 0; j < nh; j++) {
          vfloat vc[C];
          for (int c = 0; c < C; c++) vc[c] = load(value + (h0 + j) * vs[1] + c * L);
          for (int64_t m = 0; m < M; m++) {
            const float w = p[(j * M + m) * S + s];
            vfloat* o = out.data() + (j * M + m) * C;
            for (int c = 0; c < C; c++) o[c] += w * vc[c];
          }
        }
      }
      for (int64_t j = 0; j < nh; j++)
        for (int64_t m = 0; m < M; m++)
          for (int c = 0; c < C; c++) {
            const vfloat o = out[(j * M + m) * C + c] * inv[j * M + m];
            std::memcpy(op + ((b * M + m) * H + h0 + j) * (C * L) + c * L, &o, sizeof o);
          }
    }
  });
}

// The strides of an attention bias (B or 1, H or 1, M or 1, S) for b, h and the query into bs[0..2] (0 where it is
// broadcast), checking its shape and that its last dimension is contiguous (the kernels read a query's S in a row).
void bias_strides(const at::Tensor& bias, const int64_t (&want)[4], int64_t* bs, const char* name) {
  for (int d = 0; d < 4; d++)
    TORCH_CHECK(bias.size(d) == want[d] || bias.size(d) == 1, name, ": bias does not broadcast");
  for (int d = 0; d < 3; d++) bs[d] = bias.size(d) == 1 ? 0 : bias.stride(d);
  TORCH_CHECK(want[3] == 1 || (bias.size(3) == want[3] && bias.stride(3) == 1), name,
              ": the bias's last dimension must be contiguous");
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                            const std::optional<at::Tensor>& rows) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && k.scalar_type() == dtype &&
              v.scalar_type() == dtype && bias.scalar_type() == dtype && q.device().is_cpu() && k.device().is_cpu() &&
              v.device().is_cpu() && bias.device().is_cpu() && q.dim() == 4 && k.dim() == 4 && v.dim() == 4 &&
              bias.dim() == 4, "decode_attention: float32 (or all bfloat16) CPU tensors q (B, H, M, D), k and v "
              "(B, H, S, D), bias (B, H, M, S) expected");
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes() && D % 16 == 0 && D <= 128 && S > 0 &&
              q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: shapes or strides not taken");
  int64_t bs[3];
  bias_strides(bias, {B, H, M, S}, bs, "decode_attention");
  int64_t rs[2] = {0, 0};
  const int64_t* rp = nullptr;
  if (rows.has_value()) {
    const at::Tensor& r = *rows;
    TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 2 && r.size(0) == S && r.size(1) == B,
                "decode_attention: rows (S, B) of int64 expected");
    rp = r.data_ptr<int64_t>(), rs[0] = r.stride(0), rs[1] = r.stride(1);
    for (int64_t s = 0; s < S; s++)
      for (int64_t b = 0; b < B; b++)
        TORCH_CHECK(rp[s * rs[0] + b * rs[1]] >= 0 && rp[s * rs[0] + b * rs[1]] < k.size(0),
                    "decode_attention: a row index out of range");
  } else {
    TORCH_CHECK(k.size(0) == B, "decode_attention: k and v must have q's rows");
  }
  at::Tensor out = at::empty({B, M, H, D}, q.options().dtype(at::kFloat));
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)}, ks[3] = {k.stride(0), k.stride(1), k.stride(2)},
                vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  // a task: one row's heads, or a few rows' share of them when there are fewer rows than 4 a thread
  const int64_t split = std::max<int64_t>(1, (4 * at::get_num_threads() + B - 1) / B);
  const int64_t heads = (H + std::min(split, H) - 1) / std::min(split, H);
  auto run = [&](auto dtype_tag) {
    using T = decltype(dtype_tag);
    auto with = [&](auto kernel) {
      kernel(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), bias.data_ptr<T>(), rp, out.data_ptr<float>(), B, H,
             M, S, qs, ks, vs, bs, rs, heads);
    };
    switch (D / 16) {
      case 1: with(attend_rows<1 * U, T>); break;
      case 2: with(attend_rows<2 * U, T>); break;
      case 3: with(attend_rows<3 * U, T>); break;
      case 4: with(attend_rows<4 * U, T>); break;
      case 5: with(attend_rows<5 * U, T>); break;
      case 6: with(attend_rows<6 * U, T>); break;
      case 7: with(attend_rows<7 * U, T>); break;
      default: with(attend_rows<8 * U, T>); break;
    }
  };
  if (dtype == at::kBFloat16) run(c10::BFloat16());
  else run(float());
  return out.to(dtype).transpose(1, 2);  // bfloat16: the float32 result rounded once
}

// full_attention: attention of whole sequences, every query over every key (the encoder's self-attention, T queries
// and S keys a row and head):
//   out[b, h, t] = softmax(q[b, h, t] . k[b, h, s] + bias[b, h, t, s] + key_mask[b, s] over s) v[b, h, s]
// without 1/sqrt(d) (T5's). bias is (B or 1, H or 1, T or 1, S), or T5's relative position bias as one row per head,
// (H, T + S - 1): bias[b, h, t, s] = bias[h, T - 1 - t + s], a function of s - t only, whose rows stay in L1 where
// the (B, H, T, S) tensor streams from memory (flan-t5-small: 12.6 MB a layer for 2 rows of 512). key_mask (B, S):
// added (the padding: 0 or the dtype's minimum), or none. A task is one row's head: its keys laid out in panels of 64
// keys and its values in panels of 64 of their D columns (as pack_panels lays out a weight), then, TILE queries at a
// time, the scores as panel_linear computes a product (register blocks of 6 queries x 64 keys, a panel's D x 64
// floats in L1), plus the biases, a softmax per query (vexp, in float32), and the values' product the same way, written
// into out (B, T, H, D) in memory (returned as its (B, H, T, D) view), which the output projection's reshape reads as
// is. Any strides for q, k, v but the last dimension's 1; D a multiple of 64.
constexpr int64_t TILE = 48;  // queries a tile: their scores (TILE x S floats) stay in L2

at::Tensor full_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                          const std::optional<at::Tensor>& key_mask) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
              bias.scalar_type() == at::kFloat && q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
              bias.device().is_cpu() && q.dim() == 4 && k.dim() == 4 && v.dim() == 4 &&
              (bias.dim() == 4 || bias.dim() == 2),
              "full_attention: float32 CPU tensors q (B, H, T, D), k and v (B, H, S, D), bias (B, H, T, S) or "
              "(H, T + S - 1) expected");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes() && D % PANEL == 0 &&
              S > 0 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "full_attention: shapes or strides not taken");
  const bool relative = bias.dim() == 2;
  int64_t bs[3] = {0, 0, 0};  // bias's strides for b, h, t (relative: h's)
  if (relative) {
    TORCH_CHECK(bias.size(0) == H && bias.size(1) == T + S - 1 && bias.stride(1) == 1,
                "full_attention: a relative bias (H, T + S - 1) expected");
    bs[1] = bias.stride(0);
  } else {
    bias_strides(bias, {B, H, T, S}, bs, "full_attention");
  }
  const float* mp = nullptr;
  int64_t ms = 0;
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kFloat && key_mask->dim() == 2 && key_mask->size(0) == B &&
                key_mask->size(1) == S && key_mask->stride(1) == 1,
                "full_attention: key_mask (B, S) of float32 expected");
    mp = key_mask->data_ptr<float>(), ms = key_mask->stride(0);
  }
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(),
              *bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t key_panels = (S + PANEL - 1) / PANEL, Sp = key_panels * PANEL, value_panels = D / PANEL;
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)}, ks[3] = {k.stride(0), k.stride(1), k.stride(2)},
                vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> keys(Sp * D), values(S * D), qt(TILE * D), scores(TILE * Sp), inv(TILE);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / H, h = i % H;
      const float *kb = kp + b * ks[0] + h * ks[1], *vb = vp + b * vs[0] + h * vs[1];
      std::fill(keys.begin() + (Sp - PANEL) * D, keys.end(), 0.0f);  // (the last panel's keys past S: 0)
      for (int64_t s = 0; s < S; s++) {  // keys[s / 64][d][s % 64] = k[s][d]; values[d / 64][s][d % 64] = v[s][d]
        const float* ks_ = kb + s * ks[2];
        float* to = keys.data() + s / PANEL * D * PANEL + s % PANEL;
        for (int64_t d = 0; d < D; d++) to[d * PANEL] = ks_[d];
        for (int64_t p = 0; p < value_panels; p++)
          std::memcpy(values.data() + (p * S + s) * PANEL, vb + s * vs[2] + p * PANEL, PANEL * sizeof(float));
      }
      for (int64_t t0 = 0; t0 < T; t0 += TILE) {
        const int64_t n = std::min(TILE, T - t0);
        for (int64_t t = 0; t < n; t++)
          std::memcpy(qt.data() + t * D, qp + b * qs[0] + h * qs[1] + (t0 + t) * qs[2], D * sizeof(float));
        // rows in blocks of at most BLOCK_ROWS, as even as can be (as panel_linear's)
        const int64_t blocks = (n + BLOCK_ROWS - 1) / BLOCK_ROWS, size = n / blocks, larger = n % blocks;
        for (int64_t p = 0; p < key_panels; p++)  // a panel of keys (D x 64 floats) stays in L1 for every query
          for (int64_t blk = 0, r0 = 0; blk < blocks; r0 += size + (blk < larger), blk++)
            panel_rows(size + (blk < larger), qt.data() + r0 * D, D, keys.data() + p * D * PANEL,
                       scores.data() + r0 * Sp + p * PANEL, Sp, 0, D, -1, 0);
        for (int64_t t = 0; t < n; t++) {  // + the biases, then softmax's numerators over the S keys
          float* r = scores.data() + t * Sp;
          const float* bt = relative ? bp + h * bs[1] + (T - 1 - t0 - t)  // (row t of the relative form)
                                     : bp + b * bs[0] + h * bs[1] + (t0 + t) * bs[2];
          const float* mb = mp ? mp + b * ms : nullptr;
          vfloat vmax = vfloat{} - INFINITY;
          int64_t s = 0;
          for (; s + L <= S; s += L) {
            const vfloat x = load(r + s) + load(bt + s) + (mb ? load(mb + s) : vfloat{});
            std::memcpy(r + s, &x, sizeof x);
            vmax = x > vmax ? x : vmax;
          }
          float mx = -INFINITY;
          for (int i = 0; i < L; i++) mx = std::max(mx, vmax[i]);
          for (; s < S; s++) mx = std::max(mx, r[s] += bt[s] + (mb ? mb[s] : 0.0f));
          inv[t] = 1.0f / exp_row(r, S, mx);
        }
        for (int64_t p = 0; p < value_panels; p++)  // 64 values' D columns at a time (16 KB) in L1 for every query
          for (int64_t k0 = 0; k0 < S; k0 += KC)
            for (int64_t blk = 0, r0 = 0; blk < blocks; r0 += size + (blk < larger), blk++)
              panel_rows(size + (blk < larger), scores.data() + r0 * Sp, Sp, values.data() + p * S * PANEL,
                         op + ((b * T + t0 + r0) * H + h) * D + p * PANEL, H * D, k0, std::min(S, k0 + KC), -1, 0);
        for (int64_t t = 0; t < n; t++) {  // / the softmax's denominators
          float* o = op + ((b * T + t0 + t) * H + h) * D;
          for (int64_t d = 0; d < D; d += L) {
            const vfloat x = load(o + d) * inv[t];
            std::memcpy(o + d, &x, sizeof x);
          }
        }
      }
    }
  });
  return out.transpose(1, 2);
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

#if INT8_ROWS == 1
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
      _mm_prefetch(reinterpret_cast<const char*>(wn + b * K + k) + AHEAD, _MM_HINT_T1);
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

// x (M, K) . w (N, K)^T into y (M, N), exactly in int32, for int8 x of 1-8 rows (K <= 65536)
void int8_sums(const int8_t* x, const int8_t* w, int32_t* y, int64_t M, int64_t K, int64_t N) {
  const std::vector<uint8_t> xu = plus_128(x, M * K);
  rows8_of(xu.data(), w, y, M, K, N);
}
#elif INT8_ROWS == 2
// y[r, n:n+nb] for rows r < R of x (R, K), widened to int16, and int8 weight rows n..n+nb of w (N, K): vpmaddwd
// multiplies 16 int16 pairs and adds each two products into an int32 lane, exactly (|2 * 127 * 127| < 2^15 * 2), so
// the sums are exact as long as |x . w_n| <= K * 127 * 127 fits in int32 (K <= 65536, checked by the callers).
inline int32_t lanes_sum_int(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

template <int R, int nb>
inline void block16(const int16_t* x, const int8_t* w, int32_t* y, int64_t K, int64_t N, int64_t n) {
  __m256i acc[R][nb];
  for (int r = 0; r < R; r++)
    for (int b = 0; b < nb; b++) acc[r][b] = _mm256_setzero_si256();
  const int8_t* wn = w + n * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i wv[nb];
    for (int b = 0; b < nb; b++) {
      wv[b] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + b * K + k)));
      _mm_prefetch(reinterpret_cast<const char*>(wn + b * K + k) + AHEAD, _MM_HINT_T1);
    }
    for (int r = 0; r < R; r++) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * K + k));
      for (int b = 0; b < nb; b++) acc[r][b] = _mm256_add_epi32(acc[r][b], _mm256_madd_epi16(xv, wv[b]));
    }
  }
  for (int r = 0; r < R; r++)
    for (int b = 0; b < nb; b++) {
      int32_t sum = lanes_sum_int(acc[r][b]);
      for (int64_t j = k; j < K; j++) sum += int32_t(x[r * K + j]) * int32_t(wn[b * K + j]);  // the tail
      y[r * N + n + b] = sum;
    }
}

template <int R>
void rows16(const int16_t* x, const int8_t* w, int32_t* y, int64_t K, int64_t N) {
  constexpr int nb = R <= 2 ? 4 : R <= 4 ? 2 : 1;  // the sums, weights and x in AVX2's 16 registers
  at::parallel_for(0, N / nb, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) block16<R, nb>(x, w, y, K, N, b * nb);
  });
  for (int64_t n = N / nb * nb; n < N; n++) block16<R, 1>(x, w, y, K, N, n);
}

void int8_sums(const int8_t* x, const int8_t* w, int32_t* y, int64_t M, int64_t K, int64_t N) {
  const std::vector<int16_t> x16(x, x + M * K);
  switch (M) {
    case 1: rows16<1>(x16.data(), w, y, K, N); break;
    case 2: rows16<2>(x16.data(), w, y, K, N); break;
    case 3: rows16<3>(x16.data(), w, y, K, N); break;
    case 4: rows16<4>(x16.data(), w, y, K, N); break;
    case 5: rows16<5>(x16.data(), w, y, K, N); break;
    case 6: rows16<6>(x16.data(), w, y, K, N); break;
    case 7: rows16<7>(x16.data(), w, y, K, N); break;
    default: rows16<8>(x16.data(), w, y, K, N);
  }
}
#endif

#ifdef INT8_ROWS
at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kChar && w.scalar_type() == at::kChar && x.device().is_cpu() &&
              w.device().is_cpu(), "int8_rows: int8 CPU tensors expected");
  int64_t K = w.size(1), N = w.size(0), M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.is_contiguous() && x.size(1) == K && K <= 65536,
              "int8_rows: x (M, K) and a contiguous weight (N, K) with K <= 65536 expected");
  TORCH_CHECK(M >= 1 && M <= 8, "int8_rows: 1-8 rows expected, got ", M);
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kInt));
  int8_sums(xc.data_ptr<int8_t>(), w.data_ptr<int8_t>(), y.data_ptr<int32_t>(), M, K, N);
  return y;
}
#endif

#ifdef AMX_ROWS
// int8 products on Intel's AMX tiles (4th-generation Xeon and later): _tile_dpbssd multiplies a tile of up to 16 rows
// x 64 int8 inputs of x by one of 64 inputs x 16 columns of w^T, summing each (row, column)'s products exactly into
// an int32 tile (Intel's Architecture Instruction Set Extensions Programming Reference, ch. 3). w is packed ahead
// (amx_pack) into that second operand's layout, 32 columns at a time: for each 16 columns and 64 inputs one 1 KB
// tile whose row r holds, for each column, its inputs 4r..4r+3, so a step streams the packed weight once, in order.
// flan-t5-small's 16 MB output layer (the greedy screen), read from memory: 32 rows 0.70 ms against torch._int_mm's
// 2.7 (oneDNN's GEMM there packs w at every call), 1 row 0.4-0.6 ms as int8_rows.
struct TileConfig {  // the 64-byte operand of ldtilecfg, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t AMX_COLS = 32;  // output columns a block: two 16-column tiles

// w (N, K) int8 -> (ceil(N / 32) * 32 * K,) int8 in the tiles' layout, columns past N zero.
at::Tensor amx_pack(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.device().is_cpu() && w.size(1) % 64 == 0,
              "amx_pack: an int8 (N, K) CPU weight with K a multiple of 64 expected");
  const at::Tensor wc = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), tiles = K / 64, Np = (N + AMX_COLS - 1) / AMX_COLS * AMX_COLS;
  at::Tensor out = at::zeros({Np * K}, w.options());
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)  // (n, k): tile (n / 16, k / 64), its row k % 64 / 4, byte n % 16 * 4 + k % 4
      for (int64_t k = 0; k < K; k++)
        dst[((n / 16 * tiles + k / 64) * 16 + k % 64 / 4) * 64 + n % 16 * 4 + k % 4] = src[n * K + k];
  });
  return out;
}

// Whether this process may use the AMX tiles: Linux grants them on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA, kernel 5.16 on); asked once.
bool amx_ready() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// (M, K) int8 x times w packed by amx_pack, for w's N columns: (M, N) int32, exact. Rows by groups of 32 (two row
// tiles); in each, the column blocks split between threads, each block's 2 x 2 tiles of sums kept in tile registers
// over the inputs.
at::Tensor amx_rows(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(amx_ready(), "amx_rows: this process may not use AMX tiles");
  TORCH_CHECK(x.scalar_type() == at::kChar && x.dim() == 2 && x.device().is_cpu() && x.size(1) % 64 == 0 &&
              packed.scalar_type() == at::kChar && packed.is_contiguous() &&
              packed.numel() == (N + AMX_COLS - 1) / AMX_COLS * AMX_COLS * x.size(1) && x.size(1) <= 65536,
              "amx_rows: int8 x (M, K) with K a multiple of 64 (at most 65536, so that int32 sums cannot overflow) "
              "and amx_pack's weight for N columns expected");
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), tiles = K / 64, blocks = (N + AMX_COLS - 1) / AMX_COLS;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kInt));
  const int8_t* bp = packed.data_ptr<int8_t>();
  int32_t* yp = y.data_ptr<int32_t>();
  for (int64_t g = 0; g < M; g += 32) {
    const int8_t* xp = xc.data_ptr<int8_t>() + g * K;
    const int m0 = int(std::min<int64_t>(16, M - g)), m1 = int(std::clamp<int64_t>(M - g - 16, 0, 16));  // rows a tile
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      TileConfig cfg;  // tmm0-3 sums (row tile 0, 1) x (column tile 0, 1); tmm4, 5 row tiles of x; tmm6, 7 of w
      for (int t = 0; t < 8; t++) cfg.colsb[t] = 64;
      cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = m0;
      cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = m1 ? m1 : 1;
      cfg.rows[6] = cfg.rows[7] = 16;
      _tile_loadconfig(&cfg);
      alignas(64) int32_t tail[32 * AMX_COLS];  // the last block's sums, when it has fewer than 32 columns
      for (int64_t b = b0; b < b1; b++) {
        const int8_t* w0 = bp + 2 * b * tiles * 1024;
        const int8_t* w1 = w0 + tiles * 1024;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t t = 0; t < tiles; t++) {
          _tile_loadd(4, xp + 64 * t, K);
          _tile_loadd(6, w0 + t * 1024, 64);
          _tile_loadd(7, w1 + t * 1024, 64);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          if (m1) {
            _tile_loadd(5, xp + 16 * K + 64 * t, K);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
          }
        }
        const int64_t n = b * AMX_COLS, cols = std::min(AMX_COLS, N - n);
        int32_t* out = cols == AMX_COLS ? yp + g * N + n : tail;
        const int64_t stride = cols == AMX_COLS ? N : AMX_COLS;
        _tile_stored(0, out, stride * 4);
        _tile_stored(1, out + 16, stride * 4);
        if (m1) {
          _tile_stored(2, out + 16 * stride, stride * 4);
          _tile_stored(3, out + 16 * stride + 16, stride * 4);
        }
        if (cols < AMX_COLS)
          for (int r = 0; r < m0 + m1; r++)
            std::memcpy(yp + (g + r) * N + n, tail + r * AMX_COLS, cols * sizeof(int32_t));
      }
      _tile_release();
    });
  }
  return y;
}
#endif

// The smallest scale int8_product gives a row (a power of two): s / 254 stays a normal float32.
constexpr float MIN_SCALE = 256 * FLT_MIN;

// q = src / s rounded to nearest even, as int8 (finite |src| <= 127.5 s, s normal: no clamping needed); where rest
// is given, also rest = src - q s with one rounding (fma), what q leaves of src.
void digit(const float* src, int8_t* q, float* rest, int64_t K, float s) {
  int64_t k = 0;
#ifdef __AVX512F__
  const __m512 vs = _mm512_set1_ps(s);
  for (; k + L <= K; k += L) {  // IEEE division and round-to-nearest-even, as the scalar loop
    const __m512 x = _mm512_loadu_ps(src + k);
    const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(x, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
    if (rest) _mm512_storeu_ps(rest + k, _mm512_fnmadd_ps(r, vs, x));
  }
#endif
  for (; k < K; k++) {
    const float r = std::nearbyint(src[k] / s);
    q[k] = int8_t(r);
    if (rest) rest[k] = std::fma(-r, s, src[k]);
  }
}

constexpr int64_t FLOAT_SUM_K = 1040 * L;  // 1040 * 127 * 127 < 2^24 (see w8a8_float_linear)

// x (..., K) times int8 w (N, K) with float32 scales (N,), x's rows taken as integers of one or two int8 digits:
// with s1 = max |x_row| / 127 (1 where that is below MIN_SCALE), q1 = x / s1 rounded to nearest even (one digit:
// w8a8; a row with a NaN or an infinity gives NaNs); two digits
// (w8a16) also q2 = (x - q1 s1) / s2 rounded likewise, s2 = s1 / 254, so that |x - s1 q1 - s2 q2| <= s2 / 2 = max
// |x_row| / 64516: x to 16 bits. Each digit's products with w are summed exactly in int32 (int8_rows for up to 8 rows
// of digits, else torch's _int_mm: oneDNN's AMX or VNNI kernels), then y = (float(q1 . w_n) s1 + float(q2 . w_n) s2)
// scale_n. quantize.w8a8_reference and w8a16_reference do the same arithmetic step by step.
at::Tensor int8_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t digits,
                        const char* name, bool float_sums = false) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat &&
              x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(),
              name, ": float32 x, int8 weight and float32 scale on CPU expected");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && scale.is_contiguous() && scale.numel() == N && x.size(-1) == K,
              name, ": a contiguous (N, K) weight, (N,) scales and x (..., K) expected");
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0), D = digits * M;  // rows of digits: the first digits of all rows, then the second
  at::Tensor xq = at::empty({D, K}, x.options().dtype(at::kChar));
  std::vector<float> sx(D);
  const float* xp = x2.data_ptr<float>();
  int8_t* qp = xq.data_ptr<int8_t>();
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    std::vector<float> rest(digits > 1 ? K : 0);
    for (int64_t m = m0; m < m1; m++) {
      const float* row = xp + m * K;
      float amax = 0.0f;
      bool finite = true;
      int64_t k = 0;
#ifdef __AVX512F__
      __m512 vmax = _mm512_setzero_ps();
      __mmask16 bad = 0;
      const __m512 inf = _mm512_set1_ps(INFINITY);
      for (; k + L <= K; k += L) {
        const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(row + k));
        bad |= _mm512_cmp_ps_mask(v, inf, _CMP_NLT_UQ);  // NaN or infinite
        vmax = _mm512_max_ps(vmax, v);
      }
      amax = _mm512_reduce_max_ps(vmax);  // (max is exact in any order)
      finite = !bad;
#endif
      for (; k < K; k++) {
        finite = finite && std::isfinite(row[k]);
        amax = std::max(amax, std::fabs(row[k]));
      }
      const float s = amax / 127.0f;
      sx[m] = s >= MIN_SCALE ? s : 1.0f;  // (a row of zeros, or too small for s / 254 to be normal: digits 0)
      if (!finite) {  // a NaN or an infinity: the row's outputs are NaN (the float product's would be NaN or inf)
        std::memset(qp + m * K, 0, K);
        if (digits > 1) std::memset(qp + (M + m) * K, 0, K);
        sx[m] = NAN;
        if (digits > 1) sx[M + m] = NAN;
        continue;
      }
      digit(row, qp + m * K, digits > 1 ? rest.data() : nullptr, K, sx[m]);
      if (digits > 1) {
        sx[M + m] = sx[m] / 254.0f;
        digit(rest.data(), qp + (M + m) * K, nullptr, K, sx[M + m]);
      }
    }
  });
  at::Tensor y = linear_output(x, N);
  float* yp = y.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  // y[:, n0:n0+nc] from the exact int32 sums of those columns, (D, nc)
  auto scale_into = [&](const at::Tensor& acc, int64_t n0, int64_t nc) {
    const int32_t* ap = acc.data_ptr<int32_t>();
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; m++) {
        float* out = yp + m * N + n0;
        const int32_t* a1 = ap + m * nc;
        if (digits == 1) {
          for (int64_t n = 0; n < nc; n++) out[n] = (float(a1[n]) * sx[m]) * sp[n0 + n];
        } else {
          const int32_t* a2 = ap + (M + m) * nc;
          for (int64_t n = 0; n < nc; n++)
            out[n] = std::fma(float(a1[n]), sx[m], float(a2[n]) * sx[M + m]) * sp[n0 + n];
        }
      }
    });
  };
  if (float_sums) {  // (w8a8_float_linear) the digits and the weight widened to float32
    TORCH_CHECK(K % 16 == 0 && K <= FLOAT_SUM_K, name, ": K a multiple of 16, at most ", FLOAT_SUM_K, " expected");
    const at::Tensor xf = xq.to(at::kFloat);
    at::Tensor acc;
    if (D > 64) {  // (the encoder) torch's float32 GEMM over at most 1024 columns at a time (sums below 2^24), the
      // parts added as int32; past 64 rows 2-3x faster than int8_linear's loops (1024 rows: 12 against 34 ms)
      for (int64_t k0 = 0; k0 < K; k0 += 1024) {
        const int64_t kc = std::min<int64_t>(1024, K - k0);
        const at::Tensor part = at::linear(xf.narrow(1, k0, kc), w.narrow(1, k0, kc).to(at::kFloat)).to(at::kInt);
        acc = k0 == 0 ? part : acc.add_(part);
      }
      acc = acc.to(at::kFloat);
    } else {  // int8_linear's loops
      acc = at::empty({D, N}, x.options());
      const std::vector<float> ones(N, 1.0f);
      int8_products<true>(xf.data_ptr<float>(), w.data_ptr<int8_t>(), ones.data(), acc.data_ptr<float>(), D, K, N);
    }
    const float* ap = acc.data_ptr<float>();
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; m++)
        for (int64_t n = 0; n < N; n++) yp[m * N + n] = (ap[m * N + n] * sx[m]) * sp[n];
    });
    return y;
  }
#ifdef INT8_ROWS
  if (D <= 8 && K <= 65536) {  // few rows: the weight streamed once (int8_rows), faster than oneDNN's GEMM there
    at::Tensor acc = at::empty({D, N}, x.options().dtype(at::kInt));
    int8_sums(qp, w.data_ptr<int8_t>(), acc.data_ptr<int32_t>(), D, K, N);
    scale_into(acc, 0, N);
    return y;
  }
#endif
  // oneDNN's int8 GEMM slows down 3x past ~1536 columns for encoder-sized inputs (4096 rows): 1024 at a time there
  const int64_t chunk = D >= 512 ? 1024 : N;
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nc = std::min(chunk, N - n0);
    scale_into(at::_int_mm(xq, w.narrow(0, n0, nc).t()), n0, nc);
  }
  return y;
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  return int8_product(x, w, scale, 1, "w8a8_linear");
}

// w8a8_linear's result where torch._int_mm is not exact (CPUs without VNNI, past int8_rows' 8 rows): the digits and
// the weight widened to float32, whose products (|q| <= 127: below 2^14) and each lane's sum over at most FLOAT_SUM_K /
// L of them (below 2^24) are whole numbers float32 holds exactly; the lanes added as int32. flan-t5-small's w8a8
// decoding as an AVX2 CPU against w8a8_reference's float64 products: beam4 b8 80 -> 184 tok/s, greedy b32 294 -> 446.
at::Tensor w8a8_float_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  return int8_product(x, w, scale, 1, "w8a8_float_linear", true);
}

at::Tensor w8a16_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  return int8_product(x, w, scale, 2, "w8a16_linear");
}

// One of torch's packed GEMMs (speed.PACKERS "onednn", "mkl"), called through the dispatcher with the arguments the
// block's forward gives it, so the block gets the same result.
at::Tensor torch_packed(const char* name, torch::jit::Stack stack) {
  c10::Dispatcher::singleton().findSchemaOrThrow(name, "").callBoxed(&stack);
  return stack.at(0).toTensor();
}

// decoder_block: a T5 decoder block's decoding step (one new token a row) in one call, as DecoderBlock.forward runs
// it on the kernels above (eval mode: no dropout), so the output is the same to the bit; what it saves is the ~60
// Python-level operator and module calls a block makes (speed.fast_blocks: ~1.5 ms of a 5 ms flan-t5-small step at
// one row). x (B, 1, d); norms: the three layer norms' weights; linears: qkv, o, cross q, cross o, wi, wo, each by
// kinds[i]: 0 a weight (N, K) for rows_linear, 1 a copy packed for panel_linear with N = outs[i], 2, 3 and 4 int8
// weights with their scales[i] for int8_linear, w8a8_linear and w8a16_linear (quantize.py), 5 and 6 copies packed
// for oneDNN's and MKL's GEMMs (MKL's with the weight as scales[i]), 7 as 3 for w8a8_float_linear; cache: the
// layer's KVCache buffer (max_len, B, 2, H, D), written at pos, or at positions[i] for row i (then attention reads
// the bias's width of positions); bias (B or 1, H, 1, pos + 1); rows: where each row's history lies (beam search,
// decode_attention);
// cross_k, cross_v (B / G, H, S, D) and cross_mask (B / G, 1, 1, S) for G copies of each input. act: the
// feed-forward's activation ("relu", "gelu", "gelu_new", "silu"), gated or not, or "gated_gelu": gated_gelu's.
at::Tensor linear_of(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t kind, int64_t N) {
  switch (kind) {
    case 0: return rows_linear(x, w);
    case 1: return panel_linear(x, w, N);
    case 2: return int8_linear(x, w, scale);
    case 3: return w8a8_linear(x, w, scale);
    case 4: return w8a16_linear(x, w, scale);
    case 5:  // oneDNN's, on a copy packed by mkldnn._reorder_linear_weight
      return torch_packed("mkldnn::_linear_pointwise", {x, w, c10::IValue(), "none",
                                                        c10::List<std::optional<at::Scalar>>(), ""});
    case 7: return w8a8_float_linear(x, w, scale);
    default:  // MKL's, on a copy packed by mkl._mkl_reorder_linear_weight for x's rows; scale: the weight itself
      TORCH_CHECK(kind == 6, "decoder_block: unknown kind of linear ", kind);
      return torch_packed("mkl::_mkl_linear", {x, w, scale, c10::IValue(), x.numel() / x.size(-1)});
  }
}

at::Tensor activation(const at::Tensor& h, c10::string_view act) {
  if (act == "relu") return h.relu();
  if (act == "gelu") return at::gelu(h);
  if (act == "gelu_new") return at::gelu(h, "tanh");
  TORCH_CHECK(act == "silu", "decoder_block: unknown activation ", act);
  return at::silu(h);
}

at::Tensor decoder_block(const at::Tensor& x, at::TensorList norms, at::TensorList linears, at::TensorList scales,
                         at::IntArrayRef kinds, at::IntArrayRef outs, double eps, c10::string_view act, bool gated,
                         const at::Tensor& cache, int64_t pos, const std::optional<at::Tensor>& positions,
                         const at::Tensor& bias, const std::optional<at::Tensor>& rows, const at::Tensor& cross_k,
                         const at::Tensor& cross_v, const at::Tensor& cross_mask) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && norms.size() == 3 && linears.size() == 6 && scales.size() == 6 &&
              kinds.size() == 6 && outs.size() == 6 && cache.dim() == 5 && cache.size(1) == x.size(0) && pos >= 0 &&
              pos < cache.size(0) &&
              cross_k.dim() == 4 && cross_k.size(0) > 0 && x.size(0) % cross_k.size(0) == 0,
              "decoder_block: x (B, 1, d), 3 norms, 6 linears and a cache (max_len, B, 2, H, D) expected");
  const int64_t B = x.size(0), H = cache.size(3), D = cache.size(4), G = B / cross_k.size(0);
  // self-attention over the cache, this step's keys and values written at pos
  auto linear = [&](const at::Tensor& in, int i) { return linear_of(in, linears[i], scales[i], kinds[i], outs[i]); };
  at::Tensor qkv = linear(rms_norm(x, norms[0], eps), 0).view({B, 1, 3, H, D});
  at::Tensor new_kv = qkv.select(1, 0).slice(1, 1, 3);  // (B, 2, H, D)
  int64_t S = pos + 1;
  if (positions.has_value()) {  // row i at its own position (continuous batching); the bias masks later ones
    const at::Tensor p = positions->contiguous();
    TORCH_CHECK(p.scalar_type() == at::kLong && p.dim() == 1 && p.size(0) == B && bias.size(-1) <= cache.size(0),
                "decoder_block: positions (B,) of int64 expected");
    for (int64_t i = 0; i < B; i++) {
      const int64_t at_i = p.data_ptr<int64_t>()[i];
      TORCH_CHECK(at_i >= 0 && at_i < bias.size(-1), "decoder_block: a position beyond the bias");
      cache.select(0, at_i).select(0, i).copy_(new_kv.select(0, i));
    }
    S = bias.size(-1);
  } else {
    cache.select(0, pos).copy_(new_kv);
  }
  at::Tensor kv = cache.slice(0, 0, S).permute({2, 1, 3, 0, 4});  // (2, B, H, S, D)
  at::Tensor y = decode_attention(qkv.select(2, 0).transpose(1, 2), kv[0], kv[1], bias, rows);  // (B, H, 1, D)
  at::Tensor out = x.add(linear(y.transpose(1, 2).reshape({B, 1, H * D}), 1));
  // attention over the encoder output, the G copies of an input as G queries of one row
  at::Tensor q = linear(rms_norm(out, norms[1], eps), 2).view({B / G, G, H, D}).transpose(1, 2);
  y = decode_attention(q, cross_k, cross_v, cross_mask, std::nullopt);  // (B / G, H, G, D)
  out = out.add(linear(y.transpose(1, 2).reshape({B, 1, H * D}), 3));
  // feed-forward
  at::Tensor h = linear(rms_norm(out, norms[2], eps), 4);
  if (act == "gated_gelu") {  // FLAN-T5's, through gated_gelu (speed.fused_layers)
    h = gated_gelu(h);
  } else if (gated) {
    const int64_t F = h.size(-1) / 2;
    h = activation(h.slice(-1, 0, F), act).mul(h.slice(-1, F));
  } else {
    h = activation(h, act);
  }
  return out.add(linear(h, 5));
}

// screen_bounds: the int8 screen's bounds from its exact int8 product (speed.OutputScreen.bounds), in one pass over
// the (M, V) outputs where torch makes seven: approx = (product * r + x_out @ rows) * scale and b = coef @ norms,
// returned as (approx - b, approx + b). product (M, V) int32; r (M, 1); x_out (M, O), the outlying channels of x;
// rows (O, V) int8, the screen's rows for them; scale (V,); coef (M, 3); norms (3, V). The arithmetic is in float32
// in another order than torch's (with fused multiply-adds), which the bound's rounding term allows for.
std::tuple<at::Tensor, at::Tensor> screen_bounds(const at::Tensor& product, const at::Tensor& r,
                                                 const at::Tensor& x_out, const at::Tensor& rows,
                                                 const at::Tensor& scale, const at::Tensor& coef,
                                                 const at::Tensor& norms) {
  TORCH_CHECK(product.scalar_type() == at::kInt && rows.scalar_type() == at::kChar && r.scalar_type() == at::kFloat &&
              x_out.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat &&
              coef.scalar_type() == at::kFloat && norms.scalar_type() == at::kFloat && product.dim() == 2 &&
              product.device().is_cpu() && rows.device().is_cpu(),
              "screen_bounds: CPU tensors of the screen's dtypes expected");
  const int64_t M = product.size(0), V = product.size(1), O = x_out.size(1);
  TORCH_CHECK(r.numel() == M && x_out.dim() == 2 && x_out.size(0) == M && rows.dim() == 2 && rows.size(0) == O &&
              rows.size(1) == V && scale.numel() == V && coef.dim() == 2 && coef.size(0) == M && coef.size(1) == 3 &&
              norms.dim() == 2 && norms.size(0) == 3 && norms.size(1) == V, "screen_bounds: shapes do not match");
  const at::Tensor pc = product.contiguous(), rc = r.contiguous(), xc = x_out.contiguous(), qc = rows.contiguous(),
                   sc = scale.contiguous(), cc = coef.contiguous(), nc = norms.contiguous();
  at::Tensor lower = at::empty({M, V}, x_out.options()), upper = at::empty({M, V}, x_out.options());
  const int32_t* pp = pc.data_ptr<int32_t>();
  const float *rp = rc.data_ptr<float>(), *xp = xc.data_ptr<float>(), *sp = sc.data_ptr<float>(),
              *cp = cc.data_ptr<float>(), *np = nc.data_ptr<float>();
  const int8_t* qp = qc.data_ptr<int8_t>();
  float *lp = lower.data_ptr<float>(), *up = upper.data_ptr<float>();
  constexpr int64_t COLS = 512;  // columns a task: their rows, scales and norms stay in L1 while every row passes
  at::parallel_for(0, (V + COLS - 1) / COLS, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t m = 0; m < M; m++) {
      const float rm = rp[m], *xm = xp + m * O, *cm = cp + m * 3;
      const int64_t end = std::min(V, c1 * COLS);
      int64_t v = c0 * COLS;
      for (; v + L <= end; v += L) {
        vint p;
        std::memcpy(&p, pp + m * V + v, sizeof p);
        vfloat acc = __builtin_convertvector(p, vfloat) * rm;
        for (int64_t j = 0; j < O; j++) acc += xm[j] * load_int8(qp + j * V + v);
        const vfloat approx = acc * load(sp + v);
        const vfloat b = cm[0] * load(np + v) + cm[1] * load(np + V + v) + cm[2] * load(np + 2 * V + v);
        const vfloat lo = approx - b, hi = approx + b;
        std::memcpy(lp + m * V + v, &lo, sizeof lo);
        std::memcpy(up + m * V + v, &hi, sizeof hi);
      }
      for (; v < end; v++) {  // the last columns
        float acc = float(pp[m * V + v]) * rm;
        for (int64_t j = 0; j < O; j++) acc += xm[j] * float(qp[j * V + v]);
        const float approx = acc * sp[v], b = cm[0] * np[v] + cm[1] * np[V + v] + cm[2] * np[2 * V + v];
        lp[m * V + v] = approx - b;
        up[m * V + v] = approx + b;
      }
    }
  });
  return {lower, upper};
}

}  // namespace

TORCH_LIBRARY(nanoflant5_cpu, m) {
  m.def("rows_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor packed, int N) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("w8a16_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("w8a8_float_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, float eps, bool weight_grad) -> (Tensor, Tensor)");
  m.def("gated_gelu(Tensor h) -> Tensor");
  m.def("gated_gelu_backward(Tensor grad, Tensor h) -> Tensor");
  m.def("seeded_dropout(Tensor x, int dropped, int seed) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor? rows) -> Tensor");
  m.def("full_attention(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor? key_mask) -> Tensor");
  m.def("decoder_block(Tensor x, Tensor[] norms, Tensor[] linears, Tensor[] scales, int[] kinds, int[] outs, "
        "float eps, str act, bool gated, Tensor(a!) cache, int pos, Tensor? positions, Tensor bias, Tensor? rows, "
        "Tensor cross_k, Tensor cross_v, Tensor cross_mask) -> Tensor");
  m.def("screen_bounds(Tensor product, Tensor r, Tensor x_out, Tensor rows, Tensor scale, Tensor coef, "
        "Tensor norms) -> (Tensor, Tensor)");
  m.def("token_losses(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  m.def("token_losses_backward(Tensor grad, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor");
#ifdef INT8_ROWS
  m.def("int8_rows(Tensor x, Tensor weight) -> Tensor");
#endif
#ifdef BF16_PANELS
  m.def("bf16_panel_linear(Tensor x, Tensor packed, int N) -> Tensor");
#endif
#ifdef AMX_ROWS
  m.def("amx_pack(Tensor weight) -> Tensor");
  m.def("amx_ready() -> bool");
  m.def("amx_rows(Tensor x, Tensor packed, int N) -> Tensor");
#endif
}

#ifdef AMX_ROWS
TORCH_LIBRARY_IMPL(nanoflant5_cpu, CompositeExplicitAutograd, m) { m.impl("amx_ready", &amx_ready); }
#endif

TORCH_LIBRARY_IMPL(nanoflant5_cpu, MkldnnCPU, m) {  // decoder_block given oneDNN's packed copies (kind 5)
  m.impl("decoder_block", &decoder_block);
}

TORCH_LIBRARY_IMPL(nanoflant5_cpu, CPU, m) {
  m.impl("rows_linear", &rows_linear);
  m.impl("panel_linear", &panel_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("w8a16_linear", &w8a16_linear);
  m.impl("w8a8_float_linear", &w8a8_float_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("gated_gelu", &gated_gelu);
  m.impl("gated_gelu_backward", &gated_gelu_backward);
  m.impl("token_losses", &token_losses);
  m.impl("seeded_dropout", &seeded_dropout);
  m.impl("decode_attention", &decode_attention);
  m.impl("full_attention", &full_attention);
#ifdef BF16_PANELS
  m.impl("bf16_panel_linear", &bf16_panel_linear);
#endif
  m.impl("decoder_block", &decoder_block);
  m.impl("screen_bounds", &screen_bounds);
  m.impl("token_losses_backward", &token_losses_backward);
#ifdef INT8_ROWS
  m.impl("int8_rows", &int8_rows);
#endif
#ifdef AMX_ROWS
  m.impl("amx_pack", &amx_pack);
  m.impl("amx_rows", &amx_rows);
#endif
}
