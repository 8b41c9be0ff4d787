# ccmon server image: ccmon and its wheels, unpacked from ccmon.pyz once, on the official slim Python image.
#   docker build -t ccmon .
#   docker run -d --name ccmon -p 127.0.0.1:4317:4317 -p 127.0.0.1:4318:4318 -v ccmon-data:/data ccmon
# Both stages use the same pinned Python: the build carries grpcio's C extension for that version only.
ARG PYTHON_VERSION=3.12.12
ARG PYTHON_MINOR=3.12

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG PYTHON_MINOR
WORKDIR /src
COPY requirements.txt build_zipapp.py ccmon.py ccmon_pb2.py ccmon_pb2_grpc.py dashboard.html dashboard.js dashboard.css ./
# The pyz's first run unpacks it; the image keeps that folder alone (not the pyz beside it).
RUN python build_zipapp.py --python-version "${PYTHON_MINOR}" --output /out/ccmon.pyz \
    && XDG_CACHE_HOME=/out/cache python /out/ccmon.pyz --help > /dev/null \
    && mv /out/cache/ccmon/*/cp3*/ /app

FROM python:${PYTHON_VERSION}-slim-bookworm
ARG PYTHON_VERSION
LABEL org.opencontainers.image.title="ccmon" \
      org.opencontainers.image.description="Watch what Claude Code costs: an OTLP collector and usage monitor" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:${PYTHON_VERSION}-slim-bookworm"
RUN groupadd --system --gid 10001 ccmon \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/ccmon ccmon \
    && mkdir -p /data /home/ccmon/.ccmon && chown 10001:10001 /data \
    && printf '%s\n' '[server]' 'address = "0.0.0.0:4317"' 'http_address = "0.0.0.0:4318"' \
       '[database]' 'path = "/data/ccmon.db"' > /home/ccmon/.ccmon/config.toml
COPY --from=build /app /app
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# HOME names the settings' folder even when the image runs as another user (docker --user, runAsUser).
ENV HOME=/home/ccmon PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
VOLUME /data
# 4317: OTLP gRPC and the QueryService; 4318: OTLP/HTTP.
EXPOSE 4317 4318
STOPSIGNAL SIGTERM
# --health reads the same configuration as the server (~/.ccmon/config.toml, CCMON_TOKEN), so it follows
# the server's address, token and TLS; mount your own config.toml over the default one to change them.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["python", "/app/ccmon.py", "--health"]
ENTRYPOINT ["python", "/app/ccmon.py"]
# Inside the container the server listens on all interfaces; publish it on 127.0.0.1 only
# (-p 127.0.0.1:4317:4317 -p 127.0.0.1:4318:4318) unless the network in front of it is trusted
# and a token is set (-e CCMON_TOKEN=...).
CMD ["--server"]
