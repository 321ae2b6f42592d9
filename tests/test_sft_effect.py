"""Stage 02's evidence of learning (issue #24): the held-out probe (qedlib.probe.policy_shift on the held-out SFT
rows) and the before/after behaviour with bootstrap intervals, and the findings' sentences on this run's numbers
(tests/fixtures/sft_cpu_run.json: the log history, train metrics, probe and effect of `make run`'s 02_sft)."""
import json
import math
from pathlib import Path

from test_sft import make_run

from qedlib.config import load_config
from qedlib.models import TINY, resolve_model
from qedlib.stages import sft
from qedlib.views import sft as sft_view

FIXTURE_FILE = Path(__file__).parent / "fixtures" / "sft_cpu_run.json"


def _rows(before: list, after: list) -> list[dict]:
    return [{"base_closed": b, "sft_closed": a, "base_stopped": False, "sft_stopped": a, "base_tokens": 96,
             "sft_tokens": 40 if a else 96} for b, a in zip(before, after)]


def test_behaviour_effect_calls_a_change_beyond_noise_only_when_its_interval_excludes_zero():
    all_close = sft.behaviour_effect(_rows([False] * 12, [True] * 12))
    c = all_close["closes_think"]
    assert (c["before"], c["after"], c["gain"], c["ci_low"], c["ci_high"], c["n"]) == (0.0, 1.0, 1.0, 1.0, 1.0, 12)
    assert all_close["tokens"]["gain"] == -56.0
    text = sft_view.behaviour_findings(all_close)
    assert "closes `</think>` 0% -> 100% (+100 points, 95% CI [+100, +100]), beyond noise" in text
    mixed = sft.behaviour_effect(_rows([False, True, False, True, True, False], [True, False, False, True, False, True]))
    assert mixed["closes_think"]["gain"] == 0.0 and mixed["closes_think"]["ci_low"] < 0 < mixed["closes_think"]["ci_high"]
    assert "closes `</think>` 50% -> 50% (+0 points" in sft_view.behaviour_findings(mixed)
    assert "not distinguishable from no change" in sft_view.behaviour_findings(mixed)
    few = sft.behaviour_effect(_rows([False] * 4, [True] * 4))  # an interval that excludes 0, from 4 problems
    assert "from 4 problems, too few for a verdict (at least 5)" in sft_view.behaviour_findings(few)


def test_probe_findings_need_an_interval_that_excludes_zero_and_five_problems():
    p = {"probe_items": 6, "heldout_loss_before": 2.0, "heldout_loss_after": 1.5, "logprob_gain": 0.5,
         "ci_low": 0.3, "ci_high": 0.7, "kl": 0.4}
    assert "beyond noise: SFT moved the policy" in sft_view.probe_findings(p)
    assert "not distinguishable" in sft_view.probe_findings({**p, "ci_low": -0.1})
    assert "too few for a verdict" in sft_view.probe_findings({**p, "probe_items": 1})
    assert "too few for a verdict" in sft_view.probe_findings({**p, "probe_items": 4})  # excludes 0, but 4 problems
    assert "no held-out probe" in sft_view.probe_findings(None)


def test_heldout_probe_scores_exactly_the_held_out_targets(tmp_path):
    run, params = make_run(tmp_path, n=6, max_steps=2, eval_fraction=0.34)
    cfg = load_config(params)
    data = sft.prepare_data(cfg, run)
    prompts, completions = sft.probe_pairs(data)
    assert len(prompts) == 2 and all(c.strip() for c in completions)
    for msgs, p, c in zip(data.eval_rows["messages"], prompts, completions):
        assert p + c == data.tokenizer.apply_chat_template(msgs, tokenize=False)
        assert msgs[-1]["content"] in c and msgs[-1]["content"] not in p
    m = sft.run_stage(cfg, run, str(params), {}, data=data)
    probe = sft.heldout_shift(data, m["model_dir"], n_boot=200)
    assert probe["probe_items"] == 2 and probe["kl"] > 0
    assert probe["heldout_loss_before"] == -probe["logprob_start"] and math.isfinite(probe["heldout_loss_after"])
    assert probe["ci_low"] <= probe["logprob_gain"] <= probe["ci_high"]
    data.eval_rows = data.eval_rows.select([])
    assert sft.heldout_shift(data, m["model_dir"]) is None


def test_training_findings_on_this_runs_numbers():
    """The 02 findings on this run's numbers: 20 steps are 4.0 passes over 18 rows (sft.epochs says 2), 2 evaluations (the
    trainer logs the last one twice), overfitting by the gap (0.644 vs 1.823), no "weights changed"."""
    fixture = json.loads(FIXTURE_FILE.read_text())
    m, history = fixture["train_metrics"], fixture["log_history"]
    assert len(sft_view.evaluations(history)) == fixture["expected"]["evaluations"] == 2
    assert sum("eval_loss" in h for h in history) == 3  # what the old text counted
    text = sft_view.training_findings(m, history)
    for sentence in fixture["expected"]["training"]:
        assert sentence in text
    for wrong in ("no sign of overfitting", "over 3 evaluations", "of the weights changed", "epochs 2"):
        assert wrong not in text


def test_notebook_progress_has_a_bar_and_no_empty_loss_table():
    from transformers import AutoModelForCausalLM, Trainer, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY))
    args = TrainingArguments(output_dir="/tmp/unused-qed-r3", use_cpu=True, report_to=[])
    trainer = Trainer(model=model, args=args)
    trainer.pop_callback(ProgressCallback)
    trainer.add_callback(NotebookProgressCallback)
    sft.quiet_progress(trainer)
    bar = next(c for c in trainer.callback_handler.callbacks if isinstance(c, NotebookProgressCallback))
    state = TrainerState(max_steps=3)
    bar.on_train_begin(args, state, TrainerControl())
    assert bar.training_tracker.inner_table is None  # no "Step | Training Loss" header left empty in saved outputs


def test_probe_and_behaviour_findings_on_this_runs_numbers():
    """The 02 evidence sentences on this run's probe and before/after numbers (interval over problems)."""
    fixture = json.loads(FIXTURE_FILE.read_text())
    probe, effect = fixture["probe"], fixture["effect"]
    assert fixture["expected"]["probe"] == sft_view.probe_findings(probe)
    assert fixture["expected"]["behaviour"] == sft_view.behaviour_findings(effect)
    assert probe["probe_items"] == 6 and effect["closes_think"]["n"] == 12
    beyond = probe["ci_low"] > 0 or probe["ci_high"] < 0
    assert ("beyond noise" in sft_view.probe_findings(probe)) == beyond


def test_samples_table_reads_on_one_line_and_never_cuts_a_formula():
    from qedlib.views import sft as sft_view
    rows = [{"problem": "qed-002", "base": "\nThe problem of proving that $n^2 + n$ is even needs a case split here",
             "sft": "\n</think>\n\nThe given equation is $n^2 + n = n(n+1)$, a product of two consecutive numbers",
             "base_closed": False, "sft_closed": True, "base_tokens": 96, "sft_tokens": 96}]
    table = sft_view.samples_table(rows, chars=40)
    assert table.loc[0, "sft"] == "</think> The given equation is..."  # cut before the formula, not inside it
    assert "\n" not in table.loc[0, "base"] and table.loc[0, "base"].count("$") % 2 == 0
    assert list(table.columns) == ["problem", "base", "sft", "base_closed", "sft_closed", "base_tokens", "sft_tokens"]
