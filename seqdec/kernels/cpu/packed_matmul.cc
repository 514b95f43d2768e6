// Small-M float32 matmul against panel-packed weights: an XLA FFI custom
// call for XLA:CPU (seqdec.kernels.packed_matmul builds and registers it).
//
//   y[m, n] = sum_k x[m, k] * W[k, n]        x: [M, K], W: [K, N], y: [M, N]
//
// W is stored as panels[p, k, j] = W[k, 16 p + j] (P = N / 16 panels of 16
// columns, each panel one contiguous K x 16 block), so that one pass over a
// panel streams its bytes in order whatever M is. A register tile holds
// up to kMaxRows rows x 32 columns (two panels) of accumulators; rows beyond
// it re-read the panel pair from L1/L2, not from memory. Verifying a
// 5-token tree then reads the weights once, as a 1-token step does.
//
// Every y[m, n] accumulates its K products in k order into one float32
// lane (a fused multiply-add per k), independent of M and of the row block
// it falls in: the result of a row does not depend on how many rows are in
// the call (batch-invariant), so a verify and a decoding step agree bit for
// bit on the same prefix.
//
// Panel pairs are split over a small pool of worker threads (the calling
// thread included). The pool is taken with a try-lock: a concurrent call
// runs on its own thread alone instead of waiting.

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;    // columns per panel
constexpr int kMaxRows = 12;  // rows per register tile (24 zmm accumulators)

// 16 float32 lanes: one zmm register under AVX-512, two ymm under AVX2.
typedef float Vec __attribute__((vector_size(64), aligned(4)));

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

inline Vec Load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof(v)); }

// Rows [0, R) of x against `pairs` panels starting at `w` (1 or 2).
template <int R>
void Tile(const float* x, int64_t K, const float* w, int pairs, float* y,
          int64_t N) {
  Vec a0[R], a1[R];
  for (int r = 0; r < R; ++r) {
    a0[r] = Vec{};
    a1[r] = Vec{};
  }
  const float* w0 = w;
  const float* w1 = w + K * kLanes;
  if (pairs == 2) {
    for (int64_t k = 0; k < K; ++k) {
      const Vec v0 = Load(w0 + k * kLanes), v1 = Load(w1 + k * kLanes);
      for (int r = 0; r < R; ++r) {
        const float s = x[r * K + k];
        a0[r] += s * v0;   // fused multiply-add (-ffp-contract=fast)
        a1[r] += s * v1;
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const Vec v0 = Load(w0 + k * kLanes);
      for (int r = 0; r < R; ++r)
        a0[r] += x[r * K + k] * v0;
    }
  }
  for (int r = 0; r < R; ++r) {
    Store(y + r * N, a0[r]);
    if (pairs == 2) Store(y + r * N + kLanes, a1[r]);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int, float*,
                        int64_t);
constexpr TileFn kTiles[kMaxRows + 1] = {
    nullptr, Tile<1>, Tile<2>, Tile<3>,  Tile<4>,  Tile<5>, Tile<6>,
    Tile<7>, Tile<8>, Tile<9>, Tile<10>, Tile<11>, Tile<12>};

struct Job {
  const float* x;
  const float* panels;
  float* y;
  int64_t M, K, N, P;
};

// Panels [p0, p1) of the job, every row.
void RunPanels(const Job& job, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; p += 2) {
    const int pairs = p + 1 < p1 ? 2 : 1;
    const float* w = job.panels + p * job.K * kLanes;
    // Row blocks of near-equal size (16 rows: 8 + 8, not 12 + 4).
    const int64_t blocks = (job.M + kMaxRows - 1) / kMaxRows;
    const int64_t block = (job.M + blocks - 1) / blocks;
    for (int64_t m0 = 0; m0 < job.M; m0 += block) {
      const int rows = static_cast<int>(std::min<int64_t>(block, job.M - m0));
      kTiles[rows](job.x + m0 * job.K, job.K, w, pairs, job.y + m0 * job.N + p * kLanes,
                   job.N);
    }
  }
}

// Even split of P panels into `parts`, on panel-pair boundaries.
int64_t SplitPoint(int64_t P, int parts, int i) {
  const int64_t pairs = (P + 1) / 2;
  return std::min(P, 2 * (pairs * i / parts));
}

// Workers spin for a while after a job (the next matmul of a forward comes
// within microseconds), then sleep on the generation counter.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i)
      workers_.emplace_back([this, i] { Work(i); });
    size_ = threads;
  }
  ~Pool() {
    stop_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return size_; }

  // Runs `job` split over every thread; false if the pool is busy.
  bool Run(const Job& job) {
    std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    job_ = job;
    pending_.store(size_ - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    RunPanels(job, SplitPoint(job.P, size_, 0), SplitPoint(job.P, size_, 1));
    while (pending_.load(std::memory_order_acquire) != 0) {
    }
    return true;
  }

 private:
  void Work(int index) {
    uint64_t seen = 0;   // the pool is built before any job
    while (true) {
      uint64_t now = generation_.load(std::memory_order_acquire);
      for (int spin = 0; now == seen && spin < kSpins; ++spin) {
        Pause();
        now = generation_.load(std::memory_order_acquire);
      }
      if (now == seen) {
        generation_.wait(seen);
        continue;
      }
      seen = now;
      if (stop_.load()) return;
      RunPanels(job_, SplitPoint(job_.P, size_, index),
                SplitPoint(job_.P, size_, index + 1));
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  static constexpr int kSpins = 20000;   // ~100-200 us of pause
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  Job job_{};
  int size_ = 1;
};

std::atomic<int> g_threads{0};   // 0: hardware concurrency

// The pool of this process. A child made by fork() has none of its
// parent's threads, so it builds its own (the parent's is left alone).
Pool& GetPool() {
  static std::mutex mutex;
  static Pool* pool = nullptr;
  static pid_t owner = 0;
  const pid_t pid = getpid();
  std::lock_guard<std::mutex> lock(mutex);
  if (pool == nullptr || owner != pid) {
    int n = g_threads.load();
    if (n <= 0)
      n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    pool = new Pool(n);
    owner = pid;
  }
  return *pool;
}

ffi::Error PackedMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> panels,
                            ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = panels.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || pd[2] != kLanes || pd[1] != xd[1])
    return ffi::Error::InvalidArgument(
        "packed_matmul: expected x [M, K] and panels [P, K, 16]");
  Job job{x.typed_data(), panels.typed_data(), y->typed_data(), xd[0], xd[1],
          pd[0] * kLanes, pd[0]};
  if (job.M == 0 || job.P == 0) return ffi::Error::Success();
  // Small jobs are not worth waking the pool.
  const bool parallel = job.P >= 4 && job.K * job.N >= (1 << 16);
  if (!parallel) {
    RunPanels(job, 0, job.P);
    return ffi::Error::Success();
  }
  Pool& pool = GetPool();
  if (pool.size() == 1 || !pool.Run(job))
    RunPanels(job, 0, job.P);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqdecPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The pool's size, before the first call (0: the hardware's).
extern "C" void seqdec_packed_matmul_set_threads(int n) { g_threads.store(n); }
