"""Forgetting, results.json, the report and the chart."""
from __future__ import annotations

from matplotlib.colors import to_rgba

from utils.evaluate import FORGOT, IMPROVED, figure, plot, report, results

ACC = [[100.0], [90.0, 98.0], [80.0, 99.0, 97.0]]  # task 2 gains a point after task 3


def test_forgetting_is_accuracy_after_training_minus_final():
    doc = results(["a", "b", "c"], ACC, {})
    assert doc["forgetting"] == [20.0, -1.0, 0.0]
    assert doc["avg_forgetting"] == 9.5 and doc["avg_acc"] == round((80 + 99 + 97) / 3, 4)


def test_report_prints_negative_forgetting():
    assert "-1.00pp" in report(results(["a", "b", "c"], ACC, {}))


def test_chart_colours_forgetting_red_and_improvement_green():
    bars = figure(results(["a", "b", "c"], ACC, {})).axes[1].patches
    assert [b.get_height() for b in bars] == [20.0, -1.0, 0.0]
    assert bars[0].get_facecolor() == to_rgba(FORGOT)
    assert bars[1].get_facecolor() == to_rgba(IMPROVED)
    red, green, _, _ = to_rgba(IMPROVED)
    assert green > red  # an improvement is not drawn in a warning colour


def test_chart_draws_a_zero_line_above_the_bars():
    axes = figure(results(["a", "b", "c"], ACC, {})).axes[1]
    zero = [line for line in axes.lines if list(line.get_ydata()) == [0, 0]]
    assert len(zero) == 1
    assert zero[0].get_zorder() > max(b.get_zorder() for b in axes.patches)
    low, high = axes.get_ylim()
    assert low < 0 < high


def test_chart_of_no_forgetting_keeps_the_zero_line_inside():
    axes = figure(results(["a", "b"], [[100.0], [100.0, 100.0]], {})).axes[1]
    low, high = axes.get_ylim()
    assert low < 0 < high


def test_plot_is_a_png():
    assert plot(results(["a", "b", "c"], ACC, {})).startswith(b"\x89PNG\r\n\x1a\n")
