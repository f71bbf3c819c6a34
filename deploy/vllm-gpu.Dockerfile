# vLLM's own CUDA image with botkit's logits processor installed into it (no dependencies: vLLM has them).
#   docker build -f deploy/vllm-gpu.Dockerfile -t botkit-vllm-gpu .     (from the repository root)
FROM vllm/vllm-openai:latest
COPY . /botkit
RUN pip install --no-cache-dir --no-deps /botkit
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server", "--logits-processors", "botkit.engine.vllm_rules:BotkitRules"]
