# GPU image for metaloss: CUDA 13.0 base + Ubuntu 24.04's own Python 3.12 (+ its -dev headers and gcc: Triton
# compiles kernels for model.compile at run time; DeepSpeed JIT-builds its ops) + the pins from requirements.txt.
# torch and DALI come from PyPI with their CUDA 13 libraries as wheels; the base image only has to match the host
# driver: CUDA 13.0 needs an NVIDIA driver >= 580 on the host (and the NVIDIA Container Toolkit: docker run --gpus all).
# Python 3.12 is also what ../shared/gpu/dali_wheels.sh fetches (cp312) for hosts without a registry.
# Check without building (registry + COPY paths): python launch/check_image.py
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG PYTHON=3.12
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python${PYTHON} python${PYTHON}-venv \
        python${PYTHON}-dev gcc g++ make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/metaloss
COPY requirements.txt pyproject.toml README.md ./
# deepspeed is published as source only and its build imports torch: everything else first (binary wheels), then
# deepspeed without build isolation so it sees that torch (DS_BUILD_OPS=0: ops are JIT-built when first used)
RUN python${PYTHON} -m venv /opt/venv \
    && grep -v '^deepspeed==' requirements.txt > /tmp/requirements-binary.txt \
    && /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements-binary.txt \
    && /opt/venv/bin/pip install --no-build-isolation "$(grep '^deepspeed==' requirements.txt)"
ENV PATH=/opt/venv/bin:$PATH
COPY common common
COPY trainer trainer
COPY data_pipeline data_pipeline
COPY launch launch
COPY configs configs
RUN pip install --no-deps --no-build-isolation -e .
ENTRYPOINT ["metaloss"]
