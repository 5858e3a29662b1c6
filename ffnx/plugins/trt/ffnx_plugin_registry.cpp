/* The library's only exported symbols, the entry points TensorRT looks for when it loads a
 * plugin library (IPluginRegistry::loadLibrary, `trtexec --dynamicPlugins`, plugins
 * serialized into version-compatible plans, the lean runtime), as in TensorRT's own
 * libnvinfer_vc_plugin. Everything else is hidden by -fvisibility=hidden and the linker
 * version script (global: getCreators; setLoggerFinder; local: *). */
#include "ffnx_moe_plugin.h"
#include "ffnx_sparse_ffn_plugin.h"

/* Not TENSORRTAPI: that macro is empty unless TENSORRT_BUILD_LIB (TensorRT's own build). */
#define FFNX_EXPORT __attribute__((visibility("default")))

extern "C" FFNX_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static ffnx::trt::MoECreator sMoE;
  static ffnx::trt::SparseFFNCreator sSparseFFN;
  static nvinfer1::IPluginCreatorInterface* const kCREATORS[] = {&sMoE, &sSparseFFN};
  nbCreators = static_cast<int32_t>(sizeof(kCREATORS) / sizeof(kCREATORS[0]));
  return kCREATORS;
}

extern "C" FFNX_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  ffnx::trt::setLoggerFinder(finder);
}
