"""The server as a client meets it: OpenAI's own Python client against ``python -m mlx_gpt.serve``
started on a free loopback port, with bounded requests and timeouts.

Greedy answers are checked against ``generate`` (alone and under concurrent load), log-probabilities
against the model's own forward pass, and the faults a server meets (a client that leaves
mid-stream, a flood past the queue, malformed and huge bodies, Ctrl-C) against what they must leave
behind. A tiny byte-level GPT is built here; its weights are scaled up so that its greedy text
varies instead of repeating one byte.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map
import numpy as np
import pytest

from mlx_gpt import checkpoint
from mlx_gpt.generate import generate
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt import chat
from mlx_gpt.serve.openai_api import APIError, render_chat
from mlx_gpt.tokenizer import ByteTokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"
PROMPTS = ["The with statement", "def f(x):\n    return", "Hello, world", "a"]


def tiny_checkpoint(path: Path) -> Path:
    cfg = GPTConfig(vocab_size=256, block_size=1024, n_layer=2, n_head=4, n_embd=64)
    model = build(cfg, seed=7)
    # N(0, 0.02) weights give near-uniform logits and one repeated byte; larger ones vary
    model.update(tree_map(lambda a: a * 6 if a.ndim == 2 else a, model.parameters()))
    checkpoint.save(path / NAME, model, ByteTokenizer())
    return path / NAME


class Server:
    """``python -m mlx_gpt.serve`` in a subprocess on a free loopback port."""

    def __init__(self, ckpt: Path, *flags: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_gpt.serve", "--checkpoint", str(ckpt), "--port", "0",
                                      *flags], env=env, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line + self.proc.stderr.read() if self.proc.poll() is not None else line
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 60):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes, timeout: float = 30) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def model(ckpt):
    return checkpoint.load(ckpt)


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--max-batch", "8", "--prefill-chunk", "5")  # prompts fed in several chunks
    yield s
    s.close()


def solo(model, prompt: str, n: int, **kw) -> str:
    m, tok = model
    return generate(m, tok, prompt, n, temperature=0, **kw)


# ------------------------------------------------------------------------ sampling, alone


def test_choose_draws_from_the_processed_distribution():
    from mlx_gpt.serve.requests import Sampling, choose
    from mlx_gpt.sampling import apply_repetition_penalty

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(0)

    def freq(s, n=4000, **kw):
        return np.bincount([choose(logits, s, rng, **kw) for _ in range(n)], minlength=4) / n

    np.testing.assert_allclose(freq(Sampling()), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    assert set(np.nonzero(freq(Sampling(top_p=0.7)))[0]) == {0, 1}  # 0.5 + 0.3 reach 0.7
    assert set(np.nonzero(freq(Sampling(top_k=3)))[0]) == {0, 1, 2}
    assert freq(Sampling(temperature=0.05))[0] > 0.99
    assert choose(logits, Sampling(temperature=0), rng) == 0
    bias = np.array([0, 0, 0, 100], np.float32)
    assert choose(logits, Sampling(temperature=0), rng, bias=bias) == 3
    counts = np.array([3, 0, 0, 0], np.float32)  # 0.69 - 3 * 0.4 - 0.1 falls below token 1's logit
    assert choose(logits, Sampling(temperature=0, frequency_penalty=0.4, presence_penalty=0.1), rng,
                  counts=counts) == 1
    seen = np.array([True, False, False, False])
    x = np.array([2.0, 1.9, -1.0, 0.5], np.float32)
    want = int(np.argmax(np.array(apply_repetition_penalty(mx.array(x[None]), mx.array(seen[None]), 1.2))[0]))
    assert choose(x, Sampling(temperature=0, repetition_penalty=1.2), rng, seen=seen) == want == 1


# ------------------------------------------------------------------------ endpoints


def test_models_health_and_page(server):
    assert [m["id"] for m in server.get("/v1/models")["data"]] == [NAME]
    assert server.get("/health")["status"] == "ok"
    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/html") and b"/v1/completions" in r.read()


def test_greedy_completions_equal_generate(server, model):
    client = server.client()
    for prompt in PROMPTS:
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == solo(model, prompt, 24)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(prompt.encode()) and r.usage.completion_tokens == 24


def test_concurrent_greedy_answers_equal_solo_ones(server, model):
    """Requests of different lengths join and leave one batch; each answer is its solo answer."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 10 + 7 * i) for i in range(10)]
    client = server.client()
    steps = server.get("/health")["steps"]

    def ask(job):
        prompt, n = job
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, n), answer in zip(jobs, answers):
        assert answer == solo(model, prompt, n), prompt
    # decoded together: far fewer steps than tokens (each request's first token comes from its prefill)
    assert server.get("/health")["steps"] - steps < sum(n - 1 for _, n in jobs) * 0.7


def test_streaming_matches_the_whole_answer(server):
    client = server.client()
    whole = client.completions.create(model=NAME, prompt="Hello", max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt="Hello", max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 30


def test_chat_uses_the_checkpoints_template_else_the_default(server, model):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    prompt, stops = render_chat(messages, model[1])  # the tiny checkpoint has no template
    assert prompt == chat.render(chat.DEFAULT_TEMPLATE, messages, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and stops == ("<|im_end|>",)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == solo(model, prompt, 20, stop=stops)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_a_checkpoints_own_chat_template_lays_out_the_prompt_and_ends_the_turn():
    from mlx_gpt.tokenizer import ByteTokenizer, with_chat_template

    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token if m['role'] == "
                "'assistant' else '' }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    tok = with_chat_template(ByteTokenizer(), template)
    prompt, stops = render_chat([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], tok)
    assert prompt == "[system] a\n[user] b\n[assistant] "
    assert stops == ()  # nothing after an assistant's words but end-of-text, which ends it anyway
    bad = with_chat_template(ByteTokenizer(), "{{ raise_exception('no system role') }}")
    with pytest.raises(APIError) as e:
        render_chat([{"role": "user", "content": "b"}], bad)
    assert e.value.status == 400 and "no system role" in e.value.message


def test_a_chat_reads_its_templates_end_of_text_as_the_one_token_as_generate_does():
    """GPT-2's ``<|endoftext|>`` written by a template after each assistant turn is its one token in
    the served prompt, as ``generate --chat`` (``chat.encode``) and Hugging Face read it, not the
    several tokens of its text."""
    from conftest import DATA
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer
    from mlx_gpt.serve.openai_api import ModelInfo, parse_chat
    from mlx_gpt.tokenizer import with_chat_template

    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token if m['role'] == "
                "'assistant' else '' }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tok = with_chat_template(GPT2Tokenizer.from_directory(DATA / "gpt2"), template)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
    parsed = parse_chat({"model": "m", "messages": messages, "max_tokens": 4},
                        ModelInfo("m", tok, 64, tok.vocab_size, 4, 16))
    ids = list(parsed.jobs[0].prompt)
    assert ids == chat.encode(tok, render_chat(messages, tok)[0])
    assert ids.count(tok.eot_id) == 1 and ids != tok.encode(render_chat(messages, tok)[0])


def test_logprobs_and_echo_are_the_models(server, model):
    m, tok = model
    prompt = "The with statement"
    r = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    ids = tok.encode(prompt)
    assert r.choices[0].text == prompt and lp.tokens == list(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    logits = m(mx.array([ids]))[0].astype(mx.float32)
    expect = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    want = [expect[t, ids[t + 1]] for t in range(len(ids) - 1)]
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=2e-4)
    for t, top in enumerate(lp.top_logprobs[1:]):
        assert len(top) == 3
        np.testing.assert_allclose(sorted(top.values(), reverse=True), np.sort(expect[t])[::-1][:3], atol=2e-4)

    r = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 8 and all(v <= 0 for v in lp.token_logprobs)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen is the top
        assert max(top.values()) == pytest.approx(value)

    c = server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                                temperature=0, logprobs=True, top_logprobs=2)
    assert len(c.choices[0].logprobs.content) == 4 and len(c.choices[0].logprobs.content[0].top_logprobs) == 2


def test_stop_strings_cut_the_text(server, model):
    full = solo(model, "Hello, world", 40)
    stop = full[12:15]
    assert stop and full.find(stop) >= 1
    r = server.client().completions.create(model=NAME, prompt="Hello, world", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_seeds_reproduce_and_choices_differ(server):
    client = server.client()

    def ask(seed, n=1):
        r = client.completions.create(model=NAME, prompt="Once", max_tokens=40, temperature=1.0, top_p=0.95, seed=seed,
                                      n=n)
        return [c.text for c in r.choices]

    first = ask(123, n=3)
    assert ask(123, n=3) == first and len(set(first)) > 1
    assert ask(124) != first[:1]


def test_logit_bias_and_penalties(server, model):
    client = server.client()
    z = ord("z")
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=10, temperature=0, logit_bias={str(z): 100})
    assert r.choices[0].text == "z" * 10
    plain = client.completions.create(model=NAME, prompt="Hello", max_tokens=40, temperature=0).choices[0].text
    penalized = client.completions.create(model=NAME, prompt="Hello", max_tokens=40, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert len(set(penalized)) > len(set(plain))


# ------------------------------------------------------------------------ errors


def test_errors_are_openai_error_json(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    for bad in ({"temperature": 3}, {"top_p": 0}, {"n": 99}, {"max_tokens": -1}, {"logit_bias": {"999": 1}},
                {"logprobs": 50}, {"max_tokens": 1025}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, prompt="x", **bad)
        assert e.value.status_code == 400 and e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x" * 1020, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "wizard", "content": "x"}])
    status, body = server.post("/v1/completions", b'{"model": "tiny", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = server.post("/v1/completions", b"[1, 2]")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def test_a_10_mb_prompt_is_refused_quickly(server):
    start = time.monotonic()
    status, body = server.post("/v1/completions", json.dumps({"model": NAME, "prompt": "x" * 10_000_000}).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - start < 10
    assert server.get("/health")["status"] == "ok"


# ------------------------------------------------------------------------ faults


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 1000, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    for _ in range(3):
        assert r.readline().startswith(b"data: ")
        r.readline()
    steps = server.get("/health")["steps"]
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 10
    while server.get("/health")["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = server.get("/health")
    assert health["running"] == 0 and health["steps"] - steps < 900


def test_a_client_that_leaves_before_a_whole_answer_frees_its_slot(server):
    steps = server.get("/health")["steps"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 1000, "temperature": 0}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 10
    while not server.get("/health")["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    conn.sock.shutdown(2)
    conn.close()
    while server.get("/health")["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = server.get("/health")
    assert health["running"] == 0 and health["steps"] - steps < 900


def test_several_prompts_and_choices_in_one_request(server, model):
    r = server.client().completions.create(model=NAME, prompt=["Hello", "The with"], n=2, max_tokens=12,
                                           temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    want = [solo(model, "Hello", 12)] * 2 + [solo(model, "The with", 12)] * 2
    assert [c.text for c in r.choices] == want
    assert r.usage.prompt_tokens == 5 + 8 and r.usage.completion_tokens == 48


def test_flood_past_the_queue_gets_503_and_the_server_stays_up(ckpt):
    s = Server(ckpt, "--max-batch", "1", "--max-queue", "1")
    try:
        body = json.dumps({"model": NAME, "prompt": "Hi", "max_tokens": 300, "temperature": 0}).encode()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: s.post("/v1/completions", body, timeout=60), range(8)))
        statuses = sorted(status for status, _ in results)
        assert statuses.count(503) >= 1 and statuses.count(200) >= 2, statuses
        for status, body_ in results:
            if status == 503:
                assert body_["error"]["code"] == "queue_full"
            else:
                assert len(body_["choices"][0]["text"]) > 0
        r = s.client().completions.create(model=NAME, prompt="Hi", max_tokens=5, temperature=0)
        assert r.choices[0].finish_reason == "length"

        # Ctrl-C with a stream in flight: it ends at once with an error, the server exits 130
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        stream = dict(json.loads(body), stream=True, max_tokens=1000)
        conn.request("POST", "/v1/completions", body=json.dumps(stream), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")
        s.proc.send_signal(signal.SIGINT)
        rest = resp.read().decode()
        # cut short with an error chunk (or, on a fast machine, finished before the signal landed)
        assert "shutting down" in rest or '"finish_reason": "length"' in rest, rest[-500:]
        assert rest.rstrip().endswith("data: [DONE]")
        conn.close()
        assert s.proc.wait(timeout=20) == 130
        err = s.proc.stderr.read()
        assert "Traceback" not in err and err.strip().endswith("interrupted")
    finally:
        s.close()


def test_a_port_in_use_or_a_missing_checkpoint_is_one_error_line(server, ckpt):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "mlx_gpt", "serve", "--checkpoint", str(ckpt), "--port",
                           str(server.port)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{server.port}")
    proc = subprocess.run([sys.executable, "-m", "mlx_gpt.serve", "--checkpoint", str(ckpt.parent / "none")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: checkpoint {ckpt.parent / 'none'} not found"


def test_a_quantized_checkpoint_is_served_like_any_other(ckpt, tmp_path):
    from mlx_gpt import quantize

    out = quantize.quantize_checkpoint(ckpt, tmp_path / NAME, bits=8, group_size=32)
    q_model, tok = quantize.load(out)
    s = Server(out)
    try:
        r = s.client().completions.create(model=NAME, prompt="The with statement", max_tokens=20, temperature=0)
        assert r.choices[0].text == generate(q_model, tok, "The with statement", 20, temperature=0)
    finally:
        assert s.close() == 130


def test_a_modern_checkpoint_is_served_like_any_other(tmp_path):
    """The modern GPT (rotary positions, an untied and soft-capped head): greedy answers, alone and
    decoded together in one batch of rows at different positions, equal generate's."""
    from mlx_gpt.models import modern

    cfg = modern.ModernConfig(vocab_size=256, block_size=256, n_layer=2, n_head=4, n_embd=64, zero_init=False)
    m = modern.build(cfg, seed=3)
    m.update(tree_map(lambda a: a * 6 if a.ndim == 2 else a, m.parameters()))
    ckpt = checkpoint.save(tmp_path / NAME, m, ByteTokenizer())
    loaded = checkpoint.load(ckpt)
    s = Server(ckpt, "--max-batch", "4")
    try:
        jobs = [(prompt, 8 + 5 * i) for i, prompt in enumerate(PROMPTS)]

        def ask(job):
            return s.client().completions.create(model=NAME, prompt=job[0], max_tokens=job[1],
                                                 temperature=0).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        for (prompt, n), answer in zip(jobs, answers):
            assert answer == solo(loaded, prompt, n), prompt
    finally:
        assert s.close() == 130


# ------------------------------------------------------------------------ the page, in a browser


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    JSON commands on fd 3, answers on fd 4, each ended by a NUL byte), so no driver is needed."""

    def __init__(self, profile: Path) -> None:
        to_browser, self._send_fd = os.pipe()
        self._recv_fd, from_browser = os.pipe()
        # the child finds the pipe ends at 3 and 4 (moved above 4 first, so neither overwrites the other)
        ends = (to_browser, from_browser)
        to_browser, from_browser = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in ends)
        for fd in ends:
            os.close(fd)
        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=900,640", "about:blank"],
            close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: (os.dup2(to_browser, 3), os.dup2(from_browser, 4)))
        os.close(to_browser)
        os.close(from_browser)
        self._id, self._buffer, self.session = 0, b"", None

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    assert "error" not in reply, reply
                    return reply["result"]
            import select

            if select.select([self._recv_fd], [], [], 0.5)[0]:
                chunk = os.read(self._recv_fd, 1 << 20)
                assert chunk, "chromium closed its pipe"
                self._buffer += chunk
        raise TimeoutError(method)

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(expression)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._send_fd)
        os.close(self._recv_fd)


@pytest.mark.skipif(chromium() is None, reason="no chromium here (Debian: apt-get install chromium)")
def test_the_page_streams_an_answer_in_a_browser(server, model, tmp_path):
    """Headless Chromium loads the page, types a prompt, presses Send and waits for the streamed
    answer and its tokens/s; a screenshot of it is kept (at MLX_GPT_SCREENSHOT when set: the docs'
    picture is made so)."""
    import base64

    prompt = "The with statement"
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        browser.wait_for("document.getElementById('model').textContent.startsWith('model tiny')")
        browser.js(f"""document.getElementById('prompt').value = {json.dumps(prompt)};
                      document.getElementById('max_tokens').value = 60;
                      document.getElementById('temperature').value = 0;
                      document.getElementById('send').click();""")
        stats = browser.wait_for("document.getElementById('stats').textContent.includes('tokens/s') && "
                                 "document.getElementById('stats').textContent")
        assert stats.startswith("60 tokens in ") and "tokens/s" in stats
        assert browser.js("document.getElementById('out').textContent") == prompt + solo(model, prompt, 60)
        shot = Path(os.environ.get("MLX_GPT_SCREENSHOT", tmp_path / "page.png"))
        shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        browser.close()
    assert shot.stat().st_size > 1000
