// Library-level entry points of the C ABI (ffnx_kernels.h).
#include "ffnx_kernels.h"

extern "C" const char* ffnx_status_string(int status) {
  switch (status) {
    case FFNX_OK: return "ok";
    case FFNX_ERR_INVALID_ARGUMENT: return "invalid argument";
    case FFNX_ERR_UNSUPPORTED: return "unsupported parameters";
    case FFNX_ERR_WORKSPACE_TOO_SMALL: return "workspace too small";
    case FFNX_ERR_CUDA: return "CUDA error";
    default: return "unknown ffnx status";
  }
}

extern "C" int ffnx_kernels_abi_version(void) { return FFNX_KERNELS_ABI_VERSION; }
