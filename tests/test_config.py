"""Params loading: every shipped params file validates; bad keys and values are named."""
from pathlib import Path

import pytest

from qedlib.config import ConfigError, load_config, parse_override

PARAMS = sorted((Path(__file__).parent.parent / "params").glob("*.yaml"))


def test_there_are_the_four_recipes():
    assert {p.stem for p in PARAMS} >= {"smoke", "cpu", "gpu-1", "qed-nano"}


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: p.stem)
def test_every_params_file_loads(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} must open with a comment naming its hardware and cost"
    cfg = load_config(path)
    assert cfg.rubric_rl.num_generations >= 2


def test_paper_settings_in_qed_nano():
    cfg = load_config(Path(__file__).parent.parent / "params" / "qed-nano.yaml")
    rl = cfg.rubric_rl
    assert (rl.num_generations, rl.prompts_per_step, rl.max_completion_length, rl.max_steps) == (16, 64, 49152, 150)
    assert (rl.lr, rl.weight_decay, rl.max_grad_norm, rl.epsilon, rl.beta, rl.scale_rewards) == (1e-6, 0.01, 0.3, 4.0, 0.0, "none")
    assert rl.temperature == 0.8 and rl.entropy_coef == 1e-4 and rl.loss_type == "luspo"
    assert cfg.rc_rl.rc.turns == 3 and cfg.rc_rl.rc.reasoning_budget == 49152 and cfg.rc_rl.rc.summary.max_new_tokens == 2048
    assert cfg.rc_rl.states_per_trajectory == 2 and cfg.rc_rl.rc.summariser == "frozen"
    assert cfg.sft.lr == 3e-5 and cfg.base_model == "Qwen/Qwen3-4B-Thinking-2507"
    assert cfg.distill.teacher.max_concurrency == 256 and cfg.distill.sampling.temperature == 1.0


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("sft:\n  lrr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown key 'sft.lrr'.*did you mean 'lr'"):
        load_config(p)


def test_wrong_type_and_literal_are_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rubric_rl:\n  scale_rewards: sometimes\n")
    with pytest.raises(ConfigError, match=r"rubric_rl.scale_rewards = 'sometimes'.*one of 'none', 'group', 'batch'"):
        load_config(p)
    p.write_text("sft:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"sft.max_steps = 'many'.*int"):
        load_config(p)


def test_overrides_apply_and_are_validated():
    cfg = load_config(None, dict([parse_override("sft.lr=2.0e-5"), parse_override("eval.pass_k=[1, 4]")]))
    assert cfg.sft.lr == 2e-5 and cfg.eval.pass_k == [1, 4]
    with pytest.raises(ConfigError, match="unknown key 'eval.passk'"):
        load_config(None, {"eval.passk": 3})
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("sft.lr")


def test_missing_params_file_is_clear():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("params/nope.yaml")


def test_partial_section_keeps_the_fields_own_defaults():
    cfg = load_config(None, {"distill.problems.limit": 3, "eval.rc.turns": 2, "distill.judge.endpoint.batch_size": 2})
    assert cfg.distill.problems.split == "train" and cfg.distill.problems.limit == 3
    assert cfg.eval.rc.turns == 2 and cfg.eval.rc.summary.temperature == 0.7
    assert cfg.distill.judge.sampling.max_new_tokens == 1024  # untouched sibling default
