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
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { work(i); });
}

void Pool::claim_chunks(int part) {
  for (int64_t c; (c = next_.fetch_add(1)) < chunks_;) {
    (*body_)(part, c * chunk_, std::min(n_, (c + 1) * chunk_));
  }
}

void Pool::work(int index) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(m_);
  for (;;) {
    start_.wait(lock, [&] { return generation_ != seen; });
    seen = generation_;
    if (!open_) continue;  // woke after the caller finished the loop alone
    ++active_;
    lock.unlock();
    claim_chunks(index);
    lock.lock();
    if (--active_ == 0) done_.notify_one();
  }
}

void Pool::run(int64_t n, int64_t grain, const RangeFn& body) {
  int64_t chunks = std::min<int64_t>(4 * max_parts(), n / std::max<int64_t>(grain, 1));
  if (chunks <= 1 || workers_.empty()) {
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
    body_ = &body;
    n_ = n;
    chunk_ = (n + chunks - 1) / chunks;
    chunks_ = (n + chunk_ - 1) / chunk_;
    next_ = 0;
    open_ = true;
    ++generation_;
  }
  start_.notify_all();
  claim_chunks(0);
  std::unique_lock<std::mutex> lock(m_);
  open_ = false;
  done_.wait(lock, [&] { return active_ == 0; });
}

}  // namespace mlx_gpt
