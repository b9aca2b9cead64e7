# syntax=docker/dockerfile:1
# One image runs every part of telerad: `telerad operator`, `telerad gateway`,
# `telerad worker` (the entrypoint is `telerad`).
#   docker build -t telerad .                  CPU workers, gateways, the operator
#   docker build --target cuda -t telerad:cuda .   GPU workers: ONNX Runtime with CUDA 12
# The base images are build arguments so that a build with no registry at hand can bring
# its own: `make image` (hack/image.sh) builds this file unchanged with buildah, passing a
# Python 3.11 base made from Debian packages and a uv image holding PyPI's uv binary of
# the same version. A normal Docker build pulls the images named here.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV=/usr/local/bin/uv UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY hack/install-wheel.sh hack/
COPY telerad telerad
RUN hack/install-wheel.sh /opt/telerad

# The CUDA build of ONNX Runtime, with NVIDIA's CUDA and cuDNN runtime libraries as
# wheels (its [cuda,cudnn] extras); the driver comes from the node (NVIDIA container
# toolkit). It replaces the CPU build, which shares its module name.
FROM build AS build-cuda
RUN onnxruntime="$(/opt/telerad/bin/python -c 'import importlib.metadata as m; print(m.version("onnxruntime"))')" \
    && uv pip uninstall --python /opt/telerad/bin/python onnxruntime \
    && uv pip install --python /opt/telerad/bin/python "onnxruntime-gpu[cuda,cudnn]==${onnxruntime}"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 telerad \
    && useradd --system --uid 10001 --gid telerad --no-create-home --shell /usr/sbin/nologin telerad
COPY --from=build /opt/telerad /opt/telerad
ENV PATH=/opt/telerad/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The manifests run it with a read-only root filesystem and an emptyDir at /tmp.
USER 10001:10001
ENTRYPOINT ["telerad"]
CMD ["--help"]

FROM runtime AS cuda
COPY --from=build-cuda /opt/telerad /opt/telerad

FROM runtime
