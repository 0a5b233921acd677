# syntax=docker/dockerfile:1
# aidc trainer: docker build -f docker/trainer.Dockerfile -t ghcr.io/aidc-dev/aidc-trainer:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Default: PyPI's Linux wheels (CUDA runtime bundled). CPU only: https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/requirements/trainer.txt /tmp/requirements.txt
RUN python -m venv /opt/aidc \
 && /opt/aidc/bin/pip install --no-compile --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple \
      -r /tmp/requirements.txt

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="aidc-trainer" \
      org.opencontainers.image.source="https://github.com/aidc-dev/aidc" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/aidc/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
COPY --from=build /opt/aidc /opt/aidc
COPY trainer/aidc_trainer /app/aidc_trainer
# uid/gid 1000: what the operator renders (runAsUser/fsGroup 1000), so checkpoints stay writable.
USER 1000:1000
WORKDIR /tmp
# The operator sets the command (torchrun … -m aidc_trainer …); this default runs the built-in example.
CMD ["python", "-m", "aidc_trainer", "--example", "mlp"]
