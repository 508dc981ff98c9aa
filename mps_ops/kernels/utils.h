// Shared helpers for the torch_tq Metal kernels. The same source compiles with Apple's Metal
// compiler and, unmodified, with clang against the simulator shim in mps_ops/sim/include
// (which defines TQ_MSL_SIM). Conventions the simulator relies on: mps_ops/sim/README.md.
#pragma once

#include <metal_stdlib>
using namespace metal;

// instantiate_kernel("host_name", func, TemplateArgs...) — MLX style: the .metal file only
// instantiates; the signature is never written twice. Only for function templates. The simulator
// shim and its strict check (mps_ops/sim/msl_check.py) record instantiations their own way.
#if defined(TQSIM_INSTANTIATE_KERNEL)
#define instantiate_kernel(name, func, ...) TQSIM_INSTANTIATE_KERNEL(name, func, __VA_ARGS__)
#else
#define instantiate_kernel(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
#endif

// Kernel-specific helpers go below this line.
