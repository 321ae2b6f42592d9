"""Faults at the edges of a run, each reproducing a failure of issue #22 against real files, a real local HTTP
server (tests/conftest.py's fake_openai in its fault modes) and the real command line:
corrupt JSONL lines (5), trickling servers (3), secrets echoed by a server (11), unclear data and --set errors (9)."""
import json
import os
import time

import pytest

from conftest import EchoHeaders, GARBAGE, Trickle, chat_reply, fail_then
from test_export import build_run, make_cfg
from qedlib import grading as G
from qedlib.__main__ import main
from qedlib.config import ConfigError, Endpoint, Judge, Sampling, load_config, parse_override
from qedlib.problem_sets import DataError, Problem, load_problems
from qedlib.generation import OpenAIGenerator, call_deadline, make_generator
from qedlib.files import CorruptLineWarning, JsonlLog, read_jsonl

MSG = [[{"role": "user", "content": "Prove that 1 + 1 = 2."}]]
SAMPLING = Sampling(temperature=0.0, max_new_tokens=16)


def lines_of(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# ---------------------------------------------------------------- 5: no silent data loss
def test_a_corrupt_middle_line_keeps_every_later_record_and_is_named(tmp_path):
    path = tmp_path / "results.jsonl"
    log = JsonlLog(path)
    for k in "abcd":
        log.append({"key": k, "v": k * 3})
    raw = lines_of(path)
    raw[1] = b'{"key": "b", "v": "bb\x00 a disk error}\n'  # line 2 damaged in place
    path.write_bytes(b"".join(raw[:2] + [b'["not", "a", "record"]\n', b'{"no_key": 1}\n'] + raw[2:]))
    before = path.read_bytes()
    with pytest.warns(CorruptLineWarning) as caught:
        again = JsonlLog(path)
    assert sorted(again.records) == ["a", "c", "d"]  # the records after the bad lines are kept
    assert [i for i, _ in again.bad_lines] == [2, 3, 4]
    text = str(caught[0].message)
    assert len(caught) == 1 and f"{path}:2: not valid JSON" in text and f"{path}:3: a JSON list" in text
    assert f"{path}:4: no 'key' field" in text and "3 valid record(s) kept" in text
    assert path.read_bytes() == before  # reading never rewrites
    again.append({"key": "b", "v": "redone"})
    assert path.read_bytes() == before + b'{"key": "b", "v": "redone"}\n'  # appends never rewrite either
    with pytest.warns(CorruptLineWarning):
        assert [r.get("key") for r in read_jsonl(path)] == ["a", None, "c", "d", "b"]  # keyless: line 4 is a record


def test_a_torn_last_line_is_trimmed_only_by_the_writer(tmp_path):
    path = tmp_path / "samples.jsonl"
    log = JsonlLog(path)
    log.append({"key": "a"})
    with open(path, "ab") as f:
        f.write(b'{"key": "b", "te')  # an append in progress (or a crash mid-write)
    before = path.read_bytes()
    reader = JsonlLog(path)
    assert list(reader.records) == ["a"] and not reader.bad_lines and list(read_jsonl(path)) == [{"key": "a"}]
    assert path.read_bytes() == before  # a reader never trims: the writer may still be writing
    reader.append({"key": "c"})
    assert path.read_bytes() == b'{"key": "a"}\n{"key": "c"}\n'  # the writer trims the torn line, then appends
    with open(path, "ab") as f:
        f.write(b'{"key": "d"}')  # a whole record whose newline never came
    writer = JsonlLog(path)
    assert list(writer.records) == ["a", "c", "d"]
    writer.append({"key": "e"})
    assert path.read_bytes() == b'{"key": "a"}\n{"key": "c"}\n{"key": "d"}\n{"key": "e"}\n'


def test_export_official_reads_results_around_a_corrupt_line_and_never_writes_them(tmp_path, capsys):
    run = build_run(tmp_path, make_cfg(tmp_path))
    results, gens = run / "05_eval" / "results.jsonl", run / "05_eval" / "generations.jsonl"
    rows = lines_of(results)
    results.write_bytes(b"".join(rows[:3] + [b'{"key": "torn mid-fil\n'] + rows[3:]) + b'{"key": "in prog')
    gens.write_bytes(gens.read_bytes() + b'{"key": "half')
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (results, gens)}
    with pytest.warns(CorruptLineWarning, match=r"results.jsonl:4: not valid JSON"):
        assert main(["export-official", str(run), "--out", str(tmp_path / "official")]) == 0
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    exported = [r for f in (tmp_path / "official").glob("*/*/*/run-*.jsonl") for r in read_jsonl(f) if r["evaluated"]]
    assert len(exported) == len(rows)  # every valid row, including all those after the corrupt line


# ---------------------------------------------------------------- 3: bounded time
def test_a_trickling_server_is_cut_at_the_per_request_timeout(fake_openai):
    payload = json.dumps(chat_reply("<score>7</score>")).encode()
    server = fake_openai(lambda body: Trickle(payload, every_s=0.1))  # whole answer: ~20 s, each read well under 1 s
    gen = OpenAIGenerator(Endpoint(model="trickle", backend="openai", base_url=server.url, timeout_s=1.0, max_retries=0))
    t0 = time.monotonic()
    c = gen.generate(MSG, SAMPLING)[0][0]
    took = time.monotonic() - t0
    assert took < 5.0, f"a trickling server held the call for {took:.1f} s"
    assert c.finish_reason == "error" and "'trickle'" in c.error and server.url in c.error
    assert "1.0 s" in c.error and "1 attempt(s)" in c.error  # the attempt's timeout_s or the call's deadline: both 1 s


def test_the_deadline_covers_every_retry_and_names_the_endpoint(fake_openai):
    payload = json.dumps(chat_reply("Proof.")).encode()
    server = fake_openai(lambda body: Trickle(payload, every_s=0.1))
    ep = Endpoint(model="slow", backend="openai", base_url=server.url, timeout_s=30.0, max_retries=4, deadline_s=1.5)
    t0 = time.monotonic()
    c = make_generator(ep).generate(MSG, SAMPLING)[0][0]
    assert time.monotonic() - t0 < 5.0
    assert "endpoint 'slow'" in c.error and "deadline of 1.5 s" in c.error
    # the default deadline is what timeout_s and the retries allow, back-off included
    assert call_deadline(Endpoint(timeout_s=10.0, max_retries=2, retry_backoff_s=1.0)) == pytest.approx(30 + 1.5 + 3.0)


def test_a_trickling_judge_is_a_judge_error_in_bounded_time(fake_openai):
    payload = json.dumps(chat_reply("<score>7</score>")).encode()
    server = fake_openai(lambda body: Trickle(payload, every_s=0.1))
    judge = Judge(endpoint=Endpoint(model="judge", backend="openai", base_url=server.url, timeout_s=0.5, max_retries=1,
                                    retry_backoff_s=0.05), sampling=Sampling(temperature=1.0, max_new_tokens=64))
    prob = Problem("p1", "Prove that 2 is even.", rubric="- [7 pts] 2 = 2 * 1.")
    t0 = time.monotonic()
    g = G.Grader(judge).grade([prob], ["2 = 2 * 1."])[0]
    assert time.monotonic() - t0 < 5.0
    assert g.reason == "judge_error" and "endpoint 'judge'" in g.detail and "2 attempt(s)" in g.detail


def test_fail_then_succeed_and_garbage_modes(fake_openai):
    ok = fake_openai(fail_then(2, lambda body: chat_reply("Proof.")))
    ep = Endpoint(model="m", backend="openai", base_url=ok.url, max_retries=2, retry_backoff_s=0.01)
    assert make_generator(ep).generate(MSG, SAMPLING)[0][0].final == "Proof." and ok.calls == 3
    bad = fake_openai(lambda body: GARBAGE)
    c = make_generator(Endpoint(model="m", backend="openai", base_url=bad.url, max_retries=1,
                                retry_backoff_s=0.01)).generate(MSG, SAMPLING)[0][0]
    assert c.finish_reason == "error" and "unparseable response" in c.error and bad.calls == 2


# ---------------------------------------------------------------- 11: secrets never reach outputs
def test_a_key_echoed_by_the_server_is_redacted(fake_openai, monkeypatch, capsys):
    key, other = "sk-qed-test-4f1c2a9e77b0", "judge-secret-9d8e7f6a5b"
    monkeypatch.setenv("QED_FAULT_TEACHER_KEY", key)
    monkeypatch.setenv("QED_FAULT_JUDGE_KEY", other)
    server = fake_openai(lambda body: EchoHeaders(401))
    cfg = load_config(None, {"distill.teacher": {"model": "t", "backend": "openai", "base_url": server.url,
                                                 "api_key_env": "QED_FAULT_TEACHER_KEY"},
                             "eval.judge.endpoint.api_key_env": "QED_FAULT_JUDGE_KEY"})
    c = make_generator(cfg.distill.teacher).generate(MSG, SAMPLING)[0][0]
    print(c.error)  # what a notebook cell prints
    assert server.headers[0]["Authorization"] == f"Bearer {key}"  # the server did see, and echo, the key
    assert "HTTP 401" in c.error and "Bearer [redacted]" in c.error
    # a secret another endpoint of the config names is hidden too, wherever a server puts it
    leaky = fake_openai(lambda body: (403, f"forbidden; keys seen today: {other} and {key}".encode()))
    c2 = make_generator(Endpoint(model="t", backend="openai", base_url=leaky.url)).generate(MSG, SAMPLING)[0][0]
    print(c2.error)
    out = capsys.readouterr().out
    assert "HTTP 403" in out and key not in out and other not in out and "[redacted]" in c2.error


# ---------------------------------------------------------------- 9: unclear errors, the data parts
def test_a_json_array_line_is_skipped_or_named_by_file_and_line(tmp_path, capsys):
    f = tmp_path / "problems.jsonl"
    f.write_text('{"problem": "Prove A."}\n\n["Prove B.", "rubric"]\n{"problem": "Prove C."}\n')
    with pytest.raises(DataError, match=rf"{f}:3: the row is a JSON array .*on_bad_row: skip"):
        load_problems(str(f))
    probs = load_problems(str(f), on_bad_row="skip")
    assert [p.problem for p in probs] == ["Prove A.", "Prove C."]
    assert probs.skipped == [{"row": 1, "reason": "not a JSON object", "line": 3}]
    assert f"{f}: skipped 1 bad row(s): not a JSON object x1; lines 3" in capsys.readouterr().out


@pytest.mark.parametrize("name,text", [("empty.csv", ""), ("header.csv", "id,problem\n"), ("empty.jsonl", ""),
                                       ("blank.jsonl", "\n\n")])
def test_an_empty_data_file_is_one_clear_error_naming_it(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(DataError, match=rf"^{f}: the file holds no rows"):
        load_problems(str(f))


def test_a_bad_set_value_is_one_line_naming_the_key(capsys):
    with pytest.raises(ConfigError, match=r"--set sft.lr=\[1.0e-5: the value is not valid YAML"):
        parse_override("sft.lr=[1.0e-5")
    assert main(["run", "params/does-not-matter.yaml", "--set", "eval.judge.endpoint.extra_body={a: [1}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval.judge.endpoint.extra_body" in err and "Traceback" not in err
