"""`cadenza serve`: live servers on 127.0.0.1 over tiny trained models, driven by the real `openai` client and by
plain HTTP the way Ludwig's clients post. The servers run in this process (uvicorn on a thread) so that the tests
can compare their answers with the loaded model's own; one test starts the real command as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pandas as pd
import pytest

from cadenza import Model
from cadenza.serve.app import build_app
from cadenza.serve.batcher import Batcher, QueueFull
from cadenza.serve.decode import IncrementalText, find_stop, held_back
from cadenza.serve.guards import exposure_warning
from cadenza.serve.job import Failed, GenerationJob, Sampling
from cadenza.serve.settings import ServeSettings

KEY = "test-key-" + secrets.token_hex(8)
NAME = "tiny-chat"
QUESTIONS = [f"what comes after {i}" for i in range(12)]
WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
ECD_ROWS = [{"review": f"{'great fun' if i % 2 else 'dull and slow'} film number {i}", "length": 80 + i,
             "sentiment": "good" if i % 2 else "bad"} for i in range(32)]
# a short wait window makes the burst of a test one batch reliably on a busy machine
SETTINGS = ServeSettings(model_name=NAME, api_key=KEY, batch_wait_ms=200, max_tokens_limit=64, timeout_s=60)


# ============================================================================================== fixtures
@pytest.fixture(scope="module")
def serve_cache(tmp_path_factory) -> Path:
    """The Cadenza cache (embeddings, tokenized rows) of this module's models, for as long as they serve."""
    path = tmp_path_factory.mktemp("serve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CADENZA_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, serve_cache, tiny_llama_dir, tiny_bert_dir) -> dict[str, Path]:
    """A tiny LoRA llm, trained until its greedy answers differ from prompt to prompt (so that batching mistakes
    would show; fp32 so that batched and unbatched greedy decoding agree), and a tiny ecd with a text and a number
    input."""
    root = tmp_path_factory.mktemp("serve")
    quiet = lambda _: None  # noqa: E731
    llm = {"model_type": "llm", "base_model": str(tiny_llama_dir),
           "input_features": [{"name": "question", "type": "text"}],
           "output_features": [{"name": "answer", "type": "text"}],
           "adapter": {"type": "lora", "r": 8}, "generation": {"max_new_tokens": 8},
           "trainer": {"type": "finetune", "epochs": 30, "batch_size": 4, "learning_rate": 0.01,
                       "use_mixed_precision": False}}
    rows = pd.DataFrame({"question": QUESTIONS, "answer": [f"{WORDS[i]} is followed by {WORDS[i + 1]}"
                                                           for i in range(12)]})
    llm_run = Model(llm, log=quiet).train(rows, output_directory=root / "llm").run_dir
    ecd = {"model_type": "ecd",
           "input_features": [{"name": "review", "type": "text", "encoder": {
               "type": "auto_transformer", "pretrained_model_name_or_path": str(tiny_bert_dir),
               "trainable": False}}, {"name": "length", "type": "number"}],
           "output_features": [{"name": "sentiment", "type": "category"}],
           "trainer": {"epochs": 2, "batch_size": 8}}
    ecd_run = Model(ecd, log=quiet).train(pd.DataFrame(ECD_ROWS), output_directory=root / "ecd").run_dir
    return {"llm": llm_run, "ecd": ecd_run, "cache": serve_cache}


@pytest.fixture(scope="module")
def llm(trained) -> Model:
    return Model.load(trained["llm"], log=lambda _: None)


@pytest.fixture(scope="module")
def ecd(trained) -> Model:
    return Model.load(trained["ecd"], log=lambda _: None)


@contextlib.contextmanager
def running(app):
    """The app served by uvicorn on a thread, on a free 127.0.0.1 port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", limit_concurrency=256))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def llm_url(llm):
    with running(build_app(llm, SETTINGS)) as url:
        yield url


@pytest.fixture(scope="module")
def ecd_url(ecd):
    with running(build_app(ecd, ServeSettings(model_name="tiny-ecd"))) as url:
        yield url


@pytest.fixture(scope="module")
def client(llm_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llm_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, question: str, **kwargs):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}], **kwargs)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def in_parallel(fn, items: list, workers: int = 16) -> list:
    """fn over items from that many threads, started together so that the requests arrive as one burst."""
    start = threading.Barrier(len(items))

    def call(item):
        start.wait()
        return fn(item)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(call, items))


def metric(url: str, name: str, **labels) -> float:
    """One sample of the server's /metrics (0 when the series does not exist yet)."""
    text = httpx.get(f"{url}/metrics", headers=auth()).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# ================================================================================= OpenAI-compatible routes
def test_chat_completion_applies_the_chat_template_and_counts_tokens(client, llm):
    answer = ask(client, "what comes after 3", max_tokens=6)
    choice = answer.choices[0]
    assert answer.model == NAME and answer.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    tok = llm.model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "what comes after 3"}], tokenize=False,
                                     add_generation_prompt=True)
    assert answer.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= answer.usage.completion_tokens <= 6
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    parts = [{"type": "text", "text": "what comes "}, {"type": "text", "text": "after 3"}]  # OpenAI's content parts
    same = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": parts}], max_tokens=6)
    assert same.choices[0].message.content == choice.message.content  # (greedy: the same prompt, the same answer)


def test_streamed_chat_arrives_token_by_token_and_equals_the_whole_answer(client):
    # sampled with a seed: a long answer, the same each time (the trained model's greedy answers are a word or two)
    whole = ask(client, "what comes after 5", max_tokens=12, temperature=1.0, seed=1)
    chunks = list(ask(client, "what comes after 5", max_tokens=12, temperature=1.0, seed=1, stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 1  # streamed as it is generated, not in one piece at the end
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # asked for with include_usage


def test_completions_several_prompts_and_n_and_the_models_list(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    out = client.completions.create(model=NAME, prompt=["what comes after 1", "what comes after 2"], n=2,
                                    max_tokens=4, temperature=1.0, seed=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    assert out.usage.completion_tokens <= 16 and out.usage.prompt_tokens > 0
    streamed = client.completions.create(model=NAME, prompt="what comes after 1", max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == client.completions.create(
        model=NAME, prompt="what comes after 1", max_tokens=5).choices[0].text


def test_batched_greedy_answers_equal_unbatched_generation(client, llm, llm_url):
    # prompts of different lengths: the batch is left-padded, which must not change any answer
    questions = ["hi", "what comes after 7", "tell me the number that comes after eleven, please", "and 9?",
                 "what comes after 10", "count: 1 2 3 4 5 6 7 8", "a", "what is next after 99999"]
    expected = [llm.generate([q], max_new_tokens=10)[0] for q in questions]  # one at a time: no padding
    assert len(set(expected)) >= 4, expected  # the model answers each prompt its own way
    batches_before = metric(llm_url, "cadenza_batch_rows_count")
    head = llm.model.model.get_output_embeddings()
    contiguous = []  # the LM head's input in the batches: contiguous, or torch copies its weight per row
    recorder = head.register_forward_hook(lambda module, args, out: contiguous.append(args[0].is_contiguous()))
    try:
        answers = in_parallel(lambda q: ask(client, q, max_tokens=10).choices[0].message.content, questions)
    finally:
        recorder.remove()
    assert batches_before + len(questions) > metric(llm_url, "cadenza_batch_rows_count")  # some shared a batch
    assert [a.strip() for a in answers] == expected
    assert contiguous and all(contiguous)


def test_sixteen_concurrent_requests_all_succeed_in_shared_batches(client, llm_url):
    batches_before = metric(llm_url, "cadenza_batch_rows_count")
    rows_before = metric(llm_url, "cadenza_batch_rows_sum")
    requests = [(i, i % 2 == 1) for i in range(16)]  # half of them streamed

    def one(request):
        i, streamed = request
        if streamed:
            chunks = list(ask(client, f"what comes after {i}", max_tokens=8, stream=True))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].choices[0]
        choice = ask(client, f"what comes after {i}", max_tokens=8).choices[0]
        return choice.message.content, choice

    results = in_parallel(one, requests)
    assert len(results) == 16 and all(choice.finish_reason in ("stop", "length") for _, choice in results)
    batches = metric(llm_url, "cadenza_batch_rows_count") - batches_before
    assert metric(llm_url, "cadenza_batch_rows_sum") - rows_before == 16
    assert batches <= 8, f"16 requests took {batches} batches: they were not batched together"


def test_seeded_sampling_is_reproducible_whatever_the_batch(client):
    def sample(seed):
        return ask(client, "what comes after 2", max_tokens=10, temperature=1.0, seed=seed).choices[0].message.content

    alone = sample(11)
    together = in_parallel(lambda s: sample(s), [11, 12, 11, 13])
    assert together[0] == together[2] == alone
    assert len({alone, together[1], together[3]}) == 3  # other seeds, other text (49k-token vocabulary)


def test_stop_strings_end_the_text_before_them_streamed_or_not(client):
    def sample(seed, **kwargs):
        return ask(client, "what comes after 4", max_tokens=20, temperature=1.0, seed=seed, **kwargs)

    seed, text = next((s, t) for s in range(5, 50) if len(t := sample(s).choices[0].message.content) >= 12)
    stop = text[6:9]
    expected = text[:text.index(stop)]
    answer = sample(seed, stop=[stop, "never-seen"])
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "stop"
    chunks = sample(seed, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


# ============================================================================================== security
def test_the_api_key_guards_every_route_but_the_health_check(llm_url):
    wrong = openai.OpenAI(base_url=f"{llm_url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        ask(wrong, "hello", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for method, path in (("GET", "/metrics"), ("POST", "/predict"), ("POST", "/v1/completions"), ("GET", "/nope")):
        response = httpx.request(method, f"{llm_url}{path}")
        assert response.status_code == 401 and "missing API key" in response.text, path
    assert httpx.get(f"{llm_url}/").json()["message"] == "Cadenza server is up"


def test_exposure_warning_when_listening_everywhere_without_a_key():
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "k") is None and exposure_warning("127.0.0.1", None) is None


@pytest.mark.parametrize("body, status, message", [
    (b'{"messages": [{"role": "user", "content": "hi"}', 400, "malformed JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "colour": "blue"}', 400, "unknown field 'colour'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400, "above this server's limit"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', 400, "messages.0.role"),
    (b'{"messages": []}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": []}', 400, "'tools' is not supported"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 17}', 400, "--max_batch_size"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}', 400, "at most 4"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}', 404, "not served here"),
    (b'[1, 2]', 400, "the body must be a JSON object"),
    (b'', 400, "it is empty"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}', 400,
     "only text content parts"),
    (b'{"messages": [{"role": "user", "content": null}]}', 400, "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * (1 << 20) + b'"}]}', 413, "larger than"),
])
def test_bad_requests_get_a_4xx_that_says_why(llm_url, body, status, message):
    response = httpx.post(f"{llm_url}/v1/chat/completions", content=body,
                          headers={**auth(), "Content-Type": "application/json"})
    assert response.status_code == status and message in response.json()["error"]["message"], response.text


def test_the_openai_client_gets_typed_errors_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        ask(client, "hi", max_tokens=SETTINGS.max_tokens_limit + 1)
    with pytest.raises(openai.BadRequestError, match="unknown field 'colour'"):
        ask(client, "hi", extra_body={"colour": "blue"})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="at least one"):
        client.completions.create(model=NAME, prompt=[])
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(client, "word " * 600, max_tokens=8)
    assert ask(client, "still there?", max_tokens=2).choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def rambling(client) -> str:
    """A raw completion prompt on which the tiny model goes on for 40 tokens without an end of sequence (which
    prompts do depends on the trained weights, so it is looked for)."""
    for prompt in ("what comes after 3", "what comes after", "is followed by", "1 2 3 4 5", "seven", "the", "and"):
        if client.completions.create(model=NAME, prompt=prompt, max_tokens=40).usage.completion_tokens == 40:
            return prompt
    pytest.fail("every candidate prompt ends before 40 tokens: the slow-request tests need one that does not")


def test_a_slow_answer_is_a_504_and_frees_the_batch(llm, client, rambling):
    prompt = rambling
    started = time.monotonic()
    assert client.completions.create(model=NAME, prompt=prompt, max_tokens=40).usage.completion_tokens == 40
    all_480 = 12 * (time.monotonic() - started)  # about what 480 tokens take
    settings = ServeSettings(model_name=NAME, timeout_s=0.3, max_tokens_limit=480)
    with running(build_app(llm, settings)) as url:
        slow = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            slow.completions.create(model=NAME, prompt=prompt, max_tokens=480)
        assert e.value.status_code == 504 and "--prediction_timeout" in e.value.message
        started = time.monotonic()
        assert slow.completions.create(model=NAME, prompt="again", max_tokens=2).usage.completion_tokens <= 2
        assert time.monotonic() - started < all_480 / 2  # the abandoned request stopped generating


def test_a_client_that_leaves_a_stream_stops_its_generation(llm, rambling):
    with running(build_app(llm, ServeSettings(model_name=NAME, max_tokens_limit=480))) as url:
        quick = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        prompt = rambling
        started = time.monotonic()
        assert quick.completions.create(model=NAME, prompt=prompt, max_tokens=40).usage.completion_tokens == 40
        all_480 = 12 * (time.monotonic() - started)
        body = {"model": NAME, "prompt": prompt, "max_tokens": 480, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            assert len([next(events) for _ in range(3)]) == 3  # the stream runs; then the client hangs up
        started = time.monotonic()
        assert quick.completions.create(model=NAME, prompt="again", max_tokens=2).usage.completion_tokens <= 2
        assert time.monotonic() - started < all_480 / 2  # it did not wait for the abandoned stream's 480 tokens


# ================================================================================ Ludwig's routes
def test_ludwig_form_post_to_predict_ecd(ecd_url, ecd):
    row = ECD_ROWS[3]
    expected = ecd.predict(pd.DataFrame([{"review": row["review"], "length": row["length"]}])).iloc[0]
    form = {"review": row["review"], "length": str(row["length"])}
    for response in (httpx.post(f"{ecd_url}/predict", files={k: (None, v) for k, v in form.items()}),  # multipart
                     httpx.post(f"{ecd_url}/predict", data=form),                                    # url-encoded
                     httpx.post(f"{ecd_url}/predict", json={"review": row["review"], "length": row["length"]})):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["sentiment_predictions"] == expected["sentiment_predictions"]
        assert answer["sentiment_probability"] == pytest.approx(expected["sentiment_probability"], abs=1e-6)
        assert {"sentiment_probabilities_good", "sentiment_probabilities_bad"} <= set(answer)


def test_batch_predict_takes_ludwigs_split_form_and_json(ecd_url, ecd):
    df = pd.DataFrame(ECD_ROWS[:5])[["review", "length"]]
    df.index = [10, 11, 12, 13, 14]
    expected = ecd.predict(df)
    split = df.to_json(orient="split")
    for response in (httpx.post(f"{ecd_url}/batch_predict", data={"dataset": split}),  # Ludwig's client
                     httpx.post(f"{ecd_url}/batch_predict", content=split,
                                headers={"Content-Type": "application/json"}),
                     httpx.post(f"{ecd_url}/batch_predict", json=df.to_dict("records"))):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == {"index", "columns", "data"} and len(answer["data"]) == 5
        got = pd.DataFrame(answer["data"], columns=answer["columns"])
        assert list(got.sentiment_predictions) == list(expected.sentiment_predictions)
    assert answer["index"] == [0, 1, 2, 3, 4]  # records carry no index of their own
    first = httpx.post(f"{ecd_url}/batch_predict", data={"dataset": split}).json()
    assert first["index"] == [10, 11, 12, 13, 14]


@pytest.mark.parametrize("route, kwargs, message", [
    ("/predict", {"data": {"review": "fine"}}, "missing input features: 'length'"),
    ("/predict", {"json": {"length": 3}}, "missing input features: 'review'"),
    ("/predict", {"json": ["review"]}, "one JSON object"),
    ("/predict", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, "malformed JSON"),
    ("/predict", {"json": {"review": {"nested": 1}, "length": 3}}, "field 'review'"),
    ("/batch_predict", {"data": {"dataset": '{"columns": ["review"], "data": [["a"]]}'}},
     "missing input features: 'length'"),
    ("/batch_predict", {"data": {"dataset": "{oops"}}, "malformed JSON"),
    ("/batch_predict", {"data": {"other": "x"}}, "missing form field 'dataset'"),
    ("/batch_predict", {"json": {"columns": ["review", "length"], "data": [["a"]]}}, "row 0 has 1 values"),
    ("/batch_predict", {"json": 5}, "split"),
    ("/batch_predict", {"json": {"columns": ["review", "review", "length"], "data": [["a", "b", 1]]}},
     "repeated: 'review'"),
    ("/batch_predict", {"json": {"columns": ["review", "length"], "data": [["a", 1]], "index": [{"a": 1}]}},
     "index must be"),
])
def test_ludwig_routes_answer_400_naming_the_problem(ecd_url, route, kwargs, message):
    response = httpx.post(f"{ecd_url}{route}", **kwargs)
    assert response.status_code == 400 and message in response.json()["error"], response.text


def test_an_ecd_model_has_no_openai_routes(ecd_url):
    response = httpx.post(f"{ecd_url}/v1/chat/completions", json={"messages": []})
    assert response.status_code == 404 and "ecd model" in response.json()["error"]["message"]


def test_ludwig_predict_on_an_llm_uses_its_prompt(llm_url, llm):
    expected = llm.predict(pd.DataFrame({"question": ["what comes after 6"]}))["answer_predictions"][0]
    response = httpx.post(f"{llm_url}/predict", data={"question": "what comes after 6"}, headers=auth())
    assert response.status_code == 200 and response.json() == {"answer_predictions": expected}


# ================================================================================================ metrics
def test_metrics_in_prometheus_format(client, llm_url):
    before = metric(llm_url, "cadenza_generated_tokens_total")
    answer = ask(client, "what comes after 8", max_tokens=5)
    streamed = ask(client, "what comes after 8", max_tokens=5, stream=True, stream_options={"include_usage": True})
    streamed_tokens = list(streamed)[-1].usage.completion_tokens
    list(ask(client, "what comes after 8", max_tokens=5, stream=True))  # no usage asked for: counted all the same
    httpx.get(f"{llm_url}/no/such/path", headers=auth())
    text = httpx.get(f"{llm_url}/metrics", headers=auth()).text
    generated = metric(llm_url, "cadenza_generated_tokens_total") - before
    assert generated == answer.usage.completion_tokens + 2 * streamed_tokens
    assert metric(llm_url, "cadenza_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert "# TYPE cadenza_request_duration_seconds histogram" in text and "cadenza_queue_length " in text
    assert 'cadenza_requests_total{route="other",status="404"}' in text  # unknown paths share one label
    assert "no/such/path" not in text


# =========================================================================================== the worker
def test_batcher_groups_waiting_jobs_and_survives_a_failing_batch():
    batches, release = [], threading.Event()

    def run(jobs):
        batches.append([job.sampling.seed for job in jobs])
        release.wait(10)
        if any(job.sampling.seed == 99 for job in jobs):
            raise RuntimeError("out of memory")

    class Recorder:
        def __init__(self):
            self.events = []

        def put(self, event):
            self.events.append(event)

    def job(seed, rows=1):
        return GenerationJob([[1]] * rows, Sampling(max_tokens=1, seed=seed), Recorder())

    batcher = Batcher(run, max_rows=4, wait_s=0.05, max_queue=3)
    batcher.start()
    first = job(0)
    batcher.submit(first)
    while not batches:
        time.sleep(0.01)
    failing = [job(99), job(2, rows=2), job(3)]  # queued while the first batch runs: 4 rows, one batch
    for j in failing:
        batcher.submit(j)
    with pytest.raises(QueueFull):
        batcher.submit(job(4))
    release.set()
    deadline = time.monotonic() + 10
    while len(batches) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert batches == [[0], [99, 2, 3]]
    assert all(isinstance(j.channel.events[-1], Failed) for j in failing) and first.channel.events == []
    after = job(5)
    batcher.submit(after)  # the worker is still alive
    deadline = time.monotonic() + 10
    while len(batches) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batches[-1] == [5]
    batcher.stop()


def test_stopping_the_batcher_fails_and_cancels_the_running_batch():
    started = threading.Event()

    def run(jobs):  # generates until its request is cancelled, as the decode loop does
        started.set()
        while not all(job.cancelled for job in jobs):
            time.sleep(0.01)

    class Recorder:
        events: list = []

        def put(self, event):
            self.events.append(event)

    batcher = Batcher(run, max_rows=4, wait_s=0.01, max_queue=4)
    batcher.start()
    job = GenerationJob([[1]], Sampling(max_tokens=1), Recorder())
    batcher.submit(job)
    assert started.wait(10)
    batcher.stop(timeout_s=10)
    assert job.cancelled and isinstance(job.channel.events[-1], Failed)
    assert not batcher._thread.is_alive()


def test_incremental_text_adds_up_to_the_decoded_sequence(llama_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    text = "Café – naïve 日本語 🎉🎉 end. <|im_end|> x"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = IncrementalText(tok)
    streamed = "".join(pieces.add(t) for t in ids) + pieces.flush()
    assert streamed == tok.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in streamed


def test_stop_string_search_and_hold_back():
    assert find_stop("abc STOP def", ("STOP",), 0) == 4
    assert find_stop("abc ST", ("STOP",), 0) is None
    assert find_stop("abcSTOP", ("STOP", "bc"), 5) == 3  # a match ending in the new text counts, wherever it starts
    assert held_back("hello ST", ("STOP",)) == 2 and held_back("hello", ("STOP",)) == 0
    assert held_back("x\n\n", ("\n\nUser:", "\n")) == 2


# =============================================================================================== the CLI
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cadenza_serve_command_serves_and_refuses_a_bad_folder(trained, tmp_path):
    env = {**os.environ, "CADENZA_CACHE_DIR": str(trained["cache"]), "CADENZA_API_KEY": KEY}
    bad = subprocess.run([sys.executable, "-m", "cadenza", "serve", "-m", str(tmp_path / "nothing")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:"), bad.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cadenza", "serve", "-m", str(trained["ecd"]), "-H", "127.0.0.1",
                             "-p", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        row = {"review": "great", "length": "3"}
        assert httpx.post(f"{url}/predict", data=row, timeout=60).status_code == 401
        answer = httpx.post(f"{url}/predict", data=row, headers=auth(), timeout=60).json()
        assert answer["sentiment_predictions"] in ("good", "bad")
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "serving the ecd model" in output and "API key required" in output
