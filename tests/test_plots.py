"""Figure helpers: one scale per y axis, a sentence instead of an empty figure, notebook rendering set-up."""
import warnings

import pytest

from qedlib import plots


def test_series_of_different_scales_get_their_own_panels():
    rows = [{"step": i, "length": 100.0 + 20 * i, "entropy": 2.5 - 0.1 * i, "clip_ratio": 0.01 * i,
             "truncation_rate": 0.5} for i in range(4)]
    fig = plots.curves(rows, "step", ["length", "entropy", "clip_ratio", "truncation_rate"], "t")
    axis_of = {tr.name: tr.yaxis for tr in fig.data}
    # tokens, nats and fractions: three y axes; the two fractions (both in [0, 1]) share one
    assert len(set(axis_of.values())) == 3
    assert axis_of["clip_ratio"] == axis_of["truncation_rate"] != axis_of["length"] != axis_of["entropy"]
    titles = {fig.layout[k].title.text for k in fig.layout if k.startswith("yaxis")}
    assert titles == {"length", "entropy", "clip_ratio, truncation_rate"}


def test_series_of_one_scale_share_one_axis_with_the_given_title():
    rows = [{"step": i, "reward": 0.1 * i, "reward_std": 0.05} for i in range(3)]
    fig = plots.curves(rows, "step", ["reward", "reward_std"], "Reward", yaxis="reward (0-1)")
    assert {tr.yaxis for tr in fig.data} == {"y"} and fig.layout.yaxis.title.text == "reward (0-1)"


def test_scale_groups_split_by_order_of_magnitude():
    groups = plots.scale_groups({"loss": [3.0, -2.0], "grad_norm": [40.0, 12.0], "kl": [0.5, 1.5], "tokens": [900.0]})
    # tokens by name; 40 vs 3 is more than SCALE_RATIO apart; 3 vs 1.5 is not
    assert groups == [["tokens"], ["grad_norm"], ["loss", "kl"]]


def test_units_by_name_never_share_an_axis():
    """16 tokens and 10.8 nats are one order of magnitude, but not one quantity."""
    rows = [{"step": i, "length": 16.0, "entropy": 10.8} for i in (1, 2)]
    fig = plots.curves(rows, "step", ["length", "entropy"], "Completion length and entropy")
    assert len({tr.yaxis for tr in fig.data}) == 2 and fig.layout.xaxis2.dtick == 1


def test_empty_figures_become_one_sentence():
    rows = [{"step": 1, "clip_ratio": None}, {"step": 2, "clip_ratio": float("nan")}]
    note = plots.curves(rows, "step", ["clip_ratio"], "Rates per step")
    assert isinstance(note, plots.Note) and "clip_ratio" in note.text and note.text.count(".") == 1
    assert note._repr_markdown_() == note.text and "<b>Rates per step</b>" in note.to_html()
    assert isinstance(plots.stacked_time(rows, "step", ["generation_s"], "time"), plots.Note)
    assert isinstance(plots.bars(["a", "b"], [None, None], "scores"), plots.Note)
    fig = plots.curves(rows + [{"step": 3, "clip_ratio": 0.1}], "step", ["clip_ratio", "kl"], "Rates")
    assert fig.layout.title.text == "Rates (no values: kl)"  # a missing series is named, not silently absent


@pytest.mark.parametrize("on", [False, True])
def test_trainer_args_set_checkpointing_without_a_deprecation_warning(tmp_path, on):
    """transformers >= 5.23 renamed gradient_checkpointing (TRL sets the old name by default); both stages use
    the installed name, so building their arguments warns nothing."""
    import dataclasses
    from trl import SFTConfig
    from qedlib.config import Config, RLConfig
    from qedlib.grpo import grpo_args
    from qedlib.stages.sft import trl_args
    from qedlib.training import checkpointing_args
    new = "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
    assert checkpointing_args(SFTConfig, on) == {("activation_checkpointing" if new else "gradient_checkpointing"): on}
    cfg = Config()
    cfg.sft.gradient_checkpointing = on
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        sft_args = trl_args(cfg, tmp_path / "sft", "cpu", False)
        rl_args = grpo_args(RLConfig(gradient_checkpointing=on), tmp_path / "rl", 0, 1)
    assert sft_args.gradient_checkpointing is on and rl_args.gradient_checkpointing is on


def test_tokens_figure_names_each_point_in_the_legend_not_beside_it():
    import pandas as pd
    summary = pd.DataFrame([{"scaffold": sc, "tokens_per_problem": t, "mean_score_pct": m, "ci_low": m - 1,
                             "ci_high": m + 2, "checkpoint": c, "benchmark": "toy"}
                            for c, sc, t, m in (("base", "single", 16.0, 0.0), ("sft", "single", 16.0, 0.0),
                                                ("sft", "rc", 30.0, 34.2))])
    fig = plots.tokens_figure(summary)
    assert [t.name for t in fig.data] == ["base / single", "sft / single", "sft / rc"]
    assert all(t.mode == "markers" for t in fig.data)  # no text labels that overprint at close points
    assert fig.data[0].marker.color != fig.data[1].marker.color  # coinciding checkpoints stay distinguishable
    assert fig.data[1].marker.symbol != fig.data[2].marker.symbol  # one symbol per scaffold
    assert list(fig.data[2].error_y.array) == [2.0] and list(fig.data[2].error_y.arrayminus) == [1.0]
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_score_figure_writes_each_value_on_its_bar_with_its_interval():
    import pandas as pd
    summary = pd.DataFrame([{"benchmark": "toy", "scaffold": "single", "checkpoint": c, "mean_score_pct": m,
                             "ci_low": m - 5, "ci_high": m + 10} for c, m in (("base", 0.0), ("sft", 20.0))])
    (bars,) = plots.score_figure(summary).data
    assert list(bars.x) == ["base", "sft"] and list(bars.text) == ["0.0", "20.0"]
    assert list(bars.textposition) == ["outside", "inside"]  # a value inside its bar never sits on the whisker
    assert list(bars.error_y.array) == [10.0, 10.0] and list(bars.error_y.arrayminus) == [5.0, 5.0]


def test_pass_at_k_figure_needs_two_samples():
    import pandas as pd
    curve = pd.DataFrame([{"benchmark": "toy", "checkpoint": "base", "scaffold": "single", "k": 1, "pass_at_k": 0.5,
                           "ci_low": 0.0, "ci_high": 1.0}])
    assert isinstance(plots.pass_at_k_figure(curve), plots.Note)
    two = pd.concat([curve, curve.assign(k=2, pass_at_k=0.75)])
    (line,) = plots.pass_at_k_figure(two).data
    assert list(line.x) == [1, 2] and list(line.y) == [0.5, 0.75]


def test_curves_puts_a_log_metric_on_its_own_log_panel():
    from qedlib.plots import curves
    rows = [{"step": s, "reward": 0.1 * s, "grad_norm": g} for s, g in enumerate([0.5, 0.7, 45.2, 0.6], 1)]
    fig = curves(rows, "step", ["reward", "grad_norm"], "t", log=["grad_norm"])
    axes = [fig.layout[k] for k in sorted(k for k in fig.layout if k.startswith("yaxis"))]  # yaxis, yaxis2
    assert [a.type for a in axes] == [None, "log"] and axes[1].title.text == "grad_norm (log)"
