"""Safe reruns: cached and resumable records are keyed by the settings that produce them, and a rerun
into a run folder with a changed config says which stages recompute and why."""
import json

from qedlib.stages import distill

from qedlib.stages import evaluation

from qedlib import runner
from qedlib.config import load_config, save_config
from qedlib.problem_sets import Problem
from qedlib.generation import Completion

PROBLEMS = [Problem("p1", "Prove that 1 + 1 = 2.", rubric="- [7 pts] all"),
            Problem("p2", "Prove that 2 + 2 = 4.", rubric="- [7 pts] all")]


class FakeTeacher:
    """Counts prompts; every answer is an empty proof (graded 0 with no judge call)."""

    def __init__(self):
        self.prompts = 0

    def generate(self, prompts, sampling, thinking=False):
        self.prompts += len(prompts)
        return [[Completion("", "", "", True, "stop", 5, 1, 0.0)] for _ in prompts]


def distill_cfg(**over):
    return load_config(None, {"distill.sampling.n": 2, "distill.thinking": False, **over}).distill


def test_distill_samples_resume_unchanged_and_recompute_on_new_temperature(tmp_path, capsys):
    teacher = FakeTeacher()
    first = distill.generate_samples(PROBLEMS, distill_cfg(), tmp_path, teacher, progress=False)
    assert first["generated"] == 4 and teacher.prompts == 4
    again = distill.generate_samples(PROBLEMS, distill_cfg(), tmp_path, teacher, progress=False)
    assert (again["generated"], again["skipped"], again["set_aside"], teacher.prompts) == (0, 4, 0, 4)
    hotter = distill_cfg(**{"distill.sampling.temperature": 0.5})
    changed = distill.generate_samples(PROBLEMS, hotter, tmp_path, teacher, progress=False)
    assert (changed["generated"], changed["skipped"], changed["set_aside"], teacher.prompts) == (4, 0, 4, 8)
    assert "4 samples written with other settings are set aside" in capsys.readouterr().out
    # the old rows stay in the file; reads return the current settings' samples only
    assert len((tmp_path / distill.SAMPLES_FILE).read_text().splitlines()) == 8
    assert {r["settings"] for r in distill.read_samples(tmp_path, PROBLEMS, 2)} == {distill.teacher_hash(hotter)}
    assert {r["settings"] for r in distill.read_samples(tmp_path, PROBLEMS, 2, distill_cfg())} == {distill.teacher_hash(distill_cfg())}
    # more samples per problem is not a new setting: only the new indices are generated
    more = distill.generate_samples(PROBLEMS, distill_cfg(**{"distill.sampling.temperature": 0.5, "distill.sampling.n": 3}),
                                    tmp_path, teacher, progress=False)
    assert (more["generated"], more["skipped"]) == (2, 4)


def test_grades_keyed_by_judge_settings(tmp_path):
    dc = distill_cfg()
    distill.generate_samples(PROBLEMS, dc, tmp_path, FakeTeacher(), progress=False)
    samples = distill.read_samples(tmp_path, PROBLEMS, 2, dc)
    first = distill.grade_samples(PROBLEMS, samples, distill.stage_grader(dc, tmp_path), tmp_path, progress=False)
    assert first["graded"] == 4
    same = distill.grade_samples(PROBLEMS, samples, distill.stage_grader(dc, tmp_path), tmp_path, progress=False)
    assert (same["graded"], same["skipped"]) == (0, 4)
    other = distill_cfg(**{"distill.judge.sampling.temperature": 0.3})
    regraded = distill.grade_samples(PROBLEMS, samples, distill.stage_grader(other, tmp_path), tmp_path, progress=False)
    assert (regraded["graded"], regraded["set_aside"]) == (4, 4)
    # selection uses only the grades of its own judge settings
    assert all(r["status"] != "ungraded" for r in distill.select_samples(samples, distill.read_grades(tmp_path), other, PROBLEMS))
    newer = distill_cfg(**{"distill.judge.mode": "score_prob"})
    assert {r["status"] for r in distill.select_samples(samples, distill.read_grades(tmp_path), newer, PROBLEMS)} == {"ungraded"}


def test_settings_hash_ignores_speed_fields():
    a = distill_cfg()
    assert distill.teacher_hash(a) == distill.teacher_hash(distill_cfg(**{"distill.teacher.batch_size": 64}))
    assert distill.teacher_hash(a) != distill.teacher_hash(distill_cfg(**{"distill.system_prompt": "Be rigorous."}))


# ---------------------------------------------------------------- eval rows
class Counting:
    def __init__(self, gen):
        self.gen, self.prompts = gen, 0

    @property
    def endpoint(self):
        return self.gen.endpoint

    def generate(self, prompts, sampling, thinking=False):
        self.prompts += len(prompts)
        return self.gen.generate(prompts, sampling, thinking)


def eval_cfg(tmp_path, temperature=0.8):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"Prove that {i} + {i} is even.",
                                         "rubric": "- [7 pts] all"}) + "\n" for i in range(2)))
    tiny = {"model": "tiny-qwen3", "device": "cpu", "dtype": "float32", "batch_size": 8}
    return load_config(None, {"base_model": "tiny-qwen3", "generation": tiny, "eval.checkpoints": ["base"],
                              "eval.benchmarks": [{"name": "toy", "path": str(bench)}], "eval.scaffolds": ["single"],
                              "eval.samples": 1, "eval.sampling": {"temperature": temperature, "max_new_tokens": 6},
                              "eval.judge": {"endpoint": tiny, "sampling": {"temperature": 0.0, "max_new_tokens": 6},
                                             "cache": False}})


def test_eval_rows_resume_unchanged_and_recompute_on_new_temperature(tmp_path, tiny_generator, capsys):
    folder = tmp_path / "05_eval"
    policy = Counting(tiny_generator)
    rows = evaluation.run_stage(eval_cfg(tmp_path), tmp_path, stage_folder=folder, judge_generator=tiny_generator, policy_factory=lambda ep: policy)
    assert len(rows) == 2 and policy.prompts == 2
    assert len(evaluation.run_stage(eval_cfg(tmp_path), tmp_path, stage_folder=folder, judge_generator=tiny_generator, policy_factory=lambda ep: policy)) == 2
    assert policy.prompts == 2  # resumed: nothing generated
    rows = evaluation.run_stage(eval_cfg(tmp_path, 0.3), tmp_path, stage_folder=folder, judge_generator=tiny_generator, policy_factory=lambda ep: policy)
    assert len(rows) == 2 and policy.prompts == 4  # recomputed
    assert "2 rows of other settings" in capsys.readouterr().out
    assert len((folder / "results.jsonl").read_text().splitlines()) == 4  # old rows kept in the file ...
    assert {r["key"] for r in evaluation.read_results(folder)} == {r["key"] for r in rows}  # ... not read back


def test_eval_key_follows_the_weights(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"a")
    cfg = eval_cfg(tmp_path)
    ep = cfg.generation.__class__(model=str(model))
    before = evaluation.generation_hash(cfg, ep)
    (model / "model.safetensors").write_bytes(b"bb")  # a retrained model in the same folder
    assert evaluation.generation_hash(cfg, ep) != before


# ---------------------------------------------------------------- config diff
def test_changed_config_names_stages_and_keys(tmp_path, capsys):
    save_config(load_config("params/smoke.yaml"), tmp_path / "config.yaml")
    cfg = load_config("params/smoke.yaml", {"rubric_rl.temperature": 0.5, "run_name": "other"})
    redo = runner.say_config_changes(tmp_path / "config.yaml", cfg)
    assert list(redo) == ["03_rubric_rl", "04_reasoning_cache_rl", "05_eval"]
    assert "rubric_rl.temperature" in redo["03_rubric_rl"] and "03_rubric_rl" in redo["05_eval"]
    out = capsys.readouterr().out
    assert "03_rubric_rl: results will be recomputed" in out and "rubric_rl.temperature" in out and "02_sft" not in out
    assert runner.say_config_changes(tmp_path / "config.yaml", load_config("params/smoke.yaml")) == {}
    kept = load_config("params/smoke.yaml", {"sft.keep_checkpoints": "all"})  # what is kept, not what is computed
    assert runner.say_config_changes(tmp_path / "config.yaml", kept) == {}
    # only the stages being run are named
    assert list(runner.say_config_changes(tmp_path / "config.yaml", cfg, ["05_eval"])) == ["05_eval"]


def test_start_stage_says_what_changed(tmp_path, capsys):
    runner.start_stage("params/smoke.yaml", str(tmp_path), {}, "01_distill")
    capsys.readouterr()
    runner.start_stage("params/smoke.yaml", str(tmp_path), {"distill.sampling.temperature": 0.3}, "01_distill")
    out = capsys.readouterr().out
    assert "01_distill: results will be recomputed" in out and "distill.sampling.temperature" in out
