/* FfnxSparseFFN as a TensorRT IPluginV3 (schema: ffnx/plugins/schema.py SPARSE_FFN). */
#ifndef FFNX_SPARSE_FFN_PLUGIN_H
#define FFNX_SPARSE_FFN_PLUGIN_H

#include "ffnx_plugin_common.h"

namespace ffnx {
namespace trt {

struct SparseFFNAttrs {
  std::string mode{"threshold"};
  int32_t k{0};
  std::string activation{"relu"};
  int32_t modeCode{FFNX_SPARSE_THRESHOLD};
  int32_t activationCode{FFNX_ACT_RELU};

  bool resolve(std::string* err);
};

class SparseFFNPlugin final : public PluginBase {
 public:
  SparseFFNPlugin(SparseFFNAttrs attrs, int32_t nbInputs);
  SparseFFNPlugin(SparseFFNPlugin const& other);
  SparseFFNPlugin& operator=(SparseFFNPlugin const&) = delete;
  ~SparseFFNPlugin() override = default;

  char const* getPluginName() const noexcept override;
  IPluginV3* clone() noexcept override;
  PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  static bool parse(PluginFieldCollection const* fc, SparseFFNAttrs* attrs, int32_t* nbInputs,
                    std::string* err) noexcept;

 protected:
  PortSpec const* ports(int32_t* nbPorts) const noexcept override;
  bool workspaceFor(IoView const& io, size_t* bytes, std::string* err) const noexcept override;
  int32_t launch(IoView const& io, void const* const* inputs, void* output, void* workspace,
                 void* stream) noexcept override;

 private:
  bool params(IoView const& io, ffnx_sparse_ffn_params* p, std::string* err) const noexcept;

  SparseFFNAttrs mAttrs;
  std::vector<PluginField> mFields;
  PluginFieldCollection mFieldCollection{};
};

class SparseFFNCreator final : public IPluginCreatorV3One {
 public:
  SparseFFNCreator();
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

#endif  // FFNX_SPARSE_FFN_PLUGIN_H
