"""Reports that say who won and why: the headline sentence, best values highlighted, scorecard.csv,
pandas reading both files, and the kept epoch with its clean-endings count on every chart.
Hand-made results dicts: no model is loaded, so each number here is one the test chose."""

import csv
import json
import re

import pytest

from gemma_mlx.plot import loss_curve_svg
from gemma_mlx.scoring.report import (
    best_columns,
    headline,
    render_html,
    render_markdown,
    render_scorecard_text,
    render_text,
    validate_results,
    write_reports,
)

PROMPTS = ["Tell me a story", "What is tax?", "Favourite game?", "Hello"]


def _reply(index: int, text: str, cut=False, loop=False, markers=(), judge=None) -> dict:
    words = len(text.split())
    return {"prompt_index": index, "sample_index": 0, "text": text, "tokens": 2 * words, "finish_reason": "length" if cut else "stop",
            "stop_token": None if cut else "<end_of_turn>", "seconds": 0.5, "tokens_per_second": 10.0, "words": words,
            "cut": cut, "loop": loop, "mid_sentence": False, "empty": not text, "markers": list(markers),
            "out_of_character": [], "judge_score": judge, "judge_raw": None if judge is None else str(judge)}


def _card(replies: list[dict], tokens_per_second: float, judge: bool) -> dict:
    n = len(replies)
    rate = lambda f: sum(1 for r in replies if f(r)) / n  # noqa: E731
    words = [r["words"] for r in replies]
    scores = [r["judge_score"] for r in replies if r["judge_score"] is not None]
    base = {"replies": n, "mean_words": sum(words) / n, "median_words": sorted(words)[n // 2], "words_stdev": 1.0,
            "words_cv": 0.2, "min_words": min(words), "max_words": max(words), "mean_words_vs_training": sum(words) / n / 5,
            "cut_rate": rate(lambda r: r["cut"]), "stop_rate": rate(lambda r: not r["cut"]),
            "loop_rate": rate(lambda r: r["loop"]), "clean_rate": rate(lambda r: not r["cut"] and not r["loop"]),
            "mid_sentence_rate": 0.0, "empty_rate": 0.0, "persona_marker_rate": rate(lambda r: r["markers"]),
            "out_of_character_hits": 0, "out_of_character_rate": 0.0, "distinct_1": 0.5, "distinct_2": 0.8}
    return {**base, "tokens_per_second": tokens_per_second, "peak_memory_gb": 1.0,
            "judge_mean": (sum(scores) / len(scores)) if judge and scores else None,
            "per_prompt": [{"prompt_index": i, **base} for i in range(len(PROMPTS))]}


def _model(name: str, replies: list[dict], tokens_per_second: float, judge: bool, curve=None, stage="fuse") -> dict:
    return {"name": name, "spec": f"outputs/{name}", "path": f"/x/{name}", "adapter_path": None, "stage": stage,
            "is_base": stage == "convert", "manifest": None, "load_seconds": 1.0, "generate_seconds": 2.0,
            "tokens": sum(r["tokens"] for r in replies), "tokens_per_second": tokens_per_second, "peak_memory_gb": 1.0,
            "loss_curve": curve, "scorecard": _card(replies, tokens_per_second, judge), "replies": replies}


CURVE = {"source": "runs/x/tuned/metrics.jsonl", "train": [[0.5, 3.0], [1.0, 2.5], [2.0, 2.0]],
         "valid": [[1.0, 3.4], [2.0, 3.6]], "clean": [[1.0, 1], [2.0, 4]], "clean_of": 4, "kept_epoch": 2.0}


def make_results(judge: bool = True) -> dict:
    """tuned: 4/4 clean, markers in 3 of 4, judge 4.0; base: 1 of 4 clean (2 cut, 1 loop), 1 marker, judge 2.0."""
    tuned = [_reply(i, f"I reckon answer {i} is fun.", markers=["I reckon"] if i < 3 else [], judge=4 if judge else None)
             for i in range(4)]
    base = [_reply(0, "word " * 20, cut=True, judge=2 if judge else None),
            _reply(1, "tax tax tax tax tax tax", loop=True, judge=2 if judge else None),
            _reply(2, "Mum says hi.", markers=["Mum"], judge=2 if judge else None),
            _reply(3, "more " * 20, cut=True, judge=2 if judge else None)]
    return {"format": "gemma-mlx-compare/1", "created": "2026-12-02T20:00:00+00:00", "seconds": 3.0,
            "versions": {"mlx": "0"}, "settings": {"max_tokens": 40, "temperature": 0.0}, "seed": 0, "samples": 1,
            "prompts": [{"index": i, "text": t, "source": "argument", "overlaps_training": False} for i, t in enumerate(PROMPTS)],
            "persona": {"path": None, "name": "Bluey", "description": "", "markers": ["I reckon", "Mum"],
                        "mined_markers": [], "out_of_character": [], "mining": ""},
            "training_data": None, "overlaps": [], "warnings": [],
            "judge": {"model": "judge-dir", "rubric": "r", "template": "t", "settings": {}} if judge else None,
            "models": [_model("tuned", tuned, 20.0, judge, CURVE), _model("base", base, 30.0, judge, None, "convert")]}


def test_the_hand_made_results_are_valid():
    assert validate_results(make_results()) == []


def test_headline_names_the_winner_of_each_question_with_its_number():
    assert headline(make_results()) == (
        "tuned ended cleanly most often (4/4 replies stopped by themselves without a loop), stayed in voice most "
        "(75% of replies with a persona marker) and answered best (judge 4.0/5).")


def test_headline_splits_winners_and_names_ties():
    results = make_results()
    tuned, base = results["models"]
    base["scorecard"]["persona_marker_rate"] = 1.0
    tuned["scorecard"]["judge_mean"] = base["scorecard"]["judge_mean"] = 3.5
    assert headline(results) == (
        "tuned ended cleanly most often (4/4 replies stopped by themselves without a loop); base stayed in voice "
        "most (100% of replies with a persona marker); tuned and base (tied) answered best (judge 3.5/5).")


def test_headline_says_what_was_not_measured():
    results = make_results(judge=False)
    for model in results["models"]:
        model["scorecard"]["persona_marker_rate"] = None
    text = headline(results)
    assert text.startswith("tuned ended cleanly most often (4/4 ")
    assert "not measured: stayed in voice and answered best (no judge or on-topic score)" in text


def test_headline_uses_the_on_topic_rate_without_a_judge():
    results = make_results(judge=False)
    results["models"][0]["scorecard"]["on_topic_rate"] = 0.5
    results["models"][1]["scorecard"]["on_topic_rate"] = 0.75
    assert headline(results).endswith("; base answered best (75% of replies on topic).")


def test_one_model_is_described_not_crowned():
    results = make_results()
    results["models"] = results["models"][1:]
    assert headline(results) == ("base ended cleanly (1/4 replies stopped by themselves without a loop), stayed in "
                                 "voice (25% of replies with a persona marker) and answered (judge 2.0/5).")
    assert best_columns(results) == {}


def test_best_values_follow_each_rows_direction():
    best = best_columns(make_results())
    assert best["stopped by itself"] == {0} and best["cut by token limit"] == {0} and best["loops (repeats itself)"] == {0}
    assert best["ended cleanly (stopped, no loop)"] == {0} and best["judge mean (1-5)"] == {0}
    assert best["tokens/s"] == {1}  # the base model is faster here, and gets the mark for it
    assert best["mean words / training"] == {0}  # tuned: 5.5 words / 5 = 1.1, nearer 1 than the base's 2.6
    assert "peak memory GB" not in best and "distinct-1" not in best  # equal everywhere: nobody is better


def test_every_view_shows_the_headline_and_marks_the_best(tmp_path):
    results = make_results()
    sentence = headline(results)
    text = render_text(results)
    assert f"Verdict: {sentence}" in text.splitlines()[1]
    row = next(line for line in text.splitlines() if line.startswith("stopped by itself"))
    assert re.search(r"\*100%\s+50%$", row), row
    assert render_scorecard_text(results).endswith("* best in its row")
    md = render_markdown(results)
    assert "**Verdict:** " + sentence in md and "| stopped by itself | **100%** | 50% |" in md
    page = render_html(results)
    assert '<p class="headline">' + sentence.replace("'", "&#x27;") + "</p>" in page
    assert '<td class="n best">100%</td><td class="n">50%</td>' in page
    write_reports(tmp_path, results)
    assert json.loads((tmp_path / "comparison.json").read_text())["headline"] == sentence


def test_scorecard_csv_has_one_row_per_model(tmp_path):
    results = make_results()
    write_reports(tmp_path, results)
    with open(tmp_path / "scorecard.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["tuned", "base"]
    assert float(rows[0]["stop_rate"]) == 1.0 and float(rows[1]["cut_rate"]) == 0.5
    assert float(rows[0]["kept_epoch"]) == 2.0 and rows[1]["kept_epoch"] == ""
    assert "per_prompt" not in rows[0] and rows[1]["is_base"] == "True"


def test_pandas_reads_both_files_the_documented_way(tmp_path):
    pandas = pytest.importorskip("pandas")
    write_reports(tmp_path, make_results())
    cards = pandas.read_csv(tmp_path / "scorecard.csv")
    assert list(cards.model) == ["tuned", "base"] and cards.loc[1, "loop_rate"] == 0.25
    with pytest.raises(ValueError, match="same length"):
        pandas.read_json(tmp_path / "comparison.json")  # why the README shows json_normalize instead
    data = json.loads((tmp_path / "comparison.json").read_text())
    replies = pandas.json_normalize(data["models"], "replies", ["name"])
    assert len(replies) == 8 and set(replies.name) == {"tuned", "base"} and replies.cut.sum() == 2
    models = pandas.json_normalize(data["models"])
    assert list(models["scorecard.clean_rate"]) == [1.0, 0.25]


def test_report_chart_marks_the_kept_epoch_and_plots_clean_endings():
    page = render_html(make_results())
    chart = page[page.index("<h2>Training loss"):]
    assert "kept: epoch 2" in chart and 'class="kept"' in chart
    assert "clean endings (right axis)" in chart and "clean greedy endings (of 4)" in chart


def test_training_loss_svg_marks_the_kept_epoch_and_plots_clean_endings():
    metrics = [{"epoch": 0.5, "split": "train", "loss": 3.0},
               {"epoch": 1.0, "split": "valid", "loss": 3.4, "gen_clean": 13, "gen_replies": 16},
               {"epoch": 2.0, "split": "valid", "loss": 3.5, "gen_clean": 16, "gen_replies": 16}]
    svg = loss_curve_svg(metrics, "run", kept_epoch=2.0)
    assert "kept: epoch 2" in svg and "clean greedy endings (of 16)" in svg
    points = re.findall(r'<polyline points="([^"]+)"[^>]*stroke-dasharray="6 3"', svg)
    assert len(points) == 1 and len(points[0].split()) == 2  # one dashed line, a point per validation
    plain = loss_curve_svg([m for m in metrics if "gen_clean" not in m], "run")
    assert "kept:" not in plain and "clean" not in plain  # nothing invented for a run without them


VALIDATIONS = [
    {"epoch": 1.0, "step": 2, "loss": 3.4, "clean": 1, "replies": 4, "clean_rate": 0.25, "mean_words": 8.0,
     "words_vs_valid": 0.2, "on_topic_rate": 0.5, "score": 0.05, "kept": False},
    {"epoch": 2.0, "step": 4, "loss": 3.6, "clean": 4, "replies": 4, "clean_rate": 1.0, "mean_words": 36.0,
     "words_vs_valid": 0.9, "on_topic_rate": 0.75, "score": 0.68, "kept": True},
]


def test_reports_show_each_runs_validation_table_with_the_kept_row(tmp_path):
    from gemma_mlx.scoring.report_validations import validation_table

    results = make_results()
    results["models"][0]["loss_curve"] = {**CURVE, "validations": VALIDATIONS}
    header, rows, kept = validation_table(results["models"][0]["loss_curve"])
    assert header[:4] == ["epoch", "step", "loss", "clean endings"] and "on topic" in header
    assert kept == 1 and rows[1] == ["2", "4", "3.6000", "4/4", "36.0", "0.90x", "75%", "0.68", "kept"]
    assert rows[0][-1] == "" and rows[0][3] == "1/4"
    md = render_markdown(results)
    section = md.split("## Training validations")[1].split("\n## ")[0]
    assert "| 1 | 2 | 3.4000 | 1/4 | 8.0 | 0.20x | 50% | 0.05 |  |" in section
    assert "| **2** | **4** | **3.6000** | **4/4** | **36.0** | **0.90x** | **75%** | **0.68** | **kept** |" in section
    assert section.count("validations, from `runs/x/tuned/metrics.jsonl`") == 1  # one table: only model 0 has a run
    page = render_html(results)
    table = page.split("<h2>Training validations</h2>")[1].split("</table>")[0]
    assert table.count("<tr class=kept>") == 1 and '<td class="n best">0.90x</td>' in table
    assert '<td class="n">0.20x</td>' in table


def test_validation_table_without_on_topic_or_for_a_last_checkpoint():
    from gemma_mlx.scoring.report_validations import validation_table

    plain = [{k: v for k, v in row.items() if k != "on_topic_rate"} for row in VALIDATIONS]
    header, rows, kept = validation_table({**CURVE, "validations": plain})
    assert "on topic" not in header and len(rows[0]) == len(header)
    # compare was given the run's last/: the chart marks nothing, the table names the run's choice
    _, rows, kept = validation_table({**CURVE, "kept_epoch": None, "validations": VALIDATIONS})
    assert rows[kept][-1].startswith("kept by the run")
    # an older summary without greedy replies: dashes, not invented numbers
    _, rows, _ = validation_table({**CURVE, "validations": [{"epoch": 1.0, "step": 2, "loss": 3.4, "kept": True}, "junk"]})
    assert rows == [["1", "2", "3.4000", "-", "-", "-", "-", "kept"]]


def test_no_table_without_one_in_the_run():
    results = make_results()
    assert "Training validations" not in render_markdown(results) and "Training validations" not in render_html(results)


def test_a_judge_with_no_usable_score_leaves_the_verdict_to_the_on_topic_rate():
    results = make_results()
    for model, rate in zip(results["models"], (0.5, 0.0)):
        model["scorecard"]["judge_mean"] = None
        model["scorecard"]["on_topic_rate"] = rate
    assert headline(results).endswith(" and answered best (50% of replies on topic).")
    results["models"] = results["models"][1:]
    assert headline(results).endswith("and answered none (0% of replies on topic).")


def test_a_judge_with_no_usable_score_is_warned_about():
    from gemma_mlx.compare import _warnings
    from gemma_mlx.config import GenerationSettings

    results = make_results()
    assert not [w for w in _warnings([], results["models"], GenerationSettings(), None, "judge-dir") if "judge" in w]
    for model in results["models"]:
        model["scorecard"]["judge_mean"] = None
    (warning,) = [w for w in _warnings([], results["models"], GenerationSettings(), None, "judge-dir") if "judge" in w]
    assert "The judge (judge-dir) gave no usable score" in warning
