"""Decontamination on literal strings, plus the params-facing benchmark loader."""
from qedlib.problem_sets import Problem, load_problems
from qedlib.decontam import build_index, find_contaminated, load_benchmarks, ngrams, normalise, overlap_rows

BENCH = ["Let $n$ be a positive integer. Prove that $n^5 - n$ is divisible by $30$.",
         "Find all functions $f:\\mathbb{R}\\to\\mathbb{R}$ such that $f(x+y) = f(x) + f(y)$ for all reals."]


def test_normalise_strips_latex_case_and_punctuation():
    assert normalise("Prove that $\\frac{a}{b} \\ge 2$, QED.") == ["prove", "that", "a", "b", "2", "qed"]


def test_ngrams_short_text_is_one_gram():
    assert ngrams("Prove it.", 8) == {("prove", "it")}
    assert len(ngrams("one two three four five", 3)) == 3


def test_copied_problem_is_removed_reworded_kept():
    index = build_index({"bench": BENCH}, n=5)
    copied = Problem("c", "Let n be a positive integer; prove that n^5 - n is divisible by 30!")
    other = Problem("o", "Prove that the sum of two odd integers is even.")
    stock = Problem("s", "Let $n$ be a positive integer. Prove that there are infinitely many primes.")
    rows = find_contaminated([copied, other, stock], index, threshold=0.5)
    assert [r["id"] for r in rows] == ["c"]
    assert rows[0]["benchmark_item"] == "bench/0" and rows[0]["overlap"] == 1.0
    assert "bench/0" in rows[0]["reason"]
    # a stock opening shares some n-grams but stays under the threshold
    stock_row = next(r for r in overlap_rows([stock], index))
    assert 0 < stock_row["overlap"] < 0.5


def test_threshold_is_per_benchmark_item_not_union():
    half_a = "alpha beta gamma delta epsilon zeta eta theta"
    half_b = "iota kappa lambda mu nu xi omicron pi"
    index = build_index({"b": [half_a, half_b]}, n=3)
    mixed = half_a + " " + half_b  # half of its grams in each item, none in both
    overlap, item = index.best_match(mixed)
    assert 0.3 < overlap < 0.5 and item in ("b/0", "b/1")
    assert find_contaminated([mixed], index, 0.5) == []


def test_load_benchmarks_skips_missing_with_note(tmp_path):
    found, notes = load_benchmarks(["shipped:eval", str(tmp_path / "nope.jsonl")])
    assert list(found) == ["shipped:eval"]
    assert all(p.extra["split"] == "eval" for p in found["shipped:eval"])
    assert len(notes) == 1 and "nope.jsonl" in notes[0]


def test_shipped_train_is_clean_against_shipped_eval():
    bench, _ = load_benchmarks(["shipped:eval"])
    index = build_index(bench, 8)
    assert find_contaminated(load_problems("shipped", split="train"), index, 0.5) == []
    # and the eval split against itself is fully contaminated (the check can fire)
    assert len(find_contaminated(bench["shipped:eval"], index, 0.5)) == len(bench["shipped:eval"])


def test_a_missing_benchmark_fails_when_asked(tmp_path):
    """distill.decontaminate_missing: error stops instead of noting (the paper recipe's setting)."""
    import pytest
    from qedlib.problem_sets import DataError
    with pytest.raises(DataError, match=r"benchmark '.*nope.jsonl' could not be loaded.*does not exist"):
        load_benchmarks(["shipped:eval", str(tmp_path / "nope.jsonl")], missing="error")
    # a mapping entry (like eval.benchmarks) with ProblemSource keys; prompt/task are ignored here
    f = tmp_path / "b.jsonl"
    f.write_text('{"pid": "x", "q": "Prove that 2 is even."}\n{"pid": "x", "q": "Prove that 2 is even."}\n')
    found, notes = load_benchmarks([{"name": "b", "path": str(f), "columns": {"id": "pid", "problem": "q"},
                                     "duplicates": "first", "prompt": "rubric"}], missing="error")
    assert [p.id for p in found["b"]] == ["x"] and notes == []
