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


def test_batched_and_seeded_with_a_real_model(tiny_generator, shipped_problems):
    probs = shipped_problems[:3]
    rc = RCSettings(turns=2, reasoning_budget=6, summary=Sampling(temperature=0.7, top_p=0.8, max_new_tokens=4))
    a = rc_rollout(probs, tiny_generator, tiny_generator, rc, Sampling(temperature=1.0), seed=3)
    b = rc_rollout(probs, tiny_generator, tiny_generator, rc, Sampling(temperature=1.0), seed=3)
    assert [[s.prompt for s in t] for t in a] == [[s.prompt for s in t] for t in b]
    assert all(len(t) == 2 and t[0].completion_tokens <= 6 for t in a)
