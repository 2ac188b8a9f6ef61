// Row loops split over the cores this process may use.
//
// MLX's CPU backend runs every operation of a stream on that stream's one thread; the kernels
// here cut their rows into a few chunks per core that the calling thread and a small pool of
// workers claim one at a time. The caller never waits for a worker that has not started (on a
// busy machine it may do every chunk itself), only for chunks already claimed; and when the pool
// is running another stream's kernel, the caller does the whole loop itself, so streams that
// split a batch over the cores never queue behind each other.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_gpt {

constexpr int64_t kGrain = 16384;  // elements below which a loop is not worth splitting

// body(part, begin, end) for disjoint [begin, end) covering [0, n), possibly several calls per
// part; part (< max_parts()) names the thread, so calls with one part never overlap.
using RangeFn = std::function<void(int, int64_t, int64_t)>;

class Pool {
 public:
  static Pool& instance();

  // Shares of work a loop may be split into (workers + the calling thread).
  int max_parts() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // Run body over [0, n) in chunks of at least `grain` items.
  void run(int64_t n, int64_t grain, const RangeFn& body);

  ~Pool() = delete;  // never destroyed (see instance()): its workers wait for loops until the process ends

 private:
  explicit Pool(int threads);
  void work(int index);

  std::vector<std::thread> workers_;
  std::mutex busy_;  // held by the thread whose loop the workers are running
  std::mutex m_;
  std::condition_variable start_, done_;
  void claim_chunks(int part);

  // the running loop: chunks [0, chunks_) of chunk_ items over [0, n_)
  const RangeFn* body_ = nullptr;
  int64_t n_ = 0, chunk_ = 0, chunks_ = 0;
  std::atomic<int64_t> next_{0};
  bool open_ = false;  // workers may still join the running loop
  int active_ = 0;     // workers inside it
  uint64_t generation_ = 0;
};

}  // namespace mlx_gpt
