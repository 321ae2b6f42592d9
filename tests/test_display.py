"""The notebooks' display helpers: a short settings table, a metrics table."""
import pytest

from qedlib.config import Config
from qedlib.display import NOT_IN_PAPER, metrics_table, settings_table


def test_settings_table_shows_this_run_beside_the_paper():
    df = settings_table(Config(), [("learning rate", "rubric_rl.lr", 1.0e-6), ("group size", "rubric_rl.num_generations", 16),
                                   ("weights", "rubric_rl.weights_dtype", NOT_IN_PAPER)])
    assert df.loc["learning rate"].tolist() == ["1e-06", "1e-06"]
    assert df.loc["group size"].tolist() == ["4", "16"]
    assert df.loc["weights", "paper"] == "-"
    with pytest.raises(ValueError, match="<= 15"):
        settings_table(Config(), [("lr", "sft.lr", 1.0)] * 16)


def test_metrics_table_reads_dotted_keys_and_marks_missing():
    df = metrics_table({"steps": 4, "problems": {"kept": 3}, "loss": 0.12345}, [
        ("steps", "steps"), ("kept", "problems.kept"), ("loss", "loss"), ("absent", "nope.x")])
    assert df["value"].tolist() == ["4", "3", "0.1235", "n/a"]
