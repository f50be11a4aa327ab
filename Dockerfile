# The sidecar as a container next to a model server.
# Build: docker build -t sidecar .   Run: mount a config at /etc/sidecar/sidecar.yaml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid sidecar --no-create-home --shell /usr/sbin/nologin sidecar

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY config ./config
# The same install as the README's: pip installs the package from this source tree.
# The deployment's config is mounted at /etc/sidecar/sidecar.yaml (a ConfigMap).
RUN pip install --no-cache-dir . \
    && rm -rf /src

WORKDIR /
USER 10001:10001
EXPOSE 8080 9901

HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/livez', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["sidecar", "run", "--config", "/etc/sidecar/sidecar.yaml"]
