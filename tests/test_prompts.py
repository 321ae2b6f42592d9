"""Templates and their parsers, on literal strings (qedlib.prompts)."""
import pytest

from qedlib import prompts as P

RUBRIC_ANSWER = """Here is the scheme.
<rubric>
Checkpoints (7 points total):
- [2 pts] Writes both odd numbers with independent parameters.
- [3 pts] Rewrites the sum as 2(m+k+1).
- [2 pts] Concludes, noting m+k+1 is an integer.
Alternative path:
- [4 pts] Parity table argument.
- [3 pts] Covers all cases.
Zero-credit items:
- Checking examples.
- Restating the claim.
Deductions:
- [-1] Algebra slip.
- [cap 3] Same parameter for both numbers.
</rubric>"""


def test_every_template_loads_and_declares_fields():
    names = P.template_names()
    for name in ("grade_rubric", "grade_rubric_reference", "grade_proofbench", "grade_answer", "write_rubric",
                 "screen_problem"):
        assert name in names
        assert P.fields_of(name), name
    assert P.fields_of("grade_rubric") == ["problem", "rubric", "proof", "response_format"]
    assert "reference_solution" in P.fields_of("grade_rubric_reference")
    # the no-reference variant must not mention a reference solution it never receives
    assert "reference" not in P.load_prompt("grade_rubric").lower()


def test_fill_rejects_missing_none_empty_and_unexpected_fields():
    base = dict(problem="Prove x.", rubric="[7 pts] all", proof="Done.", response_format="fmt")
    assert "Prove x." in P.fill("grade_rubric", **base)
    with pytest.raises(P.PromptError, match="reference_solution"):
        P.fill("grade_rubric_reference", **base)
    with pytest.raises(P.PromptError, match="reference_solution"):
        P.fill("grade_rubric_reference", **base, reference_solution=None)
    with pytest.raises(P.PromptError, match="rubric"):
        P.fill("grade_rubric", **{**base, "rubric": "   "})
    with pytest.raises(P.PromptError, match="does not use"):
        P.fill("grade_rubric", **base, reference_solution="a solution")
    with pytest.raises(P.PromptError, match="unknown prompt template"):
        P.load_prompt("nope")


def test_fill_is_one_pass_and_keeps_latex_braces():
    proof = r"We have \frac{a}{b} = {proof} and {rubric} stays literal."
    out = P.fill("grade_rubric", problem="Prove $x^{2} \\ge 0$.", rubric="R", proof=proof, response_format="F")
    assert proof in out
    assert "$x^{2} \\ge 0$" in out
    assert "{problem}" not in out and "{response_format}" not in out


def test_response_formats_have_no_numeric_example_tags():
    from qedlib.verdicts import TAG, _tag_value
    formats = P.response_formats()
    assert set(formats) == {"score_text", "score_prob", "points_text", "points_prob", "answer_text", "answer_prob"}
    for name, text in formats.items():
        tags = TAG.findall(text)
        assert tags, name
        # an echoed example must never read as a score
        assert all(_tag_value(v)[0] == "placeholder" for _, v in tags), (name, tags)


def test_parse_rubric_good_and_bad():
    r, err = P.parse_rubric(RUBRIC_ANSWER)
    assert err is None
    assert r["total"] == 7
    assert [c["points"] for c in r["checkpoints"] if c["path"] == "checkpoints"] == [2, 3, 2]
    assert r["zero_credit"] == ["Checking examples.", "Restating the claim."]
    assert r["deductions"][1] == {"penalty": "cap 3", "description": "Same parameter for both numbers."}
    assert P.parse_rubric("no block") == (None, "no <rubric>...</rubric> block")
    bad = RUBRIC_ANSWER.replace("[3 pts] Rewrites", "[4 pts] Rewrites")
    assert P.parse_rubric(bad)[1] == "checkpoints total 8 points, not 7"
    assert "not 7" in P.parse_rubric(RUBRIC_ANSWER.replace("[3 pts] Covers", "[2 pts] Covers"))[1]
    assert "no checkpoint lines" in P.parse_rubric("<rubric>Checkpoints:\nnothing</rubric>")[1]


def test_parse_rubric_uses_the_last_block_when_the_layout_is_echoed():
    echoed = "<rubric>\nCheckpoints (7 points total):\n- [P pts] description\n</rubric>\n" + RUBRIC_ANSWER
    assert P.parse_rubric(echoed)[0]["total"] == 7


def test_write_rubric_and_screen_templates_fill():
    t = P.fill("write_rubric", problem="Prove x.", reference_solution="Because y.")
    assert "Because y." in t and "<rubric>" in t
    assert "Prove x." in P.fill("screen_problem", problem="Prove x.")


def test_parse_screening():
    ok = "Fine.\n<screening>\nincomplete: no\nwrong_statement: No\npurely computational: no\ndifficulty: 6\n</screening>"
    got, err = P.parse_screening(ok)
    assert err is None and got == {"incomplete": False, "wrong_statement": False, "purely_computational": False,
                                   "difficulty": 6, "keep": True}
    got, _ = P.parse_screening(ok.replace("incomplete: no", "incomplete: yes").replace("6", "6/10"))
    assert got["keep"] is False and got["incomplete"] is True and got["difficulty"] == 6
    assert "difficulty" in P.parse_screening(ok.replace("difficulty: 6", "difficulty: 11"))[1]
    assert "yes or no" in P.parse_screening(ok.replace("incomplete: no", "incomplete: maybe"))[1]
    assert "missing" in P.parse_screening("<screening>\nincomplete: no\n</screening>")[1]
    assert P.parse_screening("nothing")[1].startswith("no <screening>")
    # the echoed layout (placeholders) is not an answer
    echo = P.fill("screen_problem", problem="Prove x.")
    assert P.parse_screening(echo)[0] is None
