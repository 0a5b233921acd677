# syntax=docker/dockerfile:1
# aidc model server: docker build -f docker/server.Dockerfile -t ghcr.io/aidc-dev/aidc-server:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/requirements/server.txt /tmp/requirements.txt
RUN python -m venv /opt/aidc \
 && /opt/aidc/bin/pip install --no-compile --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple \
      -r /tmp/requirements.txt

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="aidc-server" \
      org.opencontainers.image.source="https://github.com/aidc-dev/aidc" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/aidc/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
COPY --from=build /opt/aidc /opt/aidc
# The server reads checkpoints with aidc_trainer.checkpoint (docs/contracts.md).
COPY trainer/aidc_trainer /app/aidc_trainer
COPY server/aidc_server /app/aidc_server
USER 1000:1000
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["python", "-m", "aidc_server"]
