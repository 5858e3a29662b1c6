#include "ffnx_moe_plugin.h"

#include <cstring>
#include <new>

namespace ffnx {
namespace trt {

namespace {
char const* const kNAME = "FfnxMoE";
char const* const kROUTING[] = {"router", "hash"};
char const* const kSCORING[] = {"softmax", "topk_softmax", "sigmoid"};
char const* const kGROUP_SCORING[] = {"top2_sum", "max"};  /* ffnx_group_scoring order */

enum Input : int32_t {
  kHIDDEN, kROUTER_LOGITS, kFC1_W, kFC1_B, kFC2_W, kFC2_B, kSCORE_BIAS, kTOKEN_IDS,
  kHASH_TABLE, kSHARED_FC1_W, kSHARED_FC2_W, kSHARED_GATE_W, kNB_PORTS
};

/* Schema order and dtypes (schema.py MOE.inputs). */
PortSpec const kPORTS[kNB_PORTS] = {
    {"hidden", PortKind::kFLOAT_LIKE_HIDDEN, false},
    {"router_logits", PortKind::kFLOAT_LIKE_HIDDEN, true},
    {"fc1_weight", PortKind::kFLOAT_LIKE_HIDDEN, false},
    {"fc1_bias", PortKind::kFLOAT_LIKE_HIDDEN, true},
    {"fc2_weight", PortKind::kFLOAT_LIKE_HIDDEN, false},
    {"fc2_bias", PortKind::kFLOAT_LIKE_HIDDEN, true},
    {"score_bias", PortKind::kFP32, true},
    {"token_ids", PortKind::kINT64, true},
    {"hash_table", PortKind::kINT64, true},
    {"shared_fc1_weight", PortKind::kFLOAT_LIKE_HIDDEN, true},
    {"shared_fc2_weight", PortKind::kFLOAT_LIKE_HIDDEN, true},
    {"shared_gate_weight", PortKind::kFLOAT_LIKE_HIDDEN, true},
};

bool has(IoView const& io, int32_t i) { return i < io.nbInputs && io.present[i]; }
}  // namespace

bool MoEAttrs::resolve(std::string* err) {
  routingCode = lookup(kROUTING, 2, routingMode);
  scoringCode = lookup(kSCORING, 3, scoring);
  activationCode = lookup(kACTIVATIONS, 7, activation);
  groupScoringCode = lookup(kGROUP_SCORING, 2, groupScoring);
  if (routingCode < 0) *err = "routing_mode '" + routingMode + "' is not one of " + joined(kROUTING, 2);
  else if (scoringCode < 0) *err = "scoring '" + scoring + "' is not one of " + joined(kSCORING, 3);
  else if (activationCode < 0)
    *err = "activation '" + activation + "' is not one of " + joined(kACTIVATIONS, 7);
  else if (topK < 1) *err = "top_k must be >= 1, got " + std::to_string(topK);
  else if (numExperts < 0) *err = "num_experts must be >= 0, got " + std::to_string(numExperts);
  else if (normalize != 0 && normalize != 1) *err = "normalize must be 0 or 1";
  else if (groupScoringCode < 0)
    *err = "group_scoring '" + groupScoring + "' is not one of " + joined(kGROUP_SCORING, 2);
  else if (nGroup < 1 || topkGroup < 0 || topkGroup > nGroup)
    *err = "n_group=" + std::to_string(nGroup) + ", topk_group=" + std::to_string(topkGroup) +
           ": need n_group >= 1 and 0 <= topk_group <= n_group";
  else if (nGroup > 32)
    *err = "n_group=" + std::to_string(nGroup) + ": the CUDA kernels take at most 32 groups";
  else if (nGroup > 1 && routingCode != FFNX_ROUTING_ROUTER)
    *err = "group-limited routing (n_group > 1) needs routing_mode='router'";
  else return true;
  return false;
}

MoEPlugin::MoEPlugin(MoEAttrs attrs, int32_t nbInputs) : mAttrs(std::move(attrs)) {
  mNbInputs = nbInputs;
  mTimingCacheId = std::string(kNAME) + ":" + std::to_string(mAttrs.numExperts) + ":" +
                   std::to_string(mAttrs.topK) + ":" + mAttrs.routingMode + ":" + mAttrs.scoring +
                   ":" + std::to_string(mAttrs.normalize) + ":" + mAttrs.activation;
  if (mAttrs.activationCode == FFNX_ACT_CLAMPED_SWIGLU) {
    mTimingCacheId += ":" + std::to_string(mAttrs.activationAlpha) + ":" +
                      std::to_string(mAttrs.activationLimit);
  }
  if (mAttrs.nGroup > 1) {
    mTimingCacheId += ":" + std::to_string(mAttrs.nGroup) + ":" +
                      std::to_string(mAttrs.topkGroup) + ":" + mAttrs.groupScoring;
  }
}

/* Serialized-field buffers are not copied: they point into `other`. */
MoEPlugin::MoEPlugin(MoEPlugin const& other) : PluginBase(other), mAttrs(other.mAttrs) {}

char const* MoEPlugin::getPluginName() const noexcept { return kNAME; }

IPluginV3* MoEPlugin::clone() noexcept {
  try {
    return new MoEPlugin(*this);
  } catch (...) {
    logError(std::string(kNAME) + ": clone failed (out of memory)");
  }
  return nullptr;
}

PortSpec const* MoEPlugin::ports(int32_t* nbPorts) const noexcept {
  *nbPorts = kNB_PORTS;
  return kPORTS;
}

PluginFieldCollection const* MoEPlugin::getFieldsToSerialize() noexcept {
  try {
    auto text = [](std::string const& s) { return static_cast<int32_t>(s.size() + 1); };
    mFields = {
        PluginField("num_experts", &mAttrs.numExperts, PluginFieldType::kINT32, 1),
        PluginField("top_k", &mAttrs.topK, PluginFieldType::kINT32, 1),
        PluginField("routing_mode", mAttrs.routingMode.c_str(), PluginFieldType::kCHAR,
                    text(mAttrs.routingMode)),
        PluginField("scoring", mAttrs.scoring.c_str(), PluginFieldType::kCHAR, text(mAttrs.scoring)),
        PluginField("normalize", &mAttrs.normalize, PluginFieldType::kINT32, 1),
        PluginField("routed_scaling_factor", &mAttrs.routedScalingFactor, PluginFieldType::kFLOAT32,
                    1),
        PluginField("activation", mAttrs.activation.c_str(), PluginFieldType::kCHAR,
                    text(mAttrs.activation)),
        PluginField("n_group", &mAttrs.nGroup, PluginFieldType::kINT32, 1),
        PluginField("topk_group", &mAttrs.topkGroup, PluginFieldType::kINT32, 1),
        PluginField("group_scoring", mAttrs.groupScoring.c_str(), PluginFieldType::kCHAR,
                    text(mAttrs.groupScoring)),
        PluginField("activation_alpha", &mAttrs.activationAlpha, PluginFieldType::kFLOAT32, 1),
        PluginField("activation_limit", &mAttrs.activationLimit, PluginFieldType::kFLOAT32, 1),
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

bool MoEPlugin::parse(PluginFieldCollection const* fc, MoEAttrs* a, int32_t* nbInputs,
                      std::string* err) noexcept {
  *nbInputs = 0;
  auto visit = [&](std::string const& name, PluginField const& f) {
    int64_t v = 0;
    if (name == "num_experts") return fieldInt(f, &v) && ((a->numExperts = int32_t(v)), true);
    if (name == "top_k") return fieldInt(f, &v) && ((a->topK = int32_t(v)), true);
    if (name == "normalize") return fieldInt(f, &v) && ((a->normalize = int32_t(v)), true);
    if (name == "n_group") return fieldInt(f, &v) && ((a->nGroup = int32_t(v)), true);
    if (name == "topk_group") return fieldInt(f, &v) && ((a->topkGroup = int32_t(v)), true);
    if (name == "group_scoring") return fieldString(f, &a->groupScoring);
    if (name == "ffnx_nb_inputs") return fieldInt(f, &v) && ((*nbInputs = int32_t(v)), true);
    if (name == "routed_scaling_factor") return fieldFloat(f, &a->routedScalingFactor);
    if (name == "activation_alpha") return fieldFloat(f, &a->activationAlpha);
    if (name == "activation_limit") return fieldFloat(f, &a->activationLimit);
    if (name == "routing_mode") return fieldString(f, &a->routingMode);
    if (name == "scoring") return fieldString(f, &a->scoring);
    if (name == "activation") return fieldString(f, &a->activation);
    return true;
  };
  return readFields(fc, err, visit, [&] { return a->resolve(err); });
}

bool MoEPlugin::params(IoView const& io, ffnx_moe_params* p, std::string* err) const noexcept {
  std::memset(p, 0, sizeof(*p));
  Dims const* d = io.dims;
  if (!has(io, kFC1_W) || !has(io, kFC2_W) || d[kHIDDEN].nbDims < 1) {
    *err = "hidden, fc1_weight and fc2_weight are required";
    return false;
  }
  bool const gated = isGated(mAttrs.activationCode);
  int64_t const D = d[kHIDDEN].d[d[kHIDDEN].nbDims - 1];
  int64_t const T = leadingVolume(d[kHIDDEN]);
  int64_t const E = d[kFC1_W].nbDims == 3 ? d[kFC1_W].d[0] : -1;
  int64_t const H1 = d[kFC1_W].nbDims == 3 ? d[kFC1_W].d[1] : -1;
  int64_t const H = gated ? H1 / 2 : H1;
  if (E <= 0 || H1 <= 0 || (gated && H1 % 2 != 0) || !shapeIs(d[kFC1_W], {E, H1, D})) {
    *err = "fc1_weight " + str(d[kFC1_W]) + " must be [E, H1, D] with D = " + std::to_string(D) +
           (gated ? " and even H1 (gate; up)" : "");
    return false;
  }
  if (!shapeIs(d[kFC2_W], {E, D, H})) {
    *err = "fc2_weight " + str(d[kFC2_W]) + " must be [E, D, H] = [" + std::to_string(E) + ", " +
           std::to_string(D) + ", " + std::to_string(H) + "]";
    return false;
  }
  if (mAttrs.numExperts > 0 && mAttrs.numExperts != E) {
    *err = "num_experts=" + std::to_string(mAttrs.numExperts) + " but fc1_weight has " +
           std::to_string(E) + " experts";
    return false;
  }
  if (mAttrs.topK > E) {
    *err = "top_k=" + std::to_string(mAttrs.topK) + " exceeds " + std::to_string(E) + " experts";
    return false;
  }
  if (mAttrs.nGroup > 1) {  /* schema group_error */
    int64_t const G = E / mAttrs.nGroup, tg = mAttrs.topkGroup ? mAttrs.topkGroup : mAttrs.nGroup;
    if (E % mAttrs.nGroup != 0 || mAttrs.topK > tg * G ||
        (mAttrs.groupScoringCode == FFNX_GROUP_TOP2_SUM && G < 2)) {
      *err = "group-limited routing needs E % n_group == 0, top_k <= topk_group * E/n_group and "
             "(top2_sum) >= 2 experts per group; got E=" + std::to_string(E) + ", n_group=" +
             std::to_string(mAttrs.nGroup) + ", topk_group=" + std::to_string(mAttrs.topkGroup) +
             ", top_k=" + std::to_string(mAttrs.topK);
      return false;
    }
  }
  if ((has(io, kFC1_B) && !shapeIs(d[kFC1_B], {E, H1})) ||
      (has(io, kFC2_B) && !shapeIs(d[kFC2_B], {E, D})) ||
      (has(io, kSCORE_BIAS) && !shapeIs(d[kSCORE_BIAS], {E}))) {
    *err = "a bias does not match fc1_bias [E, H1], fc2_bias [E, D], score_bias [E]";
    return false;
  }
  if (mAttrs.routingCode == FFNX_ROUTING_ROUTER) {
    Dims const& r = d[kROUTER_LOGITS];
    if (!has(io, kROUTER_LOGITS) || r.d[r.nbDims - 1] != E ||
        (T >= 0 && leadingVolume(r) >= 0 && leadingVolume(r) != T)) {
      *err = "routing_mode='router' needs router_logits [*, E] with one row per token";
      return false;
    }
  } else if (!has(io, kTOKEN_IDS) || !has(io, kHASH_TABLE) ||
             !shapeIs(d[kHASH_TABLE], {-1, mAttrs.topK}) ||
             (T >= 0 && volume(d[kTOKEN_IDS]) >= 0 && volume(d[kTOKEN_IDS]) != T)) {
    *err = "routing_mode='hash' needs token_ids [*] (one per token) and hash_table [V, top_k]";
    return false;
  }
  int64_t Hs = 0;
  if (has(io, kSHARED_FC1_W) != has(io, kSHARED_FC2_W)) {
    *err = "shared_fc1_weight and shared_fc2_weight come together";
    return false;
  }
  if (has(io, kSHARED_FC2_W)) {
    Hs = d[kSHARED_FC2_W].nbDims == 2 ? d[kSHARED_FC2_W].d[1] : -1;
    if (!shapeIs(d[kSHARED_FC2_W], {D, Hs}) ||
        !shapeIs(d[kSHARED_FC1_W], {gated ? 2 * Hs : Hs, D})) {
      *err = "shared experts must be shared_fc1_weight [Hs1, D], shared_fc2_weight [D, Hs]";
      return false;
    }
  }
  if (has(io, kSHARED_GATE_W) && (Hs == 0 || !shapeIs(d[kSHARED_GATE_W], {1, D}))) {
    *err = "shared_gate_weight [1, D] needs shared experts";
    return false;
  }
  if (!toKernelDtype(io.type, &p->dtype)) {
    *err = "hidden must be float32, float16 or bfloat16";
    return false;
  }
  p->num_tokens = T;
  p->hidden = D;
  p->inter = H;
  p->num_experts = E;
  p->top_k = mAttrs.topK;
  p->shared_inter = Hs;
  p->routing_mode = mAttrs.routingCode;
  p->scoring = mAttrs.scoringCode;
  p->normalize = mAttrs.normalize;
  p->activation = mAttrs.activationCode;
  p->routed_scaling_factor = mAttrs.routedScalingFactor;
  p->has_fc1_bias = has(io, kFC1_B);
  p->has_fc2_bias = has(io, kFC2_B);
  p->has_score_bias = has(io, kSCORE_BIAS);
  p->has_shared_gate = has(io, kSHARED_GATE_W);
  p->n_group = mAttrs.nGroup;
  p->topk_group = mAttrs.topkGroup;
  p->group_scoring = mAttrs.groupScoringCode;
  p->activation_alpha = mAttrs.activationAlpha;
  p->activation_limit = mAttrs.activationLimit;
  return true;
}

bool MoEPlugin::workspaceFor(IoView const& io, size_t* bytes, std::string* err) const noexcept {
  ffnx_moe_params p;
  if (!params(io, &p, err)) return false;
  *bytes = ffnx_moe_workspace_size(&p);
  return true;
}

int32_t MoEPlugin::launch(IoView const& io, void const* const* in, void* output, void* workspace,
                          void* stream) noexcept {
  ffnx_moe_params p;
  std::string err;
  if (!params(io, &p, &err)) {
    logError(std::string(kNAME) + ": " + err);
    return FFNX_ERR_INVALID_ARGUMENT;
  }
  auto at = [&](int32_t i) -> void const* { return has(io, i) ? in[i] : nullptr; };
  ffnx_moe_tensors t{};
  t.hidden = in[kHIDDEN];
  t.router_logits = at(kROUTER_LOGITS);
  t.fc1_weight = in[kFC1_W];
  t.fc1_bias = at(kFC1_B);
  t.fc2_weight = in[kFC2_W];
  t.fc2_bias = at(kFC2_B);
  t.score_bias = static_cast<float const*>(at(kSCORE_BIAS));
  t.token_ids = static_cast<int64_t const*>(at(kTOKEN_IDS));
  t.hash_table = static_cast<int64_t const*>(at(kHASH_TABLE));
  t.shared_fc1_weight = at(kSHARED_FC1_W);
  t.shared_fc2_weight = at(kSHARED_FC2_W);
  t.shared_gate_weight = at(kSHARED_GATE_W);
  t.output = output;
  /* TensorRT allocated getWorkspaceSize() for the profile's max shapes; the kernels need no
   * more for fewer tokens (ffnx_kernels.h contract). */
  size_t const bytes = ffnx_moe_workspace_size(&p);
  int const status = ffnx_moe_launch(&p, &t, workspace, bytes, stream);
  if (status != FFNX_OK) {
    logError(std::string(kNAME) + ": ffnx_moe_launch: " + ffnx_status_string(status));
  }
  return status;
}

MoECreator::MoECreator() {
  mFields = {
      PluginField("num_experts", nullptr, PluginFieldType::kINT32, 1),
      PluginField("top_k", nullptr, PluginFieldType::kINT32, 1),
      PluginField("routing_mode", nullptr, PluginFieldType::kCHAR, 0),
      PluginField("scoring", nullptr, PluginFieldType::kCHAR, 0),
      PluginField("normalize", nullptr, PluginFieldType::kINT32, 1),
      PluginField("routed_scaling_factor", nullptr, PluginFieldType::kFLOAT32, 1),
      PluginField("activation", nullptr, PluginFieldType::kCHAR, 0),
      PluginField("n_group", nullptr, PluginFieldType::kINT32, 1),
      PluginField("topk_group", nullptr, PluginFieldType::kINT32, 1),
      PluginField("group_scoring", nullptr, PluginFieldType::kCHAR, 0),
      PluginField("activation_alpha", nullptr, PluginFieldType::kFLOAT32, 1),
      PluginField("activation_limit", nullptr, PluginFieldType::kFLOAT32, 1),
  };
  mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
  mFieldCollection.fields = mFields.data();
}

char const* MoECreator::getPluginName() const noexcept { return kNAME; }

IPluginV3* MoECreator::createPlugin(char const* name, PluginFieldCollection const* fc,
                                    TensorRTPhase /*phase*/) noexcept {
  try {
    MoEAttrs attrs;
    int32_t nbInputs = 0;
    std::string err;
    if (!MoEPlugin::parse(fc, &attrs, &nbInputs, &err)) {
      logError(std::string(kNAME) + " node '" + (name ? name : "") + "': " + err);
      return nullptr;
    }
    return new MoEPlugin(std::move(attrs), nbInputs);
  } catch (...) {
    logError(std::string(kNAME) + ": out of memory creating the plugin");
  }
  return nullptr;
}

}  // namespace trt
}  // namespace ffnx
