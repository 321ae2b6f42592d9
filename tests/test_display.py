"""The notebooks' display helpers: a short settings table, a metrics table."""
import pytest

from qedlib import paper
from qedlib.config import Config
from qedlib.display import metrics_table, settings_table
from qedlib.paper import NOT_IN_PAPER


def test_settings_table_shows_this_run_beside_the_paper():
    df = settings_table(Config(), [("learning rate", "rubric_rl.lr"), ("group size", "rubric_rl.num_generations"),
                                   ("weights", "rubric_rl.weights_dtype")])
    assert df.loc["learning rate"].tolist() == ["1e-06", "1e-06"]
    assert df.loc["group size"].tolist() == ["4", "16"]
    assert df.loc["weights", "paper"] == NOT_IN_PAPER == "-"  # a key paper.RECIPE does not hold
    with pytest.raises(ValueError, match="<= 15"):
        settings_table(Config(), [("lr", "sft.lr")] * 16)


def test_settings_table_reads_the_paper_column_from_the_recipe(monkeypatch):
    monkeypatch.setitem(paper.RECIPE, "rubric_rl.num_generations", 99)
    assert settings_table(Config(), [("group size", "rubric_rl.num_generations")]).loc["group size", "paper"] == "99"


def test_metrics_table_reads_dotted_keys_and_marks_missing():
    df = metrics_table({"steps": 4, "problems": {"kept": 3}, "loss": 0.12345}, [
        ("steps", "steps"), ("kept", "problems.kept"), ("loss", "loss"), ("absent", "nope.x")])
    assert df["value"].tolist() == ["4", "3", "0.1235", "n/a"]
