"""What notebook 04_reasoning_cache_rl shows: settings, a cache state in full, the curves, the findings in words (did
the reward rise, did the policy move on a fixed probe, do the summaries end, do later turns score differently), the
score by turn before and after training.

Reads what qedlib.stages.rc_rl computes and writes (step records, trajectories, inspection rows); it trains nothing.
Each finding function states its test in its docstring; tests/test_rc_rl_view.py feeds them a laptop run's numbers
(tests/fixtures/rc_rl_run.json).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ..display import experiments_markdown
from ..files import read_json
from ..generation import render_prompt
from ..layout import RC_RL
from ..plots import curves, stacked_time
from ..reasoning_cache import attempt_text, reasoning_messages, summary_messages
from ..rl_findings import findings as grpo_run_findings, headroom
from ..stats import MIN_VERDICT_N, verdict as stats_verdict

# Key settings shown beside the paper's (qedlib.display.settings_table reads the paper's values from qedlib.paper).
SETTINGS = [("reasoning turns", "rc_rl.rc.turns"), ("tokens per turn", "rc_rl.rc.reasoning_budget"),
            ("summary tokens", "rc_rl.rc.summary.max_new_tokens"), ("summary asked for", "rc_rl.rc.summary_length"),
            ("summariser in training", "rc_rl.rc.summariser"),
            ("frozen summariser model", "rc_rl.rc.summariser_endpoint.model"),
            ("states sampled per trajectory", "rc_rl.states_per_trajectory"),
            ("rollouts per state (group)", "rc_rl.num_generations"), ("problems per step", "rc_rl.prompts_per_step"),
            ("optimizer steps", "rc_rl.max_steps"), ("completion tokens", "rc_rl.max_completion_length"),
            ("learning rate", "rc_rl.lr"), ("PPO clip epsilon", "rc_rl.epsilon"),
            ("entropy bonus", "rc_rl.entropy_coef"), ("reward", "rc_rl.reward")]

# The training result as one small table (qedlib.display.metrics_table), section "Train".
TRAIN_METRICS = [("steps", "steps"), ("reward, first steps (group mean)", "learning.first"),
                 ("reward, last steps (group mean)", "learning.last"), ("reward gain", "learning.gain"),
                 ("gain, 95% interval low", "learning.ci_low"), ("gain, 95% interval high", "learning.ci_high"),
                 ("probe KL(trained || start) per token", "probe.kl"),
                 ("probe log-prob change per token", "probe.logprob_gain"),
                 ("truncation rate", "truncation_rate"), ("summaries cut at their budget", "summary_cut_rate"),
                 ("summaries unusable (unclosed or empty)", "summary_unclosed_rate"), ("seconds", "seconds")]

# The stage's final metrics (metrics.json) as one small table, section "Metrics".
METRICS = [("reward gain (first vs last steps)", "learning.gain"), ("gain, 95% interval low", "learning.ci_low"),
           ("gain, 95% interval high", "learning.ci_high"), ("reward gain on fixed cache states", "reward_check.gain"),
           ("fixed states gain, 95% low", "reward_check.ci_low"), ("fixed states gain, 95% high", "reward_check.ci_high"),
           ("probe KL per token", "probe.kl"),
           ("truncation rate", "truncation_rate"), ("summaries cut at their budget", "summary_cut_rate"),
           ("tokens per trajectory", "tokens_per_trajectory")]


# ---------------------------------------------------------------- "One cache state, in full" and "The summary"
def state_view(trajectories: list[dict], problems, tokenizer, thinking: bool, summary_length: str) -> dict:
    """One worked RC example from the last step's trajectories: the full rendered prompt of the first cache
    state that carries a summary (else turn 0's), and the summariser's prompt and summary of the turn before it.
    The caption says how the summary ended (on its own, or cut at its budget) and that "usable" is a format check
    only: nothing checks what a summary says."""
    if not trajectories:
        raise ValueError("no trajectories recorded (trajectories_last_step.json is empty): rerun the stage")
    by_id = {p.id: p for p in problems}
    with_summary = [(tr, t) for tr in trajectories for t in tr["turns"] if t["summary_out"]]
    traj, src = with_summary[0] if with_summary else (trajectories[0], trajectories[0]["turns"][0])
    prob = by_id[traj["problem_id"]]
    state = reasoning_messages(prob.problem, src["summary_out"])
    attempt = attempt_text(SimpleNamespace(**src, text=src["reasoning"]))
    ended = {"stop": "ended on its own", "length": "was cut at its token budget, mid-sentence"}.get(
        src.get("summary_finish", ""), "ended (how was not recorded)")
    caption = (f"Turn {src['turn']} of `{prob.id}`: the summariser's text below {ended}; it became the cache state "
               "above. It counts as usable because it is non-empty (and closed any thinking): nothing checks what it "
               f"says, so read it against the attempt.\n\n{_quote(src['summary_out'])}" if src["summary_out"] else
               f"No summary of the last step was usable (turn {src['turn']} of `{prob.id}`: status "
               f"{src['summary_status'] or 'none'}), so every cache state is the first prompt again.")
    return {"problem_id": prob.id, "turn": src["turn"], "summary_status": src["summary_status"],
            "state_prompt": render_prompt(tokenizer, state, thinking), "caption": caption,
            "summariser_prompt": summary_messages(prob.problem, src["summary_in"], attempt, summary_length)[0]["content"],
            "summary": src["summary_out"]}


def _quote(text: str) -> str:
    """Markdown block quote of every line of `text` (a quote marker on the first line alone ends at its newline)."""
    return "\n".join("> " + line for line in text.splitlines())


def worked_state(cfg, stage_folder, problems, model_path: str) -> dict:
    """`state_view` of the last training step's trajectories (trajectories_last_step.json), rendered with the
    chat template of the model the policy started from."""
    from transformers import AutoTokenizer  # heavy: transformers loads only for the tokenizer's chat template
    trajectories = read_json(Path(stage_folder) / "trajectories_last_step.json")
    return state_view(trajectories, problems, AutoTokenizer.from_pretrained(model_path), cfg.thinking,
                      cfg.rc_rl.rc.summary_length)


# ---------------------------------------------------------------- the curves and "What we see and why"
def step_figures(steps: list[dict]) -> list:
    """The step records as three figures, one scale per panel: the training reward and the judge's score of the RC
    turns; the rates and the gradient norm (log axis); where the time goes."""
    return [curves(steps, "step", ["reward", "judge_score_mean"], "RC-RL reward per step"),
            curves(steps, "step", ["truncation_rate", "summary_cut_rate", "frac_zero_std", "grad_norm"],
                   "Rates and gradient norm per step", log=["grad_norm"]),
            stacked_time(steps, "step", ["trajectory_s", "rollout_s", "grading_s"], "Where the time goes")]


def _interval(lo: float, hi: float, fmt: str = "+.3f") -> str:
    return f"95% interval [{lo:{fmt}}, {hi:{fmt}}]"


def learning_finding(learning: dict) -> str:
    """Did the training reward rise? Test: `learning` (qedlib.stages.rc_rl.learning: group means of the first vs the
    last third of the steps, bootstrap over groups). "Rose beyond noise" only when ci_low > 0, "fell" only when
    ci_high < 0, with >= stats.MIN_VERDICT_N groups on each side; otherwise "no change beyond noise"; fewer groups: no verdict; no
    gain measured (None): the stage's note."""
    if learning.get("gain") is None:
        return f"**Reward.** No gain measured: {learning.get('note', 'no step logged group rewards')}."
    head = (f"**Reward.** The {learning['reward']} reward (0-1) went {learning['first']:.3f} (mean of "
            f"{learning['n_first']} groups in {_steps(learning.get('steps_first'))}) -> {learning['last']:.3f} "
            f"({learning['n_last']} groups in {_steps(learning.get('steps_last'))}): gain "
            f"{learning['gain']:+.3f}")
    if min(learning["n_first"], learning["n_last"]) < MIN_VERDICT_N:
        return head + (f": too few groups for a verdict (at least {MIN_VERDICT_N} on each side; raise rc_rl.max_steps "
                       "or prompts_per_step).")
    band = _interval(learning["ci_low"], learning["ci_high"])
    if learning["ci_low"] > 0:
        return head + f", {band} (bootstrap over groups): it rose beyond noise."
    if learning["ci_high"] < 0:
        return head + f", {band} (bootstrap over groups): it fell beyond noise."
    return (head + f", {band} (bootstrap over groups) includes 0: no change beyond noise in these steps"
            f"{headroom(learning)}.")


def reward_check_finding(check: dict) -> str:
    """The reward on fixed cache states, starting vs trained policy (qedlib.stages.rc_rl.reward_check). Test: the
    verdict of `stats.verdict` on the interval over states: "rose beyond noise" only when ci_low > 0 with >=
    stats.MIN_VERDICT_N states, "fell" only when ci_high < 0; otherwise no change beyond noise; fewer states: no
    verdict. Says how many of the check's problems the run trained on (0: the states are new to the policy)."""
    if not check.get("states"):
        return f"**Reward on fixed cache states.** Not measured: {check.get('note', 'no state had a valid reward')}."
    seen = check.get("trained_on", 0)
    which = ("none of which the run trained on" if not seen else
             f"{seen} of which the run trained on" if seen < check["problems"] else "all of which the run trained on")
    head = (f"**Reward on fixed cache states.** On {check['states']} cache states of {check['problems']} problems "
            f"({which}), {check['samples_per_state']} samples each, the {check['reward']} reward (0-1) went "
            f"{check['start']:.3f} (starting policy) -> {check['trained']:.3f} (trained): gain {check['gain']:+.3f}")
    v = stats_verdict(check["ci_low"], check["ci_high"], check["states"])
    if v == "few":
        return head + f": too few states for a verdict (at least {MIN_VERDICT_N}; raise rc_rl.check_problems)."
    band = _interval(check["ci_low"], check["ci_high"])
    if v == "up":
        return head + f", {band} (bootstrap over states): it rose beyond noise."
    if v == "down":
        return head + f", {band} (bootstrap over states): it fell beyond noise."
    return head + f", {band} (bootstrap over states) includes 0: no change beyond noise."


def reward_check_figure(check: dict):
    """Each fixed cache state's mean reward under the starting and the trained policy (reward_check's per_state)."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    rows = [r for r in check.get("per_state", []) if r["start"] is not None and r["trained"] is not None]
    labels = [f"{r['problem_id']} · state {r['state']}" for r in rows]
    fig = go.Figure()
    for key, name in (("start", "starting policy"), ("trained", "trained policy")):
        fig.add_trace(go.Scatter(x=labels, y=[r[key] for r in rows], mode="markers", name=name,
                                 marker={"size": 10}))
    fig.update_layout(title=f"{check.get('reward', '')} reward on fixed cache states, before vs after RC-RL",
                      xaxis_title="cache state (problem · state index)", yaxis_title="mean reward (0-1)",
                      yaxis_range=[-0.05, 1.05], height=360, template="plotly_white", xaxis_tickangle=-30)
    return fig


def _steps(steps) -> str:
    """"step 3" or "steps 1-2" (the words before the numbers included)."""
    if not steps:
        return "steps ?"
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def probe_finding(probe: dict) -> str:
    """How far the saved policy moved from the start on the fixed probe set (qedlib.probe.policy_shift). Test: the
    log-probability change counts as beyond noise only when its bootstrap interval over probe items excludes 0 and
    there are >= stats.MIN_VERDICT_N items; the KL is reported as measured (it is >= 0 by construction, so its size is
    the information)."""
    change, n = probe["logprob_gain"], probe["probe_items"]
    band = _interval(probe["ci_low"], probe["ci_high"], "+.4f")
    verdict = {"up": "beyond noise", "down": "beyond noise", "none": "within noise (the interval includes 0)",
               "few": f"{n} items are too few for a verdict (at least {MIN_VERDICT_N})"}[
        stats_verdict(probe["ci_low"], probe["ci_high"], n)]
    return (f"**Policy shift.** On {probe['probe_items']} fixed probe items (a reference proof after the turn-0 "
            f"prompt), the trained policy's per-token log-probability went {probe['logprob_start']:.3f} -> "
            f"{probe['logprob_trained']:.3f} ({change:+.4f}, {band}: {verdict}); the mean per-token "
            f"KL(trained || start) is {probe['kl']:.4f} nats. This, not the share of weights that changed (Adam moves "
            "every weight with any gradient by about lr), is what training did to the policy's behaviour.")


def summary_finding(metrics: dict, settings) -> str | None:
    """The summaries, counted from the data: how many were written, the share that ended on their own within
    `rc.summary.max_new_tokens` vs cut at it (`summary_cut_rate`), and the share unusable (unclosed thinking or
    empty: `summary_unclosed_rate`). Test: each share is stated only when the stage recorded it; None when no
    summary was written."""
    cut, unusable, n = metrics.get("summary_cut_rate"), metrics.get("summary_unclosed_rate"), metrics.get("summaries")
    if cut is None and unusable is None:
        return None
    rc = settings.rc
    who = (f"the frozen `{rc.summariser_endpoint.model}`" if rc.summariser == "frozen" else "the policy itself")
    parts = []
    if cut is not None:
        parts.append(f"{1 - cut:.0%} ended on their own within {rc.summary.max_new_tokens:,} tokens and {cut:.0%} "
                     "were cut at that budget (used anyway, ending mid-sentence)")
    if unusable is not None:
        parts.append(f"{unusable:.0%} were unusable (thinking never closed, or empty) and the previous cache state "
                     "was kept")
    count = f"{n} summaries" if n else "The summaries"
    return f"**Summaries** (written by {who}). {count}: " + "; ".join(parts) + "."


def turn_finding(by_turn: dict) -> str | None:
    """The judge score (0-7) per RC turn during training with 95% intervals over trajectories, and whether the last
    turn differs from the first. Test: "higher/lower beyond noise" only when the paired change's interval
    (`score_by_turn["change"]`) excludes 0 over >= 5 pairs; fewer pairs: "too few to tell"; None without scores."""
    turns = {t: v for t, v in by_turn.items() if t != "change" and v.get("score_mean") is not None}
    if not turns:
        return None
    scores = "; ".join(f"turn {t}: {v['score_mean']:.2f} [{v['ci_low']:.2f}, {v['ci_high']:.2f}], "
                       f"{v.get('n_scored', v.get('n'))} graded" for t, v in turns.items())
    out = f"**By turn** (judge score 0-7 of each turn's proof during training, 95% interval over trajectories): {scores}."
    ch = by_turn.get("change")
    if not ch:
        return out
    diff = (f" Turn {ch['to_turn']} minus turn {ch['from_turn']} on the same trajectories: {ch['mean']:+.2f} points "
            f"({_interval(ch['ci_low'], ch['ci_high'], '+.2f')}, {ch['pairs']} pairs)")
    if ch["pairs"] < 5:
        return out + diff + ": too few pairs to tell."
    if ch["ci_low"] > 0:
        return out + diff + ": the later turn scores higher beyond noise."
    if ch["ci_high"] < 0:
        return out + diff + ": the later turn scores lower beyond noise."
    return out + diff + ": no difference beyond noise (RC does not help or hurt measurably here)."


def findings(steps: list[dict], metrics: dict, settings) -> str:
    """Stage 3's findings for this run (qedlib.rl_findings.findings: signal, length, gradient norm, clip ratio; its
    learning and policy-shift bullets are replaced by this stage's, whose probe is reference proofs) plus this
    stage's own: the reward's gain, the reward on fixed cache states (when `metrics` has `reward_check`), the policy
    shift on the probe, the summaries, the score by turn."""
    own = ("weights_changed_frac", "learning", "probe", "reward_check")
    shared = grpo_run_findings(steps, {k: v for k, v in metrics.items() if k not in own}, settings)
    ours = [learning_finding(metrics["learning"]) if metrics.get("learning") else None,
            reward_check_finding(metrics["reward_check"]) if metrics.get("reward_check") else None,
            probe_finding(metrics["probe"]) if metrics.get("probe") else None,
            summary_finding(metrics, settings), turn_finding(metrics.get("score_by_turn") or {})]
    return "\n".join([shared] + [f"- {x}" for x in ours if x])


# ---------------------------------------------------------------- "Score by turn, before and after RC-RL"
def turn_table(before: list[dict], after: list[dict]):
    """Mean score, truncation and tokens per (model, turn) of `inspect_trajectories` rows before and after
    training, with the number of problems graded; a turn with no valid grade has score None (JSON has no NaN)."""
    import pandas as pd  # heavy: pandas loads only when the notebook draws the table
    table = (pd.concat([pd.DataFrame(before).assign(model="before"), pd.DataFrame(after).assign(model="after")])
             .groupby(["model", "turn"], sort=False).agg(score=("score", "mean"), graded=("score", "count"),
                                                         truncated=("truncated", "mean"), tokens=("tokens", "mean"))
             .reset_index().astype(object))
    return table.where(table.notna(), None)


def turn_figure(table):
    """Bars of the mean score (0-7) per model and turn of `turn_table`, grouped by turn, with axis titles."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    fig = go.Figure([go.Bar(name=m, x=[f"turn {t}" for t in part.turn], y=list(part.score))
                     for m, part in table.groupby("model", sort=False)])
    fig.update_layout(title="Mean judge score by turn, before and after RC-RL (a few problems: no interval)",
                      xaxis_title="RC turn", yaxis_title="mean judge score (0-7)", barmode="group", height=360,
                      template="plotly_white")
    return fig


def turn_interval_figure(by_turn: dict):
    """The training run's judge score (0-7) per RC turn with its 95% bootstrap interval (score_by_turn)."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    turns = [(t, v) for t, v in by_turn.items() if t != "change" and v.get("score_mean") is not None]
    fig = go.Figure(go.Scatter(
        x=[f"turn {t}" for t, _ in turns], y=[v["score_mean"] for _, v in turns], mode="markers",
        error_y={"type": "data", "symmetric": False, "array": [v["ci_high"] - v["score_mean"] for _, v in turns],
                 "arrayminus": [v["score_mean"] - v["ci_low"] for _, v in turns]}))
    fig.update_layout(title="Judge score by turn during training, 95% interval over trajectories",
                      xaxis_title="RC turn", yaxis_title="mean judge score (0-7)", height=340,
                      template="plotly_white")
    return fig


def tokens_finding(tokens: float, settings) -> str:
    """The tokens of one RC trajectory against one single pass with the same per-turn budget, in words. Test: "more"
    only when the trajectory's tokens exceed the budget."""
    budget = settings.rc.reasoning_budget
    cmp = "more tokens, in bounded pieces" if tokens > budget else "no more tokens than one pass"
    return (f"Tokens per RC trajectory (reasoning and summaries, all turns): {tokens:.0f}, against at most {budget} "
            f"for one single pass with the same per-turn budget: RC spends {cmp}.")


# ---------------------------------------------------------------- "Try it"
START = "outputs/cpu/03_rubric_rl/model"  # the `make run` run's stage-03 policy: each experiment starts where 04 did
EXPERIMENTS = [
    {"name": "paper-lr", "overrides": {"rc_rl.model": START, "rc_rl.lr": 1.0e-6},
     "look_for": "the paper's lr on the 135M policy. Measured (2026-12-05, against this run's 1e-4): the probe's KL "
                 "about 300 times smaller (0.0003 vs 0.09 nats), yet the reward on fixed cache states still rose, "
                 "+0.52 [+0.40, +0.67] against +0.73: a few decision tokens can move while whole proofs barely do. "
                 "The first-vs-last-steps gain is 'too few groups' at either lr."},
    {"name": "judge-reward", "overrides": {"rc_rl.model": START, "rc_rl.reward": "judge"},
     "look_for": "the 135M judge's grade as the reward: compare the reward on fixed cache states (now the judge's "
                 "score/7) and the probe's KL with this run's; how much do a group's judge rewards differ "
                 "(reward_std)?"},
    {"name": "self-summariser", "overrides": {"rc_rl.model": START, "rc_rl.rc.summariser": "policy",
                                              "rc_rl.rc.summary_thinking": None,
                                              "rc_rl.rc.summary_thinking_budget": 32},
     "look_for": "the policy summarising itself, thinking first with 32 extra tokens, instead of the frozen instruct "
                 "model: compare the Summaries finding (cut and unusable shares) and the summary in *One cache "
                 "state* with this run's."},
]


def try_it(params_file: str = "params/cpu.yaml") -> str:
    """Markdown for the notebook's "Try it" section, built from EXPERIMENTS (one source, tested). Each experiment
    starts from the `make run` run's stage-03 model (outputs/cpu) in its own run folder. Notebook 04, "Try it"."""
    return experiments_markdown(EXPERIMENTS, params_file, RC_RL)
