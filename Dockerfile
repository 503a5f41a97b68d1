# GPU image for metaloss: CUDA 13 runtime + the pinned Python stack (DALI for CUDA 13).
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip g++ make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/metaloss
COPY requirements.txt pyproject.toml README.md ./
RUN python3.11 -m venv /opt/venv && /opt/venv/bin/pip install -r requirements.txt
ENV PATH=/opt/venv/bin:$PATH
COPY common common
COPY trainer trainer
COPY data_pipeline data_pipeline
COPY launch launch
COPY configs configs
RUN pip install --no-deps --no-build-isolation -e .
ENTRYPOINT ["metaloss"]
