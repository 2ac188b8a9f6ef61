#include "parallel.h"

#include <cstdlib>
#ifdef __linux__
#include <sched.h>
#endif

namespace mlx_gpt {

namespace {

int usable_cores() {
  if (const char* env = std::getenv("MLX_GPT_EXT_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

Pool& Pool::instance() {
  // never destroyed: worker threads must not be joined while the interpreter shuts down
  static Pool* pool = new Pool(usable_cores());
  return *pool;
}

Pool::Pool(int threads) {
  shares_.resize(threads);
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { work(i); });
}

Pool::~Pool() {
  {
    std::lock_guard<std::mutex> lock(m_);
    stop_ = true;
  }
  start_.notify_all();
  for (auto& t : workers_) t.join();
}

void Pool::work(int index) {
  uint64_t seen = 0;
  for (;;) {
    std::unique_lock<std::mutex> lock(m_);
    start_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    auto [begin, end] = shares_[index];
    const RangeFn* body = body_;
    lock.unlock();
    if (begin < end) (*body)(index, begin, end);
    lock.lock();
    if (--pending_ == 0) done_.notify_one();
  }
}

void Pool::run(int64_t n, int64_t grain, const RangeFn& body) {
  int64_t parts = std::min<int64_t>(max_parts(), n / std::max<int64_t>(grain, 1));
  if (parts <= 1) {
    if (n > 0) body(0, 0, n);
    return;
  }
  std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
  if (!busy.owns_lock()) {
    body(0, 0, n);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(m_);
    for (int64_t p = 0; p < max_parts(); ++p) {
      shares_[p] = p < parts ? std::make_pair(n * p / parts, n * (p + 1) / parts) : std::make_pair(n, n);
    }
    body_ = &body;
    pending_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  start_.notify_all();
  body(0, shares_[0].first, shares_[0].second);
  std::unique_lock<std::mutex> lock(m_);
  done_.wait(lock, [&] { return pending_ == 0; });
}

}  // namespace mlx_gpt
