# One image for both roles: `llmadapter serve` (the Deployment in deploy/kubernetes, the KServe runtime)
# and Prefect flow runs (the Kubernetes work pool's job template in deploy/prefect), which run flows/
# and tasks/ from /opt/llmadapter, the image's working directory.
#
#   docker build -t registry.example.com/llmadapter:0.1.0 .
#   docker run --rm -p 8080:8080 -e MLFLOW_TRACKING_URI=http://mlflow:5000 \
#       registry.example.com/llmadapter:0.1.0 llmadapter serve models:/chat-model@champion --host 0.0.0.0
FROM python:3.11-slim-bookworm

# tini as PID 1 forwards SIGTERM to the server (which drains, then exits 0) and reaps the validation
# workers a flow run starts.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.* \
    && rm -rf /var/lib/apt/lists/*

# The CPU build of torch first, from PyTorch's own index (PyPI's default wheel pulls CUDA, ~3 GB more).
# For a GPU image, drop --index-url (or use a CUDA index) and build on a CUDA base.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/llmadapter
COPY pyproject.toml README.md ./
COPY llmadapter ./llmadapter
# prefect-kubernetes: the worker of a Kubernetes work pool runs from this image too.
ARG PREFECT_KUBERNETES_VERSION=0.8.0
# DL3013 counts "." (this project, from source) as an unpinned package; its dependencies' ranges are
# in pyproject.toml. Pin them exactly with a constraints file (pip install -c) if you need that.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[embeddings]" "prefect-kubernetes==${PREFECT_KUBERNETES_VERSION}"
COPY flows ./flows
COPY tasks ./tasks
COPY prefect.yaml ./

# Not root. The data dir (SQLite store, caches) and HF_HOME are the writable places; mount volumes
# there (the manifests mount emptyDirs, so the root filesystem can be read-only).
RUN useradd --system --uid 10001 --home-dir /var/lib/llmadapter --create-home llmadapter
USER 10001
# DL3064 reads "TOKEN" in TOKENIZERS_PARALLELISM; nothing here is a secret (those come from Secrets).
# hadolint ignore=DL3064
ENV LLMADAPTER_DATA_DIR=/var/lib/llmadapter \
    HF_HOME=/var/lib/llmadapter/hf \
    PYTHONUNBUFFERED=1 \
    DO_NOT_TRACK=1 \
    TOKENIZERS_PARALLELISM=false \
    LLMADAPTER_HOST=0.0.0.0 \
    LLMADAPTER_PORT=8080
EXPOSE 8080

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["llmadapter", "serve", "--help"]
