#include "ffnx_sparse_ffn_plugin.h"

#include <cstring>
#include <new>

namespace ffnx {
namespace trt {

namespace {
char const* const kNAME = "FfnxSparseFFN";
char const* const kMODES[] = {"threshold", "topk"};

enum Input : int32_t { kHIDDEN, kW_GATE, kW_UP, kB_UP, kW_DOWN, kB_DOWN, kTHRESHOLDS, kNB_PORTS };

PortSpec const kPORTS[kNB_PORTS] = {
    {"hidden", PortKind::kFLOAT_LIKE_HIDDEN, false},
    {"w_gate", PortKind::kFLOAT_LIKE_HIDDEN, true},
    {"w_up", PortKind::kFLOAT_LIKE_HIDDEN, false},
    {"b_up", PortKind::kFLOAT_LIKE_HIDDEN, true},
    {"w_down", PortKind::kFLOAT_LIKE_HIDDEN, false},
    {"b_down", PortKind::kFLOAT_LIKE_HIDDEN, true},
    {"thresholds", PortKind::kFP32, true},
};

bool has(IoView const& io, int32_t i) { return i < io.nbInputs && io.present[i]; }
}  // namespace

bool SparseFFNAttrs::resolve(std::string* err) {
  modeCode = lookup(kMODES, 2, mode);
  activationCode = lookup(kACTIVATIONS, 6, activation);
  if (modeCode < 0) *err = "mode '" + mode + "' is not one of " + joined(kMODES, 2);
  else if (activationCode < 0)
    *err = "activation '" + activation + "' is not one of " + joined(kACTIVATIONS, 6);
  else if (modeCode == FFNX_SPARSE_TOPK && k < 1) *err = "mode='topk' needs k >= 1";
  else return true;
  return false;
}

SparseFFNPlugin::SparseFFNPlugin(SparseFFNAttrs attrs, int32_t nbInputs)
    : mAttrs(std::move(attrs)) {
  mNbInputs = nbInputs;
  mTimingCacheId = std::string(kNAME) + ":" + mAttrs.mode + ":" + std::to_string(mAttrs.k) + ":" +
                   mAttrs.activation;
}

/* Serialized-field buffers are not copied: they point into `other`. */
SparseFFNPlugin::SparseFFNPlugin(SparseFFNPlugin const& other) : PluginBase(other), mAttrs(other.mAttrs) {}

char const* SparseFFNPlugin::getPluginName() const noexcept { return kNAME; }

IPluginV3* SparseFFNPlugin::clone() noexcept {
  try {
    return new SparseFFNPlugin(*this);
  } catch (...) {
    logError(std::string(kNAME) + ": clone failed (out of memory)");
  }
  return nullptr;
}

PortSpec const* SparseFFNPlugin::ports(int32_t* nbPorts) const noexcept {
  *nbPorts = kNB_PORTS;
  return kPORTS;
}

PluginFieldCollection const* SparseFFNPlugin::getFieldsToSerialize() noexcept {
  try {
    mFields = {
        PluginField("mode", mAttrs.mode.c_str(), PluginFieldType::kCHAR,
                    static_cast<int32_t>(mAttrs.mode.size() + 1)),
        PluginField("k", &mAttrs.k, PluginFieldType::kINT32, 1),
        PluginField("activation", mAttrs.activation.c_str(), PluginFieldType::kCHAR,
                    static_cast<int32_t>(mAttrs.activation.size() + 1)),
        PluginField("ffnx_nb_inputs", &mNbInputs, PluginFieldType::kINT32, 1),
    };
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
  } catch (...) {
    logError(std::string(kNAME) + ": getFieldsToSerialize failed (out of memory)");
    return nullptr;
  }
  return &mFieldCollection;
}

bool SparseFFNPlugin::parse(PluginFieldCollection const* fc, SparseFFNAttrs* a, int32_t* nbInputs,
                            std::string* err) noexcept {
  *nbInputs = 0;
  auto visit = [&](std::string const& name, PluginField const& f) {
    int64_t v = 0;
    if (name == "k") return fieldInt(f, &v) && ((a->k = int32_t(v)), true);
    if (name == "ffnx_nb_inputs") return fieldInt(f, &v) && ((*nbInputs = int32_t(v)), true);
    if (name == "mode") return fieldString(f, &a->mode);
    if (name == "activation") return fieldString(f, &a->activation);
    return true;
  };
  return readFields(fc, err, visit, [&] { return a->resolve(err); });
}

bool SparseFFNPlugin::params(IoView const& io, ffnx_sparse_ffn_params* p,
                             std::string* err) const noexcept {
  std::memset(p, 0, sizeof(*p));
  Dims const* d = io.dims;
  if (!has(io, kW_UP) || !has(io, kW_DOWN) || d[kHIDDEN].nbDims < 1) {
    *err = "hidden, w_up and w_down are required";
    return false;
  }
  int64_t const D = d[kHIDDEN].d[d[kHIDDEN].nbDims - 1];
  int64_t const H = d[kW_UP].nbDims == 2 ? d[kW_UP].d[0] : -1;
  if (H <= 0 || !shapeIs(d[kW_UP], {H, D}) || !shapeIs(d[kW_DOWN], {D, H})) {
    *err = "w_up " + str(d[kW_UP]) + " and w_down " + str(d[kW_DOWN]) +
           " must be [H, D] and [D, H] with D = " + std::to_string(D);
    return false;
  }
  if ((has(io, kW_GATE) && !shapeIs(d[kW_GATE], {H, D})) ||
      (has(io, kB_UP) && !shapeIs(d[kB_UP], {H})) || (has(io, kB_DOWN) && !shapeIs(d[kB_DOWN], {D})) ||
      (has(io, kTHRESHOLDS) && !shapeIs(d[kTHRESHOLDS], {H}))) {
    *err = "expected w_gate [H, D], b_up [H], b_down [D], thresholds [H]";
    return false;
  }
  if (mAttrs.modeCode == FFNX_SPARSE_THRESHOLD && !has(io, kTHRESHOLDS)) {
    *err = "mode='threshold' needs the thresholds input";
    return false;
  }
  if (mAttrs.modeCode == FFNX_SPARSE_TOPK && mAttrs.k > H) {
    *err = "k=" + std::to_string(mAttrs.k) + " exceeds H=" + std::to_string(H);
    return false;
  }
  if (!toKernelDtype(io.type, &p->dtype)) {
    *err = "hidden must be float32, float16 or bfloat16";
    return false;
  }
  p->num_tokens = leadingVolume(d[kHIDDEN]);
  p->hidden = D;
  p->inter = H;
  p->k = mAttrs.k;
  p->gated = has(io, kW_GATE);
  p->mode = mAttrs.modeCode;
  p->activation = mAttrs.activationCode;
  p->has_b_up = has(io, kB_UP);
  p->has_b_down = has(io, kB_DOWN);
  return true;
}

bool SparseFFNPlugin::workspaceFor(IoView const& io, size_t* bytes,
                                   std::string* err) const noexcept {
  ffnx_sparse_ffn_params p;
  if (!params(io, &p, err)) return false;
  *bytes = ffnx_sparse_ffn_workspace_size(&p);
  return true;
}

int32_t SparseFFNPlugin::launch(IoView const& io, void const* const* in, void* output,
                                void* workspace, void* stream) noexcept {
  ffnx_sparse_ffn_params p;
  std::string err;
  if (!params(io, &p, &err)) {
    logError(std::string(kNAME) + ": " + err);
    return FFNX_ERR_INVALID_ARGUMENT;
  }
  auto at = [&](int32_t i) -> void const* { return has(io, i) ? in[i] : nullptr; };
  ffnx_sparse_ffn_tensors t{};
  t.hidden = in[kHIDDEN];
  t.w_gate = at(kW_GATE);
  t.w_up = in[kW_UP];
  t.b_up = at(kB_UP);
  t.w_down = in[kW_DOWN];
  t.b_down = at(kB_DOWN);
  t.thresholds = static_cast<float const*>(at(kTHRESHOLDS));
  t.output = output;
  size_t const bytes = ffnx_sparse_ffn_workspace_size(&p);
  int const status = ffnx_sparse_ffn_launch(&p, &t, workspace, bytes, stream);
  if (status != FFNX_OK) {
    logError(std::string(kNAME) + ": ffnx_sparse_ffn_launch: " + ffnx_status_string(status));
  }
  return status;
}

SparseFFNCreator::SparseFFNCreator() {
  mFields = {
      PluginField("mode", nullptr, PluginFieldType::kCHAR, 0),
      PluginField("k", nullptr, PluginFieldType::kINT32, 1),
      PluginField("activation", nullptr, PluginFieldType::kCHAR, 0),
  };
  mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
  mFieldCollection.fields = mFields.data();
}

char const* SparseFFNCreator::getPluginName() const noexcept { return kNAME; }

IPluginV3* SparseFFNCreator::createPlugin(char const* name, PluginFieldCollection const* fc,
                                          TensorRTPhase /*phase*/) noexcept {
  try {
    SparseFFNAttrs attrs;
    int32_t nbInputs = 0;
    std::string err;
    if (!SparseFFNPlugin::parse(fc, &attrs, &nbInputs, &err)) {
      logError(std::string(kNAME) + " node '" + (name ? name : "") + "': " + err);
      return nullptr;
    }
    return new SparseFFNPlugin(std::move(attrs), nbInputs);
  } catch (...) {
    logError(std::string(kNAME) + ": out of memory creating the plugin");
  }
  return nullptr;
}

}  // namespace trt
}  // namespace ffnx
