#include "ffnx_plugin_common.h"

#include <cstdio>
#include <cstring>
#include <mutex>

namespace ffnx {
namespace trt {

namespace {
std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder{nullptr};

void emit(ILogger::Severity severity, std::string const& msg) noexcept {
  ILogger* logger{nullptr};
  {
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    if (gLoggerFinder != nullptr) {
      logger = gLoggerFinder->findLogger();
    }
  }
  try {
    std::string const line = "[ffnx plugin] " + msg;
    if (logger != nullptr) {
      logger->log(severity, line.c_str());
    } else if (severity <= ILogger::Severity::kWARNING) {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
  } catch (...) {
    std::fprintf(stderr, "[ffnx plugin] out of memory formatting a log message\n");
  }
}
}  // namespace

void setLoggerFinder(ILoggerFinder* finder) noexcept {
  std::lock_guard<std::mutex> lock(gLoggerMutex);
  if (gLoggerFinder == nullptr && finder != nullptr) {
    gLoggerFinder = finder;
  }
}

void logError(std::string const& msg) noexcept { emit(ILogger::Severity::kERROR, msg); }
void logVerbose(std::string const& msg) noexcept { emit(ILogger::Severity::kVERBOSE, msg); }

bool fieldInt(PluginField const& f, int64_t* out) noexcept {
  if (f.data == nullptr || f.length < 1) return false;
  switch (f.type) {
    case PluginFieldType::kINT32: *out = *static_cast<int32_t const*>(f.data); return true;
    case PluginFieldType::kINT64: *out = *static_cast<int64_t const*>(f.data); return true;
    case PluginFieldType::kINT16: *out = *static_cast<int16_t const*>(f.data); return true;
    case PluginFieldType::kINT8: *out = *static_cast<int8_t const*>(f.data); return true;
    default: return false;
  }
}

bool fieldFloat(PluginField const& f, float* out) noexcept {
  if (f.data == nullptr || f.length < 1) return false;
  switch (f.type) {
    case PluginFieldType::kFLOAT32: *out = *static_cast<float const*>(f.data); return true;
    case PluginFieldType::kFLOAT64:
      *out = static_cast<float>(*static_cast<double const*>(f.data));
      return true;
    default: {
      int64_t i{};
      if (!fieldInt(f, &i)) return false;
      *out = static_cast<float>(i);
      return true;
    }
  }
}

bool fieldString(PluginField const& f, std::string* out) noexcept {
  if (f.type != PluginFieldType::kCHAR || f.data == nullptr || f.length < 0) return false;
  char const* s = static_cast<char const*>(f.data);
  *out = std::string(s, strnlen(s, static_cast<size_t>(f.length)));
  return true;
}

int32_t lookup(char const* const* names, int32_t n, std::string const& s) noexcept {
  for (int32_t i = 0; i < n; ++i) {
    if (s == names[i]) return i;
  }
  return -1;
}

std::string joined(char const* const* names, int32_t n) {
  std::string out;
  for (int32_t i = 0; i < n; ++i) {
    out += (i ? ", " : "") + std::string(names[i]);
  }
  return out;
}

char const* const kACTIVATIONS[7] = {"swiglu", "geglu", "reglu", "gelu", "relu", "silu",
                                     "clamped_swiglu"};

bool isGated(int32_t activation) noexcept {
  return activation == FFNX_ACT_SWIGLU || activation == FFNX_ACT_GEGLU ||
         activation == FFNX_ACT_REGLU || activation == FFNX_ACT_CLAMPED_SWIGLU;
}

int64_t volume(Dims const& d) noexcept {
  int64_t v = 1;
  for (int32_t i = 0; i < d.nbDims; ++i) {
    if (d.d[i] < 0) return -1;
    v *= d.d[i];
  }
  return v;
}

int64_t leadingVolume(Dims const& d) noexcept {
  int64_t v = 1;
  for (int32_t i = 0; i + 1 < d.nbDims; ++i) {
    if (d.d[i] < 0) return -1;
    v *= d.d[i];
  }
  return v;
}

bool toKernelDtype(DataType t, int32_t* out) noexcept {
  switch (t) {
    case DataType::kFLOAT: *out = FFNX_F32; return true;
    case DataType::kHALF: *out = FFNX_F16; return true;
    case DataType::kBF16: *out = FFNX_BF16; return true;
    default: return false;
  }
}

bool shapeIs(Dims const& d, std::initializer_list<int64_t> want) noexcept {
  if (d.nbDims != static_cast<int32_t>(want.size())) return false;
  int32_t i = 0;
  for (int64_t w : want) {
    int64_t const got = d.d[i++];
    if (w >= 0 && got >= 0 && w != got) return false;
  }
  return true;
}

std::string str(Dims const& d) {
  std::string out = "[";
  for (int32_t i = 0; i < d.nbDims; ++i) {
    out += (i ? ", " : "") + std::to_string(d.d[i]);
  }
  return out + "]";
}

bool supportsPort(PortSpec const* ports, int32_t nbPorts, int32_t pos,
                  DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                  int32_t nbOutputs) noexcept {
  if (inOut == nullptr || pos < 0 || pos >= nbInputs + nbOutputs || nbInputs > nbPorts) {
    return false;
  }
  PluginTensorDesc const& desc = inOut[pos].desc;
  if (desc.format != TensorFormat::kLINEAR) return false;
  DataType const hidden = inOut[0].desc.type;
  if (pos == 0) {
    return hidden == DataType::kFLOAT || hidden == DataType::kHALF || hidden == DataType::kBF16;
  }
  if (pos >= nbInputs) return desc.type == hidden; /* output: same type as hidden */
  switch (ports[pos].kind) {
    case PortKind::kFLOAT_LIKE_HIDDEN: return desc.type == hidden;
    case PortKind::kFP32: return desc.type == DataType::kFLOAT;
    case PortKind::kINT64: return desc.type == DataType::kINT64;
  }
  return false;
}

IoView viewOf(DynamicPluginTensorDesc const* in, int32_t nbInputs, bool useMax) noexcept {
  IoView io;
  io.nbInputs = nbInputs < IoView::kMAX ? nbInputs : IoView::kMAX;
  io.type = nbInputs > 0 ? in[0].desc.type : DataType::kFLOAT;
  for (int32_t i = 0; i < io.nbInputs; ++i) {
    /* A placeholder for an absent input is a constant [0]: zero volume even at build time. */
    io.dims[i] = useMax ? in[i].max : in[i].desc.dims;
    io.present[i] = volume(in[i].desc.dims) != 0 && volume(in[i].max) != 0;
  }
  return io;
}

IoView viewOf(PluginTensorDesc const* in, int32_t nbInputs) noexcept {
  IoView io;
  io.nbInputs = nbInputs < IoView::kMAX ? nbInputs : IoView::kMAX;
  io.type = nbInputs > 0 ? in[0].type : DataType::kFLOAT;
  for (int32_t i = 0; i < io.nbInputs; ++i) {
    io.dims[i] = in[i].dims;
    io.present[i] = volume(in[i].dims) != 0;
  }
  io.present[0] = true; /* hidden is required; zero tokens is a valid (empty) run */
  return io;
}

IPluginCapability* PluginBase::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
  }
  return nullptr;
}

int32_t PluginBase::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs,
                                       DataType const* inputTypes,
                                       int32_t nbInputs) const noexcept {
  if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != 1 || nbInputs < 1) return 1;
  outputTypes[0] = inputTypes[0];
  return 0;
}

int32_t PluginBase::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
                                    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                                    DimsExprs* outputs, int32_t nbOutputs,
                                    IExprBuilder& /*exprBuilder*/) noexcept {
  if (inputs == nullptr || outputs == nullptr || nbInputs < 1 || nbOutputs != 1) return 1;
  outputs[0] = inputs[0]; /* output: hidden's shape */
  return 0;
}

bool PluginBase::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                           int32_t nbInputs, int32_t nbOutputs) noexcept {
  int32_t n = 0;
  PortSpec const* p = ports(&n);
  return supportsPort(p, n, pos, inOut, nbInputs, nbOutputs);
}

int32_t PluginBase::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                    DynamicPluginTensorDesc const* /*out*/,
                                    int32_t nbOutputs) noexcept {
  try {
    int32_t n = 0;
    ports(&n);
    if (in == nullptr || nbInputs < 1 || nbInputs > n || nbOutputs != 1) {
      logError(std::string(getPluginName()) + ": expected 1.." + std::to_string(n) +
               " inputs and 1 output, got " + std::to_string(nbInputs) + " and " +
               std::to_string(nbOutputs));
      return 1;
    }
    size_t bytes = 0;
    std::string err;
    if (!workspaceFor(viewOf(in, nbInputs, true), &bytes, &err)) {
      logError(std::string(getPluginName()) + ": " + err);
      return 1;
    }
    mNbInputs = nbInputs;
    return 0;
  } catch (...) {
    logError(std::string(getPluginName()) + ": unexpected C++ exception in configurePlugin");
  }
  return 1;
}

size_t PluginBase::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                    DynamicPluginTensorDesc const* /*outputs*/,
                                    int32_t /*nbOutputs*/) const noexcept {
  try {
    size_t bytes = 0;
    std::string err;
    if (inputs == nullptr || !workspaceFor(viewOf(inputs, nbInputs, true), &bytes, &err)) return 0;
    return bytes;
  } catch (...) {
    logError(std::string(getPluginName()) + ": unexpected C++ exception in getWorkspaceSize");
  }
  return 0;
}

int32_t PluginBase::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs,
                                  PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
  int32_t n = 0;
  ports(&n);
  if (in == nullptr || nbInputs < 1 || nbInputs > n || nbOutputs != 1) return 1;
  mNbInputs = nbInputs;
  return 0;
}

int32_t PluginBase::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                            void const* const* inputs, void* const* outputs, void* workspace,
                            cudaStream_t stream) noexcept {
  try {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr) {
      return 1;
    }
    if (mNbInputs < 1) {
      logError(std::string(getPluginName()) + ": enqueue before onShapeChange/configurePlugin");
      return 1;
    }
    IoView const io = viewOf(inputDesc, mNbInputs);
    if (leadingVolume(io.dims[0]) == 0) return 0; /* no tokens */
    return launch(io, inputs, outputs[0], workspace, static_cast<void*>(stream));
  } catch (...) {
    logError(std::string(getPluginName()) + ": unexpected C++ exception in enqueue");
  }
  return 1;
}

IPluginV3* PluginBase::attachToContext(IPluginResourceContext* /*context*/) noexcept {
  return clone();
}

}  // namespace trt
}  // namespace ffnx
