"""What notebook 03_rubric_rl shows: the settings beside the paper's, the problems, the prompt the policy sees, the
judge's view of one rollout, the learning gain with its interval, and the side run on the other reward drawn beside
the stage's run.

Reads what qedlib.stages.rubric_rl computes and writes (problems, step rows); the only training here is the side
run, through the stage's own `train` (qedlib.side_run). The worked GRPO group and the findings in words come from
qedlib.rl_findings, shared with notebook 04.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from .. import side_run
from ..display import excerpt, rubric_markdown
from ..grading import build_prompt
from ..grpo import problem_prompts
from ..layout import named_model
from ..plots import Note, curves
from ..rl_findings import reward_comparison
from ..stages import rubric_rl
from ..training import launched_by_accelerate

# Section "settings": (label, dotted config key); the paper's column comes from qedlib.paper.RECIPE.
SETTINGS = [
    ("rollouts per problem (group)", "rubric_rl.num_generations"),
    ("problems per step", "rubric_rl.prompts_per_step"),
    ("optimizer steps", "rubric_rl.max_steps"),
    ("completion tokens", "rubric_rl.max_completion_length"),
    ("temperature", "rubric_rl.temperature"),
    ("learning rate", "rubric_rl.lr"),
    ("PPO clip epsilon", "rubric_rl.epsilon"),
    ("entropy bonus", "rubric_rl.entropy_coef"),
    ("std scaling", "rubric_rl.scale_rewards"),
    ("loss aggregation (luspo: token sum / sequences, token-level ratios)", "rubric_rl.loss_type"),
    ("grad clip", "rubric_rl.max_grad_norm"),
    ("steps per generated batch", "rubric_rl.steps_per_generation"),
    ("reward", "rubric_rl.reward"),
    ("judge", "rubric_rl.judge.endpoint.model"),
]


def problems_table(problems, n: int = 8):
    """The first problems as a table: id, category and the opening of the statement (display.excerpt: never cut inside
    a formula) (section "Problems")."""
    import pandas as pd  # heavy: a table for the notebook, loaded only when one is drawn
    return pd.DataFrame([{"id": p.id, "category": p.category, "problem": excerpt(p.problem)} for p in problems]).head(n)


def first_prompt(model_path: str, problems, thinking: bool) -> str:
    """The first problem's prompt exactly as the policy sees it, chat template included (section "The prompt the
    policy sees")."""
    from transformers import AutoTokenizer  # heavy: the policy's tokenizer (transformers)
    return problem_prompts(AutoTokenizer.from_pretrained(model_path), problems[:1], thinking)[0]["prompt"]


def judge_view(cfg, problems, steps: list[dict]) -> tuple[str, str, str]:
    """(problem id, its rubric as Markdown (display.rubric_markdown), the judge prompt) for the first recorded rollout that had a proof to grade, or
    for the first rollout's text when none had one (no judge call was then made: the reward was 0); section
    "What the judge read"."""
    groups = [r["group"] for r in steps if r.get("group")]
    if not groups:
        raise ValueError("no step recorded a group: rerun the stage (steps.jsonl predates group records)")
    g = next((g for g in groups if any(g.get("proofs", []))), groups[0])
    proof = next((p for p in g.get("proofs", []) if p), g["completions"][0])
    by_id = {p.id: p for p in problems}
    if g["problem_id"] not in by_id:
        raise KeyError(f"problem {g['problem_id']!r} of the step records is not in rubric_rl.problems")
    prob = by_id[g["problem_id"]]
    return prob.id, rubric_markdown(prob.rubric), build_prompt(cfg.rubric_rl.judge.prompt, cfg.rubric_rl.judge.mode, prob, proof).text


SIDE_STEPS = 2  # workbook default for the side run's steps (notebook parameter side_steps)


def side_reward(cfg) -> str:
    """The reward of the side run beside the stage: the judge when the stage trains on a cheap reward (the paper's
    reward as the contrast), else the cheap `opening` grader (a reward the policy can move)."""
    return "opening" if cfg.rubric_rl.reward == "judge" else "judge"


def side_run_steps(cfg, model: str, max_steps: int, reward: str, params_file: Optional[str | Path] = None,
                   overrides: Optional[dict] = None) -> list[dict]:
    """The step rows of the stage trained again on `reward` from `model` for `max_steps` steps, in a temporary
    folder and where the stage trains: in this process (`rubric_rl.train`) or under its own `accelerate launch`
    (which needs the notebook's params_file and overrides)."""
    changes = {"reward": reward, "model": model, "max_steps": max_steps}
    if launched_by_accelerate(cfg.rubric_rl.launch):
        return side_run.launched(cfg, "rubric_rl", params_file, overrides, **changes)
    with side_run.temporary_run() as tmp:
        rubric_rl.train(side_run.changed(cfg, "rubric_rl", **changes), tmp, keep_model=False)  # only its step rows
        return side_run.step_rows(tmp)


def side_run_result(cfg, model: str, steps: list[dict], side_steps: int, params_file: Optional[str | Path] = None,
                    overrides: Optional[dict] = None) -> tuple[list[dict], object, str]:
    """Section "The other reward": train the stage on `side_reward` for `side_steps` steps (at most the stage's;
    0 skips it): (its step rows, both reward curves, the two runs compared in words with their intervals)."""
    reward = side_reward(cfg)
    side = side_run_steps(cfg, model, min(side_steps, cfg.rubric_rl.max_steps), reward, params_file,
                          overrides) if side_steps else []
    main = cfg.rubric_rl.reward
    rows = ([{"step": r["step"], main: r["reward"]} for r in steps]
            + [{"step": r["step"], f"{reward} (side run)": r["reward"]} for r in side])
    figure = curves(rows, "step", [main, f"{reward} (side run)"], f"Mean reward per step: {main} vs {reward}",
                    "reward (0-1)")
    judge_rows, other_rows, other = (side, steps, main) if reward == "judge" else (steps, side, reward)
    return side, figure, reward_comparison(judge_rows, other_rows, "judge", other)


def step_figures(steps: list[dict]) -> list:
    """Section "Curves": one figure per scale: the mean reward; the spread within groups (reward std, all-equal
    share); lengths (cap hit, no `</think>`) and the clip ratio; the gradient norm on a log axis."""
    return [curves(steps, "step", ["reward"], "Mean reward per step", "reward (0-1)"),
            curves(steps, "step", ["reward_std", "frac_zero_std"], "Spread within groups",
                   "reward std / share of all-equal groups"),
            curves(steps, "step", ["clipped_ratio", "truncation_rate", "clip_ratio"], "Rates per step",
                   "share (0-1)"),
            curves(steps, "step", ["grad_norm"], "Gradient norm before clipping", log=["grad_norm"])]


def learning_figure(steps: list[dict], learning: dict):
    """Section "Did the reward rise?": every group's mean reward by step, the first-k and last-k windows' means, and
    the gain with its 95% bootstrap interval in the title (the numbers of metrics.json `learning`)."""
    import plotly.graph_objects as go  # heavy: loads only when a figure is drawn
    pts = [(r["step"], m) for r in steps for m in (r.get("group_means") or []) if m is not None]
    if not pts or learning.get("gain") is None:
        return Note("**Did the reward rise?** No step recorded group rewards: rerun the stage.")
    fig = go.Figure(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", name="group mean",
                               marker={"opacity": 0.6}))
    k, xs = learning["k"], [r["step"] for r in steps if r.get("group_means")]
    for name, window, value in (("first", xs[:k], learning["first"]), ("last", xs[-k:], learning["last"])):
        fig.add_trace(go.Scatter(x=[window[0] - 0.3, window[-1] + 0.3], y=[value, value], mode="lines",
                                 name=f"mean of the {name} {k} steps", line={"width": 4}))
    fig.update_layout(title=f"{learning['reward']} reward: gain {learning['gain']:+.3f}, 95% interval "
                            f"[{learning['ci_low']:+.3f}, {learning['ci_high']:+.3f}] (bootstrap over groups)",
                      xaxis_title="step", yaxis_title=f"{learning['reward']} reward, group mean (0-1)",
                      template="plotly_white", height=380, legend={"orientation": "h", "y": -0.25})
    return fig


# "Try it" (the notebook's last section): each starts from this run's SFT model (`rubric_rl.model` = its folder) and
# runs stage 03 alone in a fresh run folder. `minutes` on 2 idle cores with params/cpu.yaml: 03-paper-lr measured
# (2026-12-05: 354 s, gain +0.02 [-0.10, +0.15], probe KL 0.003 vs 1.16 in make run's stage), the others estimated
# from it (the same rollouts per step; 03-lag generates every other step).
EXPERIMENTS = [
    {"name": "03-paper-lr", "overrides": {"rubric_rl.lr": 1.0e-6}, "minutes": 6, "measured": True,
     "look_for": "the paper's lr: the learning interval of the opening reward includes 0 and the probe's KL is "
                 "orders of magnitude below this run's; Adam moves each weight by about lr per step, and 1e-6 x "
                 "the steps here is far below the size of the weights."},
    {"name": "03-small-groups", "overrides": {"rubric_rl.num_generations": 4, "rubric_rl.prompts_per_step": 4},
     "minutes": 6, "measured": False,
     "look_for": "the same 16 rollouts per step in groups of 4: the share of all-equal groups (advantage 0) rises "
                 "and the gain's interval widens."},
    {"name": "03-lag", "overrides": {"rubric_rl.steps_per_generation": 2, "rubric_rl.epsilon": 0.2},
     "minutes": 5, "measured": False,
     "look_for": "each batch reused for two steps at PPO's usual epsilon 0.2: the clip ratio leaves 0 (at epsilon 4 "
                 "only a ratio above 5 with a positive advantage would count)."},
]


def try_it(cfg, run_dir, params_file: str = "params/cpu.yaml") -> str:
    """Markdown for the notebook's "Try it" section from EXPERIMENTS: each command starts stage 03 from this run's
    SFT model (absolute path of `layout.named_model(cfg, run_dir, "sft")`), in a fresh run folder."""
    sft = str(Path(named_model(cfg, run_dir, "sft")).resolve())
    out = []
    for i, x in enumerate(EXPERIMENTS, 1):
        sets = " ".join(f"--set {k}={yaml.safe_dump(v).splitlines()[0]}" for k, v in
                        {"rubric_rl.model": sft, **x["overrides"]}.items())
        how = "measured" if x.get("measured") else "estimated from 03-paper-lr"
        took = f" (about {x['minutes']:.0f} min on 2 cores, {how})" if x["minutes"] else ""
        out.append(f"{i}. **{x['name']}**{took}: `python -m qedlib run {params_file} --run-name try-{x['name']} "
                   f"--stages 03_rubric_rl {sets}`  \n   Look for: {x['look_for']}")
    return "\n".join(out)
