# Prometheus from Debian's package (no registry image needed); the config is mounted by compose.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/*
USER nobody
ENTRYPOINT ["prometheus"]
