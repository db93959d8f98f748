// Work sharing without OpenMP's barrier: the calling thread and the inter-op
// pool's threads claim items from a shared counter.
//
// at::parallel_for (OpenMP in torch's CPU builds) starts a team and joins it
// at a barrier: every thread of the team must run, even one that has nothing
// left to do. With more runnable threads than cores (a shared machine) a
// preempted worker holds the whole call, and the waiting threads spin
// (libgomp's default wait policy) on the cores it needs: a 90 %-sparse ResNet
// that takes 11 ms with OMP_WAIT_POLICY=PASSIVE took 0.6-1.4 s so. Here the
// caller starts on the items at once; helpers are posted to at::launch's pool
// (threads that sleep on a condition variable, not spin) and join when they
// wake, and a helper that wakes after the last item is claimed leaves without
// touching the caller's data. The caller returns once every claimed item is
// done, so it only ever waits for work in progress.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

namespace pycompress {

// Runs f(i) for every i in [0, n) on up to at::get_num_threads() threads; f must not throw.
template <class F>
void share_work(int64_t n, const F& f) {
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), n) - 1;
  if (helpers <= 0 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();  // outlives the call for helpers that wake late
  auto work = [counters, n, &f] {
    for (int64_t i = counters->next++; i < n; i = counters->next++) {
      f(i);
      counters->done++;
    }
  };
  for (int64_t h = 0; h < helpers; ++h) at::launch(work);
  work();
  while (counters->done.load() < n) std::this_thread::yield();
}

}  // namespace pycompress
