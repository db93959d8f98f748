// Whether the CPU kernels multiply bf16 with AVX512-BF16 dot products
// (vdpbf16ps): only when the build target has them (-march, PYCOMPRESS_ARCH).
#pragma once

#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
#define PYCOMPRESS_BF16_DOT 1
#endif
