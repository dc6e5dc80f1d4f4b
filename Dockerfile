# mmdemo on a CUDA machine:
#   docker build -t mmdemo .
#   docker run --gpus all -p 7860:7860 -v mmdemo-data:/data mmdemo
# Configuration by MMDEMO_* variables (docker run -e MMDEMO_PROFILE=tiny -e MMDEMO_AUTH_FILE=/data/auth.toml ...).
# The install line is the one CI runs: pip install -r requirements.txt (torch==2.13.0 from PyPI is the
# CUDA build on Linux x86_64 and brings its own CUDA libraries; the host needs a recent NVIDIA driver).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 (deadsnakes), in a virtual environment owned by nobody but root.
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common ca-certificates \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y software-properties-common && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml requirements.txt README.md ./
COPY mmdemo ./mmdemo
RUN pip install -r requirements.txt
COPY app.py ./
COPY assets ./assets

RUN useradd --create-home --uid 1000 mmdemo \
    && mkdir -p /data && chown mmdemo:mmdemo /data
USER mmdemo

# Everything mmdemo writes (and the Hub's model cache) lives in the volume.
ENV MMDEMO_DATA_DIR=/data \
    HF_HOME=/data/huggingface \
    MMDEMO_HOST=0.0.0.0 \
    MMDEMO_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1
VOLUME /data
EXPOSE 7860

HEALTHCHECK --interval=30s --timeout=10s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/livez', timeout=8)"

CMD ["python", "app.py"]
