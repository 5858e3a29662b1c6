import subprocess
import sys


def test_runtime_import_loads_no_torch_onnx_or_graphsurgeon():
    code = (
        "import sys, ffnx.runtime, ffnx.runtime.engine, ffnx.runtime.backends.ort; "
        "heavy = [m for m in ('torch', 'onnx', 'onnx_graphsurgeon', 'onnxscript', 'tensorrt') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_trt_backend_module_imports_without_tensorrt():
    code = (
        "import sys, importlib.util\n"
        "if importlib.util.find_spec('ffnx.runtime.backends.trt') is None: raise SystemExit(0)\n"
        "import ffnx.runtime.backends.trt\n"
        "print(','.join(m for m in ('torch', 'onnx', 'tensorrt') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
