"""qedlib.stages.rubric_rl's entry `run_stage`: trains once through the stage's own `train` and records it; a second
call with the same settings returns the saved result without training; changed settings train again."""
from __future__ import annotations

import json

from qedlib.config import load_config
from qedlib.layout import stage_dir
from qedlib.run_state import RECORD_FILE
from qedlib.stages import rubric_rl


def test_run_stage_trains_once_then_returns_the_saved_result(tmp_path, monkeypatch):
    calls = []

    def train(cfg, run_dir):  # what the in-process step leaves behind: the result file
        calls.append(cfg.rubric_rl.lr)
        result = {"steps": len(calls), "lr": cfg.rubric_rl.lr}
        folder = stage_dir(run_dir, rubric_rl.STAGE)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train_result.json").write_text(json.dumps(result))
        return result
    monkeypatch.setattr(rubric_rl, "train", train)
    cfg = load_config(None, {"rubric_rl.model": "base"})
    assert rubric_rl.run_stage(cfg, tmp_path) == {"steps": 1, "lr": cfg.rubric_rl.lr}
    record = json.loads((stage_dir(tmp_path, rubric_rl.STAGE) / RECORD_FILE).read_text())
    assert record["complete"] == "training"
    assert rubric_rl.run_stage(cfg, tmp_path) == {"steps": 1, "lr": cfg.rubric_rl.lr} and len(calls) == 1
    changed = load_config(None, {"rubric_rl.model": "base", "rubric_rl.lr": 2.0e-6})
    assert rubric_rl.run_stage(changed, tmp_path) == {"steps": 2, "lr": 2.0e-6} and calls == [cfg.rubric_rl.lr, 2.0e-6]


def test_stage_grader_only_for_the_judge_reward(tmp_path):
    cfg = load_config(None, {})
    grader = rubric_rl.stage_grader(cfg.rubric_rl, tmp_path)
    assert grader is not None and grader.judge == cfg.rubric_rl.judge
    fmt = load_config(None, {"rubric_rl.reward": "format"})
    assert rubric_rl.stage_grader(fmt.rubric_rl, tmp_path) is None
