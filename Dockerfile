# syntax=docker/dockerfile:1
# speciesclf HTTP service image (CPU). See docs/deploy.md. Not built in this repository's CI: no container
# engine runs there.

# --- builder: compile the native core into a portable wheel --------------------------------------------
FROM python:3.11-slim-bookworm AS builder
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config libjpeg62-turbo-dev libspng-dev libwebp-dev \
 && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir "cmake>=3.24" ninja "scikit-build-core>=0.10" "pybind11>=2.12" build
WORKDIR /src
COPY pyproject.toml CMakeLists.txt README.md ./
COPY csrc ./csrc
COPY python ./python
# OFF: no -march=native, so the wheel runs on any x86-64 host, not just the build machine's CPU.
ENV SPECIESCLF_NATIVE_ARCH=OFF SPECIESCLF_CUDA=off
RUN python -m build --wheel --no-isolation --outdir /wheels .

# --- runtime -------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libjpeg62-turbo libspng0 libwebp7 \
 && rm -rf /var/lib/apt/lists/*
# The CPU build of torch first, from PyTorch's own index (the default PyPI wheel pulls in CUDA).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/speciesclf-*.whl)[onnx,serve]" && rm -rf /wheels

RUN useradd --system --uid 10001 --create-home --home-dir /home/speciesclf speciesclf \
 && mkdir -p /models && chown speciesclf /models
# Model weights: mount them at /models (e.g. a read-only volume: -v /srv/models:/models:ro), or bake
# them in with `COPY models/ /models/` in a derived image. Without them the built-in models are
# downloaded once into $SPECIESCLF_HOME at first start, which needs network access.
ENV SPECIESCLF_WEIGHTS=/models \
    SPECIESCLF_HOME=/home/speciesclf/.speciesclf \
    PYTHONUNBUFFERED=1
USER speciesclf
WORKDIR /home/speciesclf

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
# Plain SIGTERM handling: uvicorn stops accepting connections and drains accepted work (docs/deploy.md).
STOPSIGNAL SIGTERM
CMD ["speciesclf", "serve", "--model", "species100", "--host", "0.0.0.0", "--port", "8000"]
