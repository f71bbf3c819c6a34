"""A stand-in for vLLM's OpenAI server process, for VllmServer's start / watch / restart tests.

    python tests/fake_vllm_server.py --model DIR --port N [any other vLLM flag, ignored]

Serves /health, /v1/models and streamed /v1/completions: the words of a seeded draw, one every
WORD_S. With DIE_ONCE set to a file path, the first process whose file does not exist yet creates
it and dies (os._exit) in the middle of its first answer, as an engine that crashes; with
EXIT_AT_START it exits at once, printing an ERROR line, as a server that cannot start.
"""

import argparse
import asyncio
import json
import os
import random
import sys

from aiohttp import web

WORD_S = 0.05
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    args, _ = parser.parse_known_args()
    if os.environ.get("EXIT_AT_START"):
        print("ERROR 01-01 00:00:00 [fake.py:1] RuntimeError: no engine today", flush=True)
        sys.exit(3)
    print(f"INFO 01-01 00:00:00 [fake.py:1] Starting vLLM server on http://{args.host}:{args.port}", flush=True)
    name = args.served_model_name or args.model

    async def health(request):
        return web.Response()

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model"}]})

    async def completions(request):
        body = await request.json()
        if "botkit_probe" in (body.get("vllm_xargs") or {}):
            return web.json_response({"error": {"message": "Unknown botkit rule argument 'botkit_probe'"}}, status=400)
        rng = random.Random(body.get("seed"))
        words = [" " + rng.choice(WORDS) for _ in range(body.get("max_tokens", 16))]
        if not body.get("stream"):
            logprobs = {"token_logprobs": [-1.0] * len(words)} if body.get("logprobs") is not None else None
            return web.json_response(
                {"choices": [{"index": 0, "text": "".join(words), "logprobs": logprobs, "finish_reason": "length"}]}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        die = os.environ.get("DIE_ONCE")
        for i, word in enumerate(words):
            if die and i == 2 and not os.path.exists(die):
                open(die, "w").close()
                os._exit(1)
            last = i == len(words) - 1
            choice = {
                "index": 0,
                "text": word,
                "finish_reason": "length" if last else None,
                "logprobs": {"token_logprobs": [-1.0]} if body.get("logprobs") is not None else None,
            }
            await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            await asyncio.sleep(WORD_S)
        usage = {"prompt_tokens": 1, "completion_tokens": len(words)}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
