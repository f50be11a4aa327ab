# The sidecar as a container next to a model server.
#
#   docker build -t sidecar .
#   docker run -p 8080:8080 -e SIDECAR_UPSTREAM_URL=http://model:8000 sidecar
#
# With no config mounted it runs config/minimal.yaml, set by environment variables
# (SIDECAR_UPSTREAM_URL, SIDECAR_UPSTREAM_HEALTH_PATH, SIDECAR_PORT, ...; see that
# file). For your own config mount a directory at /etc/sidecar (relative schema and
# baseline paths then resolve inside it) and point SIDECAR_CONFIG at the file.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml

RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid sidecar --no-create-home --shell /usr/sbin/nologin sidecar

WORKDIR /src
COPY pyproject.toml README.md hatch_build.py build_native.py ./
COPY sidecar ./sidecar
COPY config ./config
# The README's install, plus the redis extra a config's shared_state needs. The wheel
# compiles the request path with mypyc, so a C compiler is installed for the build and
# removed after it. Log files a config names go under /var/log/sidecar, which the
# unprivileged user may write.
# DL3008 and DL3013 ask to pin packages: the compiler is the distribution's, and this
# installs the local source tree.
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir ".[redis]" \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* /src \
    && mkdir -p /etc/sidecar /var/log/sidecar \
    && chown 10001:10001 /var/log/sidecar
COPY config/minimal.yaml /etc/sidecar/sidecar.yaml

WORKDIR /
USER 10001:10001
EXPOSE 8080 9901

# Follows the configured port: `sidecar healthcheck` reads it from $SIDECAR_CONFIG.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["sidecar", "healthcheck"]

ENTRYPOINT ["sidecar", "run"]
CMD ["--workers", "auto"]
