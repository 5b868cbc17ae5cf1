"""Serving benchmark: the same chat completions sent one after another, then all at once from 16 clients, to a
real `cadenza serve` process through the `openai` client.

    python bench/bench_serve.py --model_path results/experiment_run   # a trained llm, e.g. the README's example
    python bench/bench_serve.py --zero_shot                           # the packaged SmolLM2 as is (trainer: none)
    python bench/bench_serve.py --model_path M --clients 16 --max_tokens 48 --rounds 2

What it does:
  1. starts `cadenza serve -m MODEL -H 127.0.0.1 -p <free port> --api_key <random>` as a subprocess;
  2. checks what the issue asks of it: a chat completion, the same completion streamed (its pieces add up to the
     whole answer), a wrong key refused;
  3. sequential: `--clients` chatterbot questions sent one after another from one client; concurrent: the same
     questions sent at once from as many threads (released together by a barrier), so the server batches them.
     Each mode runs `--rounds` times; the faster round is reported;
  4. prints requests/s, completion tokens/s and latency (median, max) of both modes, their ratio, the batch sizes
     the server reports in /metrics, and how many greedy answers were the same in both modes (batching pads
     prompts; in bf16 a padded row can round differently, so an answer may differ in a late token).
Decoding is the model's `generation:` config (greedy unless it says otherwise), `--max_tokens` at most.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def zero_shot_model(folder: Path) -> Path:
    """The packaged SmolLM2-135M-Instruct saved as a Cadenza llm with `trainer: {type: none}` (nothing trained)."""
    from cadenza import Model

    config = {"model_type": "llm", "base_model": "smollm2", "input_features": [{"name": "question", "type": "text"}],
              "output_features": [{"name": "answer", "type": "text"}], "trainer": {"type": "none"},
              "preprocessing": {"sample_size": 20}, "generation": {"max_new_tokens": 48}}
    return Model(config).train(dataset="chatterbot", output_directory=folder).run_dir


def questions(n: int) -> list[str]:
    from cadenza.data.read import read_dataset

    df = read_dataset("chatterbot").drop_duplicates("question").sample(n=n, random_state=0)
    return [str(q) for q in df["question"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str, port: int, key: str, max_batch: int, wait_ms: float) -> subprocess.Popen:
    log = open(Path(tempfile.gettempdir()) / f"cadenza-serve-bench-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cadenza", "serve", "-m", model_path, "-H", "127.0.0.1",
                             "-p", str(port), "--api_key", key, "-t", "600", "--max_batch_size", str(max_batch),
                             "--batch_wait_ms", str(wait_ms), "--served_model_name", "bench", "--log_level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); its log: {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start within 10 minutes; its log: {log.name}")


def chat(client, question: str, max_tokens: int) -> tuple[str, int, float]:
    started = time.perf_counter()
    answer = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens)
    return answer.choices[0].message.content, answer.usage.completion_tokens, time.perf_counter() - started


def acceptance(client, url: str) -> None:
    import openai

    whole = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": "What is a computer?"}])
    stream = client.chat.completions.create(model="bench", stream=True,
                                            messages=[{"role": "user", "content": "What is a computer?"}])
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    print(f"chat completion: {whole.choices[0].message.content!r} ({whole.usage.completion_tokens} tokens, "
          f"{whole.choices[0].finish_reason})")
    print(f"streamed: {len(pieces)} pieces, same text: {''.join(pieces) == whole.choices[0].message.content}")
    try:
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        print("wrong key: ACCEPTED (unexpected)")
    except openai.AuthenticationError:
        print("wrong key: refused (401)")


def run_sequential(client, prompts: list[str], max_tokens: int) -> tuple[list, float]:
    started = time.perf_counter()
    results = [chat(client, q, max_tokens) for q in prompts]
    return results, time.perf_counter() - started


def run_concurrent(client, prompts: list[str], max_tokens: int) -> tuple[list, float]:
    barrier = threading.Barrier(len(prompts) + 1)

    def one(q):
        barrier.wait()
        return chat(client, q, max_tokens)

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(one, q) for q in prompts]
        barrier.wait()
        started = time.perf_counter()
        results = [f.result() for f in futures]
    return results, time.perf_counter() - started


def batch_stats(url: str, key: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))  # noqa: E731
    return value("cadenza_batch_rows_count"), value("cadenza_batch_rows_sum")


def summary(name: str, results: list, seconds: float) -> dict:
    tokens = sum(r[1] for r in results)
    latencies = [r[2] for r in results]
    return {"mode": name, "requests": len(results), "seconds": seconds, "req_s": len(results) / seconds,
            "tokens": tokens, "tok_s": tokens / seconds, "p50": statistics.median(latencies), "max": max(latencies)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_path", help="a trained llm (run folder or model folder)")
    source.add_argument("--zero_shot", action="store_true", help="serve the packaged SmolLM2 as is")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max_tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch_wait_ms", type=float, default=10.0, help="the server's --batch_wait_ms")
    a = p.parse_args()
    import openai
    import torch

    model_path = a.model_path or str(zero_shot_model(Path(tempfile.mkdtemp(prefix="cadenza-bench-serve-"))))
    key, port = secrets.token_hex(16), free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"# bench_serve: {model_path}, {a.clients} clients, max_tokens {a.max_tokens}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, --batch_wait_ms {a.batch_wait_ms:g}")
    server = start_server(model_path, port, key, max_batch=a.clients, wait_ms=a.batch_wait_ms)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
        acceptance(client, url)
        prompts = questions(a.clients)
        chat(client, prompts[0], a.max_tokens)  # warm-up
        best: dict[str, tuple] = {}
        for _ in range(a.rounds):
            for name, run in (("sequential", run_sequential), ("concurrent", run_concurrent)):
                before = batch_stats(url, key)
                results, seconds = run(client, prompts, a.max_tokens)
                after = batch_stats(url, key)
                batches = (after[0] - before[0], after[1] - before[1])
                if name not in best or seconds < best[name][1]:
                    best[name] = (results, seconds, batches)
        rows = [summary(name, *best[name][:2]) for name in ("sequential", "concurrent")]
        print("\n| mode | requests | wall s | requests/s | completion tokens | tokens/s | latency p50 s | max s | "
              "batches (mean rows) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            batches, batch_rows = best[row["mode"]][2]
            print(f"| {row['mode']} | {row['requests']} | {row['seconds']:.2f} | {row['req_s']:.2f} | "
                  f"{row['tokens']} | {row['tok_s']:.1f} | {row['p50']:.2f} | {row['max']:.2f} | {batches:.0f} "
                  f"({batch_rows / max(batches, 1):.1f}) |")
        seq, conc = rows
        same = sum(s[0] == c[0] for s, c in zip(best["sequential"][0], best["concurrent"][0]))
        print(f"\nconcurrent / sequential: {conc['req_s'] / seq['req_s']:.2f}x requests/s, "
              f"{conc['tok_s'] / seq['tok_s']:.2f}x tokens/s; all {len(best['concurrent'][0])} concurrent requests "
              f"succeeded; {same}/{len(prompts)} greedy answers identical in both modes")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
