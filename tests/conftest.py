"""Shared fixtures: tiny models built offline, one tiny generator, one fake OpenAI server, the shipped problems,
headless Chromium."""
import json
import os
import shutil
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="session")
def tiny_model_path():
    """Folder of the tiny random Qwen3 model (built once, offline)."""
    from qedlib.models import build_tiny
    return str(build_tiny())


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_path):
    """The transformers generator around tiny-qwen3 on the CPU that every test shares (loaded once)."""
    from qedlib.config import Endpoint
    from qedlib.generation import make_generator
    return make_generator(Endpoint(model="tiny-qwen3", device="cpu", dtype="float32", batch_size=8))


def chat_reply(content: str = "", reasoning: str | None = None, finish: str = "stop", prompt_tokens: int = 100,
               completion_tokens: int = 10, logprobs: dict | None = None) -> dict:
    """An OpenAI chat-completions response body with one choice."""
    msg = {"role": "assistant", "content": content, **({"reasoning_content": reasoning} if reasoning else {})}
    return {"choices": [{"message": msg, "finish_reason": finish, "logprobs": logprobs}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}


class FakeOpenAI:
    """An OpenAI-compatible server on loopback whose answer to each request is `reply(body)`: a dict (sent as
    200 JSON) or (status, raw bytes). Counts the requests and keeps every request body."""

    def __init__(self, reply):
        self.reply, self.bodies = reply, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.bodies.append(body)
                out = owner.reply(body)
                status, payload = (200, json.dumps(out).encode()) if isinstance(out, dict) else out
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"  # an Endpoint's base_url
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def calls(self) -> int:
        """Requests answered so far."""
        return len(self.bodies)

    @property
    def prompts(self) -> list[str]:
        """The last message of every request, in order."""
        return [b["messages"][-1]["content"] for b in self.bodies]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_openai():
    """fake_openai(reply) -> a running FakeOpenAI (stopped after the test); `chat_reply` builds answers."""
    servers = []

    def start(reply) -> FakeOpenAI:
        servers.append(FakeOpenAI(reply))
        return servers[-1]
    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def shipped_problems():
    from qedlib.data import load_problems
    return load_problems("shipped")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium():
    """dom(html_file) -> the page's DOM after its scripts ran, in headless Chromium (Debian's `chromium`, which
    .ci/run installs); tests using it skip when it is not installed."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed: `apt-get install -y --no-install-recommends chromium` "
                    "(Debian) to run the HTML rendering tests")

    def dom(html_file: Path) -> str:
        with tempfile.TemporaryDirectory() as profile:
            res = subprocess.run([found, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                                  "--dump-dom", Path(html_file).resolve().as_uri()], capture_output=True, text=True,
                                 timeout=180)
        assert "<html" in res.stdout, f"chromium printed no DOM for {html_file} (rc {res.returncode}): {res.stderr[-500:]}"
        return res.stdout
    return dom
