# ffnx server image: TensorRT + ONNX Runtime + ffnx with the TensorRT plugin library built in.
#
#   docker build -t ffnx:trt .
#   docker run --gpus all --rm -v $PWD/artifacts:/artifacts ffnx:trt \
#       ffnx build /artifacts/mixtral-tiny --precision fp16
#
# The base image pins TensorRT (headers, libraries, Python bindings, trtexec) and CUDA; the
# tag -> TensorRT version table is in NVIDIA's "TensorRT Container Release Notes". Override
# with --build-arg TRT_IMAGE=nvcr.io/nvidia/tensorrt:<yy.mm>-py3. Plans are tied to the
# TensorRT version and GPU they were built with: build them inside the image you deploy.
ARG TRT_IMAGE=nvcr.io/nvidia/tensorrt:25.10-py3
FROM ${TRT_IMAGE}

# Ampere (80, 86), Ada (89), Hopper (90). Add 87 only for Orin, which uses docker/Dockerfile.jetson.
ARG CUDA_ARCHS="80;86;89;90"
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FFNX_PLUGIN_LIBRARY=/opt/ffnx/lib/libffnx_trt_plugins.so

WORKDIR /opt/ffnx/src
COPY pyproject.toml README.md ./
COPY ffnx ./ffnx

# onnxruntime-gpu, not onnxruntime: the two share files and break each other, so the CPU wheel
# that ffnx's base requirements pull in is removed and the GPU wheel reinstalled cleanly. torch
# stays out: serving needs none, and `ffnx export` users bring their own CUDA build of torch.
RUN python3 -m pip install --upgrade pip cmake \
 && python3 -m pip install ".[gpu]" "onnx>=1.16" "onnx-graphsurgeon>=0.5" \
 && ORT_GPU="$(python3 -m pip show onnxruntime-gpu | sed -n 's/^Version: //p')" \
 && python3 -m pip uninstall -y onnxruntime onnxruntime-gpu \
 && python3 -m pip install "onnxruntime-gpu==${ORT_GPU}"

# The plugin library: trt/*.cpp + cuda/*.cu against the image's TensorRT headers. The check at
# the end loads it into TensorRT's plugin registry (no GPU needed) and fails the build if the
# ffnx creators do not register.
RUN cmake -S ffnx/plugins -B /tmp/plugins -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS}" -DCMAKE_INSTALL_LIBDIR=lib \
 && cmake --build /tmp/plugins -j"$(nproc)" \
 && cmake --install /tmp/plugins --prefix /opt/ffnx \
 && rm -rf /tmp/plugins \
 && python3 -c "import tensorrt as t, ffnx.plugins.trt_build as b; print('TensorRT', t.__version__, b.load_plugin_library(t))"

WORKDIR /workspace
CMD ["ffnx", "--help"]
