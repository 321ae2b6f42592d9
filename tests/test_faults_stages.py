"""Faults are never results (issue 22, the stage parts): each test reproduces one reported failure with the real
code path (tiny-qwen3, a closed port or the fake OpenAI server) and checks what the stage does now."""
import json
import shutil
import socket

import pytest

from conftest import chat_reply
from qedlib.stages import distill
from qedlib.stages import evaluation
from qedlib.stages import rc_rl
from qedlib import grpo, rl_findings
from qedlib.stages import rubric_rl
from qedlib.config import load_config
from qedlib.problem_sets import Problem
from qedlib.grading import Grader, InvalidRateError
from qedlib.files import read_jsonl
from qedlib.layout import stage_dir
from qedlib.models import content_fingerprint
from qedlib.sft_data import SFTDataError, load_sft_data

RUBRIC = "1 point: states the claim. 6 points: a complete argument. Zero credit: restating the problem."


def closed_port_url() -> str:
    """The base URL of a loopback port nobody listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


def http_judge(url_env: str) -> dict:
    """An OpenAI-compatible text-mode judge whose URL is in `url_env`, with no retries (the tests stay short)."""
    return {"endpoint": {"backend": "openai", "model": "judge", "base_url_env": url_env, "max_retries": 0,
                         "timeout_s": 5.0}, "mode": "text", "cache": False}


class Policy:
    """Wraps the shared tiny generator: counts generate calls and prompts; raises KeyboardInterrupt (a kill) on the
    call numbered `kill_at`."""

    def __init__(self, gen, kill_at=None):
        self.gen, self.kill_at, self.calls, self.prompts = gen, kill_at, 0, 0

    @property
    def tokenizer(self):
        return self.gen.tokenizer

    @property
    def endpoint(self):
        return self.gen.endpoint

    def generate(self, prompts, sampling, thinking=False):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt("killed")
        self.prompts += len(prompts)
        return self.gen.generate(prompts, sampling, thinking)


def eval_cfg(tmp_path, **over):
    """Three toy problems, two samples each, one chunk per problem, thinking off (every text is a proof)."""
    bench = tmp_path / "bench.jsonl"
    if not bench.exists():
        bench.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"Prove that {i} + {i} is even.", "rubric": RUBRIC})
                                 + "\n" for i in range(3)))
    tiny = {"model": "tiny-qwen3", "device": "cpu", "dtype": "float32", "batch_size": 8}
    base = {"base_model": "tiny-qwen3", "generation": tiny, "thinking": False,
            "eval.benchmarks": [{"name": "toy", "path": str(bench)}], "eval.checkpoints": ["base"],
            "eval.scaffolds": ["single"], "eval.samples": 2, "eval.chunk": 1, "eval.bootstrap": 20,
            "eval.sampling": {"temperature": 1.0, "max_new_tokens": 8},
            "eval.judge": {"endpoint": tiny, "mode": "score_prob", "cache": False}}
    return load_config(None, {**base, **over})


# ---------------------------------------------------------------- failure 1: a judge outage stored as results
def test_eval_judge_outage_is_no_result_and_the_rerun_completes_exactly_the_missing_rows(tmp_path, monkeypatch,
                                                                                        tiny_generator, fake_openai):
    monkeypatch.setenv("QED_T_JUDGE_URL", closed_port_url())
    cfg = eval_cfg(tmp_path, **{"eval.judge": http_judge("QED_T_JUDGE_URL"), "eval.max_invalid_rate": 1.0})
    folder = tmp_path / "05_eval"
    policy = Policy(tiny_generator)
    evaluation.run_stage(cfg, tmp_path, stage_folder=folder, policy_factory=lambda ep: policy)
    stored = list(read_jsonl(folder / "results.jsonl")) if (folder / "results.jsonl").exists() else []
    assert all(r["valid"] and r["invalid_reason"] != "judge_error" for r in stored)  # only rows with no proof (valid 0s)
    failed = {r["key"] for r in read_jsonl(folder / evaluation.FAILURES_FILE)}
    assert len(failed) + len(stored) == 6 and failed
    judge = fake_openai(lambda body: chat_reply("The proof is fine. <score>5</score>"))
    monkeypatch.setenv("QED_T_JUDGE_URL", judge.url)
    prompts_before = policy.prompts
    rows = evaluation.run_stage(cfg, tmp_path, stage_folder=folder, policy_factory=lambda ep: policy)
    assert policy.prompts == prompts_before  # generations were logged: nothing regenerated
    assert judge.calls == len(failed)  # exactly the missing rows were graded
    assert len(rows) == 6 and {r["key"] for r in rows} >= failed
    assert all(r["score"] == 5.0 for r in rows if r["key"] in failed)
    assert len((folder / "results.jsonl").read_text().splitlines()) == 6  # no judge_error row, no duplicate


def test_eval_judge_down_stops_at_the_threshold_naming_the_endpoint(tmp_path, monkeypatch, tiny_generator):
    monkeypatch.setenv("QED_T_JUDGE_URL", closed_port_url())
    cfg = eval_cfg(tmp_path, **{"eval.judge": http_judge("QED_T_JUDGE_URL"), "thinking": False})
    policy = Policy(tiny_generator)
    with pytest.raises(InvalidRateError, match=r"\$QED_T_JUDGE_URL.*eval\.max_invalid_rate = 0\.5"):
        evaluation.run_stage(cfg, tmp_path, stage_folder=tmp_path / "05_eval", policy_factory=lambda ep: policy)
    assert policy.calls == 1  # stopped after the first chunk, not after generating everything


def test_eval_policy_endpoint_down_logs_no_generation(tmp_path, monkeypatch):
    monkeypatch.setenv("QED_T_POLICY_URL", closed_port_url())
    cfg = eval_cfg(tmp_path, **{"eval.endpoint": {"backend": "openai", "model": "policy", "max_retries": 0,
                                                  "base_url_env": "QED_T_POLICY_URL"}})
    with pytest.raises(InvalidRateError, match=r"policy.*\$QED_T_POLICY_URL"):
        evaluation.run_stage(cfg, tmp_path, stage_folder=tmp_path / "05_eval")
    gens = tmp_path / "05_eval" / "generations.jsonl"
    assert not gens.exists() or not gens.read_text().strip()
    assert [r["role"] for r in read_jsonl(tmp_path / "05_eval" / evaluation.FAILURES_FILE)] == ["policy"]


# ---------------------------------------------------------------- failure 7: keys miss settings
def test_eval_key_is_the_models_content_and_the_seed(tmp_path, tiny_model_path):
    a, b = tmp_path / "run1" / "model", tmp_path / "run2" / "model"
    shutil.copytree(tiny_model_path, a)
    shutil.copytree(tiny_model_path, b)  # a moved run folder: another path, new mtimes, the same bytes
    cfg = eval_cfg(tmp_path)
    ep = lambda path: cfg.generation.__class__(model=str(path))  # noqa: E731
    assert content_fingerprint(str(a)) == content_fingerprint(str(b))
    assert evaluation.generation_hash(cfg, ep(a)) == evaluation.generation_hash(cfg, ep(b))
    seeded = load_config(None, {"seed": 1, "thinking": False, "eval.sampling": {"temperature": 1.0, "max_new_tokens": 8}})
    assert evaluation.generation_hash(seeded, ep(a)) != evaluation.generation_hash(
        load_config(None, {"seed": 0, "thinking": False, "eval.sampling": {"temperature": 1.0, "max_new_tokens": 8}}), ep(a))
    weights = next(b.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert evaluation.generation_hash(cfg, ep(a)) != evaluation.generation_hash(cfg, ep(b))


def test_moved_run_folder_keeps_its_eval_rows(tmp_path, tiny_model_path, tiny_generator):
    run1 = tmp_path / "run1"
    shutil.copytree(tiny_model_path, run1 / "02_sft" / "model")
    cfg = eval_cfg(tmp_path, **{"eval.checkpoints": ["sft"]})
    policy = Policy(tiny_generator)
    first = evaluation.run_stage(cfg, run1, policy_factory=lambda ep: policy)
    shutil.move(str(run1), str(tmp_path / "run2"))
    again = evaluation.run_stage(cfg, tmp_path / "run2", policy_factory=lambda ep: policy)
    assert policy.calls == 6 and {r["key"] for r in again} == {r["key"] for r in first}  # nothing regenerated


def test_resumed_eval_equals_an_uninterrupted_one(tmp_path, tiny_generator):
    cfg = eval_cfg(tmp_path)
    whole = evaluation.run_stage(cfg, tmp_path, stage_folder=tmp_path / "whole", policy_factory=lambda ep: Policy(tiny_generator))
    with pytest.raises(KeyboardInterrupt):  # killed at the fourth generation call (three of six chunks done)
        evaluation.run_stage(cfg, tmp_path, stage_folder=tmp_path / "killed", policy_factory=lambda ep: Policy(tiny_generator, kill_at=4))
    resumed = evaluation.run_stage(cfg, tmp_path, stage_folder=tmp_path / "killed", policy_factory=lambda ep: Policy(tiny_generator))
    texts = lambda rows: {r["key"]: r["model_solution"] for r in rows}  # noqa: E731
    assert texts(resumed) == texts(whole) and len(set(texts(whole).values())) > 1


def distill_cfg(**over):
    tiny = {"model": "tiny-qwen3", "device": "cpu", "dtype": "float32", "batch_size": 8}
    return load_config(None, {"distill.teacher": {**tiny, "batch_size": 2}, "distill.thinking": False,
                              "distill.sampling": {"temperature": 1.0, "max_new_tokens": 8, "n": 2},
                              "distill.judge": {"endpoint": tiny, "mode": "score_prob"}, **over})


PROBLEMS = [Problem(f"p{i}", f"Prove that {i} + {i} is even.", rubric=RUBRIC) for i in range(3)]


def test_resumed_distill_equals_an_uninterrupted_one_and_the_seed_is_in_the_key(tmp_path, tiny_generator):
    dc = distill_cfg().distill
    distill.generate_samples(PROBLEMS, dc, tmp_path / "whole", Policy(tiny_generator), progress=False)
    with pytest.raises(KeyboardInterrupt):
        distill.generate_samples(PROBLEMS, dc, tmp_path / "killed", Policy(tiny_generator, kill_at=2), progress=False)
    distill.generate_samples(PROBLEMS, dc, tmp_path / "killed", Policy(tiny_generator), progress=False)
    texts = lambda folder: {r["key"]: r["text"] for r in distill.read_samples(folder, dc=dc)}  # noqa: E731
    assert texts(tmp_path / "killed") == texts(tmp_path / "whole") and len(texts(tmp_path / "whole")) == 6
    policy = Policy(tiny_generator)
    stats = distill.generate_samples(PROBLEMS, dc, tmp_path / "whole", policy, progress=False, seed=1)
    assert stats["generated"] == 6 and stats["skipped"] == 0 and policy.prompts == 6  # seed 1 reuses nothing
    assert set(texts(tmp_path / "whole")).isdisjoint(r["key"] for r in distill.read_samples(tmp_path / "whole", dc=dc, seed=1))


# ---------------------------------------------------------------- failure 4: judge down in distill
def _sample(problem, i):
    text = f"Proof. {problem.id} sample {i}: the sum of two equal integers is twice one of them."
    return {"key": distill.sample_key(problem.id, i, "h"), "problem_id": problem.id, "sample_index": i, "text": text,
            "reasoning": "", "proof": text, "think_closed": True, "finish_reason": "stop", "truncated": False,
            "prompt_tokens": 10, "completion_tokens": 20, "cost": 0.0}


def test_distill_with_the_judge_down_is_an_error_naming_the_judge(tmp_path, monkeypatch):
    monkeypatch.setenv("QED_T_JUDGE_URL", closed_port_url())
    cfg = distill_cfg(**{"distill.judge": http_judge("QED_T_JUDGE_URL")})
    samples = [_sample(p, i) for p in PROBLEMS for i in range(2)]
    grader = Grader(cfg.distill.judge)
    with pytest.raises(InvalidRateError, match=r"\$QED_T_JUDGE_URL.*distill\.max_invalid_rate"):
        distill.grade_samples(PROBLEMS, samples, grader, tmp_path, progress=False, max_invalid_rate=0.5)
    with pytest.raises(InvalidRateError, match=r"0 of 6 samples graded.*\$QED_T_JUDGE_URL"):  # no threshold: still an error
        distill.grade_samples(PROBLEMS, samples, grader, tmp_path, progress=False, max_invalid_rate=1.0)
    grades = tmp_path / distill.GRADES_FILE
    assert not grades.exists() or not grades.read_text().strip()  # nothing stored: a rerun grades every sample


def test_distill_teacher_down_is_an_error_naming_the_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("QED_T_TEACHER_URL", closed_port_url())
    cfg = distill_cfg(**{"distill.teacher": {"backend": "openai", "model": "teacher", "max_retries": 0,
                                             "base_url_env": "QED_T_TEACHER_URL"}})
    with pytest.raises(InvalidRateError, match=r"teacher.*\$QED_T_TEACHER_URL"):
        distill.generate_samples(PROBLEMS, cfg.distill, tmp_path, progress=False)


def test_sft_on_an_empty_distill_dataset_says_it_is_empty(tmp_path):
    distill.save_dataset(distill.build_dataset([]), tmp_path / "01_distill")  # 01 kept nothing
    cfg = load_config(None, {"sft.dataset": "distill"})
    with pytest.raises(SFTDataError, match=r"01_distill/dataset: the dataset is empty.*rerun 01_distill"):
        load_sft_data(cfg, tmp_path)


# ---------------------------------------------------------------- failure 4: judge down in RL
def rl_cfg(tmp_path):
    """GRPO on four shipped problems, two steps of 2 x 2 rollouts, the judge behind $QED_T_JUDGE_URL."""
    rl_keys = {"model": "base", "problems": {"path": "shipped", "split": "train", "limit": 4}, "num_generations": 2,
               "prompts_per_step": 2, "max_steps": 2, "max_completion_length": 8, "save_steps": 1,
               "judge": http_judge("QED_T_JUDGE_URL")}
    return load_config(None, {"base_model": "tiny-qwen3", "device": "cpu", "thinking": False,
                              **{f"rubric_rl.{k}": v for k, v in rl_keys.items()}})


def test_rubric_rl_with_the_judge_down_stops_before_any_save(tmp_path, monkeypatch):
    monkeypatch.setenv("QED_T_JUDGE_URL", closed_port_url())
    stage = stage_dir(tmp_path, rubric_rl.STAGE)
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "config.json").write_text('{"previous": "run"}')  # the previous run's output
    (stage / "train_result.json").write_text('{"steps": 7}')
    with pytest.raises(InvalidRateError, match=r"rubric_rl step 1: \d of 4 .*\$QED_T_JUDGE_URL.*rubric_rl\.max_invalid_rate"):
        rubric_rl.train(rl_cfg(tmp_path), tmp_path)
    assert (stage / "model" / "config.json").read_text() == '{"previous": "run"}'
    assert json.loads((stage / "train_result.json").read_text()) == {"steps": 7}
    assert not list((stage / "checkpoints").glob("checkpoint-*"))  # no step was taken on nothing


def test_rc_rl_with_the_judge_down_stops_before_any_save(tmp_path, monkeypatch):
    monkeypatch.setenv("QED_T_JUDGE_URL", closed_port_url())
    keys = {"model": "base", "problems": {"path": "shipped", "split": "train", "limit": 4}, "num_generations": 2,
            "prompts_per_step": 2, "states_per_trajectory": 1, "max_steps": 2, "max_completion_length": 8,
            "save_steps": 1, "judge": http_judge("QED_T_JUDGE_URL"),
            "rc": {"turns": 2, "reasoning_budget": 8, "summary": {"temperature": 0.7, "top_p": 0.8, "max_new_tokens": 6}}}
    cfg = load_config(None, {"base_model": "tiny-qwen3", "device": "cpu", "thinking": False,
                             **{f"rc_rl.{k}": v for k, v in keys.items()}})
    with pytest.raises(InvalidRateError, match=r"rc_rl step 1: .*\$QED_T_JUDGE_URL.*rc_rl\.max_invalid_rate"):
        rc_rl.train(cfg, tmp_path)
    stage = stage_dir(tmp_path, rc_rl.STAGE)
    assert not (stage / "model").exists() and not (stage / "train_result.json").exists()


def test_rl_findings_read_an_all_invalid_run():
    group = {"problem_id": "p", "completions": ["a", "b"], "proofs": ["a", "b"], "rewards": [None, None]}
    steps = [{"step": s, "reward": float("nan"), "reward_std": float("nan"), "frac_zero_std": 1.0, "loss": 0.0,
              "grad_norm": 0.0, "truncation_rate": 0.0, "invalid_rate": 1.0, "clip_ratio": 0.0, "group": group}
             for s in (1, 2)]
    text = rl_findings.findings(steps, {"weights_changed_frac": 0.0, **grpo.summarise_steps(steps)},
                                load_config(None, {}).rubric_rl)
    assert "**No reward.**" in text and "nan" not in text
    table, info = rl_findings.worked_group(steps)
    assert "no rollout got a valid reward" in rl_findings.group_caption(info)


# ---------------------------------------------------------------- failure 8 (stage part): a missing rubric
def test_missing_rubric_fails_when_rl_problems_load(tmp_path):
    path = tmp_path / "rl.jsonl"
    path.write_text(json.dumps({"id": "a", "problem": "Prove 1 = 1.", "rubric": RUBRIC}) + "\n"
                    + json.dumps({"id": "b", "problem": "Prove 2 = 2."}) + "\n")
    cfg = load_config(None, {"rubric_rl.problems": {"path": str(path), "split": None}})
    with pytest.raises(ValueError, match=r"rl\.jsonl: row 1 \(problem 'b'\) has no rubric.*Nothing was trained"):
        rubric_rl.load_problems(cfg)
