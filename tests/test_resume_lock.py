"""Runs that survive faults (issue 22 items 2, 5, 6; issue 21 item 3), with real processes.

One full smoke pipeline (`python -m qedlib run params/smoke.yaml`, a subprocess) is shared by the tests that need a
finished run; they work on copies when they change it. Other tests start real runner processes and kill them.
"""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qedlib.config import load_config
from qedlib.layout import REPO, STAGES
from qedlib.run_state import (LOCK_ENV, LOCK_FILE, RECORD_FILE, RunLocked, acquire_lock, check_not_locked,
                              check_record, release_lock)

SMOKE = str(REPO / "params" / "smoke.yaml")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TRL_EXPERIMENTAL_SILENCE": "1"}


def qedlib_run(*args, **kw) -> subprocess.CompletedProcess:
    """`python -m qedlib run ...` as a user types it; its exit code and output."""
    return subprocess.run([sys.executable, "-m", "qedlib", "run", *args], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=kw.get("timeout", 1500))


def start_run(outputs: Path, *args) -> subprocess.Popen:
    """A runner in its own process group (as a shell job is), so the test can kill the whole group."""
    return subprocess.Popen([sys.executable, "-m", "qedlib", "run", SMOKE, "--outputs", str(outputs), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
                            start_new_session=True)


def silent_teacher() -> tuple[socket.socket, str]:
    """A listening socket that takes connections and never answers, and the `--set` that makes distill's teacher
    call it: the stage then certainly waits mid-cell (a smoke distill can finish in seconds, so a sleep races it)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent.settimeout(180)
    teacher = {"model": "silent", "backend": "openai", "base_url": f"http://127.0.0.1:{silent.getsockname()[1]}/v1",
               "timeout_s": 600.0, "max_retries": 0}
    return silent, f"distill.teacher={json.dumps(teacher)}"


def snapshot(folder: Path) -> dict:
    """Every file under `folder`: (mtime_ns, sha256)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """A running (not zombie) process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float, what: str):
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """One whole smoke pipeline, run once by the command line; tests copy it before changing it."""
    outputs = tmp_path_factory.mktemp("resume")
    r = qedlib_run(SMOKE, "--outputs", str(outputs))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = outputs / "smoke"
    assert all((run_dir / s / RECORD_FILE).exists() for s in STAGES)
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of a run folder (mtimes kept, as `cp -a` or a move would)."""
    out = tmp_path / "outputs" / "smoke"
    shutil.copytree(run_dir, out, symlinks=True)
    return out


# ---------------------------------------------------------------- rerun = resume
@pytest.mark.smoke
def test_rerun_of_a_finished_run_changes_no_file(finished_run):
    before = snapshot(finished_run)
    t0 = time.perf_counter()
    r = qedlib_run(SMOKE, "--outputs", str(finished_run.parent))
    took = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in STAGES:
        assert f"[qedlib] {stage}: skipped, finished with these settings" in r.stdout
    assert "running" not in r.stdout
    after = snapshot(finished_run)
    assert after == before, {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    print(f"rerun of a finished smoke run: {took:.1f} s")


@pytest.mark.smoke
def test_changed_setting_names_its_keys_and_the_stages_after(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    same = load_config(SMOKE)
    assert all(check_record(same, run_dir, s)[0] for s in STAGES)  # a copied (moved) run folder is still finished
    cfg = load_config(SMOKE, {"rubric_rl.lr": 2.0e-5, "rubric_rl.launch.num_processes": 1})
    assert check_record(cfg, run_dir, "02_sft")[0]
    done, why = check_record(cfg, run_dir, "03_rubric_rl")
    assert not done and why == "settings changed: rubric_rl.lr"
    # what a stage keeps (not what it computes) and how it runs change nothing
    assert check_record(load_config(SMOKE, {"rubric_rl.keep_checkpoints": "all",
                                            "rubric_rl.launch.mode": "external"}), run_dir, "03_rubric_rl")[0]
    (run_dir / "03_rubric_rl" / RECORD_FILE).unlink()  # 03 reruns: 04 and 05 read its model, so they follow
    done, why = check_record(same, run_dir, "04_reasoning_cache_rl")
    assert not done and why == "its input from 03_rubric_rl changed"
    model = next((run_dir / "02_sft" / "model").glob("*.safetensors"))
    model.write_bytes(model.read_bytes() + b"\0")  # a model changed behind the record's back
    done, why = check_record(same, run_dir, "02_sft")
    assert not done and "missing or changed" in why


@pytest.mark.smoke
def test_run_recomputes_a_changed_stage_and_says_which_keys_changed(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    r = qedlib_run(SMOKE, "--outputs", str(run_dir.parent), "--stages", "distill", "sft",
                   "--set", "distill.sampling.temperature=0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[qedlib] running 01_distill (settings changed: distill.sampling.temperature" in r.stdout
    assert "[qedlib] running 02_sft (its input from 01_distill changed" in r.stdout
    assert json.loads((run_dir / "01_distill" / RECORD_FILE).read_text())["settings"]["distill"]["sampling"][
        "temperature"] == 0.5


@pytest.mark.smoke
def test_notebook_training_reuses_a_model_trained_with_the_same_settings(finished_run, tmp_path, capsys, monkeypatch):
    from qedlib.stages import rubric_rl
    run_dir = copy_run(finished_run, tmp_path)
    cfg = load_config(SMOKE)
    saved = json.loads((run_dir / "03_rubric_rl" / "train_result.json").read_text())
    monkeypatch.setattr(rubric_rl, "train", lambda c, d: pytest.fail("a model trained with these settings must not "
                                                                     "train again"))
    # rubric_rl.run_stage is the notebook's entry point: the saved result, no training
    assert rubric_rl.run_stage(cfg, run_dir, SMOKE, {}) == saved
    assert "not training again" in capsys.readouterr().out


@pytest.mark.smoke
def test_external_mode_waits_for_the_batch_job_or_refuses_with_its_command(finished_run, tmp_path, capsys,
                                                                          monkeypatch):
    from qedlib.stages import rubric_rl
    run_dir = copy_run(finished_run, tmp_path)
    changed = {"rubric_rl.lr": 2.0e-5, "rubric_rl.launch.mode": "external"}
    cfg = load_config(SMOKE, changed)
    result_file = run_dir / "03_rubric_rl" / "train_result.json"
    monkeypatch.setattr(rubric_rl, "train", lambda c, d: pytest.fail("external mode must not train in the notebook"))
    with pytest.raises(RuntimeError, match=r"(?s)launch.mode is external.*accelerate launch .* -m qedlib train rubric_rl"):
        rubric_rl.run_stage(cfg, run_dir, SMOKE, changed)
    # the batch job (what a cluster runs) trains with the same settings and writes the record the notebook waits for
    job = subprocess.Popen([sys.executable, "-m", "qedlib", "train", "rubric_rl", "--params", SMOKE, "--run-dir",
                            str(run_dir), "--set", "rubric_rl.lr=2.0e-5"], env=ENV, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cfg = load_config(SMOKE, {**changed, "rubric_rl.launch.wait_s": 600.0})
    result = rubric_rl.run_stage(cfg, run_dir, SMOKE, changed)
    log, _ = job.communicate(timeout=600)
    assert job.returncode == 0, log[-3000:]
    assert result == json.loads(result_file.read_text()) and result["steps"] == 2
    assert "the batch job finished" in capsys.readouterr().out
    record = json.loads((run_dir / "03_rubric_rl" / RECORD_FILE).read_text())
    assert record["complete"] == "training" and record["settings"]["rubric_rl"]["lr"] == 2.0e-5
    # the same batch job again: nothing to do
    again = subprocess.run([sys.executable, "-m", "qedlib", "train", "rubric_rl", "--params", SMOKE, "--run-dir",
                            str(run_dir), "--set", "rubric_rl.lr=2.0e-5"], env=ENV, cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "not training again" in again.stdout


# ---------------------------------------------------------------- one writer per run folder
def test_second_run_into_a_folder_is_refused_and_kill_9_ends_the_kernel(tmp_path):
    silent, teacher = silent_teacher()  # the first run stays mid-stage until it is killed
    first = start_run(tmp_path, "--stages", "distill", "--set", teacher)
    try:
        lock = tmp_path / "smoke" / LOCK_FILE
        held, _ = silent.accept()  # its kernel is waiting on the teacher
        assert lock.exists()
        second = qedlib_run(SMOKE, "--outputs", str(tmp_path), "--stages", "distill", "--set", teacher, timeout=300)
        assert second.returncode == 2
        assert f"is in use by pid {first.pid} on" in second.stderr and str(lock) in second.stderr
        assert not (tmp_path / "smoke" / "01_distill" / RECORD_FILE).exists()
        kernel = wait_for(lambda: [c for c in children(first.pid)
                                   if "ipykernel" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")],
                          180, "the first run's kernel")[0]
        os.killpg(first.pid, signal.SIGKILL)  # kill -9 of the runner's process group; the kernel is in its own session
        first.wait(timeout=30)
        t0 = time.monotonic()
        wait_for(lambda: not alive(kernel), 5, f"kernel {kernel} to end after its runner was killed")
        print(f"kernel gone {time.monotonic() - t0:.2f} s after kill -9 of the runner")
        held.close()
    finally:
        silent.close()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    # the dead runner's lock is stale: the next writer takes it over and says so
    token = acquire_lock(tmp_path / "smoke", "test")
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_lock(tmp_path / "smoke", token)
    assert not lock.exists()


def test_notebook_into_a_folder_a_live_run_holds_is_refused(tmp_path, monkeypatch, capsys):
    from qedlib.runner import start_stage
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / LOCK_FILE
        lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "now",
                                    "command": "python -m qedlib run params/smoke.yaml", "token": "abc"}))
        monkeypatch.delenv(LOCK_ENV, raising=False)
        with pytest.raises(RunLocked, match=f"being written by pid {holder.pid}"):
            start_stage(SMOKE, str(tmp_path), {}, "01_distill")
        monkeypatch.setenv(LOCK_ENV, "abc")  # the kernel of the run that holds the lock
        check_not_locked(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.delenv(LOCK_ENV)
    check_not_locked(tmp_path)  # its holder is dead now: ignored, with a message
    assert "stale lock of a dead process" in capsys.readouterr().out


def test_die_with_parent_ends_a_child_in_its_own_session_when_the_parent_is_killed(tmp_path):
    """What the runner's kernels get: the child sleeps in C (no Python poller could run), still it ends at once."""
    script = ("import subprocess, sys, time\n"
              "from qedlib.runner import die_with_parent\n"
              "import os\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True,\n"
              "                     preexec_fn=die_with_parent(os.getpid()))\n"
              "print(c.pid, flush=True)\n"
              "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait()
    wait_for(lambda: not alive(child), 2, "the child of a killed parent to end")


# ---------------------------------------------------------------- fail early, name the thing
def test_ctrl_c_ends_with_one_line_naming_the_stage(tmp_path):
    silent, teacher = silent_teacher()  # Ctrl-C lands while the kernel waits for an answer that never comes
    run = start_run(tmp_path, "--stages", "distill", "--set", teacher)
    try:
        notebook = tmp_path / "smoke" / "01_distill" / "01_distill.ipynb"
        held, _ = silent.accept()  # the kernel is now waiting for the teacher's answer
        wait_for(notebook.exists, 60, "the distill notebook to be written")
        run.send_signal(signal.SIGINT)  # Ctrl-C reaches the runner (the kernel has its own session)
        out, err = run.communicate(timeout=120)
        held.close()
    finally:
        silent.close()
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("[qedlib]")]
    assert len(lines) == 1 and "interrupted in stage 01_distill" in lines[0] and "rerun the same command" in lines[0]
    assert not (tmp_path / "smoke" / LOCK_FILE).exists()  # released on the way out
    cells = json.loads(notebook.read_text())["cells"]  # the executed notebook does not look finished
    assert "Interrupted (Ctrl-C)" in "".join(cells[0]["source"])
    unrun = [c for c in cells if c["cell_type"] == "code" and c.get("execution_count") is None]
    assert unrun and all(c["metadata"]["papermill"]["status"] == "pending" for c in unrun)


def test_missing_model_env_and_rubric_fail_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.delenv("QED_TEST_UNSET_URL", raising=False)
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"id": "p1", "problem": "Prove 1 = 1.", "rubric": "7: says why", "split": "train"}) + "\n" +
                        json.dumps({"id": "p2", "problem": "Prove 2 = 2.", "split": "train"}) + "\n")
    env = {k: v for k, v in ENV.items() if k != "QED_TEST_UNSET_URL"}
    r = subprocess.run([sys.executable, "-m", "qedlib", "run", SMOKE, "--outputs", str(tmp_path), "--stages",
                        "rubric_rl", "eval", "--set", "eval.judge.endpoint.backend=openai", "--set",
                        "eval.judge.endpoint.base_url_env=QED_TEST_UNSET_URL", "--set",
                        f"rubric_rl.problems.path={problems}"], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
    assert r.returncode == 2
    assert "before any stage starts" in r.stderr
    assert "rubric_rl.model is 'previous' but no earlier stage (sft)" in r.stderr and "rubric_rl.model: base" in r.stderr
    assert "eval.judge: environment variable QED_TEST_UNSET_URL is not set" in r.stderr
    assert f"rubric_rl.problems ({problems}): 1 of 2 problems have no rubric (first: p2)" in r.stderr
    assert not (tmp_path / "smoke" / "03_rubric_rl").exists()  # nothing ran


def test_torn_checkpoint_is_skipped_for_the_last_complete_one(tmp_path, capsys):
    from qedlib.training import last_checkpoint
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    said = capsys.readouterr().out
    assert f"skipping {tmp_path / 'checkpoint-6'}: incomplete" in said
    assert last_checkpoint(tmp_path / "absent") is None
