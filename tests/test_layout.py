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


def test_a_relative_path_from_the_repository_root_works_from_a_notebooks_kernel(tmp_path, monkeypatch):
    """The README's and Try it's commands run from the repository root and name `outputs/cpu/...`; the notebook's
    kernel runs in notebooks/. A relative SFT dataset and a relative model folder resolve from the root there."""
    import json
    import shutil
    from qedlib.config import load_config
    from qedlib.layout import REPO, from_repo_root
    from qedlib.sft_data import load_sft_data
    folder = REPO / "outputs" / "test-relative-paths"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        (folder / "rows.jsonl").write_text(json.dumps({"problem": "Show 1 = 1.", "proof": "Trivially."}) + "\n")
        (folder / "model").mkdir()
        (folder / "model" / "config.json").write_text("{}")
        monkeypatch.chdir(tmp_path)
        rel = "outputs/test-relative-paths"
        data, counts = load_sft_data(load_config(None, {"sft.dataset": f"{rel}/rows.jsonl"}), tmp_path)
        assert counts["rows_loaded"] == 1 and data[0]["problem"] == "Show 1 = 1."
        assert named_model(Config(), tmp_path, f"{rel}/model") == str(folder / "model")
        # unchanged: a name, a hub id, an absolute path, a path that exists from here
        assert from_repo_root("smollm2-135m") == "smollm2-135m" and from_repo_root("hub:org/x") == "hub:org/x"
        assert from_repo_root(str(tmp_path)) == str(tmp_path)
        (tmp_path / "outputs" / "test-relative-paths").mkdir(parents=True)
        assert from_repo_root(rel) == rel
    finally:
        shutil.rmtree(folder)
