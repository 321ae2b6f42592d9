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


def test_a_side_run_keeps_its_step_rows_and_saves_no_checkpoint_or_model(tmp_path):
    """`train(..., keep_model=False)`, what notebook 03's side run calls: two real GRPO steps on the tiny model write
    the step rows and the learning record, and no checkpoint, model or probe (nothing reads them; the checkpoint
    alone is 1.5 GB of weights and optimizer state on the laptop)."""
    keys = {"model": "base", "problems": {"path": "shipped", "split": "train", "limit": 2}, "num_generations": 2,
            "prompts_per_step": 2, "max_steps": 2, "max_completion_length": 8, "save_steps": 1, "reward": "opening"}
    cfg = load_config(None, {"base_model": "tiny-qwen3", "device": "cpu", "thinking": False,
                             **{f"rubric_rl.{k}": v for k, v in keys.items()}})
    result = rubric_rl.train(cfg, tmp_path, keep_model=False)
    stage = stage_dir(tmp_path, rubric_rl.STAGE)
    assert len((stage / "steps.jsonl").read_text().splitlines()) == 2 and "learning" in result
    assert not (stage / "model").exists() and not list(stage.glob("checkpoints/checkpoint-*"))
    assert "probe" not in result and "weights_changed_frac" not in result
