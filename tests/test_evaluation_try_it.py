"""Notebook 05's Try it, run as a reader runs it: the commands views.evaluation.try_it writes for a finished run
(its own SFT model, a threshold its judge reaches) are executed on params/smoke.yaml and must produce what the
text tells the reader to look at. Slow: stages 01-02 on smoke, then two evaluations (a few minutes on 2 cores)."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from qedlib.config import load_config
from qedlib.views import evaluation as eval_view

REPO = Path(__file__).resolve().parent.parent
SMOKE = "params/smoke.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    from qedlib.runner import run_pipeline
    return run_pipeline(str(REPO / SMOKE), run_name="src", stages=["01_distill", "02_sft"],
                        outputs=tmp_path_factory.mktemp("outputs"))


def test_two_try_it_commands_run_from_the_runs_sft_model(source_run, tmp_path):
    rows = [{"score": s} for s in (0.0, 2.5, 2.6, 2.8)]  # the judge's grades on a run: the threshold must be reached
    text = eval_view.try_it(rows, load_config(str(REPO / SMOKE)), source_run, None, params_file=SMOKE)
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("python -m qedlib run")]
    assert len(commands) == 3 and all(str(source_run / "02_sft" / "model") in c for c in commands)
    for cmd in commands[:2]:  # matched tokens, three samples
        args = shlex.split(cmd)[1:]  # drop "python": run with this interpreter
        res = subprocess.run([sys.executable, *args, "--outputs", str(tmp_path)], cwd=REPO, capture_output=True,
                             text=True, timeout=1200)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    matched = json.loads((tmp_path / "try-matched" / "05_eval" / "metrics.json").read_text())
    (ck,) = matched["checkpoints"]
    assert ck.endswith("02_sft/model") and set(matched["scores"][ck]) == {"single", "rc"}
    assert any(c["kind"] == "scaffold" for c in matched["comparisons"])  # the paired rc - single the text points to
    samples = json.loads((tmp_path / "try-samples" / "05_eval" / "metrics.json").read_text())
    assert samples["samples"] == 3 and "pass@3" in samples["scores"][ck]["single"]
    assert samples["scores"][ck]["single"]["pass@3"] >= samples["scores"][ck]["single"]["pass@1"]
