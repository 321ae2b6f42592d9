"""What notebooks 01 and 02 teach: the worked examples, the findings computed from a run's numbers, the
"Try it" experiments (every override loads), and training cells that print no raw log dicts."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from qedlib.stages import distill

from qedlib.views import distill as distill_view

from qedlib import proof_chat as policy

from qedlib.stages import sft

from qedlib import sft_data

from qedlib.views import sft as sft_view
from qedlib.config import load_config, parse_override
from qedlib.problem_sets import Problem
from qedlib.grading import build_prompt
from qedlib.models import TINY, resolve_model

REPO = Path(__file__).resolve().parent.parent
CPU = REPO / "params" / "cpu.yaml"
RUBRIC = "Checkpoints (7 points): [7 pts] a complete argument."
LONG_PROOF = "Let n be odd, so n = 2k + 1 for an integer k. " * 6 + "Hence the claim."
PROBLEMS = [Problem("p1", "Prove that the sum of two odd integers is even.", rubric=RUBRIC, source="lit"),
            Problem("p2", "Prove that there are infinitely many primes.", rubric=RUBRIC, source="lit")]


def _sample(pid, i, proof=LONG_PROOF, reasoning="Try n = 2k + 1.", truncated=False):
    return {"key": f"{pid}#{i}", "problem_id": pid, "sample_index": i, "text": proof, "reasoning": reasoning,
            "proof": proof, "think_closed": True, "finish_reason": "length" if truncated else "stop",
            "truncated": truncated, "prompt_tokens": 10, "completion_tokens": 90, "cost": 0.0}


def _grade(pid, i, points, dc=None):
    key = distill.grade_key(f"{pid}#{i}", (dc or _dc()).judge)  # a grade is keyed by its judge's settings
    return {"key": key, "problem_id": pid, "sample_index": i, "valid": True, "points": points,
            "reason": None, "judge_text": f"assessment of {pid}#{i}", "cost": 0.0, "probs": {}}


def _dc(**over):
    return load_config(None, {"distill.thinking": False, "distill.drop_truncated": False, **over}).distill


def _rows(points=(2.29, 2.88, 2.5, 2.6), dc=None):
    samples = [_sample("p1", 0), _sample("p1", 1, proof=LONG_PROOF + " QED."), _sample("p2", 0, truncated=True),
               _sample("p2", 1)]
    grades = [_grade(s["problem_id"], s["sample_index"], p, dc) for s, p in zip(samples, points)]
    return distill.select_samples(samples, grades, dc or _dc(), PROBLEMS), grades


# ---------------------------------------------------------------- 01: one sample read in full
def test_worked_example_shows_the_exact_judge_prompt_and_the_whole_proof():
    dc = _dc()
    rows, grades = _rows(dc=dc)
    ex = distill_view.worked_example(rows, PROBLEMS, dc, grades)
    assert ex["row"]["key"] == "p1#1"  # the best-graded kept sample
    want = build_prompt(dc.judge.prompt, dc.judge.mode, PROBLEMS[0], LONG_PROOF + " QED.")
    assert ex["judge_prompt"] == want.text and RUBRIC in ex["judge_prompt"]
    html = distill_view.render_worked_example(ex)
    for part in ("Prove that the sum of two odd integers is even.", RUBRIC, "Try n = 2k + 1.",
                 (LONG_PROOF + " QED.").strip(), "assessment of p1#1", "2.88 / 7"):
        assert part in html.replace("&#x27;", "'"), part
    assert html.index("before &lt;/think&gt;") < html.index("after &lt;/think&gt;")
    # the problem is typeset (MathJax skips <pre>); the model's proof and the judge prompt stay raw, as written
    problem_at = html.index("Prove that the sum of two odd integers is even.")
    assert html.rfind("<p", 0, problem_at) > html.rfind("<pre", 0, problem_at)
    assert html.rfind("<pre", 0, html.index("Try n = 2k + 1.")) > html.index("<h4>Teacher reasoning")


def test_worked_example_without_any_proof_says_so():
    dc = _dc()
    samples = [_sample("p1", 0, proof="")]
    rows = distill.select_samples(samples, [_grade("p1", 0, 0.0)], dc, PROBLEMS)
    assert distill_view.worked_example(rows, PROBLEMS, dc, []) is None
    assert "nothing to show" in distill_view.render_worked_example(None)


def test_distill_findings_state_the_real_grade_range():
    rows, grades = _rows()
    metrics = distill.stage_metrics(rows, [], grades, 2, {}, 1.0, "x")
    text = distill_view.findings(metrics, rows)
    assert "2.29 to 2.88" in text and "hardly separates" in text and "1 of 4 hit" in text
    wide, _ = _rows(points=(0.0, 7.0, 3.0, 5.0))
    text = distill_view.findings(distill.stage_metrics(wide, [], grades, 2, {}, 1.0, "x"), wide)
    assert "0.00 to 7.00" in text and "hardly separates" not in text


# ---------------------------------------------------------------- 02: the masked example read in full
def test_loss_segments_cover_the_example_and_train_only_the_assistant_turn():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_model(TINY))
    messages = policy.sft_messages("Prove that the sum of two odd integers is even.", "", LONG_PROOF)
    ids, labels = sft_data.tokenize_example(tok, messages, sft_data.training_chat_template(tok))
    segs = sft_data.loss_segments(tok, ids, labels)
    assert sum(s["tokens"] for s in segs) == len(ids)
    assert [s["loss"] for s in segs] == [False, True, False]  # prompt, assistant turn, template's trailing newline
    assert segs[1]["text"] == sft_data.loss_text(tok, ids, labels) and LONG_PROOF.strip() in segs[1]["text"]
    assert "Prove that" in segs[0]["text"] and segs[1]["tokens"] == sum(l != -100 for l in labels)
    html = sft_view.render_loss_segments(segs)
    assert LONG_PROOF.strip() in html and f"trained (loss): {segs[1]['tokens']} tokens" in html


def test_think_block_length_and_empty_share():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_model(TINY))
    assert sft_view.think_tokens("\n</think>\n\nProof.", tok) == 0
    assert sft_view.think_tokens("I add the two numbers.\n</think>\n\nProof.", tok) > 3
    assert sft_view.think_tokens("still thinking", tok) is None
    rows = [{"base": "no close", "sft": "\n</think>\n\nP."}, {"base": "a b c</think>x", "sft": "\n</think>\n\nQ."}]
    stats = sft_view.think_block_stats(rows, tok)
    assert stats["think_tokens_before"] > 0 and stats["think_tokens_after"] == 0
    assert stats["empty_think_before"] == 0 and stats["empty_think_after"] == 1.0
    ds = [policy.sft_row("P", "", "proof"), policy.sft_row("Q", "reason", "proof")]
    import datasets
    assert sft_view.empty_reasoning_share(datasets.Dataset.from_list(ds)) == 0.5


def test_sft_findings_trend_needs_three_evaluations_and_overfitting_the_gap():
    m = {"train_loss_first": 3.0, "train_loss_last": 1.0, "steps": 20, "examples": 8}
    logs = [{"step": s, "loss": 1.0, "epoch": s / 2} for s in range(1, 21)]
    rising = logs + [{"step": 5, "eval_loss": 2.0}, {"step": 10, "eval_loss": 1.9}, {"step": 20, "eval_loss": 2.4}]
    text = sft_view.training_findings(m, rising)
    assert "rose from its lowest 1.900 (step 10)" in text and "Overfitting by the train/eval gap" in text
    assert "10.0 passes over the 8 training rows" in text and "weights" not in text
    close = logs + [{"step": 10, "eval_loss": 1.05}, {"step": 20, "eval_loss": 1.02}, {"step": 20, "eval_loss": 1.02}]
    text = sft_view.training_findings(m, close)
    assert "its 2 evaluations" in text and "too few to call a trend" in text and "No overfitting" in text
    closing = {"think_closed_before": 0.0, "think_closed_after": 1.0, "think_tokens_before": None,
               "think_tokens_after": 0.25, "empty_think_after": 0.75, "targets_empty_think": 1.0}
    text = sft_view.think_findings(closing)
    assert "0% before SFT, 100% after" in text and "75%" in text and "*format*" in text and "100% of the training" in text
    assert "*format*" not in sft_view.think_findings({**closing, "empty_think_after": 0.0, "think_tokens_after": 40.0})


def test_training_prints_no_raw_log_dicts(tmp_path, capsys):
    import datasets
    import yaml
    run = tmp_path / "run"
    rows = [policy.sft_row(f"Prove that {i} + {i} = {2 * i}.", "Add.", f"Indeed {2 * i}.") for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(run / "01_distill" / "dataset"))
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"base_model": TINY, "device": "cpu", "sft": {
        "max_length": 128, "max_steps": 3, "batch_size": 2, "save_steps": 3, "logging_steps": 1, "eval_fraction": 0.3}}))
    metrics = sft.train(load_config(params), run)
    out = capsys.readouterr()
    assert metrics["steps"] == 3
    assert "{'loss'" not in out.out + out.err and "'eval_loss'" not in out.out + out.err


def test_quiet_progress_replaces_the_notebook_table_too():
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir="/tmp/unused-qed", use_cpu=True, report_to=[]))
    trainer.pop_callback(ProgressCallback)
    trainer.add_callback(NotebookProgressCallback)
    sft.quiet_progress(trainer)
    bars = [c for c in trainer.callback_handler.callbacks if isinstance(c, (ProgressCallback, NotebookProgressCallback))]
    assert len(bars) == 1 and type(bars[0]).on_log is not NotebookProgressCallback.on_log


# ---------------------------------------------------------------- "Try it"
@pytest.mark.parametrize("module", [distill_view, sft_view], ids=["01_distill", "02_sft"])
def test_every_try_it_override_loads_and_the_command_says_the_same(module):
    assert 3 <= len(module.EXPERIMENTS) <= 5
    text = module.try_it()
    for x in module.EXPERIMENTS:
        cfg = load_config(CPU, x["overrides"])  # keys that exist, values that validate
        for key, value in x["overrides"].items():
            got = cfg
            for part in key.split("."):
                got = getattr(got, part)
            assert got == value, key
        line = next(ln for ln in text.splitlines() if f"try-{x['name']} " in ln)
        sets = dict(parse_override(s.split("`")[0]) for s in line.split("--set ")[1:])
        assert sets == x["overrides"] and x["look_for"] in text


def test_decontamination_experiment_removes_the_held_out_problems():
    x = next(x for x in distill_view.EXPERIMENTS if x["name"] == "decontam-eval")
    dc = load_config(CPU, {**x["overrides"], "distill.decontaminate": ["shipped:eval"]}).distill
    problems = distill.load_stage_problems(dc)
    kept, removed, _ = distill.decontaminate(problems, dc)
    n_eval = sum(1 for p in problems if p.extra.get("split") == "eval") or 12
    assert len(removed) == n_eval and len(kept) == len(problems) - n_eval


def test_settings_tables_fit_and_name_real_keys():
    from qedlib.display import settings_table
    cfg = load_config(CPU)
    for module in (distill_view, sft_view):
        table = settings_table(cfg, module.SETTINGS)
        assert len(table) <= 15 and "paper" in table.columns


# ---------------------------------------------------------------- the notebooks call all this
@pytest.mark.parametrize("name,calls", [
    ("01_distill", ["settings_table(cfg, distill_view.SETTINGS)", "distill_view.worked_example(", "distill_view.findings(",
                    "metrics_table(metrics, distill_view.METRICS)"]),
    ("02_sft", ["settings_table(cfg, sft_view.SETTINGS)", "sft_data.loss_segments(", "sft_view.training_findings(",
                "sft_view.think_block_stats(", "sft_view.think_findings(", "metrics_table(metrics, sft_view.METRICS)"]),
])
def test_notebooks_show_the_mechanism_and_no_raw_dicts(name, calls):
    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", 4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for call in calls:
        assert call in code, call
    assert "json_normalize" not in code  # no 60-row config dump
    assert not re.search(r"print\((gen_stats|grade_stats|dataset|metrics|train_metrics|closing)\b", code)
    assert not any(c.source.strip().splitlines()[-1].strip() in ("metrics", "train_metrics")
                   for c in nb.cells if c.cell_type == "code")
    last = nb.cells[-1]  # the notebook ends with "Try it": exactly the module's experiments (one source)
    module = {"01_distill": distill_view, "02_sft": sft_view}[name]
    assert last.cell_type == "markdown" and last.source.startswith("## Try it") and module.try_it() in last.source


@pytest.mark.parametrize("name", ["01_distill", "02_sft", "03_rubric_rl", "04_reasoning_cache_rl", "05_eval"])
def test_notebook_cells_are_short_calls_without_logic(name):
    """Cells of at most 10 lines that call qedlib: no functions, classes, branches (statements or `x if c else y`)
    or loops of their own (a `for` that shows a list of figures is the one loop allowed)."""
    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", 4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        lines = [ln for ln in cell.source.splitlines() if ln.strip()]
        assert 1 <= len(lines) <= 10, f"{name} code cell {i}: {len(lines)} lines"
        assert not re.search(r"^\s*(def|class|if|elif|else|while|try|with open)\b|\blambda\b|\bif\b.+\belse\b", cell.source, re.M), \
            f"{name} code cell {i} holds logic:\n{cell.source}"
        loops = re.findall(r"^\s*for .*:\n(.*)", cell.source, re.M)
        assert all(body.strip().endswith(".show()") for body in loops), f"{name} code cell {i}: a loop that is not showing figures"


def test_table_excerpts_never_cut_a_formula():
    from qedlib.display import excerpt
    assert excerpt("Prove that $1 + 2 + \\cdots + n = \\frac{n(n+1)}{2}$ for every n.", 30) == "Prove that..."
    assert excerpt("Prove that $n^3 - n$ is divisible by $6$ for every integer n.", 48) == \
        "Prove that $n^3 - n$ is divisible by $6$ for eve..."
    assert excerpt("short", 48) == "short"


def test_rubric_headings_start_their_own_lists():
    from qedlib.display import rubric_markdown
    text = "Checkpoints (7 points total):\n- [3 pts] A.\n- [4 pts] B.\nZero-credit items:\n- Examples.\nDeductions:\n- [-1] C."
    assert rubric_markdown(text) == ("**Checkpoints (7 points total):**\n\n- [3 pts] A.\n- [4 pts] B.\n\n"
                                     "**Zero-credit items:**\n\n- Examples.\n\n**Deductions:**\n\n- [-1] C.")
