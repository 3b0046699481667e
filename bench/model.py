"""What the pipeline adds to a real model's latency: to the first token, and to the answer.

    python -m bench.model [--requests 20] [--max-tokens 32] [--json FILE]

One llama.cpp server with the packaged Gemma 3 270M (the `local` extra) answers both ways,
one request at a time (a rate the model sustains), alternating: directly (streamed chat
completions over HTTP, as a client of the server would) and through the five stage processes
(the inference stage's openai worker on the same server; the client follows the request's
token stream). Per way: time to the first token, time to the whole answer, completion
tokens per second after the first; and what the pipeline adds, at p50 and p99, two ways:
`added` pairs each request through the pipeline with the same prompt asked directly right
after it (the model's own run-to-run variation is in it), and `*_overhead` takes from each
pipeline request the model's time as the inference stage measured it (time to its first
token; the inference hop), leaving what the pipeline itself cost that request.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from bench.run import ROOT
from bench.stats import percentile
from shared.app.load import load
from shared.app.natsserver import EmbeddedNats
from shared.client import Chunk, Client
from shared.envelope import Result
from shared.status import until_consuming
from shared.topology import Topology
from shared.transport.connection import Bus
from shared.workers.local import default_cache, packaged_model

ALIAS = "gemma3-270m"
PROMPTS = [
    "Write one sentence about the sea.",
    "Name three colors.",
    "What is a message queue?",
    "Describe a cat in a few words.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _direct(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {"model": ALIAS, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, tokens = time.monotonic(), None, 0
    async with http.stream("POST", "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = orjson.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content") and first is None:
                    first = time.monotonic()
    end = time.monotonic()
    return _times(start, first or end, end, tokens)


async def _pipeline(client: Client, prompt: str) -> dict[str, float]:
    start, first, result = time.monotonic(), None, None
    async for item in client.ask_stream(prompt, "bench", timeout=120):
        if isinstance(item, Chunk) and first is None and item.text:
            first = time.monotonic()
        elif isinstance(item, Result):
            result = item
    end = time.monotonic()
    assert result is not None and result.usage is not None
    tokens = result.usage.completion_tokens or 0
    row = _times(start, first or end, end, tokens)
    # What the pipeline itself added to this very request: its times less the model's own,
    # as the inference stage measured them (free of the model's run-to-run noise).
    [hop] = [h for h in result.hops if h.stage == "inference"]
    row["ttft_overhead"] = row["ttft"] - (result.usage.ttft_ms or 0.0)
    row["total_overhead"] = row["total"] - (hop.done - hop.received) * 1000
    return row


def _times(start: float, first: float, end: float, tokens: int) -> dict[str, float]:
    rate = (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0
    return {"ttft": (first - start) * 1000, "total": (end - start) * 1000, "tps": rate}


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for key in ("ttft", "total", "ttft_overhead", "total_overhead"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[f"{key}_p50"] = round(percentile(values, 50), 2)
            out[f"{key}_p99"] = round(percentile(values, 99), 2)
    out["tokens_per_second"] = round(sum(r["tps"] for r in rows) / len(rows), 2)
    return out


async def run(args: argparse.Namespace) -> dict[str, object]:
    model = packaged_model(default_cache())
    port = _free_port()
    llama = subprocess.Popen([sys.executable, "-m", "shared.workers.llamacpp_server", "--model",
                              str(model), "--port", str(port), "--alias", ALIAS],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    store = Path(tempfile.mkdtemp(prefix="bench-model-"))
    nats_server = EmbeddedNats(store_dir=store)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            while True:
                try:
                    if (await http.get(base.removesuffix("/v1") + "/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
            nats_server.start()
            env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
            env.update({
                "ORCH_NATS_URL": nats_server.url, "ORCH_LOG_LEVEL": "WARNING",
                "ORCH_STAGES__INFERENCE__OPTIONS__WORKER": "openai",
                "ORCH_STAGES__INFERENCE__OPTIONS__OPENAI__BASE_URL": base,
                "ORCH_STAGES__INFERENCE__OPTIONS__OPENAI__MODEL": ALIAS,
                "ORCH_STAGES__INFERENCE__OPTIONS__OPENAI__MAX_TOKENS": str(args.max_tokens),
                "ORCH_STAGES__INFERENCE__OPTIONS__OPENAI__TEMPERATURE": "0",
            })  # fmt: skip
            for stage in ("rag", "assemble", "inference", "post", "stream"):
                procs.append(subprocess.Popen([sys.executable, "-m", f"services.{stage}"],
                                              cwd=ROOT, env=env))  # fmt: skip
            settings = load(nats_url=nats_server.url)
            topology = Topology(settings)
            async with await Bus.connect(nats_server.url, name="bench-model") as bus:
                await until_consuming(bus, topology, 60)
            client = await Client.connect(settings, nats_server.url)
            try:
                await _pipeline(client, "warm up")
                await _direct(http, "warm up", args.max_tokens)
                direct, piped = [], []
                for i in range(args.requests):
                    # The pipeline's prompt is the assembled one: give the direct call the
                    # same text, so both make the model do the same work.
                    prompt = PROMPTS[i % len(PROMPTS)]
                    piped.append(await _pipeline(client, prompt))
                    assembled = _assembled(prompt)
                    direct.append(await _direct(http, assembled, args.max_tokens))
            finally:
                await client.close()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        nats_server.stop()
        nats_server.cleanup()
        os.kill(llama.pid, signal.SIGTERM)
        llama.wait(15)
    d, p = _summary(direct), _summary(piped)
    # Paired: each request through the pipeline less the same prompt asked directly next.
    paired = {
        key: [a[key] - b[key] for a, b in zip(piped, direct, strict=True)]
        for key in ("ttft", "total")
    }
    added = {
        f"{key}_{q}_added_ms": round(percentile(values, n), 2)
        for key, values in paired.items()
        for q, n in (("p50", 50), ("p99", 99))
    }
    return {"requests": args.requests, "max_tokens": args.max_tokens, "direct": d,
            "pipeline": p, "added": added,
            "tokens_per_second_ratio": round(p["tokens_per_second"] / d["tokens_per_second"], 3)
            if d["tokens_per_second"] else None}  # fmt: skip


def _assembled(prompt: str) -> str:
    from services.assemble.stage import DEFAULT_TEMPLATE, render
    from shared.data import CONTEXT
    from shared.envelope import Envelope
    from shared.retrieval import Retriever

    env = Envelope(request_id="b", session_id="bench", input=prompt, created_at=0.0)
    return render(DEFAULT_TEMPLATE, CONTEXT.write(env, Retriever.from_file(None).search(prompt, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
