"""Issue 22 gaps: failures whose first tests went around the code path the issue reported, each reproduced here
through the function the runner, the notebook or the trainer really calls.

1: a distill, eval or calibration run that ends below max_invalid_rate with failed calls must not be skipped by the
   next run (its record alone would vouch for missing rows); 7: a new seed (or thinking, base_model) with `--stages`
   naming a later stage was skipped by its completion record, and eval with a new seed must generate new rows;
   8: an unset API-key variable, a missing SFT dataset or benchmark file fail before any stage, a torn checkpoint-N
   does not block `resume: true` of a real trainer; 9: a missing data file in `plan` is one line; item 5: a stale
   lock is taken over with a message naming the dead holder."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import chat_reply, fail_then
from test_calibration import JUDGE_A, JUDGE_B, calibration_config, scripted_judge
from test_faults_stages import PROBLEMS, Policy, _sample, closed_port_url, distill_cfg, eval_cfg, http_judge
from qedlib.stages import distill
from qedlib.stages import evaluation
from qedlib import runner
from qedlib.__main__ import main
from qedlib.config import RLConfig, load_config
from qedlib.grading import Grader
from qedlib.files import read_jsonl
from qedlib.layout import REPO, STAGES
from qedlib.grpo import train_on_problems
from qedlib.run_state import (LOCK_FILE, RunLocked, acquire_lock, check_record, work_left_to_redo, release_lock,
                              write_record)

SMOKE = str(REPO / "params" / "smoke.yaml")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TRL_EXPERIMENTAL_SILENCE": "1"}


def finished_records(run_dir, cfg) -> None:
    """Completion records of every stage as a finished run with `cfg` leaves them (stage folders with no files)."""
    for stage in STAGES:
        (run_dir / stage).mkdir(parents=True, exist_ok=True)
        write_record(cfg, run_dir, stage, "stage")


# ---------------------------------------------------------------- failure 7: keys miss settings (the runner's skip)
@pytest.mark.parametrize("key,value,first", [("seed", 1, "01_distill"), ("thinking", False, "02_sft"),
                                             ("base_model", "tiny-qwen3-other", "01_distill")])
def test_a_changed_global_setting_reruns_every_stage_that_uses_it_even_when_run_alone(tmp_path, key, value, first):
    """`run --stages eval --set seed=1` on a finished run: eval samples with the seed, so it must not be skipped
    (each stage's record names the global keys it reads, not only through the chain of the stages before it)."""
    cfg = load_config(SMOKE)
    finished_records(tmp_path, cfg)
    assert all(check_record(cfg, tmp_path, s)[0] for s in STAGES)
    changed = load_config(SMOKE, {key: value})
    assert getattr(changed, key) != getattr(cfg, key)
    for stage in STAGES[STAGES.index(first):]:  # no earlier stage reruns: each later record must see the key itself
        done, why = check_record(changed, tmp_path, stage)
        assert not done and why == f"settings changed: {key}", (stage, why)
    for stage in STAGES[:STAGES.index(first)]:
        assert check_record(changed, tmp_path, stage)[0]
    # what the runner prints before it starts agrees with what it then does
    runner.write_text_if_changed(tmp_path / "config.yaml", runner.config_text(cfg))
    assert list(runner.say_config_changes(tmp_path / "config.yaml", changed, ["05_eval"])) == ["05_eval"]


def test_eval_with_a_new_seed_generates_new_rows_and_keeps_the_old_ones_apart(tmp_path, tiny_generator):
    folder = tmp_path / "05_eval"
    policy = Policy(tiny_generator)
    first = evaluation.run_stage(eval_cfg(tmp_path), tmp_path, stage_folder=folder, policy_factory=lambda ep: policy)
    assert policy.prompts == 6
    again = evaluation.run_stage(eval_cfg(tmp_path), tmp_path, stage_folder=folder, policy_factory=lambda ep: policy)
    assert policy.prompts == 6 and {r["key"] for r in again} == {r["key"] for r in first}  # same seed: resumed
    seeded = evaluation.run_stage(eval_cfg(tmp_path, seed=1), tmp_path, stage_folder=folder, policy_factory=lambda ep: policy)
    assert policy.prompts == 12  # every row generated again under seed 1
    assert len(seeded) == 6 and {r["key"] for r in seeded}.isdisjoint(r["key"] for r in first)
    assert {r["model_solution"] for r in seeded} != {r["model_solution"] for r in first}
    assert len(list(read_jsonl(folder / "results.jsonl"))) == 12
    back = evaluation.run_stage(eval_cfg(tmp_path), tmp_path, stage_folder=folder, policy_factory=lambda ep: policy)
    assert policy.prompts == 12 and {r["key"] for r in back} == {r["key"] for r in first}  # seed 0's rows are kept


# ---------------------------------------------------------------- failure 8: fail early, name the thing
def test_unset_api_key_and_missing_data_files_fail_before_any_stage(tmp_path):
    """The issue's late failures: an API-key variable the eval judge reads only at 05 (after training), a benchmark
    file and an SFT dataset that are not there; one refusal naming each, before any notebook runs."""
    env = {k: v for k, v in ENV.items() if k != "QED_GAP_UNSET_KEY"}
    bench, data = tmp_path / "gone" / "bench.jsonl", tmp_path / "gone" / "sft.jsonl"
    r = subprocess.run([sys.executable, "-m", "qedlib", "run", SMOKE, "--outputs", str(tmp_path), "--stages", "sft",
                        "rubric_rl", "eval", "--set", "eval.judge.endpoint.backend=openai", "--set",
                        "eval.judge.endpoint.base_url=http://127.0.0.1:9/v1", "--set",
                        "eval.judge.endpoint.api_key_env=QED_GAP_UNSET_KEY", "--set",
                        f"eval.benchmarks=[shipped, {{name: mine, path: {bench}}}]", "--set", f"sft.dataset={data}"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "before any stage starts" in r.stderr and "Traceback" not in r.stderr
    assert "eval.judge: environment variable QED_GAP_UNSET_KEY is not set" in r.stderr
    assert f"eval.benchmarks[1].path: {bench} does not exist" in r.stderr
    assert f"sft.dataset: {data} does not exist" in r.stderr
    assert not any((tmp_path / "smoke" / s).exists() for s in STAGES)  # nothing ran


def test_sft_from_distill_with_no_distill_output_fails_before_any_stage(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qedlib", "run", SMOKE, "--outputs", str(tmp_path), "--stages", "sft"],
                       capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"sft.dataset is 'distill' but {tmp_path / 'smoke' / '01_distill' / 'dataset'} does not exist" in r.stderr
    assert not (tmp_path / "smoke" / "02_sft").exists()


def test_a_torn_checkpoint_does_not_block_resume_of_a_real_trainer(tiny_model_path, shipped_problems, tmp_path, capsys):
    """Killed while saving checkpoint-2 (no trainer_state.json): `resume: true` starts from checkpoint-1 and trains
    on, instead of failing every rerun until the folder is deleted by hand."""
    rl = RLConfig(num_generations=2, prompts_per_step=2, max_steps=2, max_completion_length=6, reward="format",
                  save_steps=1)
    train_on_problems(rl, tiny_model_path, shipped_problems[:4], tmp_path, thinking=False)
    torn = tmp_path / "checkpoint-2"
    (torn / "trainer_state.json").unlink()  # the Trainer writes it last: a kill mid-save leaves the rest
    for f in torn.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])  # and a half-written weights file
    rows, trainer = train_on_problems(replace(rl, max_steps=3), tiny_model_path, shipped_problems[:4], tmp_path,
                                      thinking=False, resume=True)
    assert f"skipping {torn}: incomplete" in capsys.readouterr().out
    assert trainer.state.global_step == 3
    assert len(trainer.generation_seconds) == 2  # steps 2 and 3: resumed from checkpoint-1, not from step 0
    assert (tmp_path / "checkpoint-3" / "trainer_state.json").is_file()


# ---------------------------------------------------------------- item 5: one writer per run folder
def test_a_stale_lock_is_taken_over_with_a_message_and_a_live_one_refused(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no process has now
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "yesterday",
                                "command": "python -m qedlib run params/cpu.yaml", "token": "old"}))
    token = acquire_lock(tmp_path, "python -m qedlib run params/smoke.yaml")
    said = capsys.readouterr().out
    assert f"taking over the stale lock of a dead process: pid {dead.pid}" in said and str(lock) in said
    held = json.loads(lock.read_text())
    assert (held["pid"], held["token"]) == (os.getpid(), token)
    with pytest.raises(RunLocked, match=rf"in use by pid {os.getpid()} on .*params/smoke.yaml"):
        acquire_lock(tmp_path, "python -m qedlib run params/smoke.yaml")  # a live holder (this process) is refused
    release_lock(tmp_path, "not-the-token")
    assert lock.exists()  # only its holder removes it
    release_lock(tmp_path, token)
    assert not lock.exists()


# ---------------------------------------------------------------- failure 9: one line, not a traceback
def test_plan_with_a_missing_benchmark_file_is_one_line_naming_it(tmp_path, capsys):
    gone = tmp_path / "bench.jsonl"
    assert main(["plan", SMOKE, "--set", f"eval.benchmarks=[{{name: mine, path: {gone}}}]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{gone} does not exist" in err and "Traceback" not in err


# ---------------------------------------------------------------- failure 1: a stage that ends with failed calls
def test_eval_finished_with_failed_judge_calls_is_not_skipped_by_the_next_run(tmp_path, monkeypatch, tiny_generator,
                                                                              fake_openai):
    """Below eval.max_invalid_rate the stage ends and the runner records it; the rerun must still redo the failed
    rows (the runner would otherwise skip a 'finished' stage and the missing rows would never come)."""
    monkeypatch.setenv("QED_T_JUDGE_URL", closed_port_url())
    cfg = eval_cfg(tmp_path, **{"eval.judge": http_judge("QED_T_JUDGE_URL"), "eval.max_invalid_rate": 1.0})
    policy = Policy(tiny_generator)
    evaluation.run_stage(cfg, tmp_path, policy_factory=lambda ep: policy)
    write_record(cfg, tmp_path, "05_eval", "stage")  # what the runner does when the notebook ends
    done, why = check_record(cfg, tmp_path, "05_eval")
    assert not done and "failed calls" in why and evaluation.FAILURES_FILE in why, why
    judge = fake_openai(lambda body: chat_reply("Fine. <score>6</score>"))
    monkeypatch.setenv("QED_T_JUDGE_URL", judge.url)
    rows = evaluation.run_stage(cfg, tmp_path, policy_factory=lambda ep: policy)
    assert len(rows) == 6 and judge.calls >= 1
    write_record(cfg, tmp_path, "05_eval", "stage")
    assert check_record(cfg, tmp_path, "05_eval")[0]  # complete now: the next run skips it


def test_distill_finished_with_failed_judge_calls_is_not_skipped_by_the_next_run(tmp_path, monkeypatch, fake_openai):
    judge = fake_openai(fail_then(2, lambda body: chat_reply("Fine. <score>6</score>")))
    monkeypatch.setenv("QED_T_JUDGE_URL", judge.url)
    cfg = distill_cfg(**{"distill.judge": {"endpoint": {"backend": "openai", "model": "judge", "max_retries": 0,
                                                        "base_url_env": "QED_T_JUDGE_URL"}, "mode": "text",
                                           "cache": False}})
    folder = tmp_path / "01_distill"
    samples = [_sample(p, i) for p in PROBLEMS for i in range(2)]
    stats = distill.grade_samples(PROBLEMS, samples, Grader(cfg.distill.judge), folder, chunk=1, progress=False,
                                  max_invalid_rate=1.0)
    assert (stats["graded"], stats["judge_errors"]) == (4, 2)
    write_record(cfg, tmp_path, "01_distill", "stage")
    done, why = check_record(cfg, tmp_path, "01_distill")
    assert not done and "2 judge calls failed" in why, why
    again = distill.grade_samples(PROBLEMS, samples, Grader(cfg.distill.judge), folder, chunk=1, progress=False)
    assert (again["graded"], again["skipped"], again["judge_errors"]) == (2, 4, 0)
    write_record(cfg, tmp_path, "01_distill", "stage")
    assert check_record(cfg, tmp_path, "01_distill")[0]


def test_calibration_with_a_failed_judge_call_leaves_open_work_until_redone(tmp_path, fake_openai):
    """Item 1, calibration alike: a failed calibration grade is no grade (test_calibration), and the eval stage it
    belongs to is not skipped by the next run until that call was made."""
    server_a, server_b = fake_openai(scripted_judge(JUDGE_A)), fake_openai(scripted_judge(JUDGE_B))
    cfg = calibration_config(tmp_path, server_a.url, server_b.url)
    run = evaluation.Evaluation(cfg, tmp_path / "05_eval")
    evaluation.judge_comparison(run, [], cfg, evaluation.judge_calibration(run, [], cfg))  # judge B fails on P2-C
    assert "1 calibration judge call failed" in work_left_to_redo(tmp_path, "05_eval")
    JUDGE_B["P2-C"] = 2
    try:
        evaluation.judge_comparison(run, [], cfg, evaluation.judge_calibration(run, [], cfg))
    finally:
        JUDGE_B["P2-C"] = None
    assert work_left_to_redo(tmp_path, "05_eval") is None
