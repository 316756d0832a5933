// Launch policy of the CUDA stages for the current call: whether kernels are launched with programmatic
// dependent launch (PDL, Hopper+). Plain C++ (the torch binding sets it, the .cu launchers read it).
//
// Why PDL (benchmarks/NOTES.md, v5): at decode the op is a chain of ~10 short kernels, and in a CUDA graph
// each boundary costs the next kernel's launch and ramp-up after the previous one drains. With PDL a kernel
// is launched while its predecessor's last wave still runs; its CTAs become resident as SMs free up and
// wait in griddepcontrol.wait (pdl.cuh) until the predecessor has completed and its writes are visible.
#pragma once

namespace moelora::cuda {

// Set for the duration of one op call on the calling thread (ScopedLaunchPolicy); false by default, so a
// launcher used on its own launches plainly.
inline thread_local bool tls_pdl_launch = false;

inline bool pdl_launch_enabled() { return tls_pdl_launch; }

class ScopedLaunchPolicy {
 public:
  explicit ScopedLaunchPolicy(bool pdl) : saved_(tls_pdl_launch) { tls_pdl_launch = pdl; }
  ~ScopedLaunchPolicy() { tls_pdl_launch = saved_; }
  ScopedLaunchPolicy(const ScopedLaunchPolicy&) = delete;
  ScopedLaunchPolicy& operator=(const ScopedLaunchPolicy&) = delete;

 private:
  bool saved_;
};

}  // namespace moelora::cuda
