"""RemoteBackend: generate through an OpenAI-style `/v1/completions` server (vLLM's, or another
botkit's web adapter) instead of in-process, so generation can scale out onto an existing engine.

Each sample is one streamed HTTP request; at most `max_concurrency` are in flight (the remote engine
batches them itself). Closing the stream early closes the connection, which makes vLLM abort the
request. Errors are one sentence naming the server and what to check; the API key is never in them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from yarl import URL

from botkit.config import Config, secret
from botkit.engine.rule_args import to_xargs
from botkit.errors import ConfigError, GenerationError, ModelLoadError, RequestTimeout
from botkit.model.tokenizer import EOS, count_tokenizer
from botkit.params import SamplingParams
from botkit.serve.backends import Completion, Job

log = logging.getLogger("botkit.remote")

MAX_ATTEMPTS = 3  # a 429/503 before the first token is retried this many times in all
MAX_RETRY_WAIT_S = 2.0


@dataclass(frozen=True)
class Chunk:
    """A piece of one sample: new text, then a last chunk with the finish reason and token count."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    num_tokens: int = 0  # completion tokens, on the last chunk
    num_prompt_tokens: int | None = None  # as the server counted them, on the last chunk if it said
    logprob_sum: float | None = None  # of the sample's tokens under the model (nats), on the last chunk when asked for


def completions_url(url: str) -> URL:
    """`http://host:8000/v1` (or `.../v1/completions`, or a bare `http://host:8000`) -> the completions URL."""
    parsed = URL(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"model.url must be an http(s) URL such as http://gpu-box:8000/v1, not {url!r}.")
    path = parsed.path.rstrip("/")
    if path.endswith("/completions"):
        return parsed.with_path(path)
    return parsed.with_path((path or "/v1") + "/completions")


class RemoteBackend:
    """The Backend interface (botkit.serve.backends) over a RemoteClient. Counts tokens with the bundled
    GPT-2 tokenizer, which is right for GPT-2-family models; `max_context` is the remote window."""

    def __init__(
        self,
        url: str,
        *,
        model: str = "",
        api_key: str | None = None,
        max_batch_size: int = 32,
        max_context: int = 1024,
        timeout_s: float = 120.0,
        tokenizer=None,
        run_dir: str | None = None,
    ):
        self.client = RemoteClient(
            url, model=model, api_key=api_key, max_concurrency=max_batch_size, timeout_s=timeout_s
        )
        self.name = model or "remote"
        self.max_batch_size = max_batch_size
        self.max_context = max_context
        # the served model's (`tokenizers`, no torch): counts, cuts, judges copies
        self.tokenizer = tokenizer or count_tokenizer()
        self.run_dir = run_dir  # the run whose copy index judges `unique` replies (None: only the prompt is checked)
        self.unsupported: list[str] = []  # settings this server cannot honour (capabilities.py), found at start

    @classmethod
    def from_config(cls, config: Config) -> RemoteBackend:
        if not config.model.url:
            raise ConfigError(
                'model.backend is "remote" but model.url is empty: set it to the server\'s URL, such as '
                "http://gpu-box:8000/v1."
            )
        run_dir = (
            config.model.source
            if config.model.source and (Path(config.model.source) / "config.json").is_file()
            else None
        )
        return cls(
            config.model.url,
            model=config.model.remote_model,
            api_key=remote_api_key(config),
            max_batch_size=config.batch.max_size,
            max_context=config.model.max_context,
            timeout_s=config.batch.timeout_s,
            tokenizer=run_tokenizer(run_dir) if run_dir else None,
            run_dir=run_dir,  # the served run's folder, when it is here too: its tokenizer and copy index judge replies
        )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    async def __aenter__(self) -> RemoteBackend:
        await self.client.__aenter__()
        self.name = self.client.model
        from botkit.serve.capabilities import probe, unsupported_sentence

        self.unsupported = await probe(self.client)
        if self.unsupported:
            log.warning("%s", unsupported_sentence(self.client.server, self.unsupported))
        return self

    def health_details(self) -> dict:
        """What /healthz adds about the engine: its server and the settings it cannot honour."""
        from botkit.serve.capabilities import unsupported_sentence

        details = {"engine": self.client.server, "unsupported": list(self.unsupported)}
        if self.unsupported:
            details["note"] = unsupported_sentence(self.client.server, self.unsupported)
        return details

    async def __aexit__(self, *exc) -> None:
        await self.client.__aexit__(*exc)

    async def generate(self, job: Job) -> Completion:
        prompt, params = self._fit_window(job.prompt, job.params)
        if params.seed is None:  # as the own engine: every sample has a seed, stored with its reply
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        if is_judged(params):
            from botkit.serve.remote_draws import judged_completion

            return await judged_completion(self, job, prompt, params)
        text, first_token_at, last = [], None, Chunk("")
        async for chunk in self.client.stream(prompt, params):
            if chunk.text:
                first_token_at = first_token_at or time.time()
                text.append(chunk.text)
                job.on_text(chunk.text)
            last = chunk
        num_prompt_tokens = last.num_prompt_tokens if last.num_prompt_tokens is not None else self.count_tokens(prompt)
        return Completion(
            "".join(text), last.finish_reason or "stop", num_prompt_tokens, last.num_tokens, params.seed, first_token_at
        )

    def copy_index(self):
        """The run's copy index (copy_index.CopyIndex), or None without a local run that has one."""
        if not hasattr(self, "_index"):
            from botkit.engine.copy_index import CopyIndex

            self._index = CopyIndex.load(self.run_dir) if self.run_dir else None
        return self._index

    def _fit_window(self, prompt: str, params: SamplingParams) -> tuple[str, SamplingParams]:
        """The remote server refuses prompt + max_tokens over its window, where the local engine slides
        it: keep the prompt's last tokens and, if need be, ask for fewer new ones. An empty prompt
        starts from end-of-text, as it does locally."""
        prompt = prompt or EOS
        ids = self.tokenizer.encode(prompt).ids
        budget = max(self.max_context - params.max_new_tokens, self.max_context // 2)
        if len(ids) > budget:
            ids = ids[-budget:]
            prompt = self.tokenizer.decode(ids, skip_special_tokens=False)
        max_new_tokens = min(params.max_new_tokens, self.max_context - len(ids))
        if max_new_tokens != params.max_new_tokens:
            params = dataclasses.replace(params, max_new_tokens=max_new_tokens)
        return prompt, params


def run_tokenizer(run_dir: str):
    """A run's own tokenizer as a bare `tokenizers` one (no torch): its tokenizer.json, else its GPT-2 files."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    folder = Path(run_dir)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.add_special_tokens([EOS])
    return tokenizer


def is_judged(params: SamplingParams) -> bool:
    """Whether a sample is judged before it is sent (judging.py), as the own engine's Sequence.is_judged."""
    return bool(params.banned_words or params.unique or params.candidates > 1)


class RemoteClient:
    """The HTTP side: streams one completion per call. Used by RemoteBackend; usable alone."""

    def __init__(
        self,
        url: str,
        *,
        model: str = "",
        api_key: str | None = None,
        max_concurrency: int = 32,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
    ):
        self.url = completions_url(url)
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._api_key = api_key
        self.has_rules = True  # the server runs botkit's logits processor (capabilities.probe says at start)
        self.native_samplers = set(NATIVE_SAMPLERS)  # without it, vLLM's own sampler fields the server takes
        self._limit = asyncio.Semaphore(max_concurrency)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def server(self) -> str:
        return str(self.url.origin())

    async def __aenter__(self) -> RemoteClient:
        """Checks the server answers (and learns the model name if none is configured), so a wrong
        url or key stops botkit at start with one sentence rather than failing every request."""
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        try:
            models = await self.list_models()
        except _NoModelList as exc:
            if not self.model:
                await self.__aexit__(None, None, None)
                raise ModelLoadError(str(exc)) from None
            models = None  # some OpenAI-style servers have no /v1/models; a named model is enough
        except GenerationError as exc:
            await self.__aexit__(None, None, None)
            raise ModelLoadError(str(exc)) from None
        if not self.model:
            if not models:
                await self.__aexit__(None, None, None)
                raise ModelLoadError(f"The remote model server {self.server} lists no models: set model.remote_model.")
            self.model = models[0]
        elif models and self.model not in models:
            log.warning(
                "The remote server %s lists %s, not %r; sending %r anyway.", self.server, models, self.model, self.model
            )
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def list_models(self) -> list[str]:
        """The model ids from `GET .../v1/models`; raises GenerationError when the server cannot be used."""
        models_url = self.url.with_path(self.url.path.rsplit("/", 1)[0] + "/models")
        try:
            async with self._request("GET", models_url) as response:
                if response.status in (404, 405):
                    raise _NoModelList(f"The remote model server has no {models_url}: set model.remote_model.")
                await self._check(response)
                body = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise _translate(self, exc) from None
        if not isinstance(body, dict):
            return []
        return [m.get("id") for m in body.get("data", []) if isinstance(m, dict) and m.get("id")]

    async def stream(self, prompt: str, params: SamplingParams, *, logprobs: bool = False) -> AsyncIterator[Chunk]:
        """The sample's text as the server streams it; the last chunk carries finish_reason."""
        body = self.request_body(prompt, params, logprobs=logprobs)
        async with self._limit:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                response = None
                try:
                    async with self._request("POST", self.url, json=body) as response:
                        if response.status in (429, 503) and attempt < MAX_ATTEMPTS:
                            await asyncio.sleep(_retry_after_s(response))
                            continue
                        await self._check(response)
                        async for chunk in self._read_events(response):
                            yield chunk
                        return
                except aiohttp.ServerDisconnectedError as exc:
                    # A kept-alive connection the server closed while idle (uvicorn, vLLM's server, closes
                    # them after 5 s): it never read the request, so sending it again is safe.
                    if response is not None or attempt == MAX_ATTEMPTS:
                        raise _translate(self, exc) from None
                except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                    raise _translate(self, exc) from None

    def _redact(self, text: str) -> str:
        """A server's error text may echo the key it was sent; it never reaches users or the store."""
        return text.replace(self._api_key, "[redacted]") if self._api_key else text

    def request_body(self, prompt: str, params: SamplingParams, *, logprobs: bool = False) -> dict:
        """The OpenAI-style body: OpenAI's names where they exist, vLLM's otherwise, each sampler sent only
        when on (a plain OpenAI server knows no top_k); botkit's per-token rules ride in `vllm_xargs`."""
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},  # a last chunk with the token count
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if logprobs:
            body["logprobs"] = 0  # the drawn token's log-probability only (the model's own: vLLM's raw_logprobs)
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM's extension; sent only when on, since OpenAI lacks it
        if self.has_rules:  # the processor runs the penalties and min_p; vLLM's own stay neutral, or they apply twice
            body["vllm_xargs"] = rule_args(params)
        else:
            body |= {name: value for name, value in native_samplers(params).items() if name in self.native_samplers}
        return body

    def _request(self, method: str, url: URL, **kwargs):
        if self._session is None:
            raise RuntimeError("RemoteClient used outside `async with`")
        return self._session.request(method, url, **kwargs)

    async def _check(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        message = self._redact(await _server_message(response))
        if response.status in (401, 403):
            raise GenerationError(
                f"The remote model server {self.server} refused the API key ({response.status}): "
                "check the environment variable named in model.api_key_env."
            )
        if response.status == 404 and not message:
            raise GenerationError(
                f"The remote model server has nothing at {self.url}: check that model.url ends in /v1."
            )
        if response.status in (429, 503):
            raise GenerationError(
                f"The remote model server {self.server} is busy ({response.status}): try again in a moment."
            )
        raise GenerationError(
            f"The remote model server {self.server} refused the request ({response.status}: "
            f"{message or response.reason})."
        )

    async def _read_events(self, response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
        finish_reason, num_tokens, num_prompt_tokens, num_chunks, logprob_sum = None, None, None, 0, None
        async for raw in response.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if not isinstance(event, dict):
                raise ValueError("a stream event that is not a JSON object")
            if event.get("error"):
                raise GenerationError(
                    f"The remote model server {self.server} failed mid-answer: {self._redact(_message_of(event))}"
                )
            if event.get("usage"):
                num_tokens = event["usage"].get("completion_tokens")
                num_prompt_tokens = event["usage"].get("prompt_tokens")
            for choice in event.get("choices") or ():
                num_chunks += 1
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
                logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
                if logprobs:
                    logprob_sum = (logprob_sum or 0.0) + sum(x for x in logprobs if isinstance(x, int | float))
                if choice.get("text"):
                    yield Chunk(choice["text"])
        if finish_reason is None:
            raise GenerationError(
                f"The remote model server {self.server} ended the answer without a finish reason: is "
                "it overloaded or restarting?"
            )
        reason = "length" if finish_reason == "length" else "stop"
        yield Chunk(
            "",
            finish_reason=reason,
            num_tokens=num_tokens or num_chunks,
            num_prompt_tokens=num_prompt_tokens,
            logprob_sum=logprob_sum,
        )


class _NoModelList(GenerationError):
    """The server has no model list (only fatal when no model name is configured)."""


def _translate(client: RemoteClient, exc: BaseException) -> BaseException:
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = getattr(exc.os_error, "errno", None)
        reason = os.strerror(errno) if errno else str(exc.os_error)  # "Connection refused", not a repr
        return GenerationError(
            f"The remote model server {client.server} cannot be reached ({reason}): "
            "check model.url and that the server is running."
        )
    if isinstance(exc, TimeoutError):
        return RequestTimeout(f"The remote model server {client.server} did not answer in time: it may be overloaded.")
    if isinstance(exc, ValueError):  # json.JSONDecodeError, or a non-UTF-8 body
        return GenerationError(
            f"The remote model server {client.server} sent something other than OpenAI-style JSON: check model.url."
        )
    return GenerationError(
        f"The connection to the remote model server {client.server} failed ({exc.__class__.__name__}): try again."
    )


def _retry_after_s(response: aiohttp.ClientResponse) -> float:
    try:
        return min(float(response.headers.get("Retry-After", "0.5")), MAX_RETRY_WAIT_S)
    except ValueError:
        return 0.5


async def _server_message(response: aiohttp.ClientResponse) -> str:
    try:
        return _message_of(json.loads(await response.text()))
    except (ValueError, UnicodeDecodeError, aiohttp.ClientError):
        return ""


def _message_of(body) -> str:
    """OpenAI and botkit write {"error": {"message"}}; older vLLM {"object": "error", "message"}."""
    if not isinstance(body, dict):
        return ""
    error = body.get("error")
    message = (
        error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else body.get("message")
    )
    return str(message or "")[:300]


# Samplers vLLM runs itself, under OpenAI's name where it has one, else vLLM's, with their off values:
# sent as such only to a server without botkit's processor (capabilities.py).
NATIVE_SAMPLERS = {"repetition_penalty": 1.0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def native_samplers(params: SamplingParams) -> dict:
    """The request fields of the samplers that are on."""
    return {
        name: getattr(params, name, off) for name, off in NATIVE_SAMPLERS.items() if getattr(params, name, off) != off
    }


def rule_args(params: SamplingParams) -> dict:
    """botkit's per-token rules for the server's logits processor (botkit.engine.vllm_rules), as
    `vllm_xargs`; {} when every rule is off."""
    return to_xargs(params)


def remote_api_key(config: Config) -> str | None:
    """The remote server's API key from the environment variable named in model.api_key_env, if any."""
    if not config.model.api_key_env:
        return None
    return secret(config.model.api_key_env, "The remote backend (model.api_key_env)")
