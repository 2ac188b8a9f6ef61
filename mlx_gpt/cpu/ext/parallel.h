// Row loops split over the cores this process may use.
//
// MLX's CPU backend runs every operation of a stream on that stream's one thread; the kernels
// here hand equal shares of their rows to a small pool of worker threads and take one share
// themselves. When the pool is already busy (another stream is running a kernel on it), the
// caller does the whole loop itself instead of waiting, so streams that split a batch over the
// cores never queue behind each other.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_gpt {

// body(part, begin, end) for disjoint [begin, end) covering [0, n); part < max_parts().
using RangeFn = std::function<void(int, int64_t, int64_t)>;

class Pool {
 public:
  static Pool& instance();

  // Shares of work a loop may be split into (workers + the calling thread).
  int max_parts() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // Run body over [0, n) in up to max_parts() shares of at least `grain` items each.
  void run(int64_t n, int64_t grain, const RangeFn& body);

  ~Pool();

 private:
  explicit Pool(int threads);
  void work(int index);

  std::vector<std::thread> workers_;
  std::mutex busy_;  // held by the thread whose loop the workers are running
  std::mutex m_;
  std::condition_variable start_, done_;
  const RangeFn* body_ = nullptr;
  std::vector<std::pair<int64_t, int64_t>> shares_;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
};

}  // namespace mlx_gpt
