"""Where a run's stages keep their models (qedlib.layout): 'previous' is the stage before in the pipeline."""
import pytest

from qedlib.config import Config
from qedlib.layout import MODEL_DIRS, named_model


def test_previous_is_the_stage_before_in_the_pipeline(tmp_path, capsys):
    cfg = Config(base_model="base-model")
    with pytest.raises(FileNotFoundError, match="set rubric_rl.model: base"):  # nothing trained yet: no silent base
        named_model(cfg, tmp_path, "previous", "rubric_rl")
    for name in ("sft", "rubric_rl", "rc_rl"):  # a finished run
        (tmp_path / MODEL_DIRS[name]).mkdir(parents=True)
        (tmp_path / MODEL_DIRS[name] / "config.json").write_text("{}")
    # rerunning 03 in a finished run starts from SFT, not from the newer RC-RL model
    assert named_model(cfg, tmp_path, "previous", "rubric_rl") == str(tmp_path / MODEL_DIRS["sft"])
    assert named_model(cfg, tmp_path, "previous", "rc_rl") == str(tmp_path / MODEL_DIRS["rubric_rl"])
    (tmp_path / MODEL_DIRS["rubric_rl"] / "config.json").unlink()  # rubric RL skipped: RC-RL falls back, says so
    assert named_model(cfg, tmp_path, "previous", "rc_rl") == str(tmp_path / MODEL_DIRS["sft"])
    assert "'previous' is rubric_rl" in capsys.readouterr().out
    with pytest.raises(ValueError, match="training stage"):
        named_model(cfg, tmp_path, "previous")
