# syntax=docker/dockerfile:1.7
# One Dockerfile, two runtime images:
#   --target slim : operator and router (no torch, no CUDA)
#   --target cuda : agent and engine (CUDA runtime, torch, triton, cuda-bindings)
# Every component starts as `kvmarina <component>`; the operator picks the command.

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

# ---- build the wheel once ----------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS wheel
WORKDIR /src
RUN pip install --no-cache-dir "build==1.2.2.post1"
COPY pyproject.toml README.md ./
COPY core core
COPY operator operator
COPY agent agent
COPY connector connector
COPY engine engine
COPY router router
COPY kernels kernels
COPY local local
RUN python -m build --wheel --outdir /dist

# ---- slim: operator, router --------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# The operator makes each pool's mutual-TLS CA and certificate with the openssl CLI
# (operator/pki.py); named here rather than relied on as a dependency of the base.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /dist /dist
# The base install: what the operator and the router import (no torch, no CUDA).
RUN pip install --no-cache-dir /dist/*.whl \
 && rm -rf /dist
USER 65532:65532
ENTRYPOINT ["kvmarina"]

# ---- cuda: agent, engine -----------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/kvmarina
ENV PATH=/opt/kvmarina/bin:$PATH
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir "torch==2.13.0" \
 && pip install --no-cache-dir "/dist/$(ls /dist)[all,gpu]" \
 && rm -rf /dist
USER 65532:65532
ENTRYPOINT ["kvmarina"]
