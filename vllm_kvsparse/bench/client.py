"""Streaming chat completions against one OpenAI-compatible endpoint, timed on the client.

Timing of one request (time.perf_counter, seconds):
  ttft      send -> first chunk that carries a generated token (a chunk with choices, other
            than a role-only opening chunk)
  itl       gaps between successive token-carrying chunks (one chunk is normally one token)
  tpot      (last token chunk - first token chunk) / (output_tokens - 1): mean inter-token
            latency of the request, right even when a chunk carries several tokens
  e2e       send -> end of stream
Output and prompt token counts come from the final usage chunk (stream_options.include_usage).
Every failure (bad URL, connection refused, HTTP 4xx/5xx, timeout, error inside the stream) is
recorded on the request with its error text; nothing is raised.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

from vllm_kvsparse.bench.workload import BenchRequest


@dataclass
class RequestResult:
    index: int
    ok: bool = False
    error: str | None = None
    scheduled_s: float = 0.0  # arrival time in the schedule (0 for an infinite rate)
    start_s: float = 0.0  # actual send time (after waiting for a --concurrency slot)
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    chunks: int = 0
    finish_reason: str | None = None
    text: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def api_base(url: str) -> tuple[str, str]:
    """(server root for /metrics and /health, OpenAI base ending in /v1) from a user URL given
    as http://host:port or http://host:port/v1."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    root = url[:-3].rstrip("/") if url.endswith("/v1") else url
    return root, root + "/v1"


class RequestFailed(Exception):
    """A request the server answered, but not with a good stream (HTTP status, stream error)."""


def error_text(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, RequestFailed):
        return msg
    name = type(e).__name__
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)) and not msg:
        msg = "request timed out"
    return f"{name}: {msg}" if msg else name


def make_client(timeout: float, max_connections: int | None):
    import httpx

    # trust_env=False: no proxy from the environment between the benchmark and the server.
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                             limits=httpx.Limits(max_connections=max_connections,
                                                 max_keepalive_connections=max_connections),
                             trust_env=False)


async def discover_model(client, root: str) -> tuple[str | None, str | None]:
    """(first model id from /v1/models, error text)."""
    try:
        r = await client.get(root + "/v1/models", timeout=10.0)
        if r.status_code != 200:
            return None, f"HTTP {r.status_code}: {r.text[:300]}"
        data = r.json().get("data") or []
        if not data:
            return None, "/v1/models lists no model"
        return data[0]["id"], None
    except Exception as e:  # noqa: BLE001 - any failure is reported, never raised
        return None, error_text(e)


async def send(client, v1: str, model: str, req: BenchRequest, *, seed: int, timeout: float,
               ignore_eos: bool, t0: float) -> RequestResult:
    """One streaming chat completion; `t0` is the endpoint run's start (perf_counter)."""
    res = RequestResult(req.index)
    body = {"model": model, "messages": req.messages(), "max_tokens": req.max_tokens,
            "temperature": 0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    res.start_s = start - t0
    try:
        await asyncio.wait_for(_stream(client, v1, body, res, start), timeout)
    except Exception as e:  # noqa: BLE001
        res.ok, res.error = False, error_text(e)
    res.e2e_s = time.perf_counter() - start
    return res


async def _stream(client, v1: str, body: dict, res: RequestResult, start: float) -> None:
    token_times: list[float] = []
    text: list[str] = []
    completed = False
    async with client.stream("POST", v1 + "/chat/completions", json=body) as r:
        if r.status_code != 200:
            raw = (await r.aread()).decode(errors="replace")
            raise RequestFailed(f"HTTP {r.status_code}: {_error_message(raw)}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                completed = True
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                raise RequestFailed("error in stream: " + _error_message(json.dumps(chunk)))
            usage = chunk.get("usage")
            if usage:
                res.prompt_tokens = usage.get("prompt_tokens")
                res.output_tokens = usage.get("completion_tokens") or 0
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
                if delta.get("content"):
                    text.append(delta["content"])
                role_only = ("role" in delta and not delta.get("content")
                             and not choice.get("finish_reason"))
                if not role_only:
                    token_times.append(now)
                    res.chunks += 1
                break  # n=1: one choice per chunk
    res.text = "".join(text)
    if not completed and res.finish_reason is None:
        raise RequestFailed("stream ended early (no [DONE] and no finish_reason)")
    if not token_times:
        raise RequestFailed("no tokens received")
    if not res.output_tokens:
        res.output_tokens = res.chunks  # server sent no usage: one token per chunk
    res.ttft_s = token_times[0] - start
    res.itl_s = [b - a for a, b in zip(token_times, token_times[1:])]
    if res.output_tokens > 1:
        res.tpot_s = (token_times[-1] - token_times[0]) / (res.output_tokens - 1)
    res.ok = True


def _error_message(raw: str) -> str:
    try:
        obj = json.loads(raw)
        err = obj.get("error", obj)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:500]
    except (ValueError, AttributeError):
        pass
    return raw.strip()[:500]
