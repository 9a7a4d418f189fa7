# syntax=docker/dockerfile:1
# lungopacity web service: CPU-only PyTorch, runs as a non-root user, reads the model
# bundle from a mounted volume. See README.md, "Running as a container".
#
#   docker build -t lungopacity .
#   docker run --rm -p 8000:8000 -v "$PWD/demo-run/model:/models/bundle:ro" \
#       -e LUNGOPACITY_TOKEN=change-me lungopacity
#
# The base image is pinned to an exact Python release. To pin it by digest as well, replace
# both FROM lines with python:3.12.8-slim-bookworm@sha256:<digest> (the digest from
# `docker buildx imagetools inspect python:3.12.8-slim-bookworm`); tests/test_dockerfile.py
# accepts either form, and refuses floating tags (3.12-slim, latest).

# ---------------------------------------------------------------- builder: the wheel
FROM python:3.12.8-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- runtime: the service
FROM python:3.12.8-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# CPU wheels of torch and torchvision first (the default PyPI wheels pull ~3 GB of CUDA
# libraries a CPU server never uses); installing lungopacity afterwards keeps them, as
# they already satisfy its torch>=2.5 / torchvision>=0.20.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url ${TORCH_INDEX_URL} "torch>=2.5" "torchvision>=0.20"
COPY --from=builder /wheels /wheels
RUN pip install "$(ls /wheels/lungopacity-*.whl)[service]" \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 lungopacity \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/lungopacity lungopacity \
    && mkdir -p /models \
    && chown lungopacity:lungopacity /models

ENV LUNGOPACITY_BUNDLE=/models/bundle \
    LUNGOPACITY_PORT=8000
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/lungopacity
EXPOSE 8000

# /healthz answers as soon as the process listens (the bundle loads in the background;
# /readyz says when predictions can be served). No curl in the slim image: Python's urllib.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LUNGOPACITY_PORT', '8000'), timeout=4)"]

# exec: the server is PID 1 and gets docker's SIGTERM. Arguments after the image name
# (docker run ... lungopacity --concurrency 4) are appended to `lungopacity serve`.
ENTRYPOINT ["sh", "-c", "exec lungopacity serve --host 0.0.0.0 --port \"$LUNGOPACITY_PORT\" --bundle \"$LUNGOPACITY_BUNDLE\" \"$@\"", "--"]
