"""`gemma-mlx compare`: scorecard functions, the four report files, the JSON shape, and clear errors."""

import json
import shutil

import pytest
from click.testing import CliRunner

import gemma_mlx  # noqa: F401  (preloads BLAS before mlx.core)
from gemma_mlx.scoring import scorecard as scoring
from gemma_mlx.cli import cli
from gemma_mlx.compare import compare_models, unique_names
from gemma_mlx.scoring.inputs import collect_prompts
from gemma_mlx.config import GenerationSettings
from gemma_mlx.errors import DataError
from gemma_mlx.scoring.judge import parse_judge_score
from gemma_mlx.scoring.report import REPORT_FILES, render_html, validate_results

MAX_TOKENS = 8
PERSONA = """\
name: Bluey
description: A cheerful six-year-old puppy who loves games.
markers: ["I reckon", "Hooray", "Mum", "Bingo"]
out_of_character: ["As an AI", "language model"]
"""
TRAINING = [
    ("What game should we play?", "I reckon we play keepy uppy with the balloon! Hooray!"),
    ("Tell me a story!", "Once upon a time Bingo and I played keepy uppy all day."),
    ("Do you like the beach?", "Yes! Mum says the beach is for keepy uppy and sandcastles."),
    ("What is tax?", "I don't know, but Dad says it is grown-up stuff. Want to play keepy uppy?"),
    ("Who is your best friend?", "Bingo! She is my little sister and we play heaps."),
    ("What's for lunch?", "Mum made sandwiches. I reckon they are the best sandwiches."),
]
PROMPTS = ["Tell me a story", "What should I do today?", "Is <b>bold</b> & <script>x</script> safe?"]


def chat_record(user: str, reply: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-inputs")
    (root / "persona.yaml").write_text(PERSONA)
    (root / "train.jsonl").write_text("\n".join(chat_record(u, r) for u, r in TRAINING) + "\n")
    # a repeated prompt across the two files is asked once
    (root / "prompts.txt").write_text("# comparison prompts\n" + "\n".join(PROMPTS[:2]) + "\n\n")
    (root / "more.txt").write_text(PROMPTS[2] + "\n" + PROMPTS[0] + "\n")
    return root


@pytest.fixture(scope="module")
def wordy_models(converted_models, tmp_path_factory):
    """Copies of the tiny models that say words: their ids past the small tokenizer's vocabulary
    decode to nothing, and a random model favours them, so their (tied) embedding rows are zeroed."""
    import mlx.core as mx
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("wordy")
    wordy = {}
    for flavour, source in converted_models.items():
        target = shutil.copytree(source, root / source.name)
        real = Tokenizer.from_file(str(target / "tokenizer.json")).get_vocab_size()
        weights = mx.load(str(target / "model.safetensors"))
        embed = weights["model.embed_tokens.weight"]
        weights["model.embed_tokens.weight"] = mx.concatenate([embed[:real], mx.zeros_like(embed[real:])])
        mx.save_safetensors(str(target / "model.safetensors"), weights)
        wordy[flavour] = target
    return wordy


@pytest.fixture(scope="module")
def fused_pt(wordy_models, inputs, tmp_path_factory):
    """A -pt model fine-tuned for one short epoch by our trainer, then fused: a real run with a loss curve."""
    from gemma_mlx.config import LoraSettings, TrainSettings
    from gemma_mlx.fuse import fuse_model
    from gemma_mlx.train import train_model

    data = tmp_path_factory.mktemp("compare-data")
    (data / "train.jsonl").write_text("\n".join(chat_record(u, r) for u, r in TRAINING[:4]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(chat_record(u, r) for u, r in TRAINING[4:]) + "\n")
    run = train_model(wordy_models["pt"], data, out=tmp_path_factory.mktemp("run") / "tiny-pt",
                      lora=LoraSettings(rank=2, num_layers=2), train=TrainSettings(epochs=2, batch_size=2))
    return fuse_model(run.out_dir).out_dir


@pytest.fixture(scope="module")
def compared(fused_pt, wordy_models, inputs, tmp_path_factory):
    """One comparison shared by the read-only tests: fused -pt vs its base, with persona, data and judge."""
    out = tmp_path_factory.mktemp("reports") / "cmp"
    return compare_models(
        [str(fused_pt), str(wordy_models["pt"])],
        [inputs / "prompts.txt", inputs / "more.txt"],
        settings=GenerationSettings(max_tokens=MAX_TOKENS),
        persona=inputs / "persona.yaml",
        training_data=inputs / "train.jsonl",
        out=out,
        judge=str(wordy_models["it"]),
    )


# ---------------------------------------------------------------- persona.py on hand-made replies

def test_marker_matching_counts_whole_words_any_case():
    markers = ["I reckon", "Hooray", "Mum", "Bingo"]
    replies = [
        "I RECKON we should play. Hooray!",  # two markers, one reply
        "The minimum is heaps of fun.",  # "Mum" inside "minimum" is not a marker
        "mum said no, and Bingo cried",  # lower case counts
        "Nothing to see here.",
    ]
    assert scoring.find_phrases(replies[0], markers) == ["I reckon", "Hooray"]
    assert scoring.find_phrases(replies[1], markers) == []
    assert scoring.find_phrases(replies[2], markers) == ["Mum", "Bingo"]
    assert scoring.marker_rate(replies, markers) == 0.5
    assert scoring.marker_counts(replies, markers) == {"I reckon": 1, "Hooray": 1, "Mum": 1, "Bingo": 1}
    assert scoring.marker_rate(replies, []) is None
    # curly apostrophes in a reply match a straight one in the spec
    assert scoring.find_phrases("I\u2019m an AI, as an AI model", ["I'm", "As an AI"]) == ["I'm", "As an AI"]


@pytest.mark.parametrize("text, mid", [
    ("Hooray!", False), ("Is it?", False), ('She said "yes."', False), ("Fun! \U0001F436", False),
    ("That was great.)", False), ("and then we", True), ("Fun \U0001F436", True), ("", False), ("   ", False),
])
def test_ends_mid_sentence(text, mid):
    assert scoring.ends_mid_sentence(text) is mid


def test_word_counts_and_distinct_n():
    assert scoring.word_count("I don't know, Mum! \U0001F436 ...") == 4
    assert scoring.words("Bingo\u2019s game") == ["bingo's", "game"]
    assert scoring.distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert scoring.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert scoring.distinct_n(["", "one"], 2) is None


def test_summarise_rates_do_not_blame_cut_replies_twice():
    texts = ["I reckon so.", "and then", "cut off here and", "As an AI I cannot"]
    finish = ["stop", "stop", "length", "stop"]
    flags = [scoring.reply_flags(t, f, ["I reckon"], ["As an AI"]) for t, f in zip(texts, finish)]
    card = scoring.summarise(texts, flags, has_markers=True, training_words={"mean": 6.0})
    assert card["cut_rate"] == 0.25
    assert card["mid_sentence_rate"] == pytest.approx(2 / 3)  # of the 3 not cut, 2 trail off
    assert card["persona_marker_rate"] == 0.25
    assert card["out_of_character_hits"] == 1 and card["out_of_character_rate"] == 0.25
    assert card["mean_words"] == pytest.approx(3.5) and card["median_words"] == pytest.approx(3.5)
    assert card["mean_words_vs_training"] == pytest.approx(3.5 / 6)
    assert card["min_words"] == 2 and card["max_words"] == 5


def test_mined_markers_are_typical_of_training_and_rare_in_the_base():
    training = [r for _, r in TRAINING]
    base = ["The beach is a place with sand.", "Lunch is a meal eaten at noon.", "A story has a plot."]
    mined = scoring.mine_markers(training, base, exclude=["Mum", "Bingo"], min_base_words=10)
    assert mined[0] == "keepy uppy"  # in 4 of 6 training replies, never said by the base model
    assert not any("mum" in m.split() or "bingo" in m.split() for m in mined)  # spec markers are not re-mined
    assert "keepy uppy" not in scoring.mine_markers(training, ["We play keepy uppy."] * 3, min_base_words=10)
    assert scoring.mine_markers(training, base) == []  # 20 base words: too few to call anything rare
    assert scoring.mine_markers(training, []) == []  # no base model: nothing is mined
    names = ["We saw Chilli today.", "I told Chilli a joke.", "Then Chilli laughed.", "Chilli is fun."]
    assert scoring.mine_markers(names, base, min_base_words=10) == ["chilli"]  # a name inside sentences


def test_prompt_overlap_finds_near_exact_training_prompts():
    training = [(u, f"train.jsonl:{i + 1}") for i, (u, _) in enumerate(TRAINING)]
    found = scoring.find_overlaps(["tell me a story", "What's for lunch today friend?", "Explain gravity"], training)
    assert [(o["prompt_index"], o["training_source"]) for o in found] == [(0, "train.jsonl:2")]


def test_judge_score_parsing():
    assert parse_judge_score("4") == 4
    assert parse_judge_score("Score: 5/5") == 5
    assert parse_judge_score("0 points") is None
    assert parse_judge_score("no idea") is None


def test_unique_names_tell_twin_fused_dirs_apart():
    from gemma_mlx.compare import ModelRun

    def run(path):
        return ModelRun("fused", path, path, None, "fuse", None, 0.0, 0.0, 0, 0.0, 0.0, None)

    entries = [run("/runs/a/tiny-pt/fused"), run("/runs/a/tiny-it/fused")]
    assert unique_names(entries) == ["tiny-pt/fused", "tiny-it/fused"]


def test_prompts_deduplicated_first_kept(inputs):
    pairs = collect_prompts([inputs / "prompts.txt", inputs / "more.txt", "What should I do today?", "New one"])
    assert [t for t, _ in pairs] == [*PROMPTS, "New one"]
    assert pairs[0][1].endswith("prompts.txt:2")


# ---------------------------------------------------------------- a real comparison on tiny models

def test_all_four_report_files_and_a_manifest(compared):
    for name in (*REPORT_FILES, "manifest.json"):
        assert (compared.out_dir / name).is_file(), name
    manifest = json.loads((compared.out_dir / "manifest.json").read_text())
    assert manifest["stage"] == "compare" and set(manifest["metrics"]) == {m["name"] for m in compared.results["models"]}


def test_json_validates_and_numbers_are_in_range(compared):
    results = json.loads((compared.out_dir / "comparison.json").read_text())
    assert validate_results(results) == []
    assert [p["text"] for p in results["prompts"]] == PROMPTS
    assert results["seed"] == 0 and results["settings"]["max_tokens"] == MAX_TOKENS
    assert "mlx" in results["versions"] and "mlx-lm" in results["versions"]
    fused, base = results["models"]
    assert fused["stage"] == "fuse" and base["stage"] == "convert" and base["is_base"] and not fused["is_base"]
    assert fused["loss_curve"]["train"] and base["loss_curve"] is None
    for model in results["models"]:
        card = model["scorecard"]
        assert len(model["replies"]) == len(PROMPTS)
        for key in ("cut_rate", "persona_marker_rate", "empty_rate", "out_of_character_rate"):
            assert 0.0 <= card[key] <= 1.0, key
        assert card["mean_words"] >= 0 and card["min_words"] >= 0
        assert card["tokens_per_second"] > 0 and card["peak_memory_gb"] > 0
        assert len(card["per_prompt"]) == len(PROMPTS)
        assert all(r["tokens"] <= MAX_TOKENS for r in model["replies"])
        assert all(r["judge_score"] is None or 1 <= r["judge_score"] <= 5 for r in model["replies"])
    assert results["persona"]["markers"] == ["I reckon", "Hooray", "Mum", "Bingo"]
    assert results["training_data"]["reply_words"]["n"] == len(TRAINING)
    assert results["judge"]["model"].endswith("tiny-gemma-3-it")
    # "Tell me a story" is (nearly) a training prompt: flagged, and warned about
    assert [o["prompt_index"] for o in results["overlaps"]] == [0] and results["prompts"][0]["overlaps_training"]
    assert any("not held-out" in w for w in results["warnings"])


def test_validate_results_reports_bad_shapes(compared):
    bad = json.loads(json.dumps(compared.results))
    bad["models"][0]["scorecard"]["cut_rate"] = 1.5
    del bad["models"][1]["replies"][0]["finish_reason"]
    bad["seed"] = "zero"
    problems = validate_results(bad)
    assert "$.seed: expected int, got str" in problems
    assert "$.models[1].replies[0].finish_reason: missing" in problems
    bad = json.loads(json.dumps(compared.results))
    bad["models"][0]["scorecard"]["cut_rate"] = 1.5
    assert validate_results(bad) == ["$.models[0].scorecard.cut_rate: 1.5 is not in [0, 1]"]


def test_comparison_txt_shows_word_counts_and_cut_flags(compared):
    text = (compared.out_dir / "comparison.txt").read_text()
    replies = [(m, r) for m in compared.results["models"] for r in m["replies"]]
    assert any(r["cut"] for _, r in replies), "max_tokens is small enough that some reply is cut"
    for model, reply in replies:
        assert reply["words"] == scoring.word_count(reply["text"])
        words = "1 word" if reply["words"] == 1 else f"{reply['words']} words"
        heading = f"--- {model['name']} ({words})"
        assert heading in text
        line = next(l for l in text.splitlines() if l.startswith(heading))
        assert (f"[cut at {reply['tokens']} tokens]" in line) == reply["cut"]
        if not reply["cut"] and reply["stop_token"] not in ("<end_of_turn>", "<eos>"):
            assert f"[stopped by {reply['stop_token']}]" in line
    assert "=== Scorecard" in text and "persona-marker rate" in text and "judge mean (1-5)" in text
    assert "=== Prompt 1/3: Tell me a story" in text and "WARNING:" in text
    md = (compared.out_dir / "comparison.md").read_text()
    assert "## Scorecard" in md and "| cut by token limit |" in md


def test_hand_made_replies_are_scored_and_tagged(compared):
    """From Reply objects to comparison.txt with known texts: word counts, cut and stop-token tags, markers."""
    from gemma_mlx.compare import ModelRun, score_model
    from gemma_mlx.generate import Reply
    from gemma_mlx.scoring.report import render_text

    made = [("I reckon we play! Hooray!", 9, "stop", "<end_of_turn>"),
            ("Once upon a time there was a", 8, "length", None),
            ("Let me think and", 5, "stop", "<unused7>")]
    results = json.loads(json.dumps(compared.results))
    model = results["models"][0]
    entry = ModelRun.from_json(model)
    entry.raw_replies = [Reply(i, 0, PROMPTS[i], text, tokens, reason, stop, 0.5, 10.0, {})
                         for i, (text, tokens, reason, stop) in enumerate(made)]
    score_model(entry, PROMPTS, ["I reckon", "Hooray"], ["As an AI"], {"mean": 10.0})
    results["models"] = [entry.as_json()]
    assert validate_results(results) == []
    card = entry.scorecard
    assert card["persona_marker_rate"] == pytest.approx(1 / 3) and card["cut_rate"] == pytest.approx(1 / 3)
    assert card["mid_sentence_rate"] == 0.5 and card["mean_words"] == pytest.approx(16 / 3)
    assert [p["persona_marker_rate"] for p in card["per_prompt"]] == [1.0, 0.0, 0.0]
    text = render_text(results)
    name = entry.name
    assert f"--- {name} (5 words)\nI reckon we play! Hooray!" in text  # <end_of_turn> is the normal end: no tag
    assert f"--- {name} (7 words) [cut at 8 tokens]\n" in text
    assert f"--- {name} (4 words) [stopped by <unused7>] [ends mid-sentence]\n" in text


def test_loops_are_flagged_in_every_view(compared):
    from gemma_mlx.compare import ModelRun, _warnings, score_model
    from gemma_mlx.config import GenerationSettings
    from gemma_mlx.generate import Reply
    from gemma_mlx.scoring.report import render_markdown, render_text

    loop = "Dad was a big house with a big house with a big house with a big house with a big house"
    made = [(loop, 40, "length"), ("I'm going to the zoo! Today I'm going to see the lions.", 14, "stop"),
            ("We went to a big house with a big house with a big house with a big house.", 20, "stop")]
    results = json.loads(json.dumps(compared.results))
    entry = ModelRun.from_json(results["models"][0])
    entry.raw_replies = [Reply(i, 0, PROMPTS[i], t, n, why, None, 0.5, 10.0, {}) for i, (t, n, why) in enumerate(made)]
    score_model(entry, PROMPTS, ["Dad"], [], None)
    results["models"] = [entry.as_json()]
    results["warnings"] = _warnings([], results["models"], GenerationSettings())
    assert validate_results(results) == []
    assert [r["loop"] for r in entry.replies] == [True, False, True]
    card = entry.scorecard
    assert card["loop_rate"] == pytest.approx(2 / 3) and card["stop_rate"] == pytest.approx(2 / 3)
    name = entry.name
    assert f"--- {name} (21 words) [cut at 40 tokens] [loop]\n" in render_text(results)
    assert f"**{name} (18 words) [loop]**" in render_markdown(results)
    assert '<span class="tag cut">loop</span>' in render_html(results)
    assert any("2 of 3 replies are loops" in w for w in results["warnings"])
    assert "loops (repeats itself)" in render_text(results)


def test_report_html_is_self_contained_and_escaped(compared):
    page = (compared.out_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<script" not in page and "&lt;script&gt;" in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert page.count("<svg") == 1  # the fused model's training loss; the base model has no run
    for model in compared.results["models"]:
        assert model["name"] in page
    # model text is escaped too
    evil = json.loads(json.dumps(compared.results))
    evil["models"][0]["replies"][0]["text"] = "<img src=x onerror=alert(1)> I reckon"
    html = render_html(evil)
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt; <mark>I reckon</mark>" in html


def test_same_inputs_again_is_a_no_op(compared, fused_pt, wordy_models, inputs):
    again = compare_models(
        [str(fused_pt), str(wordy_models["pt"])], [inputs / "prompts.txt", inputs / "more.txt"],
        settings=GenerationSettings(max_tokens=MAX_TOKENS), persona=inputs / "persona.yaml",
        training_data=inputs / "train.jsonl", out=compared.out_dir, judge=str(wordy_models["it"]),
    )
    assert again.status == "up-to-date" and again.results["created"] == compared.results["created"]


# ---------------------------------------------------------------- the command line

def test_cli_compare_base_plus_adapters(wordy_models, fused_pt, inputs, isolated_outputs):
    adapters = fused_pt.parent
    args = ["compare", f"{wordy_models['pt']}::{adapters}", str(wordy_models["it"]),
            "--prompt", "What is your name?", "--max-tokens", "4", "--seed", "3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "persona-marker rate" in result.stdout and "Report:" in result.stdout
    assert "[model 2/2]" in result.stderr  # progress goes to stderr
    (report_dir,) = (isolated_outputs / "compare").iterdir()  # the default: outputs/compare/<timestamp>/
    results = json.loads((report_dir / "comparison.json").read_text())
    assert validate_results(results) == []
    assert results["seed"] == 3 and results["models"][0]["stage"] == "base+adapters"
    assert results["warnings"] and all(f"warning: {w}" in result.stderr for w in results["warnings"])  # said, not only filed
    assert results["models"][0]["loss_curve"] is not None
    # a changed comparison into the same report dir is refused without --force, then replaces it
    changed = [*args[:-4], "--max-tokens", "3", "--out", str(report_dir)]
    refused = CliRunner().invoke(cli, changed)
    assert refused.exit_code == 1 and "--force" in refused.output and "Traceback" not in refused.output
    assert json.loads((report_dir / "comparison.json").read_text())["settings"]["max_tokens"] == 4
    result = CliRunner().invoke(cli, [*changed, "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((report_dir / "comparison.json").read_text())["settings"]["max_tokens"] == 3


@pytest.fixture()
def runner_args(converted_models, inputs):
    return ["compare", str(converted_models["pt"]), "--prompts", str(inputs / "prompts.txt"), "--max-tokens", "2"]


def _fails_cleanly(args, *needles):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result


def test_cli_missing_model_dir(tmp_path, inputs):
    _fails_cleanly(["compare", str(tmp_path / "nope"), "--prompts", str(inputs / "prompts.txt")],
                   "nope does not exist", "converted or fused model directory")


def test_cli_empty_prompt_file(tmp_path, converted_models):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    _fails_cleanly(["compare", str(converted_models["pt"]), "--prompts", str(empty)], "empty.txt holds no prompts")


def test_cli_unreadable_prompts(tmp_path, converted_models):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"Hello\n\xff\xfe broken\n")
    _fails_cleanly(["compare", str(converted_models["pt"]), "--prompts", str(binary)], "not valid UTF-8")
    _fails_cleanly(["compare", str(converted_models["pt"]), "--prompts", str(tmp_path)], "is a directory")
    _fails_cleanly(["compare", str(converted_models["pt"]), "--prompts", str(tmp_path / "missing.txt")],
                   "missing.txt does not exist")
    with pytest.raises(DataError, match="no prompts to compare|No prompts to compare"):
        collect_prompts([])


def test_cli_model_without_tokenizer(tmp_path, converted_models, inputs):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(converted_models["pt"], broken)
    for path in broken.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            path.unlink()
    _fails_cleanly(["compare", str(broken), "--prompts", str(inputs / "prompts.txt")], "tokenizer")


def test_cli_bad_setting_fails_before_loading(runner_args):
    _fails_cleanly([*runner_args[:-2], "--max-tokens", "0"], "max_tokens is 0; it must be at least 1")


def test_cli_refuses_to_overwrite_a_directory_that_is_not_a_report(tmp_path, runner_args):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    _fails_cleanly([*runner_args, "--out", str(precious)], "`compare` did not write", "even with --force")
    _fails_cleanly([*runner_args, "--out", str(precious), "--force"], "`compare` did not write")
    assert (precious / "notes.txt").read_text() == "keep me"


def test_cli_out_that_is_a_file_fails_before_loading(tmp_path, runner_args):
    target = tmp_path / "report"
    target.write_text("keep me")
    for force in ([], ["--force"]):
        _fails_cleanly([*runner_args, "--out", str(target), *force], "is a file")
    assert target.read_text() == "keep me"


def test_cli_incomplete_last_model_fails_before_the_first_loads(tmp_path, runner_args, converted_models):
    """A dir without weights, or adapters that are not adapters, named last: refused before any model runs."""
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    result = _fails_cleanly([*runner_args, str(empty)], "is not an MLX model directory")
    assert "loading" not in result.output
    spec = f"{converted_models['pt']}::{tmp_path}"
    result = _fails_cleanly([*runner_args, spec], "is not an adapter directory")
    assert "loading" not in result.output


def test_html_tags_keep_a_bracketed_stop_token(compared):
    results = json.loads(json.dumps(compared.results))
    reply = results["models"][0]["replies"][0]
    reply.update(cut=False, finish_reason="stop", stop_token="[multimodal]")
    assert '<span class="tag stop">stopped by [multimodal]</span>' in render_html(results)


def test_html_highlights_markers_with_curly_apostrophes(compared):
    from gemma_mlx.scoring.report import highlight

    assert highlight("Bingo\u2019s turn, I\u2019m it", ["bingo", "I'm"]) == "<mark>Bingo</mark>\u2019s turn, <mark>I\u2019m</mark> it"


def test_replies_jsonl_loads_in_one_call(compared):
    import pandas

    frame = pandas.read_json(compared.out_dir / "replies.jsonl", lines=True)
    models = len(compared.results["models"])
    assert len(frame) == models * len(compared.results["prompts"]) * compared.results["samples"]
    assert {"model", "prompt", "text", "cut", "loop", "finish_reason", "markers"} <= set(frame.columns)
    first = compared.results["models"][0]["replies"][0]
    row = frame[(frame.model == compared.results["models"][0]["name"]) & (frame.prompt_index == first["prompt_index"])].iloc[0]
    assert row.text == first["text"] and bool(row.cut) == first["cut"]


def test_loss_charts_share_one_scale_with_round_ticks():
    import re

    from gemma_mlx.scoring.report import loss_svg, shared_loss_range

    low = {"train": [[0.5, 2.13], [1.0, 2.4]], "valid": [[1.0, 2.2]]}
    high = {"train": [[0.5, 4.61], [1.0, 4.0]], "valid": [[1.0, 4.4]]}
    y_range = shared_loss_range([low, high])
    assert y_range == (2.13, 4.61)
    ticks = [re.findall(r'text-anchor="end">([^<]+)<', loss_svg(c, "m", y_range)) for c in (low, high)]
    assert ticks[0] == ticks[1] == ["2", "3", "4", "5"]  # the same, round values on both charts


def test_the_trained_models_charts_mark_the_kept_epoch(compared):
    """The fused model came from a training run: its chart in report.html and the run's own loss.svg
    mark the epoch whose adapters were kept, beside the clean-endings count that chose it."""
    from pathlib import Path

    curve = compared.results["models"][0]["loss_curve"]
    run_dir = Path(curve["source"]).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert curve["kept_epoch"] == summary["best_epoch"] and len(curve["clean"]) == len(curve["valid"]) == 2
    kept = f"kept: epoch {summary['best_epoch']:g}"
    assert kept in (compared.out_dir / "report.html").read_text()
    assert kept in (run_dir / "loss.svg").read_text() and "clean greedy endings" in (run_dir / "loss.svg").read_text()
    rows = (compared.out_dir / "scorecard.csv").read_text().splitlines()
    assert len(rows) == 1 + len(compared.results["models"]) and rows[0].startswith("model,")



def test_the_reports_show_the_runs_validation_table(compared):
    """The training run's per-validation table (summary.json's validations) is in report.html and
    comparison.md, one row per validation with its numbers, the kept row marked; the base has none."""
    from pathlib import Path

    curve = compared.results["models"][0]["loss_curve"]
    summary = json.loads((Path(curve["source"]).parent / "summary.json").read_text())
    table = summary["validations"]
    assert curve["validations"] == table and len(table) == 2 and [r["kept"] for r in table].count(True) == 1
    page = (compared.out_dir / "report.html").read_text()
    section = page.split("<h2>Training validations</h2>")[1].split("</table>")[0]
    assert section.count("<tr") == 1 + len(table) and section.count("<tr class=kept>") == 1
    kept = next(r for r in table if r["kept"])
    kept_row = section.split("<tr class=kept>")[1].split("</tr>")[0]
    assert f">{kept['clean']}/{kept['replies']}<" in kept_row and f">{kept['loss']:.4f}<" in kept_row
    md = (compared.out_dir / "comparison.md").read_text().split("## Training validations")[1].split("\n## ")[0]
    assert md.count("tiny-gemma-3-pt + LoRA") == 1 and "(base)" not in md
    assert f"| **{kept['epoch']:g}** | **{kept['step']}** |" in md and md.count("**kept**") == 1

def test_one_display_name_per_model(compared, fused_pt, wordy_models):
    """A fine-tuned model is '<checkpoint> + LoRA' however it is given (fused, or base with adapters), an
    un-tuned one '<checkpoint> (base)': the names run's summary and the arena use too."""
    from gemma_mlx.models import display_name

    assert [m["name"] for m in compared.results["models"]] == ["tiny-gemma-3-pt + LoRA", "tiny-gemma-3-pt (base)"]
    manifest = json.loads((fused_pt / "manifest.json").read_text())
    adapters = manifest["adapters"]
    assert display_name(wordy_models["pt"], adapters) == "tiny-gemma-3-pt + LoRA"
    assert display_name(wordy_models["pt"], f"{adapters}/last") == "tiny-gemma-3-pt + LoRA (last)"
    for view in ("comparison.txt", "comparison.md", "report.html", "scorecard.csv"):
        assert "tiny-gemma-3-pt + LoRA" in (compared.out_dir / view).read_text(), view


def test_a_prompt_record_with_a_system_message_or_turns_is_refused_not_cut(tmp_path):
    """compare asks one user message; a record whose system message or earlier turns it would drop is an
    error at its line (a user message with its reply, like a training record, is fine)."""
    from gemma_mlx.prompts import read_prompt_lines

    path = tmp_path / "p.jsonl"
    ok = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Morag."}]}
    with_system = {"messages": [{"role": "system", "content": "You are Morag."}, {"role": "user", "content": "Hi"}]}
    path.write_text(json.dumps(ok) + "\n")
    assert read_prompt_lines(path) == [("Who are you?", f"{path}:1")]
    path.write_text(json.dumps(ok) + "\n" + json.dumps(with_system) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: its \"messages\" are system, user; .*one user message"):
        read_prompt_lines(path)


def test_training_data_behind_a_system_message_is_warned_about(tmp_path):
    from gemma_mlx.compare import _warnings
    from gemma_mlx.scoring.inputs import read_training_data

    data = tmp_path / "d.jsonl"
    records = [{"messages": [{"role": "system", "content": "You are Morag."}, {"role": "user", "content": f"q {i}"},
                             {"role": "assistant", "content": "Och aye."}]} for i in range(3)]
    records.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Aye."}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    training, _, _ = read_training_data(data)
    assert training["with_system"] == 3
    warnings = _warnings([], [], GenerationSettings(), training)
    assert len(warnings) == 1 and "3 of 4 training examples begin with a system message" in warnings[0]
    training["with_system"] = 0
    assert _warnings([], [], GenerationSettings(), training) == []


def test_two_comparisons_in_the_same_second_get_folders_of_their_own(isolated_outputs, monkeypatch):
    from gemma_mlx import compare

    import datetime
    import types

    frozen = types.SimpleNamespace(now=lambda: datetime.datetime(2026, 12, 5, 3, 7, 39))
    monkeypatch.setattr(compare, "_dt", types.SimpleNamespace(datetime=frozen))
    first, second = compare._default_out(), compare._default_out()
    assert first.name == "20261205-030739" and second.name == "20261205-030739-2"
    assert first.is_dir() and second.is_dir()  # claimed as they are named


def test_a_lock_left_by_a_failed_command_goes_at_exit(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "report"
    code = ("import gemma_mlx.locks as locks, pathlib; "
            f"locks.lock_output(pathlib.Path({str(out)!r}), 'compare'); raise SystemExit(1)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 1
    assert not list(tmp_path.glob(".*.lock"))


def test_training_data_of_a_split_folder_is_its_train_split(tmp_path):
    from gemma_mlx.scoring.inputs import read_training_data

    folder = tmp_path / "data"
    folder.mkdir()
    for name, count in (("train", 5), ("valid", 2), ("test", 2)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": f"{name} question {i}"}, {"role": "assistant", "content": "answer"}]}) + "\n"
            for i in range(count)))
    summary, replies, prompts = read_training_data(folder)
    assert summary["examples"] == 5 and len(replies) == 5 and all(p.startswith("train") for p, _ in prompts)
