"""The RC loop: turns, cache states, truncated turns, accumulation, and one function for train and eval."""
from dataclasses import replace

from qedlib.config import RCSettings, Sampling
from qedlib.generation import Completion, split_thinking
from qedlib.reasoning_cache import cache_state_prompts, rc_rollout, reasoning_messages


class ScriptedGenerator:
    """Answers from a script and records every prompt: tests the loop's bookkeeping, not a model."""

    def __init__(self, answers):
        self.answers, self.seen = list(answers), []

    def generate(self, prompts, sampling, thinking=False):
        out = []
        for msgs in prompts:
            self.seen.append((msgs[-1]["content"], sampling.max_new_tokens))
            text = self.answers.pop(0)
            r, f, closed = split_thinking(text, thinking)
            out.append([Completion(text, r, f, closed, "stop" if closed else "length", 10, 5)])
        return out


def test_turns_states_and_first_turn_prompt(shipped_problems):
    p = shipped_problems[0]
    policy = ScriptedGenerator(["idea one</think>proof one", "cut off while still thinking about"])
    summ = ScriptedGenerator(["I tried idea one.", "I continued but stopped."])
    rc = RCSettings(turns=2, reasoning_budget=7, summary=Sampling(max_new_tokens=5))
    [traj] = rc_rollout([p], policy, summ, rc, Sampling(temperature=0.8))
    assert [s.turn for s in traj] == [0, 1]
    assert traj[0].summary_in == "" and "Summary of the earlier attempt" not in traj[0].prompt[0]["content"]
    assert traj[1].summary_in == "I tried idea one." and "I tried idea one." in traj[1].prompt[0]["content"]
    assert traj[0].final == "proof one" and traj[1].final == "" and not traj[1].think_closed
    # the reasoning budget and the summary budget are the ones configured
    assert policy.seen[0][1] == 7 and summ.seen[0][1] == 5
    # a cut-off turn still hands its raw reasoning to the summariser, never an empty attempt
    assert "cut off while still thinking about" in summ.seen[1][0]
    states = cache_state_prompts(p, traj)
    assert len(states) == 3 and states[-1] == reasoning_messages(p.problem, "I continued but stopped.")


def test_accumulate_appends_summaries(shipped_problems):
    p = shipped_problems[1]
    rc = RCSettings(turns=2, accumulate=True)
    [traj] = rc_rollout([p], ScriptedGenerator(["a</think>b", "c</think>d"]), ScriptedGenerator(["S1", "S2"]),
                        rc, Sampling())
    assert traj[1].summary_in == "S1" and traj[1].summary_out == "S1\n\nS2"


def test_eval_can_skip_the_last_summary(shipped_problems):
    summ = ScriptedGenerator(["S1"])
    rc_rollout(shipped_problems[:1], ScriptedGenerator(["a</think>b", "c</think>d"]), summ,
               RCSettings(turns=2), Sampling(), final_summary=False)
    assert len(summ.seen) == 1


def test_the_summariser_is_asked_for_the_configured_length(shipped_problems):
    """rc.summary_length (params: rc_rl.rc / eval.rc) reaches the summariser's prompt; the default is the paper's."""
    for rc, words in ((RCSettings(turns=1), "Write at most two short paragraphs in the first person"),
                      (RCSettings(turns=1, summary_length="two sentences"), "Write two sentences in the first person")):
        summ = ScriptedGenerator(["S1"])
        rc_rollout(shipped_problems[:1], ScriptedGenerator(["a</think>b"]), summ, rc, Sampling())
        assert words in summ.seen[0][0]


def test_batched_and_seeded_with_a_real_model(tiny_generator, shipped_problems):
    probs = shipped_problems[:3]
    rc = RCSettings(turns=2, reasoning_budget=6, summary=Sampling(temperature=0.7, top_p=0.8, max_new_tokens=4))
    a = rc_rollout(probs, tiny_generator, tiny_generator, rc, Sampling(temperature=1.0), seed=3)
    b = rc_rollout(probs, tiny_generator, tiny_generator, rc, Sampling(temperature=1.0), seed=3)
    assert [[s.prompt for s in t] for t in a] == [[s.prompt for s in t] for t in b]
    assert all(len(t) == 2 and t[0].completion_tokens <= 6 for t in a)


def test_eval_scaffold_and_rc_rl_build_identical_state_prompts(tiny_model_path, shipped_problems, monkeypatch):
    """One RC function for training and evaluation: same seed and model -> the same turn prompts."""
    from types import SimpleNamespace

    from qedlib import generation
    from qedlib.config import Endpoint, RCRLConfig
    from qedlib.models import load_model
    from qedlib.stages.rc_rl import RCRollout, problem_slots
    from qedlib.scaffolds import ScaffoldSettings, run_scaffold

    seen = []
    original = generation.TransformersGenerator.generate

    def recording(self, prompts, sampling, thinking=False):
        seen.append([m[-1]["content"] for m in prompts])
        return original(self, prompts, sampling, thinking)

    monkeypatch.setattr(generation.TransformersGenerator, "generate", recording)
    probs = shipped_problems[:2]
    rc = RCSettings(turns=2, reasoning_budget=6, summary=Sampling(temperature=0.7, top_p=0.8, max_new_tokens=4))
    tok, model = load_model(tiny_model_path, dtype="float32")

    # evaluation: the rc scaffold
    policy = generation.TransformersGenerator(Endpoint(batch_size=16), model=model, tokenizer=tok)
    run_scaffold("rc", probs, policy, Sampling(temperature=0.8), ScaffoldSettings(rc=rc, thinking=True), seed=0)
    eval_prompts, seen[:] = list(seen), []

    # training: RC-RL's rollout function, at step 0 with seed 0
    rl = RCRLConfig(rc=rc, temperature=0.8, num_generations=2, states_per_trajectory=1, max_completion_length=4)
    rollout = RCRollout(rl, {p.id: p for p in probs}, thinking=True, seed=0)
    data = problem_slots(tok, probs, 1, thinking=True)
    rollout.prompt_to_id = {r["prompt"]: r["problem_id"] for r in data}
    trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=model,
                              processing_class=tok, state=SimpleNamespace(global_step=0))
    out = rollout([r["prompt"] for r in data for _ in range(2)], trainer)
    train_prompts = list(seen)

    # turn prompts (policy calls) agree; training additionally summarises the last turn
    assert eval_prompts[0] == train_prompts[0] and eval_prompts[2] == train_prompts[2]
    assert len(out["completion_ids"]) == 4 and len(out["prompt_ids"]) == 4


def test_rc_rl_policy_generator_uses_trls_colocated_vllm_engine_or_explains():
    """With rl.use_vllm the RC loop generates with TRL's colocated engine (weights synced by TRL);
    server mode and sleep mode are refused with the fix. (vLLM itself needs a GPU: wiring only here.)"""
    from types import SimpleNamespace
    import pytest
    from qedlib.config import RCRLConfig
    from qedlib.generation import VLLMGenerator
    from qedlib.stages.rc_rl import RCRollout
    rollout = RCRollout(RCRLConfig(), {}, thinking=True)
    engine, tok = object(), object()
    trainer = SimpleNamespace(use_vllm=True, processing_class=tok,
                              vllm_generation=SimpleNamespace(mode="colocate", enable_sleep_mode=False, llm=engine))
    gen = rollout.policy_generator(trainer)
    assert isinstance(gen, VLLMGenerator) and gen.llm is engine and gen.tokenizer is tok
    trainer.vllm_generation.mode = "server"
    with pytest.raises(ValueError, match="vllm_mode: colocate"):
        rollout.policy_generator(trainer)
    trainer.vllm_generation.mode, trainer.vllm_generation.enable_sleep_mode = "colocate", True
    with pytest.raises(ValueError, match="sleep mode"):
        rollout.policy_generator(trainer)


# ---------------------------------------------------------------- summaries of thinking models
# A chat template in the style of Qwen3-4B-Thinking-2507's: the generation prompt always opens <think>.
QWEN3_THINKING_STYLE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


class TemplatedScript(ScriptedGenerator):
    """Renders prompts with a real tokenizer's chat template (as the transformers backend does), answers from a script."""

    def __init__(self, answers, tokenizer):
        super().__init__(answers)
        self.tokenizer, self.rendered = tokenizer, []

    def generate(self, prompts, sampling, thinking=False):
        from qedlib.generation import render_prompt
        out = []
        for msgs in prompts:
            self.rendered.append(render_prompt(self.tokenizer, msgs, thinking))
            self.seen.append((msgs[-1]["content"], sampling.max_new_tokens))
            text = self.answers.pop(0)
            r, f, closed = split_thinking(text, thinking)
            out.append([Completion(text, r, f, closed, "stop" if closed else "length", 10, 5)])
        return out


def qwen3_style_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.chat_template = QWEN3_THINKING_STYLE
    return tok


def test_thinking_summariser_unclosed_summary_is_never_used(tiny_model_path, shipped_problems):
    from qedlib.reasoning_cache import summary_unclosed_rate, template_opens_think
    tok = qwen3_style_tokenizer(tiny_model_path)
    assert template_opens_think(tok)
    p = shipped_problems[0]
    policy = ScriptedGenerator(["idea one</think>proof one", "idea two</think>proof two", "idea three</think>proof three"])
    summ = TemplatedScript(["I should summarise... the attempt used induction and then", "thinking</think>\n\nI tried idea two."],
                           tok)
    rc = RCSettings(turns=3, reasoning_budget=7, summary=Sampling(max_new_tokens=5), summary_thinking_budget=20)
    traj = rc_rollout([p], policy, summ, rc, Sampling(), final_summary=False)[0]
    # the summariser's own template opened <think>, so it ran with thinking on and the thinking budget
    assert all(r.rstrip().endswith("<think>") for r in summ.rendered) and summ.seen[0][1] == 5 + 20
    # turn 0's summary never closed: not used; turn 1 starts from scratch (no summary block at all)
    assert traj[0].summary_status == "unclosed" and traj[0].summary_out == ""
    assert traj[1].summary_in == "" and traj[1].prompt == reasoning_messages(p.problem, "")
    # turn 1's summary closed: the text after </think> is the summary
    assert traj[1].summary_status == "ok" and traj[2].summary_in == "I tried idea two."
    assert traj[2].summary_status == "" and summary_unclosed_rate([s.summary_status for s in traj]) == 0.5


def test_unclosed_summary_keeps_the_previous_one_and_is_counted_in_eval_rows(tiny_model_path, shipped_problems):
    from qedlib.stages import evaluation
    from qedlib.verdicts import Grade
    from qedlib.stages.rc_rl import score_by_turn
    from qedlib.scaffolds import ScaffoldSettings, run_scaffold
    tok = qwen3_style_tokenizer(tiny_model_path)
    p = shipped_problems[0]
    # the policy summarises itself (test time): turn 0 summary ok, turn 1 summary cut off -> turn 2 keeps S1
    script = ["a</think>proof a", "t</think>S1", "b</think>proof b", "still thinking about the summ",
              "c</think>proof c"]
    policy = TemplatedScript(script, tok)
    rc = RCSettings(turns=3, summary=Sampling(max_new_tokens=5), summary_thinking=None)
    [res] = run_scaffold("rc", [p], policy, Sampling(), ScaffoldSettings(rc=rc, thinking=True), seed=None)
    assert [t["summary_status"] for t in res.trace] == ["ok", "unclosed", ""]
    assert "S1" in policy.seen[4][0]  # turn 2 reasoned on the last good summary
    bench = evaluation.Benchmark("toy", [p], "rubric", "proof")
    row = evaluation.make_row("m", bench, "rc", p, 0, res.to_dict(), Grade(True, 7.0))
    assert (row["summaries"], row["summaries_unclosed"]) == (2, 1)
    assert evaluation.summary_unclosed_rate([row, row]) == 0.5
    turns = [{"turn": t["turn"], "score": None, "truncated": False, "summary_tokens": 1,
              "summary_status": t["summary_status"]} for t in res.trace]
    assert score_by_turn(turns)["1"]["summary_unclosed_rate"] == 1.0 and score_by_turn(turns)["2"]["summary_unclosed_rate"] is None
