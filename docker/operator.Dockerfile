# syntax=docker/dockerfile:1
# aidc operator: docker build -f docker/operator.Dockerfile -t ghcr.io/aidc-dev/aidc-operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/requirements/operator.txt /tmp/requirements.txt
RUN python -m venv /opt/aidc && /opt/aidc/bin/pip install --no-compile -r /tmp/requirements.txt

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="aidc-operator" \
      org.opencontainers.image.source="https://github.com/aidc-dev/aidc" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/aidc/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/aidc /opt/aidc
COPY operator/aidc_operator /app/aidc_operator
# 65532: the chart's runAsUser; no home, no shell login, nothing writable but the mounted /tmp.
USER 65532:65532
EXPOSE 8000 8080 9443
ENTRYPOINT ["python", "-m", "aidc_operator"]
