# The gateway: a small image (the vLLM backends are separate images).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir '.[scale]' && useradd --system --uid 10001 gateway && mkdir -p /data && chown gateway /data
USER gateway
ENV GATEWAY_HOST=0.0.0.0 GATEWAY_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["gateway", "serve"]
CMD ["--config", "/etc/gateway/config.yaml"]
