"""Subprocess helper: parse an ONNX file with TensorRT-RTX and the ffnx plugins.

argv: plugin library, onnx file. Prints PARSED <ok> and the parser errors; a crash (abort)
shows as a negative return code in the calling test instead of killing pytest."""

import sys

from ffnx.build import flavour

trt = flavour.import_tensorrt("rtx")
logger = trt.Logger(trt.Logger.WARNING)
assert trt.get_plugin_registry().load_library(sys.argv[1]) is not None
network = trt.Builder(logger).create_network(0)
parser = trt.OnnxParser(network, logger)
ok = parser.parse_from_file(sys.argv[2])
print("PARSED", ok)
for i in range(parser.num_errors):
    print("ERROR", parser.get_error(i).desc())
