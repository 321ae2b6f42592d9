"""The 'what we see' sentences of stages 01 and 02, on literal metrics in the shape the stages write."""
from qedlib.views import distill as distill_view
from qedlib.views.sft import think_findings


def _row(points, status="kept", truncated=True):
    return {"points": points, "valid": True, "status": status, "truncated": truncated, "problem_id": "p"}


def test_distill_findings_name_grade_range_and_truncated_kept_samples():
    rows = [_row(2.3), _row(2.9, "not_best"), _row(2.5, truncated=False)]
    m = {"samples": 3, "problems_used": 2, "decontaminated": 0, "truncated": 2, "mean_grade": 2.57,
         "kept": 2, "kept_problems": 2, "mean_grade_kept": 2.4}
    text = distill_view.findings(m, rows)
    assert "**2.30 to 2.90**" in text and "within 0.60 points" in text
    assert "1 of them were cut at the token budget" in text
    assert "cut at the token budget" not in distill_view.findings(m, [_row(2.3, truncated=False)])


def test_think_findings_without_a_closed_block_before_sft():
    m = {"think_closed_before": 0.0, "think_closed_after": 1.0, "think_tokens_before": None,
         "think_tokens_after": 0.0, "empty_think_after": 1.0, "targets_empty_think": 1.0}
    text = think_findings(m)
    assert "0% before SFT, 100% after" in text
    assert "holds on average 0.0 tokens after SFT" in text and "none closed" not in text
    assert "learned the *format*" in text and "100% of the training targets" in text
    m.update(think_tokens_before=12.0, empty_think_after=0.2)
    assert "12.0 tokens before SFT and 0.0 tokens after SFT" in think_findings(m)
    assert "format" not in think_findings(m)
