"""`pyjamba serve` as a real process, driven by the official `openai` client over loopback: completions,
chat, streaming, concurrent clients against each alone, disconnects freeing their slots, SIGTERM
draining, and one-line errors for bad command lines."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pyjamba.runtime import SHIPPED_MODEL, load
from pyjamba.testing import tiny_model_folder

openai = pytest.importorskip("openai")

NEVER_EOS = {"2": -100}  # keeps the random model from ending early, so lengths are known


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-serve-cli"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m pyjamba serve` process on a free loopback port."""

    def __init__(self, model_dir, *args: str) -> None:
        self.name = Path(model_dir).name if model_dir else None  # the served name: the folder's
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "pyjamba", "serve", "--port", str(self.port), "--threads", "1"]
        command += ["--model", str(model_dir)] if model_dir else []  # none: the shipped model
        command += list(args)
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not become healthy")
            time.sleep(0.1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")

    def wait_for(self, name: str, value: float, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while (current := self.metric(name)) != value and time.monotonic() < deadline:
            time.sleep(0.05)
        return current

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--slots", "4")
    yield s
    s.stop()


def test_the_openai_client_completes_chats_and_streams(server):
    client = server.client
    name = server.name
    assert [m.id for m in client.models.list().data] == [name]
    whole = client.completions.create(model=name, prompt="Once upon a time", max_tokens=16, temperature=0)
    assert whole.choices[0].finish_reason in ("stop", "length")
    stream = client.completions.create(
        model=name, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == whole.choices[0].text

    messages = [{"role": "user", "content": "Tell me about Jamba."}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=name,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == chat.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=name, prompt="hi", temperature=-1)


def test_a_request_alongside_seven_others_gets_what_it_gets_alone(server):
    client = server.client
    prompts = [f"Request number {i}: " + "word " * (i * 3) for i in range(8)]

    def ask(prompt: str) -> list[str]:
        answer = client.completions.create(
            model=None,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            logprobs=0,
            extra_body={"logit_bias": NEVER_EOS},
        )
        return answer.choices[0].logprobs.tokens

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert all(len(tokens) == 24 for tokens in alone)


def test_a_client_that_goes_away_frees_its_slot(server):
    body = {"prompt": "Hi", "max_tokens": 4000, "logit_bias": NEVER_EOS}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            assert server.metric("pyjamba_slots_in_use") == 1
        # Leaving the block closed the connection mid-stream.
        assert server.wait_for("pyjamba_slots_in_use", 0) == 0
    with pytest.raises(httpx.TimeoutException):  # a non-streaming request abandoned by its client
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
    assert server.wait_for("pyjamba_slots_in_use", 0) == 0
    assert server.metric("pyjamba_queue_length") == 0


def test_sigterm_finishes_running_requests_and_refuses_new_ones(model_dir):
    server = Server(model_dir, "--slots", "2")
    try:
        lines: list[str] = []
        opened = threading.Event()

        def stream() -> None:
            body = {"prompt": "Hi", "max_tokens": 200, "stream": True, "logit_bias": NEVER_EOS}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    opened.set()
                    if line:
                        lines.append(line)

        reader = threading.Thread(target=stream)
        reader.start()
        assert opened.wait(60)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = httpx.post(
            server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=10
        )
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        reader.join(60)
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(60) == 0
    finally:
        server.stop()


def test_without_model_it_serves_the_shipped_model():
    if not (SHIPPED_MODEL / "config.json").is_file():
        pytest.skip("no model ships with this version of pyjamba")
    server = Server(None, "--slots", "2")
    try:
        assert [m.id for m in server.client.models.list().data] == [SHIPPED_MODEL.name]
        answer = server.client.completions.create(
            model=SHIPPED_MODEL.name, prompt="It is a truth", max_tokens=8, temperature=0
        )
        # Greedy, with the generation_config.json defaults the request leaves out (its repetition penalty).
        expected = load(None).complete("It is a truth", max_new_tokens=8, do_sample=False)
        assert answer.choices[0].text == expected
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--model", "/nonexistent/model"), "no model folder at /nonexistent/model"),
        (("--model", "{model}", "--slots", "0"), "--slots must be at least 1"),
        (("--model", "{tmp}"), "no config.json"),
    ],
)
def test_bad_command_lines_are_one_clear_line(model_dir, tmp_path, args, message):
    args = [a.format(model=model_dir, tmp=tmp_path) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "pyjamba", "serve", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_a_server_whose_model_keeps_failing_exits_1_for_its_supervisor(model_dir, monkeypatch, capsys):
    """Not a live process answering 503 forever: after max_model_failures failed steps in a row the
    engine gives up and `pyjamba serve` exits with status 1 (in process, so the model can be broken)."""
    import torch

    from pyjamba.serve import cli as serve_cli

    real_backend = serve_cli._backend

    def failing_backend(*args, **kwargs):
        backend = real_backend(*args, **kwargs)

        def broken(*a, **k):
            raise RuntimeError("device lost")

        backend.engine.model.forward = broken
        return backend

    monkeypatch.setattr(serve_cli, "_backend", failing_backend)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave this process's threads alone
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    statuses: list[int] = []

    def client() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        for _ in range(3):  # the engine's default: 3 failed steps in a row
            body = {"prompt": "Hi", "max_tokens": 2}
            statuses.append(httpx.post(url + "/v1/completions", json=body, timeout=30).status_code)

    thread = threading.Thread(target=client)
    thread.start()
    code = serve_cli.main(["--model", str(model_dir), "--port", str(port)])
    thread.join(60)
    assert statuses == [503, 503, 503]
    assert code == 1
    assert "the engine failed" in capsys.readouterr().err
