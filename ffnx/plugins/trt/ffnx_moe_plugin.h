/* FfnxMoE as a TensorRT IPluginV3 (schema: ffnx/plugins/schema.py MOE). */
#ifndef FFNX_MOE_PLUGIN_H
#define FFNX_MOE_PLUGIN_H

#include "ffnx_plugin_common.h"

namespace ffnx {
namespace trt {

struct MoEAttrs {
  int32_t numExperts{0};
  int32_t topK{2};
  std::string routingMode{"router"};
  std::string scoring{"softmax"};
  int32_t normalize{0};
  float routedScalingFactor{1.0F};
  std::string activation{"swiglu"};
  int32_t nGroup{1};     /* group-limited routing when > 1 */
  int32_t topkGroup{0};  /* 0: all groups */
  std::string groupScoring{"top2_sum"};
  float activationAlpha{1.702F}; /* clamped_swiglu (schema activation_alpha / activation_limit) */
  float activationLimit{7.0F};
  /* codes of the strings above (ffnx_kernels.h enums), set by resolve() */
  int32_t routingCode{FFNX_ROUTING_ROUTER};
  int32_t scoringCode{FFNX_SCORING_SOFTMAX};
  int32_t activationCode{FFNX_ACT_SWIGLU};
  int32_t groupScoringCode{FFNX_GROUP_TOP2_SUM};

  bool resolve(std::string* err);
};

class MoEPlugin final : public PluginBase {
 public:
  MoEPlugin(MoEAttrs attrs, int32_t nbInputs);
  MoEPlugin(MoEPlugin const& other);
  MoEPlugin& operator=(MoEPlugin const&) = delete;
  ~MoEPlugin() override = default;

  char const* getPluginName() const noexcept override;
  IPluginV3* clone() noexcept override;
  PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  /* Attributes from plugin fields (parser attributes or deserialized fields). */
  static bool parse(PluginFieldCollection const* fc, MoEAttrs* attrs, int32_t* nbInputs,
                    std::string* err) noexcept;

 protected:
  PortSpec const* ports(int32_t* nbPorts) const noexcept override;
  bool workspaceFor(IoView const& io, size_t* bytes, std::string* err) const noexcept override;
  int32_t launch(IoView const& io, void const* const* inputs, void* output, void* workspace,
                 void* stream) noexcept override;

 private:
  bool params(IoView const& io, ffnx_moe_params* p, std::string* err) const noexcept;

  MoEAttrs mAttrs;
  std::vector<PluginField> mFields;
  PluginFieldCollection mFieldCollection{};
};

class MoECreator final : public IPluginCreatorV3One {
 public:
  MoECreator();
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override { return kPLUGIN_VERSION; }
  char const* getPluginNamespace() const noexcept override { return kPLUGIN_NAMESPACE; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
  IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc,
                          TensorRTPhase phase) noexcept override;

 private:
  std::vector<PluginField> mFields;
  PluginFieldCollection mFieldCollection{};
};

}  // namespace trt
}  // namespace ffnx

#endif  // FFNX_MOE_PLUGIN_H
