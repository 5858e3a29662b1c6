"""The ffnx ops in ONNX's schema registry, from `ffnx.plugins.schema`: `onnx.checker` then
validates ffnx nodes' inputs and attributes and `onnx.shape_inference` types their outputs."""

from __future__ import annotations

from ffnx.plugins import schema

_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)",
               "bfloat16": "tensor(bfloat16)", "int64": "tensor(int64)"}  # fmt: skip


def _onnx_schema(s: schema.OpSchema):
    import onnx
    from onnx.defs import OpSchema

    float_set = set(schema.FLOAT)
    opt = OpSchema.FormalParameterOption

    def param(p: schema.Port):
        type_str = "T" if set(p.dtypes) == float_set else _ONNX_TYPES[p.dtypes[0]]
        return OpSchema.FormalParameter(
            p.name, type_str, p.doc, param_option=opt.Optional if p.optional else opt.Single
        )

    def attr(a: schema.Attr):
        default = {"int": int, "float": float, "string": str}[a.kind](a.default)
        return OpSchema.Attribute(a.name, onnx.helper.make_attribute(a.name, default), a.doc)

    out = OpSchema(
        s.op_type,
        schema.DOMAIN,
        schema.DOMAIN_VERSION,
        s.doc,
        inputs=[param(p) for p in s.inputs],
        outputs=[param(p) for p in s.outputs],
        type_constraints=[("T", [_ONNX_TYPES[d] for d in schema.FLOAT], "float types")],
        attributes=[attr(a) for a in s.attributes],
    )
    out.set_type_and_shape_inference_function(_same_as_hidden)
    return out


def _same_as_hidden(ctx) -> None:
    """Output 0 has hidden's (input 0) type and shape: every ffnx op maps [*, D] -> [*, D]."""
    ctx.set_output_type(0, ctx.get_input_type(0))


def register_onnx_schemas() -> None:
    """Register every ffnx op schema with onnx (idempotent), so `onnx.checker` validates ffnx
    nodes' inputs/attributes and `onnx.shape_inference` types their outputs."""
    import onnx.defs

    for s in schema.OPS.values():
        if not onnx.defs.has(s.op_type, schema.DOMAIN):
            onnx.defs.register_schema(_onnx_schema(s))
