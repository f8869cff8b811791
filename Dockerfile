# commandnet's images: `worker` (the default target: `commandnet worker`, no graph code — add
# yours on top, see examples/custom-worker/) and `operator` (`commandnet-operator`).
#
#   docker build --target worker   -t commandnet-worker:0.1.0 .
#   docker build --target operator -t commandnet-operator:0.1.0 .
#
# BASE is any Debian-like image with python3 (3.11+) on PATH and a working `python3 -m venv`.
# Users get the official slim image; `make images` (e2e/testbed/images.py) builds this same file
# with buildah from a Debian root made locally (`--build-arg BASE=localhost/commandnet-base:bookworm`).
# Every stage starts from BASE, so the venv's interpreter link is valid in the final stages.
ARG BASE=python:3.11-slim-bookworm

# --- build: the project's wheel, then one venv per target ---------------------------------------
# Dependencies are installed from wheels only (nothing compiled), except nkeys: pure Python,
# published as an sdist only, so pip builds its wheel here, in the build stage.
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY commandnet/ commandnet/
COPY operator/commandnet_operator/ operator/commandnet_operator/
# The wheel needs setuptools (pyproject's build-system), fetched into pip's isolated build env.
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --quiet --no-deps --wheel-dir /wheels . \
 && ls /wheels

FROM build AS venv-worker
RUN python3 -m venv /opt/commandnet \
 && wheel="$(echo /wheels/commandnet-*.whl)" \
 && /opt/commandnet/bin/pip install --quiet --only-binary=:all: --no-binary=nkeys "${wheel}[worker]" \
 && /opt/commandnet/bin/pip uninstall --quiet -y setuptools

FROM build AS venv-operator
RUN python3 -m venv /opt/commandnet \
 && wheel="$(echo /wheels/commandnet-*.whl)" \
 && /opt/commandnet/bin/pip install --quiet --only-binary=:all: --no-binary=nkeys "${wheel}[operator]" \
 && /opt/commandnet/bin/pip uninstall --quiet -y setuptools

# --- final stages: BASE + the venv; nothing compiled, no build tools ---------------------------
# Non-root numeric user (Pod Security "restricted"); no file is written outside /tmp, which the
# chart mounts as an emptyDir, so readOnlyRootFilesystem works. The user has a passwd entry, and
# USER/LOGNAME are set for a pod that runs as another uid: getpass.getuser() (kopf's peering
# identity, asyncpg's default user) fails on a uid unknown to /etc/passwd.
FROM ${BASE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/commandnet/commandnet
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN echo 'commandnet:x:10001:10001:commandnet:/tmp:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'commandnet:x:10001:' >> /etc/group
ENV PATH=/opt/commandnet/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp TMPDIR=/tmp USER=commandnet LOGNAME=commandnet \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /tmp

FROM runtime AS operator
LABEL org.opencontainers.image.title="commandnet-operator" \
      org.opencontainers.image.description="Kubernetes operator for commandnet Agents (kopf)"
COPY --from=venv-operator /opt/commandnet /opt/commandnet
USER 10001:10001
# /healthz (liveness), /metrics, the admission webhook (the operator's settings' defaults).
EXPOSE 8080 9090 9443
ENTRYPOINT ["commandnet-operator"]

FROM runtime AS worker
LABEL org.opencontainers.image.title="commandnet-worker" \
      org.opencontainers.image.description="commandnet worker runtime; add a graph's code on top"
COPY --from=venv-worker /opt/commandnet /opt/commandnet
ENV COMMANDNET_HTTP_PORT=8080
USER 10001:10001
# /healthz /readyz /metrics
EXPOSE 8080
ENTRYPOINT ["commandnet"]
CMD ["worker"]
