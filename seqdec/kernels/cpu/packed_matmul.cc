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
// A second entry point takes bfloat16 weights and a bfloat16 x, with
// float32 accumulation (the bf16_packed policy): panels hold pairs of
// consecutive k,
//
//   panels[p, k2, 2 j + e] = W[2 k2 + e, 16 p + j]     e in {0, 1}
//
// the layout of AVX512-BF16's VDPBF16PS, which adds both products of a pair
// (the odd k, then the even k) to a float32 lane. Products of two bf16 are
// exact in float32, so only the order of the additions differs from any
// other bf16 x bf16 -> f32 matmul. Hosts without AVX512-BF16 widen the pair
// to float32 (a shift and a mask) and add the same products in the same
// order with fused multiply-adds: the same sums, half the bytes of the f32
// kernel either way. Hosts with AMX (and the kernel's permission to use it)
// run the bf16 matmul on tiles instead, for every M, when K is a multiple
// of 32 (the packer pads it so): x tiles of up to 16 rows x 32 k against
// four 16-column panels at a time, TDPBF16PS adding each 32-k block's
// products to the float32 accumulator tiles in k order. One instruction
// sequence per row whatever M is, so the result stays batch-invariant, and
// a 16-token verify streams the weights once at a cost close to a 1-token
// step's (VDPBF16PS runs 32 multiply-adds per cycle and core, the tiles
// 16x that).
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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define SEQDEC_AMX 1
#include <sys/syscall.h>
#endif
#if defined(__AVX512BF16__) || defined(SEQDEC_AMX)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;    // columns per panel
constexpr int kMaxRows = 12;  // rows per register tile (24 zmm accumulators)

// 16 float32 lanes: one zmm register under AVX-512, two ymm under AVX2.
// Memory is read and written through the unaligned twin `VecU` by plain
// dereference: a memcpy into a `Vec` made GCC 12 bounce every load and
// every accumulator through the stack (a store-forwarding stall per k).
typedef float Vec __attribute__((vector_size(64)));
typedef float VecU __attribute__((vector_size(64), aligned(4)));

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

inline Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }

inline void Store(float* p, Vec v) { *reinterpret_cast<VecU*>(p) = v; }

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

// bf16 x bf16 -> f32: rows [0, R) of x (bf16 pairs, `K2` per row) against
// `pairs` bf16 panels of K2 x 32 entries starting at `w`.
typedef uint32_t Bits __attribute__((vector_size(64)));
typedef uint32_t BitsU __attribute__((vector_size(64), aligned(4)));

inline float HighHalf(uint32_t bits) {      // the bf16 in bits 16..31
  const uint32_t b = bits & 0xffff0000u;
  float f;
  __builtin_memcpy(&f, &b, sizeof(f));
  return f;
}

inline float LowHalf(uint32_t bits) { return HighHalf(bits << 16); }

template <int R>
void TileBf16(const uint16_t* x, int64_t K2, const uint16_t* w, int pairs,
              float* y, int64_t N) {
  const uint16_t* w0 = w;
  const uint16_t* w1 = w + K2 * 2 * kLanes;
  uint32_t xs[R];
#if defined(__AVX512BF16__)
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) {
    a0[r] = _mm512_setzero_ps();
    a1[r] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K2; ++k) {
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + k * 2 * kLanes);
    const __m512bh v1 = pairs == 2
        ? (__m512bh)_mm512_loadu_si512(w1 + k * 2 * kLanes) : v0;
    for (int r = 0; r < R; ++r) {
      __builtin_memcpy(&xs[r], x + r * 2 * K2 + 2 * k, sizeof(uint32_t));
      const __m512bh s = (__m512bh)_mm512_set1_epi32(static_cast<int>(xs[r]));
      a0[r] = _mm512_dpbf16_ps(a0[r], s, v0);
      if (pairs == 2) a1[r] = _mm512_dpbf16_ps(a1[r], s, v1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * N, a0[r]);
    if (pairs == 2) _mm512_storeu_ps(y + r * N + kLanes, a1[r]);
  }
#else
  Vec a0[R], a1[R];
  for (int r = 0; r < R; ++r) {
    a0[r] = Vec{};
    a1[r] = Vec{};
  }
  const Bits high = Bits{} + 0xffff0000u;
  for (int64_t k = 0; k < K2; ++k) {
    const Bits u0 = *reinterpret_cast<const BitsU*>(w0 + k * 2 * kLanes);
    const Vec even0 = (Vec)(u0 << 16), odd0 = (Vec)(u0 & high);
    Vec even1{}, odd1{};
    if (pairs == 2) {
      const Bits u1 = *reinterpret_cast<const BitsU*>(w1 + k * 2 * kLanes);
      even1 = (Vec)(u1 << 16);
      odd1 = (Vec)(u1 & high);
    }
    for (int r = 0; r < R; ++r) {
      __builtin_memcpy(&xs[r], x + r * 2 * K2 + 2 * k, sizeof(uint32_t));
      const float xo = HighHalf(xs[r]), xe = LowHalf(xs[r]);
      a0[r] += xo * odd0;    // VDPBF16PS's order: the odd k, then the even
      a0[r] += xe * even0;
      if (pairs == 2) {
        a1[r] += xo * odd1;
        a1[r] += xe * even1;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    Store(y + r * N, a0[r]);
    if (pairs == 2) Store(y + r * N + kLanes, a1[r]);
  }
#endif
}

using TileFn = void (*)(const float*, int64_t, const float*, int, float*,
                        int64_t);
constexpr TileFn kTiles[kMaxRows + 1] = {
    nullptr, Tile<1>, Tile<2>, Tile<3>,  Tile<4>,  Tile<5>, Tile<6>,
    Tile<7>, Tile<8>, Tile<9>, Tile<10>, Tile<11>, Tile<12>};

using TileBf16Fn = void (*)(const uint16_t*, int64_t, const uint16_t*, int,
                            float*, int64_t);
constexpr TileBf16Fn kTilesBf16[kMaxRows + 1] = {
    nullptr,        TileBf16<1>,  TileBf16<2>,  TileBf16<3>, TileBf16<4>,
    TileBf16<5>,    TileBf16<6>,  TileBf16<7>,  TileBf16<8>, TileBf16<9>,
    TileBf16<10>,   TileBf16<11>, TileBf16<12>};

// One matmul: float32 (x, panels float*; K the contracted size) or
// bfloat16 (uint16_t*; K the number of k pairs, x rows of 2 K entries).
struct Job {
  const void* x;
  const void* panels;
  float* y;
  int64_t M, K, N, P;
  bool bf16;
  bool amx;     // bf16 on AMX tiles (RunPanelsAmx)
};

#if defined(SEQDEC_AMX)
constexpr int kAmxRows = 16;     // x rows per tile
constexpr int kAmxPairs = 16;    // k pairs per tile (64 bytes per row)
constexpr int kAmxPanels = 4;    // accumulator tiles: panels per x tile

// Linux hands out the AMX tile state per process, on request.
bool AmxPermitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: float32 accumulators [rows, 16]; 4: x [rows, 32 bf16];
// 5-7: weights [16 k pairs, 16 columns x 2].
void ConfigureTiles(int rows) {
  TileConfig c;
  for (int t = 0; t < 5; ++t) {
    c.rows[t] = static_cast<uint8_t>(rows);
    c.colsb[t] = 64;
  }
  for (int t = 5; t < 8; ++t) {
    c.rows[t] = kAmxPairs;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// Panels [p0, p1) of a bfloat16 job, every row, on AMX tiles (K % 16 == 0
// pairs).
void RunPanelsAmx(const Job& job, int64_t p0, int64_t p1) {
  const uint16_t* x = static_cast<const uint16_t*>(job.x);
  const uint16_t* w = static_cast<const uint16_t*>(job.panels);
  const int64_t K2 = job.K, panel = K2 * 2 * kLanes;
  const int64_t x_stride = 2 * K2 * sizeof(uint16_t);
  const int64_t y_stride = job.N * sizeof(float);
  // Panel groups outermost, so a call of more than 16 rows streams the
  // weights from memory once (the other row blocks re-read them from
  // cache); row blocks of near-equal size, so the tiles are reconfigured
  // at most twice per group.
  const int64_t blocks = (job.M + kAmxRows - 1) / kAmxRows;
  const int64_t block = (job.M + blocks - 1) / blocks;
  int configured = 0;
  for (int64_t p = p0; p < p1; p += kAmxPanels) {
    const int64_t n = std::min<int64_t>(kAmxPanels, p1 - p);
    const uint16_t* b = w + p * panel;
    for (int64_t m0 = 0; m0 < job.M; m0 += block) {
      const int rows = static_cast<int>(std::min<int64_t>(block, job.M - m0));
      if (rows != configured) {
        ConfigureTiles(rows);
        configured = rows;
      }
      const uint16_t* xm = x + m0 * 2 * K2;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < K2; k += kAmxPairs) {
        const uint16_t* bk = b + k * 2 * kLanes;
        _tile_loadd(4, xm + 2 * k, x_stride);
        _tile_loadd(5, bk, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (n > 1) {
          _tile_loadd(6, bk + panel, 64);
          _tile_dpbf16ps(1, 4, 6);
        }
        if (n > 2) {
          _tile_loadd(7, bk + 2 * panel, 64);
          _tile_dpbf16ps(2, 4, 7);
        }
        if (n > 3) {
          _tile_loadd(5, bk + 3 * panel, 64);
          _tile_dpbf16ps(3, 4, 5);
        }
      }
      float* y = job.y + m0 * job.N + p * kLanes;
      _tile_stored(0, y, y_stride);
      if (n > 1) _tile_stored(1, y + kLanes, y_stride);
      if (n > 2) _tile_stored(2, y + 2 * kLanes, y_stride);
      if (n > 3) _tile_stored(3, y + 3 * kLanes, y_stride);
    }
  }
  _tile_release();
}
#endif

// Panels [p0, p1) of the job, every row.
void RunPanels(const Job& job, int64_t p0, int64_t p1) {
#if defined(SEQDEC_AMX)
  if (job.amx) {
    RunPanelsAmx(job, p0, p1);
    return;
  }
#endif
  const int64_t panel = job.K * kLanes * (job.bf16 ? 2 : 1);   // entries
  const int64_t row = job.K * (job.bf16 ? 2 : 1);
  for (int64_t p = p0; p < p1; p += 2) {
    const int pairs = p + 1 < p1 ? 2 : 1;
    // Row blocks of near-equal size (16 rows: 8 + 8, not 12 + 4).
    const int64_t blocks = (job.M + kMaxRows - 1) / kMaxRows;
    const int64_t block = (job.M + blocks - 1) / blocks;
    for (int64_t m0 = 0; m0 < job.M; m0 += block) {
      const int rows = static_cast<int>(std::min<int64_t>(block, job.M - m0));
      float* y = job.y + m0 * job.N + p * kLanes;
      if (job.bf16)
        kTilesBf16[rows](static_cast<const uint16_t*>(job.x) + m0 * row,
                         job.K,
                         static_cast<const uint16_t*>(job.panels) + p * panel,
                         pairs, y, job.N);
      else
        kTiles[rows](static_cast<const float*>(job.x) + m0 * row, job.K,
                     static_cast<const float*>(job.panels) + p * panel,
                     pairs, y, job.N);
    }
  }
}

// Panels per chunk: the unit of work the pool's threads claim (a multiple
// of the vector path's panel pairs and of the AMX path's groups of 4).
constexpr int64_t kChunk = 8;

// Workers spin for a while after a job (the next matmul of a forward comes
// within microseconds), then sleep on the generation counter. A job's
// panels are claimed chunk by chunk from a shared ticket, by the calling
// thread and the workers alike, so a worker the OS has descheduled (XLA's
// own threads share the cores) delays the call by at most the chunk it
// holds, never by its whole share. A worker may wake for a job the caller
// has already finished (and be reading it while the next one is written):
// the job is published under a sequence lock, tagged with its generation,
// and every claim is checked against the ticket's generation, so a late
// worker either takes a whole current job or does nothing.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i)
      workers_.emplace_back([this] { Work(); });
    size_ = threads;
  }
  ~Pool() {
    stop_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return size_; }

  // Runs `job` over every thread; false if the pool is busy.
  bool Run(const Job& job) {
    std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    const int64_t chunks = (job.P + kChunk - 1) / kChunk;
    const uint64_t gen = generation_.load(std::memory_order_relaxed) + 1;
    // Publish the job under a sequence lock: a worker still waking for an
    // earlier job may be reading these fields right now.
    const uint64_t seq = seq_.load(std::memory_order_relaxed);
    seq_.store(seq + 1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    Publish(job, gen, chunks);
    seq_.store(seq + 2, std::memory_order_release);
    done_.store(0, std::memory_order_relaxed);
    ticket_.store(gen << 32, std::memory_order_relaxed);
    generation_.store(gen, std::memory_order_release);
    generation_.notify_all();
    Drain(job, gen, chunks);
    for (int spin = 0; done_.load(std::memory_order_acquire) != chunks;
         ++spin) {
      if (spin < kSpins) Pause();
      else std::this_thread::yield();
    }
    return true;
  }

 private:
  // Claims chunks of job `gen` (the ticket's high half; its low half the
  // next chunk) and runs them until none is left.
  void Drain(const Job& job, uint64_t gen, int64_t chunks) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while ((t >> 32) == gen &&
           static_cast<int64_t>(t & 0xffffffffu) < chunks) {
      if (!ticket_.compare_exchange_weak(t, t + 1,
                                         std::memory_order_acq_rel,
                                         std::memory_order_acquire))
        continue;
      const int64_t c = static_cast<int64_t>(t & 0xffffffffu);
      RunPanels(job, c * kChunk, std::min(job.P, (c + 1) * kChunk));
      done_.fetch_add(1, std::memory_order_acq_rel);
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  void Work() {
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
      // A consistent copy of job `now`, else wait for the newer one being
      // published (its generation is still to come).
      const uint64_t seq = seq_.load(std::memory_order_acquire);
      if (seq & 1) continue;
      Job job;
      uint64_t gen;
      int64_t chunks;
      Snapshot(&job, &gen, &chunks);
      std::atomic_thread_fence(std::memory_order_acquire);
      if (seq_.load(std::memory_order_relaxed) != seq || gen != now) continue;
      Drain(job, now, chunks);
    }
  }

  // The job's fields are written and read through atomic_refs (relaxed):
  // the sequence lock `seq_` tells a reader whether its copy is whole.
  template <typename T>
  static void Put(T& field, T value) {
    std::atomic_ref<T>(field).store(value, std::memory_order_relaxed);
  }
  template <typename T>
  static T Get(T& field) {
    return std::atomic_ref<T>(field).load(std::memory_order_relaxed);
  }

  void Publish(const Job& job, uint64_t gen, int64_t chunks) {
    Put(job_.x, job.x);
    Put(job_.panels, job.panels);
    Put(job_.y, job.y);
    Put(job_.M, job.M);
    Put(job_.K, job.K);
    Put(job_.N, job.N);
    Put(job_.P, job.P);
    Put(job_.bf16, job.bf16);
    Put(job_.amx, job.amx);
    Put(job_gen_, gen);
    Put(chunks_, chunks);
  }

  void Snapshot(Job* job, uint64_t* gen, int64_t* chunks) {
    job->x = Get(job_.x);
    job->panels = Get(job_.panels);
    job->y = Get(job_.y);
    job->M = Get(job_.M);
    job->K = Get(job_.K);
    job->N = Get(job_.N);
    job->P = Get(job_.P);
    job->bf16 = Get(job_.bf16);
    job->amx = Get(job_.amx);
    *gen = Get(job_gen_);
    *chunks = Get(chunks_);
  }

  static constexpr int kSpins = 20000;   // ~100-200 us of pause
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> seq_{0};       // odd while a job is being written
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<bool> stop_{false};
  Job job_{};
  uint64_t job_gen_ = 0;
  int64_t chunks_ = 0;
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

void Run(const Job& job) {
  if (job.M == 0 || job.P == 0) return;
  // Small jobs are not worth waking the pool.
  const bool parallel = job.P >= 4 && job.K * job.N >= (1 << 16);
  if (!parallel) {
    RunPanels(job, 0, job.P);
    return;
  }
  Pool& pool = GetPool();
  if (pool.size() == 1 || !pool.Run(job))
    RunPanels(job, 0, job.P);
}

ffi::Error PackedMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> panels,
                            ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = panels.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || pd[2] != kLanes || pd[1] != xd[1])
    return ffi::Error::InvalidArgument(
        "packed_matmul: expected x [M, K] and panels [P, K, 16]");
  Run(Job{x.typed_data(), panels.typed_data(), y->typed_data(), xd[0], xd[1],
          pd[0] * kLanes, pd[0], false, false});
  return ffi::Error::Success();
}

ffi::Error PackedMatmulBf16Impl(ffi::Buffer<ffi::BF16> x,
                                ffi::Buffer<ffi::BF16> panels,
                                ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto pd = panels.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || pd[2] != 2 * kLanes ||
      2 * pd[1] != xd[1])
    return ffi::Error::InvalidArgument(
        "packed_matmul_bf16: expected x [M, 2 K2] and panels [P, K2, 32]");
#if defined(SEQDEC_AMX)
  const bool amx = pd[1] % kAmxPairs == 0 && AmxPermitted();
#else
  const bool amx = false;
#endif
  Run(Job{x.untyped_data(), panels.untyped_data(), y->typed_data(), xd[0],
          pd[1], pd[0] * kLanes, pd[0], true, amx});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqdecPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqdecPackedMatmulBf16, PackedMatmulBf16Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The pool's size, before the first call (0: the hardware's).
extern "C" void seqdec_packed_matmul_set_threads(int n) { g_threads.store(n); }
