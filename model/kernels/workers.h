// A small pool of worker threads shared by jaxchat's kernels (one per core).
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace jaxchat {

// A fixed set of worker threads that split a range with the calling thread. Workers
// spin after a job (the next product of a step follows within microseconds), yielding
// the core to XLA's own threads between kernels, then sleep on the job counter.
class Workers {
 public:
  static Workers& get() {
    static Workers* workers = new Workers(cores());  // never destroyed: threads live on
    return *workers;
  }

  int size() const { return static_cast<int>(threads_.size()) + 1; }

  // fn(begin, end) over [0, n) in `parts` contiguous pieces, one per thread.
  void run(int64_t n, int parts, const std::function<void(int64_t, int64_t)>& fn) {
    parts = std::max(1, std::min<int>(parts, size()));
    if (parts == 1 || n < 2) return fn(0, n);
    std::lock_guard<std::mutex> lock(mutex_);
    fn_ = &fn;
    n_ = n;
    parts_ = parts;
    pending_.store(parts - 1, std::memory_order_relaxed);
    job_.fetch_add(1, std::memory_order_release);
    job_.notify_all();
    piece(0);
    while (pending_.load(std::memory_order_acquire) != 0) __builtin_ia32_pause();
  }

 private:
  explicit Workers(int count) {
    for (int i = 1; i < count; ++i) threads_.emplace_back([this, i] { loop(i); });
    for (auto& t : threads_) t.detach();
  }

  static int cores() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1u, std::thread::hardware_concurrency());
  }

  void piece(int i) {
    int64_t begin = n_ * i / parts_, end = n_ * (i + 1) / parts_;
    if (begin < end) (*fn_)(begin, end);
  }

  void loop(int i) {
    uint64_t seen = 0;  // the job count before any job: a job posted before this thread
    for (;;) {          // started still differs from it

      uint64_t now;
      for (int spin = 0; (now = job_.load(std::memory_order_acquire)) == seen; ++spin) {
        if (spin < 256) {
          __builtin_ia32_pause();
        } else if (spin < 20000) {
          sched_yield();  // spin, but give the core to XLA's threads when they have work
        } else {
          job_.wait(seen, std::memory_order_acquire);
        }
      }
      seen = now;
      if (i < parts_) {
        piece(i);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::atomic<uint64_t> job_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int parts_ = 1;
};

}  // namespace jaxchat
