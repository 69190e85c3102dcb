# blt-serve on a CUDA-capable PyTorch base. The shipped model is inside; mount another at /models and
# set BLT_MODEL_DIR=/models/NAME to serve it. Every flag of `blt-serve --help` is also an env var:
#   BLT_HOST (0.0.0.0 here)     BLT_PORT (8000)          BLT_DEVICE (auto: cuda if visible)
#   BLT_DTYPE (auto: bf16 on GPU, fp32 on CPU)           BLT_MAX_BATCH_SIZE (16)
#   BLT_MAX_QUEUE (256)         BLT_MAX_MODEL_LEN        BLT_API_KEY (comma-separated keys)
#   BLT_METRICS_WITHOUT_KEY     BLT_ALLOWED_ORIGINS      BLT_MAX_BODY_BYTES (1048576)
#   BLT_SHUTDOWN_TIMEOUT (30)   BLT_KEEPALIVE_INTERVAL   BLT_LOG_LEVEL (info)   BLT_SERVED_MODEL_NAME
#   BLT_LOG_INTERVAL (5)        BLT_PREFILL_CHUNK (512)  BLT_MODEL_DIR (the shipped model)
#   BLT_DISABLE_LOG_REQUESTS, BLT_DISABLE_LOG_STATS (no line per request; no throughput lines)
#   BLT_THREADS (CPU threads; default all cores but one)   BLT_ENFORCE_EAGER (no CUDA graphs)
#   BLT_COMPILE (torch.compile the step's element-wise stretches)
#   BLT_KERNELS (auto: the project's Triton kernels for attention, RoPE, norms and SwiGLU where they
#   compile and check out at start-up, else PyTorch's; torch; triton; triton-gemv)
#   BLT_NO_OVERLAP (queue each engine step only after the last one's outputs are handled)
#   BLT_LOOKAHEAD_ROWS (1 on CUDA: decode steps of up to this many sequences decode each sampled byte ahead; 0: off)
#   BLT_NO_PROMPT_SHARING (prefill every prompt, even a prefix whose state a cache slot holds)
#   BLT_KEPT_PREFIXES (4: cache slots that keep a shared prefix's state, a system prompt's, for later prompts)
#   BLT_KV_CACHE_MEMORY_BYTES (4GiB: the global model's pool of pages takes that at start-up, never more)
#   BLT_GPU_MEMORY_UTILIZATION (0.9: the pool takes what that share of the GPU leaves; default: it grows)
#   BLT_JUMP_FORWARD (0 on CUDA, 2 on a CPU: bytes a guide forces, at least, prefilled as one chunk)
#   BLT_SEED (seeds the requests sent without a seed: the same text after a restart)
#   BLT_CHAT_TEMPLATE (a Jinja file for /v1/chat/completions; default: the model directory's, if any)
#   BLT_ENABLE_AUTO_TOOL_CHOICE, BLT_TOOL_CALL_PARSER (hermes, llama3_json or pythonic: tool_choice "auto"
#   reads the model's calls)
#   BLT_ENABLE_RESPONSES_API_STORE (keep /v1/responses answers for GET and previous_response_id)
#   BLT_GENERATION_CONFIG (auto: sampling defaults from the model's generation_config.json; none)
#   BLT_OVERRIDE_GENERATION_CONFIG (a JSON object of those defaults, set over them)
#   BLT_SCHEDULING_POLICY (fcfs; priority: the waiting queue ordered by the requests' priority, and a
#   more urgent request preempts a less urgent running one where no slot is free)
#   BLT_REVISION (with BLT_MODEL_DIR a Hugging Face Hub id: the branch, tag or commit; default main)
#   BLT_DOWNLOAD_DIR (with a Hub id: the cache it is fetched to; default HF_HUB_CACHE)
#   BLT_SSL_KEYFILE, BLT_SSL_CERTFILE (HTTPS)   BLT_ROOT_PATH (a reverse proxy's path prefix)
#   BLT_DISABLE_FASTAPI_DOCS (no /docs, /redoc or /openapi.json)
#
#   docker build -t blt-serve .
#   docker run --gpus all -p 8000:8000 blt-serve
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    BLT_HOST=0.0.0.0 BLT_PORT=8000 BLT_MODEL_DIR=/app/weights/blt-shakespeare

# Triton builds each kernel's launcher with a C compiler, which the runtime base lacks; without one
# the Triton kernels fail their start-up check and the server runs PyTorch's (with a warning).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 blt
WORKDIR /app
# Dependencies first (a layer that survives code changes); the base's torch satisfies torch>=2.5.
COPY pyproject.toml README.md ./
COPY blt_runtime/__init__.py blt_runtime/__init__.py
COPY server/__init__.py server/__init__.py
RUN pip install -e . && rm -rf blt_runtime server
COPY blt_runtime blt_runtime
COPY server server
COPY weights weights
RUN pip install --no-deps -e . && chown -R blt:blt /app

USER blt
EXPOSE 8000
# SIGTERM drains (503 to new requests, running ones finish); give it time: docker stop -t 40
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('BLT_PORT', '8000'), timeout=2)" || exit 1
CMD ["blt-serve"]
