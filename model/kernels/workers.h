// A small pool of worker threads shared by jaxchat's kernels (one per core).
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

// The hot loops' targets. A portable build (the Docker image's, which may run on another
// CPU) compiles each for AVX-512, AVX2 and plain x86-64, and the loader picks one when the
// library loads; a build for the CPU at hand (make setup's) compiles them for its level
// alone (-march, and this defined empty): a third of the compile time.
#ifndef JAXCHAT_TARGETS
#define JAXCHAT_TARGETS \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif

namespace jaxchat {

// A fixed set of worker threads that share a range with the calling thread. The range is
// cut into PIECES per thread, taken in turn from a counter, so the caller never waits for
// a worker that has not started: on a busy machine (another process on the other core)
// the caller does the pieces itself, and waits only for a piece a worker is in the middle
// of. Workers spin after a job (the next product of a step follows within microseconds),
// yielding the core to XLA's own threads between kernels, then sleep on the job counter.
class Workers {
 public:
  static constexpr int kPieces = 8;

  static Workers& get() {
    static Workers* workers = new Workers(cores());  // never destroyed: threads live on
    return *workers;
  }

  int size() const { return static_cast<int>(threads_.size()) + 1; }

  // fn(begin, end) over [0, n) in contiguous pieces: the same pieces whichever threads
  // take them, so the results do not depend on the timing.
  void run(int64_t n, int parts, const std::function<void(int64_t, int64_t)>& fn) {
    parts = std::max(1, std::min<int>(parts, size()));
    if (parts == 1 || n < 2) return fn(0, n);
    std::lock_guard<std::mutex> lock(mutex_);
    auto job = std::make_shared<Job>(fn, n, std::min<int64_t>(n, int64_t{parts} * kPieces),
                                     parts - 1);
    {
      std::lock_guard<std::mutex> posting(post_);
      job_ptr_ = job;
    }
    job_.fetch_add(1, std::memory_order_release);
    job_.notify_all();
    job->work();
    // Every piece is taken: wait for those still running on a worker.
    for (int spin = 0; job->done.load(std::memory_order_acquire) != job->pieces; ++spin) {
      if (spin < 1024) {
        __builtin_ia32_pause();
      } else {
        sched_yield();
      }
    }
  }

 private:
  struct Job {
    Job(const std::function<void(int64_t, int64_t)>& f, int64_t n_, int64_t pieces_,
        int helpers_)
        : fn(f), n(n_), pieces(pieces_), helpers(helpers_) {}

    void work() {
      for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < pieces;) {
        fn(n * p / pieces, n * (p + 1) / pieces);
        done.fetch_add(1, std::memory_order_release);
      }
    }

    const std::function<void(int64_t, int64_t)>& fn;  // the caller's: it outlives the pieces
    const int64_t n, pieces;
    const int helpers;  // workers that may join
    std::atomic<int64_t> next{0}, done{0};
  };

  explicit Workers(int count) {
    for (int i = 1; i < count; ++i) threads_.emplace_back([this, i] { loop(i); });
    for (auto& t : threads_) t.detach();
  }

  static int cores() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1u, std::thread::hardware_concurrency());
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
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> posting(post_);
        job = job_ptr_;
      }
      // A job whose pieces are all taken (this worker woke late) costs one look.
      if (job && i <= job->helpers) job->work();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;  // one job at a time
  std::mutex post_;   // guards job_ptr_
  std::shared_ptr<Job> job_ptr_;
  std::atomic<uint64_t> job_{0};
};

}  // namespace jaxchat
