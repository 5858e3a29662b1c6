/* Shared pieces of the ffnx TensorRT plugins (IPluginV3, namespace "ffnx", version "1").
 *
 * Each plugin wraps one op of ffnx/plugins/schema.py over the kernel C ABI (ffnx_kernels.h).
 * Inputs arrive in schema order. An optional input is absent when it is beyond the node's
 * input count or has zero volume: the ONNX parser passes empty-named inputs as null tensors,
 * so ffnx's TensorRT export replaces inner empty names with zero-element initializers
 * (ffnx/build/trt_graph_check.py: materialize_optional_inputs) and drops trailing ones.
 *
 * Only TensorRT's virtual interfaces are used, so the library links no TensorRT library and
 * loads in the full, lean and dispatch runtimes alike.
 */
#ifndef FFNX_PLUGIN_COMMON_H
#define FFNX_PLUGIN_COMMON_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "ffnx_kernels.h"

namespace ffnx {
namespace trt {

using namespace nvinfer1;

constexpr char const* kPLUGIN_NAMESPACE = "ffnx";
constexpr char const* kPLUGIN_VERSION = "1";

/* ---- logging (TensorRT hands the library an ILoggerFinder through setLoggerFinder) ---- */
void setLoggerFinder(ILoggerFinder* finder) noexcept;
void logError(std::string const& msg) noexcept;
void logVerbose(std::string const& msg) noexcept;

/* ---- plugin fields ---------------------------------------------------------------------- */
/* Attribute values as TensorRT delivers them: the ONNX parser gives INT as kINT32, FLOAT as
 * kFLOAT32 and STRING as kCHAR (length includes the terminating NUL); deserialization gives
 * back what getFieldsToSerialize wrote (the same types). */
bool fieldInt(PluginField const& f, int64_t* out) noexcept;
bool fieldFloat(PluginField const& f, float* out) noexcept;
bool fieldString(PluginField const& f, std::string* out) noexcept;

/* Read every named field of `fc` with `visit(name, field) -> bool` (false: wrong type or no
 * data; unknown names return true), then `done()` (e.g. resolving defaults and ranges). One
 * error message per bad field; no exception leaves (a bad_alloc becomes an error). */
template <typename Visit, typename Done>
bool readFields(PluginFieldCollection const* fc, std::string* err, Visit&& visit,
                Done&& done) noexcept {
  try {
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      if (f.name == nullptr) continue;
      std::string const name = f.name;
      if (!visit(name, f)) {
        *err = "attribute '" + name + "' has an unexpected type or no data";
        return false;
      }
    }
    return done();
  } catch (...) {
    *err = "out of memory reading the attributes";
    return false;
  }
}

/* Index of `s` in `names[0..n)`, or -1. */
int32_t lookup(char const* const* names, int32_t n, std::string const& s) noexcept;
std::string joined(char const* const* names, int32_t n);

extern char const* const kACTIVATIONS[7]; /* ffnx_activation order; the sparse FFN takes the first 6 */
bool isGated(int32_t activation) noexcept;

/* ---- shapes and types ------------------------------------------------------------------- */
int64_t volume(Dims const& d) noexcept;        /* -1 when a dim is unknown */
int64_t leadingVolume(Dims const& d) noexcept; /* product of all but the last dim */
bool toKernelDtype(DataType t, int32_t* out) noexcept;
/* `d` has rank want.size() and each dim equals want[i]; -1 on either side matches anything. */
bool shapeIs(Dims const& d, std::initializer_list<int64_t> want) noexcept;
std::string str(Dims const& d);

enum class PortKind : int32_t {
  kFLOAT_LIKE_HIDDEN, /* fp32/fp16/bf16, same type as input 0 */
  kFP32,              /* float32 always */
  kINT64
};

struct PortSpec {
  char const* name;
  PortKind kind;
  bool optional;
};

/* Per-input dims plus presence, from build-time or run-time descriptors. */
struct IoView {
  static constexpr int32_t kMAX = 16;
  Dims dims[kMAX];
  bool present[kMAX];
  int32_t nbInputs{0};
  DataType type{DataType::kFLOAT};
};

/* TensorRT types and formats the plugin accepts at `pos` (inputs then the output). */
bool supportsPort(PortSpec const* ports, int32_t nbPorts, int32_t pos,
                  DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                  int32_t nbOutputs) noexcept;

/* ---- the part of IPluginV3 both plugins share ------------------------------------------ */
class PluginBase : public IPluginV3,
                   public IPluginV3OneCore,
                   public IPluginV3OneBuild,
                   public IPluginV3OneRuntime {
 public:
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override;
  char const* getPluginVersion() const noexcept override { return kPLUGIN_VERSION; }
  char const* getPluginNamespace() const noexcept override { return kPLUGIN_NAMESPACE; }

  int32_t getNbOutputs() const noexcept override { return 1; }
  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs,
                          IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                 int32_t nbInputs, int32_t nbOutputs) noexcept override;
  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          DynamicPluginTensorDesc const* outputs,
                          int32_t nbOutputs) const noexcept override;
  char const* getTimingCacheID() noexcept override { return mTimingCacheId.c_str(); }

  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  IPluginV3* attachToContext(IPluginResourceContext* context) noexcept override;

 protected:
  virtual PortSpec const* ports(int32_t* nbPorts) const noexcept = 0;
  /* Validate `io` (dims may hold -1 at build time) and size the kernel's workspace; false and
   * *err set when the inputs do not fit the schema. */
  virtual bool workspaceFor(IoView const& io, size_t* bytes, std::string* err) const noexcept = 0;
  virtual int32_t launch(IoView const& io, void const* const* inputs, void* output,
                         void* workspace, void* stream) noexcept = 0;
  std::string mTimingCacheId;
  /* enqueue() is not told the input count: configurePlugin/onShapeChange record it, and it
   * is serialized (field "ffnx_nb_inputs") so a deserialized plugin knows it too. */
  int32_t mNbInputs{0};
};

IoView viewOf(DynamicPluginTensorDesc const* in, int32_t nbInputs, bool useMax) noexcept;
IoView viewOf(PluginTensorDesc const* in, int32_t nbInputs) noexcept;

}  // namespace trt
}  // namespace ffnx

#endif  // FFNX_PLUGIN_COMMON_H
