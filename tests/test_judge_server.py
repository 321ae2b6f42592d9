"""JudgeServer start / wait / stop with real server processes on loopback (qedlib.judge_server)."""
import os
import sys

import httpx
import pytest

from qedlib.judge_server import JudgeServer, JudgeServerError, free_port, katan_echo_command, vllm_serve_command


def test_vllm_command_is_printed_exactly():
    cmd = vllm_serve_command("openai/gpt-oss-20b", 8123, extra_args=["--max-model-len", 32768])
    assert cmd == ["vllm", "serve", "openai/gpt-oss-20b", "--host", "127.0.0.1", "--port", "8123",
                   "--max-model-len", "32768"]
    server = JudgeServer("openai/gpt-oss-20b", 8123, ["--max-model-len", "32768"])
    assert server.command_line() == "vllm serve openai/gpt-oss-20b --host 127.0.0.1 --port 8123 --max-model-len 32768"
    assert server.base_url == "http://127.0.0.1:8123/v1"
    with pytest.raises(ValueError):
        JudgeServer()


def test_plain_http_server_start_wait_stop(tmp_path, capsys):
    port = free_port()
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text('{"data": []}')  # http.server serves /v1/models from this folder
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with JudgeServer(command=cmd, port=port, startup_timeout_s=30) as server:
        assert server.running
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
        pid = server.proc.pid
    assert "http.server" in capsys.readouterr().out  # the exact command was printed
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_llm_katan_start_serve_stop():
    os.environ.setdefault("QED_TEST_JUDGE_KEY", "local-test-key")
    port = free_port()
    with JudgeServer(command=katan_echo_command(port), port=port, startup_timeout_s=60) as server:
        r = httpx.post(server.base_url + "/chat/completions", timeout=10,
                       headers={"Authorization": "Bearer local-test-key"},
                       json={"model": "echo", "messages": [{"role": "user", "content": "hello judge"}]})
        assert r.status_code == 200 and "hello judge" in r.json()["choices"][0]["message"]["content"]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)


def test_process_that_exits_raises_with_its_log():
    cmd = [sys.executable, "-c", "import sys; print('no GPU found'); sys.exit(3)"]
    with pytest.raises(JudgeServerError, match="(?s)exited with code 3.*no GPU found"):
        JudgeServer(command=cmd, startup_timeout_s=30).start()


def test_never_healthy_times_out_and_is_killed():
    cmd = [sys.executable, "-c", "import time; print('loading weights', flush=True); time.sleep(60)"]
    server = JudgeServer(command=cmd, startup_timeout_s=1.5)
    with pytest.raises(JudgeServerError, match="(?s)not healthy after 2s.*loading weights"):
        server.start()
    assert server.proc is None


def test_missing_executable_is_a_clear_error():
    with pytest.raises(JudgeServerError, match="cannot start 'no-such-server-binary'"):
        JudgeServer(command=["no-such-server-binary"]).start()
