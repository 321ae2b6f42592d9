"""Shared fixtures: tiny models built offline, one tiny generator, one fake OpenAI server, the shipped problems,
TRL's advantages from one real GRPO step, headless Chromium."""
import json
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
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


@dataclass
class Trickle:
    """A reply mode: status 200, then `payload` one byte every `every_s` seconds (a server whose every read
    succeeds, so a per-read timeout never fires)."""
    payload: bytes
    every_s: float = 0.2


@dataclass
class EchoHeaders:
    """A reply mode: `status` with the request's headers (Authorization included) in the JSON body."""
    status: int = 401


GARBAGE = (200, b"<html>502 Bad Gateway, said as a 200</html>")  # a reply that is not JSON at all


def fail_then(n: int, reply, status: int = 503, body: bytes = b'{"error": "overloaded"}'):
    """A reply that answers `status` to the first `n` requests, then as `reply` does."""
    seen = [0]
    lock = threading.Lock()

    def answer(req):
        with lock:
            seen[0] += 1
            first = seen[0] <= n
        return (status, body) if first else reply(req)
    return answer


class FakeOpenAI:
    """An OpenAI-compatible server on loopback whose answer to each request is `reply(body)`: a dict (sent as
    200 JSON), (status, raw bytes), a `Trickle` or an `EchoHeaders`. Counts the requests and keeps every
    request body and its headers."""

    def __init__(self, reply):
        self.reply, self.bodies, self.headers = reply, [], []
        self.stopping = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.bodies.append(body)
                owner.headers.append(dict(self.headers))
                out = owner.reply(body)
                if isinstance(out, Trickle):
                    return self.trickle(out)
                if isinstance(out, EchoHeaders):
                    sent = dict(self.headers)  # the Authorization header first, as a proxy's error page quotes it
                    out = (out.status, json.dumps({"error": f"invalid key in {sent.get('Authorization')!r}",
                                                   "headers": sent}).encode())
                status, payload = (200, json.dumps(out).encode()) if isinstance(out, dict) else out
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def trickle(self, mode: Trickle):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(mode.payload)))
                self.end_headers()
                try:
                    for i in range(len(mode.payload)):
                        if owner.stopping.wait(mode.every_s):
                            return
                        self.wfile.write(mode.payload[i:i + 1])
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what a bounded caller does

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
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_openai():
    """fake_openai(reply) -> a running FakeOpenAI (stopped after the test); `chat_reply` builds answers, and
    `Trickle`, `EchoHeaders`, `GARBAGE` and `fail_then` are the fault modes."""
    servers = []

    def start(reply) -> FakeOpenAI:
        servers.append(FakeOpenAI(reply))
        return servers[-1]
    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def shipped_problems():
    from qedlib.problem_sets import load_problems
    return load_problems("shipped")


@pytest.fixture
def trl_advantages(tiny_model_path, shipped_problems, tmp_path):
    """trl_advantages(groups, scale_rewards) -> the advantages TRL's GRPOTrainer computed, per group, in one real
    training step on tiny-qwen3 (our trainer subclass, rollouts and GRPOConfig) whose one reward function returned
    `groups` flattened (one list of rewards per problem, None for an invalid grade)."""
    from transformers import AutoTokenizer
    from qedlib.config import RLConfig
    from qedlib.grpo import SingleTurnRollout, grpo_args, make_trainer, problem_prompts

    def run(groups: list[list], scale_rewards: str = "none") -> list[list[float]]:
        size, flat = len(groups[0]), [r for g in groups for r in g]

        def scripted_reward(prompts, completions, **kw):  # the rewards in TRL's batch order: group after group
            assert len(completions) == len(flat)
            return list(flat)
        rl = RLConfig(num_generations=size, prompts_per_step=len(groups), max_steps=1, max_completion_length=4,
                      reward="format", scale_rewards=scale_rewards, save_steps=100)
        dataset = problem_prompts(AutoTokenizer.from_pretrained(tiny_model_path), shipped_problems[:len(groups)],
                                  thinking=False)
        args = grpo_args(rl, tmp_path / f"trl-{scale_rewards}", seed=0, num_processes=1)
        trainer = make_trainer(rl, tiny_model_path, dataset, [scripted_reward], args,
                               rollout_func=SingleTurnRollout(rl, thinking=False))
        trainer.train()
        assert trainer.state.global_step == 1
        adv = list(trainer._logs["advantages"])  # TRL's own record of the step's advantages, in batch order
        return [adv[i * size:(i + 1) * size] for i in range(len(groups))]
    return run


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
