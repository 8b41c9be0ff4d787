# ccmon server image: the self-contained ccmon.pyz on the official slim Python image.
#   docker build -t ccmon .
#   docker run -d --name ccmon -p 127.0.0.1:4317:4317 -p 127.0.0.1:4318:4318 -v ccmon-data:/data ccmon
# Both stages must use the same Python: the pyz carries C extensions built for it.
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY requirements.txt build_zipapp.py ccmon.py ccmon_pb2.py ccmon_pb2_grpc.py ./
RUN python build_zipapp.py --output /out/ccmon.pyz

FROM python:${PYTHON_VERSION}-slim
RUN useradd --system --uid 10001 --create-home --home-dir /home/ccmon ccmon \
    && mkdir -p /data /app && chown ccmon:ccmon /data
COPY --from=build /out/ccmon.pyz /app/ccmon.pyz
USER ccmon
# Unpack the pyz's C extensions once at build time, so containers start fast and need no writable home.
ENV XDG_CACHE_HOME=/home/ccmon/.cache PYTHONUNBUFFERED=1
RUN python /app/ccmon.pyz --version
VOLUME /data
# 4317: OTLP gRPC and the QueryService; 4318: OTLP/HTTP.
EXPOSE 4317 4318
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "/app/ccmon.pyz", "--health", "--monitor-server", "127.0.0.1:4317"]
ENTRYPOINT ["python", "/app/ccmon.pyz"]
# Inside the container the server must listen on all interfaces; publish it on 127.0.0.1 only
# (-p 127.0.0.1:4317:4317 -p 127.0.0.1:4318:4318) unless the network in front of it is trusted
# and a token is set (-e CCMON_TOKEN=...).
CMD ["--server", "--server-address", "0.0.0.0:4317", "--server-http-address", "0.0.0.0:4318", \
     "--database-path", "/data/ccmon.db"]
