"""params/paper-table.yaml: the paper's table in one command (notebook 05 alone, hub ids replaced by a local
folder), the paper beside the run in metrics.json, 05 and the report, and its cost printed by the plan."""
import json
import re
from pathlib import Path

import pytest

from conftest import chat_reply
from qedlib.stages import evaluation
from qedlib import paper
from qedlib.config import load_config
from qedlib.layout import EVAL, STAGES

REPO = Path(__file__).resolve().parent.parent
PAPER_TABLE = REPO / "params" / "paper-table.yaml"
SAMPLE = Path(__file__).parent / "fixtures" / "matharena_gradingbench_sample.jsonl"
FULL = "QED-Nano (SFT + rubric RL + RC RL)"


def judge_reply(score: int):
    """A fake judge that answers every prompt in the tag that prompt asks for (points / score)."""
    def reply(body):
        prompt = body["messages"][-1]["content"]
        tag = "points" if "<points>" in prompt else "score"
        return chat_reply(f"Assessment.\n<{tag}>{score}</{tag}>", prompt_tokens=300, completion_tokens=40)
    return reply


def judge(url: str, model: str) -> dict:
    return {"model": model, "backend": "openai", "api": "chat", "base_url": url, "max_retries": 0,
            "price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0}


def test_paper_table_params_are_eval_only_with_the_released_models():
    cfg = load_config(PAPER_TABLE)
    assert cfg.stages == [EVAL]
    assert cfg.eval.checkpoints == ["Qwen/Qwen3-4B-Thinking-2507", "lm-provers/QED-Nano-SFT", "lm-provers/QED-Nano"]
    assert [paper.paper_row(c, "single") for c in cfg.eval.checkpoints] == \
        ["Qwen3-4B-Thinking-2507 (base)", "QED-Nano-SFT", FULL]
    assert cfg.eval.samples == 3 and cfg.eval.judge.endpoint.model == "openai/gpt-oss-20b"
    # every value says where it comes from
    for line in PAPER_TABLE.read_text().splitlines():
        if re.match(r"\s+\w+: [^{\[]", line) and "#" not in line:
            pytest.fail(f"params/paper-table.yaml: value without a source comment: {line.strip()}")


def test_plan_prints_gpu_hours_judge_tokens_and_dollars(capsys):
    from qedlib.tools.plan import main
    main(str(PAPER_TABLE), [])
    out = capsys.readouterr().out
    assert "== eval cost (before anything runs) ==" in out and "== sft ==" not in out  # only the stage it runs
    total = re.search(r"total: ([\d.]+) GPU-hours, ([\d.]+)M judge tokens, \$([\d.]+)", out)
    cfg = load_config(PAPER_TABLE)
    est = cfg.eval.estimate
    tokens = 3 * 3 * sum(n * est.tokens_per_problem[b] for b, n in evaluation.BENCHMARK_SIZES.items())
    assert float(total.group(1)) == pytest.approx(tokens / est.generation_tokens_per_s / 3600, abs=0.05)
    grades = 3 * 3 * sum(evaluation.BENCHMARK_SIZES.values())
    assert float(total.group(2)) == pytest.approx(grades * (est.judge_input_tokens + est.judge_output_tokens) / 1e6, abs=0.05)
    usd = grades * (est.judge_input_tokens * 0.15 + est.judge_output_tokens * 0.60) / 1e6
    assert float(total.group(3)) == pytest.approx(usd, abs=0.01)


def test_verdict_in_words():
    assert paper.reproduction_verdict(40.0, 38.0, 33.0, 43.0) == "reproduces: 40.0 is inside [33.0, 43.0]"
    assert "2.5 points above the interval" in paper.reproduction_verdict(40.0, 30.0, 25.0, 37.5)
    with pytest.raises(ValueError, match="did you mean 'QED-Nano-SFT'"):
        paper.comparison({"by_benchmark": {}}, {"/m": "QED-Nano-SFTT"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_path):
    """`python -m qedlib run params/paper-table.yaml` with the hub ids replaced by the tiny model's folder."""
    from conftest import FakeOpenAI
    from qedlib.problem_sets import DataError, load_problems
    from qedlib.runner import run_pipeline
    try:  # the paper's benchmarks: ../shared/data/imobench, QED_IMOBENCH or the download cache
        for name in ("imo-proofbench", "imo-answerbench"):
            load_problems(name)
    except DataError as e:
        pytest.skip(f"IMO-Bench not available: {e}")
    servers = [FakeOpenAI(judge_reply(6)), FakeOpenAI(judge_reply(2))]  # 6: a grade the 7/6/1/0 prompt allows
    overrides = {
        "thinking": False,  # the tiny model never closes a think block in 16 tokens: no proof would reach the judge
        "generation": {"model": tiny_model_path, "backend": "transformers", "device": "cpu", "dtype": "float32"},
        "eval.checkpoints": [tiny_model_path], "eval.paper_rows": {tiny_model_path: FULL},
        "eval.benchmarks": ["imo-proofbench", "imo-answerbench"], "eval.benchmark_limit": 2, "eval.samples": 2,
        "eval.sampling": {"temperature": 0.8, "max_new_tokens": 16}, "eval.pass_k": [1], "eval.bootstrap": 200,
        "eval.judge.endpoint": judge(servers[0].url, "judge-a"),
        "eval.calibration.path": str(SAMPLE),
        "eval.calibration.judges": [judge(servers[1].url, "judge-b")],
    }
    try:
        yield run_pipeline(str(PAPER_TABLE), run_name="paper-table", overrides=overrides,
                           outputs=tmp_path_factory.mktemp("outputs"))
    finally:
        for s in servers:
            s.stop()


def test_one_command_runs_notebook_05_alone(run_dir):
    assert [s for s in STAGES if (run_dir / s).exists()] == [EVAL]
    assert (run_dir / EVAL / f"{EVAL}.ipynb").exists()
    assert json.loads((run_dir / "run.json").read_text())["timings_s"].keys() == {EVAL}


def test_the_paper_beside_the_run_with_intervals_and_costs(run_dir):
    m = json.loads((run_dir / EVAL / "metrics.json").read_text())
    comp = {r["benchmark"]: r for r in m["paper_comparison"]}
    assert set(comp) == {"IMO-ProofBench", "IMO-AnswerBench"}  # the benchmarks this run measured
    pb = comp["IMO-ProofBench"]
    assert pb["paper"] == 40.0 and pb["paper row"] == FULL
    assert pb["ci_low"] <= pb["measured"] <= pb["ci_high"]
    assert pb["verdict"] == paper.reproduction_verdict(40.0, pb["measured"], pb["ci_low"], pb["ci_high"])
    assert comp["IMO-AnswerBench"]["paper"] == 67.5
    # cost: 2 problems x 2 runs on IMO-ProofBench, every proof graded by judge A (300 + 40 tokens, $1 / $2 per M)
    assert pb["judge tokens per problem"] == 340 and pb["judge $"] == pytest.approx(4 * (300 + 80) / 1e6)
    assert pb["wall s"] > 0 and pb["tokens per problem"] > 0
    assert [j["judge"] for j in m["judge_comparison"]] == ["judge-a", "judge-b"]
    assert m["judge_comparison"][0]["of"] == 6  # the six hand-written gradingbench proofs


def test_report_and_notebook_show_the_paper_column(run_dir):
    md = (run_dir / "report.md").read_text()
    assert "## The paper beside the run" in md and "| checkpoint | benchmark | scaffold | paper | measured |" in md
    assert "## Judges on the calibration proofs" in md
    nb = (run_dir / EVAL / f"{EVAL}.ipynb").read_text()
    assert "published numbers fall inside the measured interval" in nb
