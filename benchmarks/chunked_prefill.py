"""Chunked prefill with ZipVL on real `vllm serve` servers: decode ITL while a long image
prompt is prefilled, and prefix-cache hits on a multi-turn image chat.

    python benchmarks/chunked_prefill.py --out benchmarks/results/chunked_prefill.json
    python benchmarks/chunked_prefill.py --quick       # smoke run, ~3-5 min, not for publishing

The plugin used to force chunked prefill off and max_num_batched_tokens = max_model_len when a
sparsity method was on, so one long prompt filled a whole engine step and every running request
waited for it. It now keeps vLLM's defaults: a long prompt is prefilled chunk by chunk and
selected at the step that completes it; prefix caching stays on (prompts >= min_prompt_len
neither read nor publish prefix-cache blocks, shorter ones do). Modes, one fresh server each
(same model, same requests, same other flags):

  none             --kv-sparsity none: stock vLLM, chunked prefill on (vLLM's default),
                   --max-num-batched-tokens 2048 (--chunk-tokens; vLLM 0.32's CPU serve default)
  zipvl-one-step   --kv-sparsity zipvl --no-enable-chunked-prefill
                   --max-num-batched-tokens MAX_MODEL_LEN: what the plugin used to force
  zipvl-chunked    --kv-sparsity zipvl with vLLM's defaults and the same
                   --max-num-batched-tokens as none

Part 1, ITL under a long prefill (per mode, --repeats rounds): K short text-only streaming chat
requests (--shorts, --short-tokens output tokens each, ignore_eos) are started; once each has
streamed --lead-tokens tokens, one long streaming request (--long-images synthetic images of
--image-size px plus random-word text, about --long-tokens prompt tokens) is sent. The prefill
window is [send of the long request, its first token] (client clock). An ITL sample is the gap
between two successive streamed chunks of one short request, as `vllm bench serve` counts them
(a chunk is normally one token; a busy API server can merge queued tokens into one chunk, so
every chunk's token count is read from its logprobs and reported). "during prefill" samples are
the gaps that overlap the window, "overall" all of them; "during engine prefill" uses the
window's engine part only, [first token - the long request's engine prefill time, first token],
which leaves out the API server's input processing (image decoding, tokenization) of the long
request. Reported: p50 / p99 / max (ms, linear interpolation over the pooled samples of all
rounds); the long request's TTFT and its engine queue and prefill times (vLLM's
vllm:request_queue_time_seconds / vllm:request_prefill_time_seconds, read when it is the only
request that finished; medians of the rounds); for zipvl, the long prompt's kept ratio = delta
kvsparse_prompt_tokens_kept / delta kvsparse_prompt_tokens_seen on /metrics over the round (the
short requests are below min_prompt_len and are not selected on), and per layer
(kvsparse_kept_ratio histogram).

Part 2, prefix-cache hit rate (servers none and zipvl-chunked, prefix caching on, vLLM's
default): two chats of --chat-turns turns each, sent one turn at a time; turn k resends the
same image, the earlier questions and answers, and a new question. "large" uses one
--image-size image (>= min_prompt_len: zipvl selects on it), "small" one --small-image-size
image whose turns all stay below min_prompt_len (zipvl runs it dense, like stock vLLM). Per
turn: vLLM's counters vllm:prefix_cache_queries_total and vllm:prefix_cache_hits_total
(deltas over the turn); hit rate = hits / queries. vLLM does not count a request that skips
the prefix-cache lookup (zipvl's selected prompts) as a query, so such turns show 0 queries and
no hit rate; the column hits / prompt tokens compares all rows on one scale.

Every number is from a random-weight tiny Qwen2-VL (`vllm-kvsparse tiny-model`, --qk-scale 400:
peaked attention, so zipvl keeps few tokens) on the CPU backend; the JSON records the exact
command, the CPU model and ISA flags, load averages and other busy processes per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vllm_kvsparse.bench.server import ServeProcess  # noqa: E402

MODES = ("none", "zipvl-one-step", "zipvl-chunked")
PREFIX_MODES = ("none", "zipvl-chunked")      # prefix caching on in both (vLLM's default)
MERGE = 28                                     # Qwen2-VL: one image token per 28x28 pixels
QUESTIONS = ["What is in this image?", "Which colour is the largest shape, and where is it?",
             "How many shapes touch the border? Answer briefly.",
             "Is there a line? Describe it.", "What is the background colour?"]


# ============================================================================ arguments

def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="ITL under a long prefill and prefix-cache hits on a multi-turn image chat: "
                    "none vs zipvl (one-step prefill) vs zipvl (chunked prefill), on real "
                    "`vllm serve` servers.")
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run: 4K long prompt (2 images), 2 shorts, 1 round, "
                         "max-model-len 5120 (numbers not for publishing)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    ap.add_argument("--parts", default="itl,prefix", help="itl and/or prefix")
    # part 1
    ap.add_argument("--max-model-len", type=int, default=20480)
    ap.add_argument("--long-tokens", type=int, default=16384, help="long prompt, tokens")
    ap.add_argument("--long-images", type=int, default=4, help="images in the long prompt")
    ap.add_argument("--image-size", type=int, default=1008,
                    help="square image side in px (multiple of 28; 1008 -> 1296 tokens)")
    ap.add_argument("--long-max-tokens", type=int, default=2,
                    help="long request's output tokens (only its TTFT is measured)")
    ap.add_argument("--shorts", type=int, default=4, help="concurrent short requests")
    ap.add_argument("--short-tokens", type=int, default=128,
                    help="output tokens per short request (ignore_eos); enough to keep them "
                         "decoding through the long prompt's prefill")
    ap.add_argument("--lead-tokens", type=int, default=4,
                    help="tokens each short streams before the long request is sent")
    ap.add_argument("--warmup-tokens", type=int, default=3072,
                    help="one image request of this many tokens (+ one short) per server first")
    ap.add_argument("--repeats", type=int, default=2, help="rounds per mode (pooled)")
    # part 2
    ap.add_argument("--chat-turns", type=int, default=3)
    ap.add_argument("--chat-tokens", type=int, default=16, help="answer tokens per turn")
    ap.add_argument("--small-image-size", type=int, default=448,
                    help="the below-min_prompt_len chat's image (448 -> 256 tokens)")
    # servers
    ap.add_argument("--tau", type=float, default=0.975)
    ap.add_argument("--min-prompt-len", type=int, default=None,
                    help="zipvl min_prompt_len (default: the plugin's, 1024)")
    ap.add_argument("--chunk-tokens", type=int, default=2048,
                    help="--max-num-batched-tokens of none and zipvl-chunked (the chunk size); "
                         "2048 is vLLM 0.32's default for `vllm serve` on CPU, passed "
                         "explicitly so that both get the same on any platform; 0: not passed")
    ap.add_argument("--block-size", type=int, default=32,
                    help="--block-size for every server (zipvl's eviction default, so prefix "
                         "hits have the same granularity); 0: each server's default")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=900)
    # model
    ap.add_argument("--qk-scale", type=float, default=400.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=1024)
    ap.add_argument("--num-heads", type=int, default=16)
    ap.add_argument("--num-kv-heads", type=int, default=4)
    ap.add_argument("--models-dir", default="/tmp/kvsparse-bench/models")
    ap.add_argument("--work-dir", default="/tmp/kvsparse-bench/chunked_prefill")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    if args.quick:
        given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
        for key, val in (("--long-tokens", 4096), ("--long-images", 2), ("--shorts", 2),
                         ("--repeats", 1), ("--max-model-len", 5120),
                         ("--warmup-tokens", 2560), ("--chat-tokens", 8)):
            if key not in given:
                setattr(args, key[2:].replace("-", "_"), val)
    args.modes = [m for m in args.modes.split(",") if m]
    args.parts = [p for p in args.parts.split(",") if p]
    bad = [m for m in args.modes if m not in MODES] + \
        [p for p in args.parts if p not in ("itl", "prefix")]
    if bad:
        ap.error(f"unknown mode/part: {', '.join(bad)}")
    for name in ("image_size", "small_image_size"):
        if getattr(args, name) % MERGE:
            ap.error(f"--{name.replace('_', '-')} must be a multiple of {MERGE}")
    need = args.long_images * image_tokens(args.image_size) + 64
    if args.long_tokens < need or args.long_tokens + args.long_max_tokens > args.max_model_len:
        ap.error(f"--long-tokens must be in [{need}, max-model-len - long-max-tokens]")
    return args


def image_tokens(side: int) -> int:
    """Placeholder tokens of a side x side image (side a multiple of 28, within max_pixels)."""
    return (side // MERGE) ** 2


def min_prompt_len(args) -> int:
    if args.min_prompt_len is not None:
        return args.min_prompt_len
    from vllm_kvsparse.config import SparsityConfig
    return SparsityConfig.min_prompt_len


def sparsity_config(args) -> str:
    cfg = {"tau": args.tau}
    if args.min_prompt_len is not None:
        cfg["min_prompt_len"] = args.min_prompt_len
    return json.dumps(cfg)


def server_args(mode: str, args, kv_bytes: int) -> list[str]:
    """`vllm serve` flags of one mode: the shared ones, then the mode's own."""
    shared = ["--dtype", "bfloat16", "--enforce-eager", "--max-model-len",
              str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
              "--kv-cache-memory-bytes", str(kv_bytes), "--limit-mm-per-prompt",
              json.dumps({"image": max(args.long_images, 1), "video": 0}), "--seed", "0"]
    if args.block_size:
        shared += ["--block-size", str(args.block_size)]
    chunk = ["--max-num-batched-tokens", str(args.chunk_tokens)] if args.chunk_tokens else []
    if mode == "none":
        return shared + ["--kv-sparsity", "none"] + chunk
    zipvl = ["--kv-sparsity", "zipvl", "--kv-sparsity-config", sparsity_config(args)]
    if mode == "zipvl-one-step":
        return shared + zipvl + ["--no-enable-chunked-prefill", "--max-num-batched-tokens",
                                 str(args.max_model_len)]
    return shared + zipvl + chunk


# ============================================================================ server

class Server(ServeProcess):
    """`vllm serve MODEL ARGS` with the benchmarks' isolated environment (own TMPDIR and
    caches), API server and engine core in their own processes as users run them."""

    def __init__(self, model: str, args: list[str], workdir: Path, startup_timeout: float):
        env = common.isolated_env(workdir)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)   # serve as users run it
        super().__init__(str(common.BIN / "vllm"), model, args, env, workdir / "server.log",
                         startup_timeout)

    def settings(self) -> dict:
        """What vLLM and the plugin logged about chunking and the sparsity settings."""
        log = self.log()
        m = re.search(r"enable_chunked_prefill=(True|False)", log)   # engine config line
        lines = [ln.split("vllm-kvsparse:", 1)[1].strip() for ln in log.splitlines()
                 if "vllm-kvsparse:" in ln]
        return {"chunked_prefill": m.group(1) == "True" if m else None,
                "plugin_log": lines[:1]}

    def own_pids(self) -> set[int]:
        """Processes of this server's process group (to leave out of other_busy_processes)."""
        pids = set()
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.getpgid(int(d.name)) == self.proc.pid:
                        pids.add(int(d.name))
                except (ProcessLookupError, PermissionError):
                    pass
        return pids


def busy_others(exclude: set[int]) -> list[str]:
    return [ln for ln in common.other_busy_processes()
            if not (ln.split(maxsplit=1) or ["0"])[0].isdigit()
            or int(ln.split(maxsplit=1)[0]) not in exclude]


# ============================================================================ prompts

def fit_text(tokenizer, target_tokens: int, n_images: int, tokens_per_image: int,
             seed: int) -> str:
    """Random-word text such that the chat prompt (images first, then the text) is at most
    target_tokens long after image expansion."""
    fixed = n_images * (tokens_per_image - 1)
    rng = random.Random(seed)
    words = [rng.choice(common.WORDS) for _ in range(target_tokens * 2 + 16)]

    def length(text: str) -> int:
        return len(tokenizer(common._chat(text, n_images),
                             add_special_tokens=False)["input_ids"]) + fixed

    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(" ".join(words[:mid])) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def image_url(side: int, seed: int) -> str:
    from vllm_kvsparse.bench.workload import png_data_url, synthetic_image
    return png_data_url(synthetic_image(side, side, seed))


def user(text: str, images: list[str] = ()) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


def short_text(seed: int) -> str:
    rng = random.Random(seed)
    return "Tell a long story about " + " ".join(rng.choice(common.WORDS) for _ in range(24))


def build_rounds(tokenizer, args) -> list[dict]:
    """The identical requests every mode gets: per round K short prompts and one long one."""
    tpi = image_tokens(args.image_size)
    rounds = []
    for r in range(args.repeats):
        seed = 1000 * (r + 1)
        imgs = [image_url(args.image_size, seed + j) for j in range(args.long_images)]
        text = fit_text(tokenizer, args.long_tokens, args.long_images, tpi, seed)
        rounds.append({"long": [user(text, imgs)],
                       "shorts": [[user(short_text(seed + 100 + i))]
                                  for i in range(args.shorts)]})
    return rounds


def build_warmup(tokenizer, args) -> dict:
    tpi = image_tokens(args.image_size)
    img = image_url(args.image_size, 999_999)
    target = max(args.warmup_tokens, tpi + 64)
    return {"long": [user(fit_text(tokenizer, target, 1, tpi, 999_999), [img])],
            "short": [user(short_text(999_998))]}


# ============================================================================ client

async def stream_chat(http, v1: str, model: str, messages: list, max_tokens: int, t0: float,
                      timeout: float, started: asyncio.Event | None = None,
                      lead: int = 1) -> dict:
    """One streaming chat completion. Times (s) are relative to t0 (perf_counter): `send_s`,
    and `token_s`, the arrival of every chunk that carries generated tokens, with `token_n`, how
    many (from the chunk's logprobs: one chunk is normally one token, but a busy API server
    merges the tokens that queued up into one chunk). `started` is set once `lead` tokens
    arrived (or the request ended)."""
    from vllm_kvsparse.bench.client import error_text

    res = {"send_s": time.perf_counter() - t0, "token_s": [], "token_n": [],
           "prompt_tokens": None,
           "output_tokens": 0, "finish_reason": None, "text": "", "error": None}
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "seed": 0, "ignore_eos": True, "stream": True, "logprobs": True,
            "stream_options": {"include_usage": True}}
    text = []

    async def run():
        async with http.stream("POST", v1 + "/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - t0
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"error in stream: {chunk['error']}")
                if chunk.get("usage"):
                    res["prompt_tokens"] = chunk["usage"].get("prompt_tokens")
                    res["output_tokens"] = chunk["usage"].get("completion_tokens") or 0
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if choice.get("finish_reason"):
                        res["finish_reason"] = choice["finish_reason"]
                    if delta.get("content"):
                        text.append(delta["content"])
                    lp = (choice.get("logprobs") or {}).get("content")
                    n = len(lp) if lp is not None else int(bool(delta.get("content")))
                    if n:
                        res["token_s"].append(now)
                        res["token_n"].append(n)
                        if started is not None and sum(res["token_n"]) >= lead:
                            started.set()
                    break
    try:
        await asyncio.wait_for(run(), timeout)
        if not res["token_s"]:
            raise RuntimeError("no tokens received")
    except Exception as e:  # noqa: BLE001 - recorded, the round goes on
        res["error"] = error_text(e)
    finally:
        if started is not None:
            started.set()
    res["text"] = "".join(text)
    res["ttft_s"] = res["token_s"][0] - res["send_s"] if res["token_s"] else None
    return res


async def scrape_text(http, root: str) -> str:
    r = await http.get(root + "/metrics", timeout=30)
    r.raise_for_status()
    return r.text


def totals(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of every sample of each named metric over its label sets (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families
    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in out and s.value == s.value:
                out[s.name] += s.value
    return out


HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"
SEEN = "kvsparse_prompt_tokens_seen_total"


# ============================================================================ measurements

def percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def itl_split(shorts: list[dict], window: tuple[float, float] | None) -> dict:
    """ITL samples (seconds) of the short requests, one per streamed chunk after the first
    (the gap since the previous chunk, as `vllm bench serve` counts them): all of them, and
    those whose gap overlaps the long prompt's prefill window (start, end); with the tokens
    those chunks carried and the largest number of tokens merged into one chunk."""
    during, overall, alive, tokens, merged = [], [], 0, 0, 1
    for s in shorts:
        ts, ns = s["token_s"], s.get("token_n") or [1] * len(s["token_s"])
        for a, b, n in zip(ts, ts[1:], ns[1:]):
            overall.append(b - a)
            if window and b > window[0] and a < window[1]:
                during.append(b - a)
                tokens += n
                merged = max(merged, n)
        if window and ts and ts[-1] > window[1]:
            alive += 1
    return {"during": during, "overall": overall, "shorts_decoding_past_window": alive,
            "tokens_during": tokens, "max_tokens_per_chunk_during": merged}


def stats_ms(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": _ms(percentile(xs, 50)), "p99_ms": _ms(percentile(xs, 99)),
            "max_ms": _ms(max(xs) if xs else None)}


def _ms(x):
    return None if x is None else 1000.0 * x


ENGINE = ("vllm:request_queue_time_seconds_sum", "vllm:request_queue_time_seconds_count",
          "vllm:request_prefill_time_seconds_sum", "vllm:request_prefill_time_seconds_count")


def engine_times(before: dict, after: dict) -> dict | None:
    """The long request's queue and prefill time inside the engine (vLLM's per-request
    histograms, engine clock: queued -> first scheduled -> first token), when it is the only
    request that finished between the two scrapes; else None."""
    d = {k: after[k] - before[k] for k in ENGINE}
    if d["vllm:request_prefill_time_seconds_count"] != 1 \
            or d["vllm:request_queue_time_seconds_count"] != 1:
        return None
    return {"queue_s": d["vllm:request_queue_time_seconds_sum"],
            "prefill_s": d["vllm:request_prefill_time_seconds_sum"]}


async def itl_round(http, root, v1, model, rnd: dict, args) -> dict:
    from vllm_kvsparse.bench import metrics_scrape
    text0 = await scrape_text(http, root)
    before, e0 = metrics_scrape.parse(text0), totals(text0, ENGINE)
    t0 = time.perf_counter()
    events = [asyncio.Event() for _ in rnd["shorts"]]
    tasks = [asyncio.create_task(stream_chat(http, v1, model, msgs, args.short_tokens, t0,
                                             args.request_timeout, ev, args.lead_tokens))
             for msgs, ev in zip(rnd["shorts"], events)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), args.request_timeout)
    long_res = await stream_chat(http, v1, model, rnd["long"], args.long_max_tokens, t0,
                                 args.request_timeout)
    await asyncio.sleep(0.5)     # the long request's finished-request stats reach /metrics
    engine = engine_times(e0, totals(await scrape_text(http, root), ENGINE))
    shorts = await asyncio.gather(*tasks)
    await asyncio.sleep(1.5)     # the plugin's stats files are flushed after each step
    after = metrics_scrape.parse(await scrape_text(http, root))
    server = metrics_scrape.server_summary(before, after, [])
    window = engine_window = None
    if long_res["token_s"]:
        window = (long_res["send_s"], long_res["token_s"][0])
        if engine:
            engine_window = (window[1] - engine["prefill_s"], window[1])
    split = itl_split(shorts, window)
    return {"window_s": window, "engine_window_s": engine_window, "long": long_res,
            "long_engine": engine, "shorts": shorts,
            "itl_during_s": split["during"], "itl_overall_s": split["overall"],
            "itl_during_engine_prefill_s": itl_split(shorts, engine_window)["during"]
            if engine_window else None,
            "shorts_decoding_past_window": split["shorts_decoding_past_window"],
            "tokens_during": split["tokens_during"],
            "max_tokens_per_chunk_during": split["max_tokens_per_chunk_during"],
            "kept_ratio_mean": server["kept_ratio_mean"],
            "kept_ratio_per_layer": server["kept_ratio_per_layer"],
            "prompt_tokens_seen": server["prompt_tokens_seen"],
            "kv_blocks_freed": server["kv_blocks_freed"],
            "errors": [r["error"] for r in [long_res, *shorts] if r["error"]]}


async def chat(http, root, v1, model, mode: str, name: str, side: int, seed: int,
               args) -> dict:
    """One multi-turn chat on one image; per-turn prefix-cache counter deltas."""
    img = image_url(side, seed)
    messages, turns = [], []
    for k in range(args.chat_turns):
        q = QUESTIONS[k % len(QUESTIONS)] + (f" (turn {k + 1})" if k >= len(QUESTIONS) else "")
        messages.append(user(q, [img] if k == 0 else []))
        b = totals(await scrape_text(http, root), (HITS, QUERIES, SEEN))
        res = await stream_chat(http, v1, model, messages, args.chat_tokens,
                                time.perf_counter(), args.request_timeout)
        await asyncio.sleep(1.5)
        a = totals(await scrape_text(http, root), (HITS, QUERIES, SEEN))
        d = {k2: a[k2] - b[k2] for k2 in a}
        turns.append({"turn": k + 1, "prompt_tokens": res["prompt_tokens"],
                      "hits": d[HITS], "queries": d[QUERIES],
                      "selected": d[SEEN] > 0 if mode != "none" else None,
                      "ttft_s": res["ttft_s"], "error": res["error"]})
        messages.append({"role": "assistant", "content": res["text"]})
    hits, queries = sum(t["hits"] for t in turns), sum(t["queries"] for t in turns)
    prompt = sum(t["prompt_tokens"] or 0 for t in turns)
    for t in turns:
        t["hit_rate"] = t["hits"] / t["queries"] if t["queries"] else None
        t["hits_per_prompt_token"] = t["hits"] / t["prompt_tokens"] if t["prompt_tokens"] \
            else None
    return {"chat": name, "image_size": side, "image_tokens": image_tokens(side),
            "turns": turns, "total": {"hits": hits, "queries": queries, "prompt_tokens": prompt,
                                      "hit_rate": hits / queries if queries else None,
                                      "hits_per_prompt_token": hits / prompt if prompt
                                      else None,
                                      "selected_turns": sum(bool(t["selected"]) for t in turns)
                                      if mode != "none" else None}}


async def run_mode(server: Server, mode: str, plan: dict, args) -> dict:
    from vllm_kvsparse.bench.client import discover_model, make_client
    out = {"rounds": [], "chats": []}
    root, v1 = server.url, server.url + "/v1"
    async with make_client(args.request_timeout, None) as http:
        model, err = await discover_model(http, root)
        if err:
            raise RuntimeError(f"{mode}: /v1/models: {err}")
        if "itl" in args.parts:
            t0 = time.perf_counter()
            warm = plan["warmup"]
            w = await asyncio.gather(
                stream_chat(http, v1, model, warm["short"], 8, t0, args.request_timeout),
                stream_chat(http, v1, model, warm["long"], 2, t0, args.request_timeout))
            out["warmup"] = {"seconds": time.perf_counter() - t0,
                             "prompt_tokens": [r["prompt_tokens"] for r in w],
                             "errors": [r["error"] for r in w if r["error"]]}
            for i, rnd in enumerate(plan["rounds"]):
                print(f"  round {i}: {len(rnd['shorts'])} shorts + long prompt ...", flush=True)
                out["rounds"].append(await itl_round(http, root, v1, model, rnd, args))
                await asyncio.sleep(1.0)
        if "prefix" in args.parts and mode in PREFIX_MODES:
            for name, side, seed in (("large", args.image_size, 77),
                                     ("small", args.small_image_size, 78)):
                print(f"  prefix-cache chat '{name}' ({args.chat_turns} turns) ...", flush=True)
                out["chats"].append(await chat(http, root, v1, model, mode, name, side, seed,
                                               args))
    return out


# ============================================================================ orchestrator

def lscpu_summary() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    keep = ("Model name", "Vendor ID", "CPU(s)", "Thread(s) per core", "Hypervisor vendor")
    info = {}
    for line in out.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in keep:
            info[key.strip()] = val.strip()
    return info


def model_spec(args) -> dict:
    return {"layers": args.layers, "hidden_size": args.hidden_size,
            "num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads,
            "qk_scale": args.qk_scale, "max_position_embeddings": 32768,
            "max_pixels": max(args.image_size, args.small_image_size) ** 2}


def kv_cache_bytes(args) -> int:
    """Room for the long request and every short at once, x1.5 (bf16 K and V, all layers)."""
    per_token = 2 * 2 * args.layers * args.num_kv_heads * (args.hidden_size // args.num_heads)
    tokens = args.max_model_len + args.shorts * (256 + args.short_tokens)
    return max(64 << 20, int(1.5 * per_token * tokens))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    spec = model_spec(args)
    hd = args.hidden_size // args.num_heads
    mdir = Path(args.models_dir) / (f"qwen2vl-l{args.layers}-h{args.hidden_size}-hd{hd}"
                                    f"-kv{args.num_kv_heads}-qk{args.qk_scale}"
                                    f"-px{spec['max_pixels']}")
    built = common.ensure_model(mdir, spec)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(mdir))
    kv_bytes = kv_cache_bytes(args)
    plan = {"rounds": build_rounds(tok, args), "warmup": build_warmup(tok, args)}
    report = {"meta": common.meta(["benchmarks/chunked_prefill.py", *argv]),
              "lscpu": lscpu_summary(),
              "model": {"dir": str(mdir), "spec": built,
                        "build_command": common.model_command(mdir, spec)},
              "settings": {k: v for k, v in vars(args).items()
                           if k not in ("models_dir", "work_dir", "out")},
              "derived": {"tokens_per_image": image_tokens(args.image_size),
                          "small_image_tokens": image_tokens(args.small_image_size),
                          "min_prompt_len": min_prompt_len(args),
                          "kv_cache_memory_bytes": kv_bytes},
              "modes": {}}
    print(common.cpu_line(report["meta"]["machine"]), flush=True)
    t_start = time.perf_counter()
    for mode in args.modes:
        sargs = server_args(mode, args, kv_bytes)
        wdir = Path(args.work_dir) / mode
        print(f"[{time.perf_counter() - t_start:6.0f}s] {mode}: vllm serve ... "
              f"{shlex.join(sargs)}", flush=True)
        entry = {"serve_args": sargs, "loadavg_before": os.getloadavg(),
                 "other_busy_processes_before": common.other_busy_processes()}
        try:
            with Server(str(mdir), sargs, wdir, args.startup_timeout) as srv:
                entry.update(startup_s=srv.startup_s, server=srv.settings(),
                             serve_command=shlex.join(srv.cmd))
                print(f"[{time.perf_counter() - t_start:6.0f}s]   up in {srv.startup_s:.0f}s "
                      f"({srv.settings()})", flush=True)
                entry["other_busy_processes_during"] = busy_others(srv.own_pids())
                entry.update(asyncio.run(run_mode(srv, mode, plan, args)))
        except Exception as e:  # noqa: BLE001 - one failed mode is reported, not fatal
            entry["error"] = f"{type(e).__name__}: {e}"[:4000]
            print(f"  FAILED: {entry['error'][:2000]}", flush=True)
        entry["loadavg_after"] = os.getloadavg()
        report["modes"][mode] = entry
    report["wall_seconds"] = time.perf_counter() - t_start
    summarize(report)
    print(render(report))
    print(footer(report))
    if args.out:
        common.write_json(Path(args.out), report)
    return 0 if not any("error" in m for m in report["modes"].values()) else 1


def summarize(report: dict) -> None:
    """report["summary"]: the pooled ITL statistics per mode and the prefix-chat totals."""
    itl, prefix = {}, []
    for mode, m in report["modes"].items():
        rounds = m.get("rounds") or []
        if rounds:
            kept = [r["kept_ratio_mean"] for r in rounds if r.get("kept_ratio_mean") is not None]
            srv = m.get("server") or {}
            itl[mode] = {
                "chunked_prefill": srv.get("chunked_prefill"),
                "max_num_batched_tokens": _flag(m["serve_args"], "--max-num-batched-tokens"),
                "long_prompt_tokens": common.median([r["long"]["prompt_tokens"]
                                                     for r in rounds]),
                "long_ttft_s": common.median([r["long"]["ttft_s"] for r in rounds]),
                "long_ttft_s_all": [r["long"]["ttft_s"] for r in rounds],
                "itl_during_prefill": stats_ms([x for r in rounds for x in r["itl_during_s"]]),
                "itl_overall": stats_ms([x for r in rounds for x in r["itl_overall_s"]]),
                "itl_during_engine_prefill": stats_ms(
                    [x for r in rounds for x in r.get("itl_during_engine_prefill_s") or []]),
                "engine_rounds": sum(1 for r in rounds if r.get("long_engine")),
                "long_engine_queue_s": common.median(
                    [(r.get("long_engine") or {}).get("queue_s") for r in rounds]),
                "long_engine_prefill_s": common.median(
                    [(r.get("long_engine") or {}).get("prefill_s") for r in rounds]),
                "kept_ratio_per_layer": _mean_layers(rounds),
                "shorts_decoding_past_window": [r["shorts_decoding_past_window"]
                                                for r in rounds],
                "tokens_during": sum(r["tokens_during"] for r in rounds),
                "max_tokens_per_chunk_during": max(r["max_tokens_per_chunk_during"]
                                                   for r in rounds),
                "shorts": len(rounds[0]["shorts"]),
                "kept_ratio_mean": sum(kept) / len(kept) if kept else None,
                "errors": [e for r in rounds for e in r["errors"]]}
        for c in m.get("chats") or []:
            prefix.append({"mode": mode, **c})
    report["summary"] = {"itl": itl, "prefix": prefix}


def footer(report: dict) -> str:
    """Load and other busy processes per mode, wall time and the CPU."""
    lines = []
    for mode, m in report["modes"].items():
        busy = m.get("other_busy_processes_during", m["other_busy_processes_before"])
        load = " ".join(f"{x:.2f}" for x in m["loadavg_before"])
        lines.append(f"{mode}: loadavg before {load}; {len(busy)} other busy processes "
                     "(tests, servers, installs)" + (": timings contended" if busy else ""))
    lines.append(f"wall time {report['wall_seconds'] / 60:.1f} min; "
                 + common.cpu_line(report["meta"]["machine"]))
    return "\n".join(lines)


def _mean_layers(rounds: list[dict]) -> dict | None:
    per = [r["kept_ratio_per_layer"] for r in rounds if r.get("kept_ratio_per_layer")]
    if not per:
        return None
    return {k: sum(p[k] for p in per if k in p) / sum(1 for p in per if k in p)
            for k in per[0]}


def _pmm(st: dict) -> str | None:
    """'p50 / p99 / max' of a stats_ms() dict."""
    if not st["n"]:
        return None
    return " / ".join(f"{st[k]:.0f}" if st[k] >= 10 else f"{st[k]:.1f}"
                      for k in ("p50_ms", "p99_ms", "max_ms"))


def _flag(args: list[str], name: str):
    return int(args[args.index(name) + 1]) if name in args else None


def render(report: dict) -> str:
    s = report["summary"]
    out = []
    failed = {m: e["error"] for m, e in report["modes"].items() if "error" in e}
    if s["itl"]:
        long_rows, itl_rows = [], []
        for mode, x in s["itl"].items():
            layers = x.get("kept_ratio_per_layer")
            long_rows.append([
                mode, {True: "on", False: "off", None: "?"}[x["chunked_prefill"]],
                x["max_num_batched_tokens"] or "vLLM default", x["long_prompt_tokens"],
                x["long_ttft_s"], x["long_engine_queue_s"], x["long_engine_prefill_s"],
                x["kept_ratio_mean"],
                " / ".join(f"{v:.2f}" for v in layers.values()) if layers else None,
                "; ".join(x["errors"])[:60] or None])
            d, o, alive = x["itl_during_prefill"], x["itl_overall"], \
                x["shorts_decoding_past_window"]
            itl_rows.append([
                mode, _pmm(d), f"{d['n']} ({x['tokens_during']} tok, <= "
                f"{x['max_tokens_per_chunk_during']}/chunk)",
                _pmm(x["itl_during_engine_prefill"]), _pmm(o), o["n"],
                f"{min(alive)}/{x['shorts']}" if alive else None])
        out.append("The long prompt (medians over rounds; engine queue / prefill: vLLM's "
                   "per-request histograms; kept ratio from kvsparse_ counters)")
        out.append("")
        out.append(common.markdown_table(
            ["mode", "chunked prefill", "max batched tok", "prompt tok", "TTFT s",
             "engine queue s", "engine prefill s", "kept ratio", "kept per layer",
             "errors"], long_rows))
        out.append("")
        out.append("ITL of the short requests, ms, p50 / p99 / max over streamed chunks "
                   "('during prefill': gaps overlapping [long send, long first token]; "
                   "'during engine prefill': [long first token - engine prefill s, long first "
                   "token])")
        out.append("")
        out.append(common.markdown_table(
            ["mode", "during prefill", "chunks during (tokens)", "during engine prefill",
             "overall", "chunks overall", "shorts decoding past prefill"], itl_rows))
    if s["prefix"]:
        rows = []
        for c in s["prefix"]:
            label = f"{c['chat']} ({c['image_size']}px, {c['image_tokens']} img tok)"
            for t in c["turns"]:
                rows.append([c["mode"], label, t["turn"], t["prompt_tokens"],
                             {True: "yes", False: "no", None: "-"}[t["selected"]],
                             t["queries"], t["hits"], t["hit_rate"], t["hits_per_prompt_token"],
                             t["error"]])
            tt = c["total"]
            sel = tt["selected_turns"]
            rows.append([c["mode"], label, "total", tt["prompt_tokens"],
                         None if sel is None else f"{sel}/{len(c['turns'])}", tt["queries"],
                         tt["hits"], tt["hit_rate"], tt["hits_per_prompt_token"], None])
        if out:
            out.append("")
        mpl = report.get("derived", {}).get("min_prompt_len")
        out.append(f"Prefix-cache hits on a multi-turn chat (same image each turn; zipvl "
                   f"min_prompt_len {mpl}; hit rate = hits / queries, vLLM's counters)")
        out.append("")
        out.append(common.markdown_table(
            ["mode", "chat", "turn", "prompt tok", "selected by zipvl", "queries", "hits",
             "hit rate", "hits / prompt tok", "error"], rows))
    for mode, err in failed.items():
        out.append(f"\n{mode}: FAILED: {err.splitlines()[0][:300]}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
