# The orchestrator image: web, batch worker, control worker, beat and Flower are this one image
# with different commands (see scripts/compose-entrypoint.sh and docker-compose.yml).
#
#   docker-compose up --build                 (builds it as llm-gateway-orchestrator:latest)
#   docker build -t llm-gateway-orchestrator .
#
# BASE_IMAGE: any Debian-like image with python3 (3.11+) and its venv module. Without a registry,
# scripts/compose-local-images.sh makes llm-gateway-base:bookworm locally and says how to use it.
# Layers go from what changes least to what changes most: the dependencies (from setup.cfg only)
# are installed before any source is copied, so editing the code rebuilds in seconds.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The dependencies as a requirements file: the next stage's cache then depends on them alone,
# not on the rest of setup.cfg (version, dev extras, pytest settings).
FROM ${BASE_IMAGE} AS requirements
# var/docker-build/pip-ca.crt is optional (the glob matches nothing when it is absent): a CA
# bundle for pip when the network to PyPI needs one, put there by scripts/compose-local-images.sh.
COPY setup.cfg var/docker-build/pip-ca.cr[t] /tmp/build/
RUN python3 -c "import configparser; c = configparser.RawConfigParser(); \
c.read('/tmp/build/setup.cfg'); \
open('/tmp/build/requirements.txt', 'w').write(c['options']['install_requires'].strip() + '\n')" \
 && touch /tmp/build/pip-ca.crt
# Found and pruned when untagged, like the final image (the next stage does not depend on it).
LABEL llm-gateway.image=orchestrator-requirements

FROM ${BASE_IMAGE} AS deps
ARG PIP_INDEX_URL=
# The CA bundle stays in this stage; the final image takes /opt/venv and nothing else from here.
COPY --from=requirements /tmp/build/requirements.txt /tmp/build/pip-ca.crt /tmp/build/
RUN python3 -m venv /opt/venv \
 && if [ -s /tmp/build/pip-ca.crt ]; then export PIP_CERT=/tmp/build/pip-ca.crt; fi \
 && if [ -z "$PIP_INDEX_URL" ]; then unset PIP_INDEX_URL; fi \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      -r /tmp/build/requirements.txt \
 && /opt/venv/bin/pip uninstall -y --disable-pip-version-check pip setuptools
# Untagged, this stage is the cache of the dependencies: the newest one is kept, older ones pruned.
LABEL llm-gateway.image=orchestrator-deps

FROM ${BASE_IMAGE}
# A fixed uid, so files the services write to volumes keep one owner across rebuilds.
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin app \
 && mkdir -p /data/files /data/hf-cache /data/prometheus \
 && chown app:app /data/files /data/hf-cache /data/prometheus
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FILES_DIR=/data/files \
    HF_HOME=/data/hf-cache \
    WEB_BIND=0.0.0.0:8000
WORKDIR /app
COPY scripts/compose-entrypoint.sh /usr/local/bin/gateway-entrypoint
COPY celeryconfig.py /app/
COPY config /app/config
COPY templates /app/templates
COPY runtimes /app/runtimes
COPY jobs /app/jobs
COPY services /app/services
COPY tasks /app/tasks
COPY webapp /app/webapp
# Compiled once here: the services run as `app`, which cannot write next to the sources.
RUN python3 -m compileall -q /app
USER app
# Marks this image's builds, so the ones a rebuild leaves untagged can be found and pruned.
LABEL llm-gateway.image=orchestrator
EXPOSE 8000 5555
ENTRYPOINT ["gateway-entrypoint"]
CMD ["web"]
