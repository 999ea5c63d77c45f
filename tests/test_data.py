"""`gemma-mlx data` (check, stats, split) and the gemma_mlx.examples API, on small files in tmp dirs
and on the shipped Bluey dataset."""

import json
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from gemma_mlx.cli import cli
from gemma_mlx.examples import load_examples, load_splits, normalise
from gemma_mlx.data import check_dataset, dataset_stats, split_dataset
from gemma_mlx.errors import DataError, OutputExistsError
from gemma_mlx.persona import load_persona
from gemma_mlx.prompts import read_prompts

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "data" / "bluey"


def chat(prompt: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}


def line(record) -> bytes:
    return (json.dumps(record) + "\n").encode()


GOOD = line(chat("Can we play a game?", "Hooray! I reckon we play shops."))
TOPICS = ["dogs", "rain", "the beach", "school", "dinner", "the park", "bedtime", "birthdays", "the moon", "swimming"]


def varied(n: int = 10) -> list[dict]:
    """n distinct prompts with replies of very different lengths (no warnings)."""
    return [chat(f"Tell me something about {TOPICS[i % 10]} number {i}", " ".join(["word"] * (5 + 17 * i)))
            for i in range(n)]


def write_jsonl(path: Path, records) -> Path:
    path.write_bytes(b"".join(line(r) for r in records))
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def problem_lines(output: str, where: str) -> list[str]:
    """The error/warning lines that `data check` printed for one place (file:line, or the dataset path)."""
    return [ln for ln in output.splitlines() if ln.startswith((f"{where}: error:", f"{where}: warning:"))]


# ---------------------------------------------------------------- errors, one small bad file each

BAD_FILES = {
    "invalid-json": (GOOD + b'{"messages": [}\n', 2, "not valid JSON"),
    "unknown-shape": (GOOD + line({"question": "Why?", "answer": "Because."}), 2, "unknown record shape (keys: answer, question)"),
    "missing-content": (line({"messages": [{"role": "user"}, {"role": "assistant", "content": "Hi"}]}), 1,
                        "message 1 (user) has no content"),
    "empty-content": (GOOD + line(chat("Where is Bingo?", "   ")), 2,
                      "message 2 (assistant) has empty content"),
    "non-string-content": (line({"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Yo"}]}), 1,
                           "content must be a string, not list"),
    "roles-out-of-order": (GOOD + line({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                     {"role": "assistant", "content": "c"}]}), 2, "roles out of order"),
    "last-not-assistant": (line({"messages": [{"role": "system", "content": "Be Bluey."}, {"role": "user", "content": "Hi"}]}), 1,
                           "the last message is from the user, not the assistant"),
    "non-utf8": (GOOD + GOOD + b'{"text": "caf\xe9"}\n', 3, "not valid UTF-8 (byte 0xe9"),
    "bom": (b"\xef\xbb\xbf" + GOOD, 1, "byte order mark"),
    "empty-file": (b"\n", 1, "the file is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_check_reports_each_error_with_file_and_line(tmp_path, case):
    content, line_number, message = BAD_FILES[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(content)

    result = invoke("data", "check", path)

    assert result.exit_code == 1, result.output
    found = problem_lines(result.output, f"{path}:{line_number}")
    assert found and found[0].startswith(f"{path}:{line_number}: error:") and message in found[0], result.output
    assert "Fix the errors above" in result.output
    assert "Traceback" not in result.output


def test_load_examples_raises_one_data_error_naming_the_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(GOOD + b"{oops\n" + GOOD + line({"text": 3}))
    with pytest.raises(DataError) as raised:
        load_examples(path)
    assert f"{path}:2: not valid JSON" in str(raised.value)
    assert f"{path}:4: 'text' must be a string, not int" in str(raised.value)


# ---------------------------------------------------------------- warnings


def test_check_warns_about_exact_and_near_duplicate_prompts(tmp_path):
    records = varied(6)
    records[1] = chat("What is your favourite colour?", "Blue, like me!")
    records[3] = chat("what is your FAVOURITE colour", " ".join(["red"] * 70))
    records[5] = chat("What is your most favourite colour?", " ".join(["green"] * 30))
    path = write_jsonl(tmp_path / "dups.jsonl", records)

    result = invoke("data", "check", path)

    assert result.exit_code == 0, result.output
    exact = problem_lines(result.output, f"{path}:4")
    assert len(exact) == 1 and f"an exact duplicate of the one at {path}:2" in exact[0]
    near = problem_lines(result.output, f"{path}:6")
    assert len(near) == 2 and all("a near (similarity 0.83) duplicate" in w for w in near), result.output
    assert "0 errors, 3 warnings" in result.output


def test_check_warns_when_reply_lengths_are_all_alike(tmp_path):
    records = [chat(f"Question about {topic}?", " ".join(["yes"] * (60 + i % 3))) for i, topic in enumerate(TOPICS)]
    path = write_jsonl(tmp_path / "same-length.jsonl", records)

    result = invoke("data", "check", path)

    assert result.exit_code == 0, result.output
    (warning,) = problem_lines(result.output, str(path))
    assert "reply lengths are all alike: 60-62 words" in warning and "coefficient of variation 0.01" in warning
    assert "copies the length" in warning
    assert check_dataset(write_jsonl(tmp_path / "varied.jsonl", varied())).warnings == []


def test_check_warns_about_overlap_with_evaluation_prompts(tmp_path):
    records = varied()
    records[2] = chat("I'm feeling sad.", "Oh no! Want a cuddle and a game of keepy uppy?")
    data = write_jsonl(tmp_path / "train.jsonl", records)
    prompts = tmp_path / "eval.txt"
    prompts.write_text("# comparison prompts\n\nTell me a story\nim feeling sad\n")

    result = invoke("data", "check", data, "--prompts", prompts)

    assert result.exit_code == 0, result.output
    (warning,) = problem_lines(result.output, f"{data}:3")
    assert f"matches the evaluation prompt at {prompts}:4" in warning


def test_check_warns_about_examples_longer_than_max_seq_length(tmp_path, converted_models):
    records = varied(8)
    records[4] = chat("Tell me a long story about the backyard", " ".join(["backyard game"] * 40))
    path = write_jsonl(tmp_path / "long.jsonl", records)

    report = check_dataset(path, model=converted_models["it"], max_seq_length=60)
    too_long = [w for w in report.warnings if "longer than the training max_seq_length of 60" in w.message]
    assert {w.where for w in too_long} >= {f"{path}:5"}
    assert f"{path}:1" not in {w.where for w in too_long}  # 5-word reply: well under 60 tokens

    result = invoke("data", "check", path, "--model", converted_models["it"], "--max-seq-length", 60)
    assert result.exit_code == 0 and f"{path}:5: warning:" in result.output, result.output


def test_check_warns_about_blank_lines_and_mixed_shapes_that_break_mlx_lm(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(line(varied()[0]) + b"\n" + line({"text": "Bingo and Bluey play keepy uppy."}))
    result = invoke("data", "check", path)
    assert result.exit_code == 0, result.output
    (blank,) = problem_lines(result.output, f"{path}:2")
    assert "blank line" in blank and "mlx-lm's own loader fails on it" in blank
    (mixed,) = problem_lines(result.output, str(path))
    assert "mixes record shapes (chat, text)" in mixed


# ---------------------------------------------------------------- formats


def test_check_accepts_mlx_lm_formats_and_split_directories(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "Hi!", "completion": "G'day!"}, *varied(5)])
    write_jsonl(folder / "valid.jsonl.txt", [{"text": "Bluey and Bingo played shops all afternoon."}])
    write_jsonl(folder / "test.jsonl", [chat("Where is Dad?", "In the backyard!")])

    result = invoke("data", "check", folder)
    assert result.exit_code == 0, result.output
    assert "8 valid examples, 0 errors" in result.output

    splits = load_splits(folder)
    assert [len(splits.train), len(splits.valid), len(splits.test)] == [6, 1, 1]
    assert splits.train[0].messages == chat("Hi!", "G'day!")["messages"]
    assert splits.valid[0].text.startswith("Bluey") and splits.valid[0].messages is None
    assert splits.test[0].source == f"{folder / 'test.jsonl'}:1"


def test_check_reads_a_saved_hugging_face_dataset(tmp_path):
    import datasets

    good = tmp_path / "hf-good"
    datasets.Dataset.from_list(varied(4)).save_to_disk(str(good))
    result = invoke("data", "check", good)
    assert result.exit_code == 0 and "4 valid examples, 0 errors" in result.output, result.output
    assert len(load_examples(good)) == 4

    bad = tmp_path / "hf-bad"
    rows = [{"prompt": "Hi", "completion": "Hello"}, {"prompt": "Bye", "completion": ""}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(bad))
    result = invoke("data", "check", bad)
    assert result.exit_code == 1
    assert f"{bad}[train]:2: error: 'completion' is empty" in result.output
    assert "Traceback" not in result.output


def test_unreachable_hub_dataset_id_is_a_clear_error():
    result = invoke("data", "check", "nobody-here/no-such-dataset")
    assert result.exit_code == 1
    assert "loading it as a Hugging Face dataset failed" in result.output
    assert "Traceback" not in result.output


def test_missing_path_is_a_clear_error(tmp_path):
    result = invoke("data", "stats", tmp_path / "nope.jsonl")
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- prompts and persona


def test_read_prompts_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\n\n  Tell me a story  \nWhat should I do today?\n")
    assert read_prompts(txt) == ["Tell me a story", "What should I do today?"]
    jsonl = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"messages": [{"role": "user", "content": "Yo"}]}])
    assert read_prompts(jsonl) == ["Hi", "Yo"]
    write_jsonl(jsonl, [{"prompt": "Hi"}, {"question": "Yo"}])
    with pytest.raises(DataError, match=f"{jsonl}:2: no prompt found"):
        read_prompts(jsonl)


def test_load_persona_and_its_errors(tmp_path):
    path = tmp_path / "persona.yaml"
    path.write_text("name: Bluey\ndescription: A puppy.\nmarkers: [I reckon, Hooray]\nout_of_character: [As an AI]\n")
    persona = load_persona(path)
    assert (persona.name, persona.markers, persona.out_of_character) == ("Bluey", ["I reckon", "Hooray"], ["As an AI"])

    path.write_text("name: Bluey\nmarkers: [Hooray]\nmarker: [oops]\n")
    with pytest.raises(DataError, match=f"{path}:3: unknown key 'marker'"):
        load_persona(path)
    path.write_text("name: Bluey\nmarkers: Hooray\n")
    with pytest.raises(DataError, match=f"{path}:2: 'markers' must be a list"):
        load_persona(path)


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise("  I'm feeling   SAD!! ") == normalise("im feeling sad") == "im feeling sad"


# ---------------------------------------------------------------- stats


def test_stats_numbers_histogram_markers_and_json(tmp_path):
    lengths = [10, 20, 30, 40, 100]
    records = [chat(f"Tell me about {TOPICS[i]}", "Hooray! " + " ".join(["heaps"] * (n - 1))) for i, n in enumerate(lengths)]
    records[0] = chat("Tell me about dogs", "I reckon dogs are the best. Mum agrees, heaps more!")
    folder = tmp_path / "bluey"
    folder.mkdir()
    write_jsonl(folder / "conversations.jsonl", records)
    (folder / "persona.yaml").write_text("name: Bluey\nmarkers: [I reckon, Hooray, heaps, Mum, Bingo]\n")

    result = invoke("data", "stats", folder, "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    words = stats["reply_words"]
    assert (words["n"], words["min"], words["median"], words["max"], words["mean"]) == (5, 10, 30, 100, 40.0)
    assert sum(b["count"] for b in stats["reply_words_histogram"]) == 5
    markers = {row["marker"]: (row["count"], row["replies"]) for row in stats["persona"]["markers"]}
    assert markers["heaps"] == (1 + 19 + 29 + 39 + 99, 5) and markers["Mum"] == (1, 1)
    assert markers["Hooray"] == (4, 4) and markers["I reckon"] == (1, 1) and markers["Bingo"] == (0, 0)
    assert stats["persona"]["replies_with_marker"] == 5

    text = invoke("data", "stats", folder)
    assert text.exit_code == 0
    assert "reply words: min 10  q1 20  median 30  mean 40.0  q3 40  max 100" in text.output
    assert "| ########################################" in text.output  # the fullest histogram bin
    assert "heaps" in text.output and "duplicate prompts: 0" in text.output


def test_stats_counts_tokens_with_a_model(tmp_path, converted_models):
    path = write_jsonl(tmp_path / "d.jsonl", varied(4))
    stats = dataset_stats(path, model=converted_models["pt"])
    assert stats["reply_tokens"]["n"] == 4
    # every example adds the turn scaffolding (bos, 2 x start/end of turn, role names) to its reply
    assert stats["example_tokens"]["min"] > stats["reply_tokens"]["min"] >= 5


# ---------------------------------------------------------------- split



def test_a_runs_split_data_finds_the_persona_of_the_dataset_it_came_from(tmp_path):
    """`data split` writes only JSONL files; stats (and prefs) on them use the source's persona.yaml."""
    from gemma_mlx.data import split_dataset
    from gemma_mlx.persona import persona_beside

    folder = tmp_path / "cat"
    folder.mkdir()
    write_jsonl(folder / "conversations.jsonl", [chat(f"Tell me about {t}", f"Mrrp. {t}, hmph.") for t in TOPICS[:10]])
    (folder / "persona.yaml").write_text("name: Cat\nmarkers: [Mrrp, hmph]\n")
    split = tmp_path / "runs" / "cat" / "data"
    split_dataset(folder, split)
    assert not (split / "persona.yaml").exists()
    assert persona_beside(split) == persona_beside(split / "train.jsonl") == folder / "persona.yaml"
    stats = json.loads(invoke("data", "stats", split / "train.jsonl", "--json").stdout)
    assert {row["marker"] for row in stats["persona"]["markers"]} == {"Mrrp", "hmph"}
    assert stats["persona"]["replies_with_marker"] == stats["reply_words"]["n"] > 0
    (folder / "persona.yaml").unlink()  # the source lost its persona: none, not an error
    assert persona_beside(split) is None
    (split / "manifest.json").write_text("not json")  # a damaged manifest is no persona either
    assert persona_beside(split) is None

def test_split_is_seeded_and_keeps_near_duplicates_together(tmp_path):
    records = varied(30)
    for i in range(0, 30, 3):  # ten pairs of near-duplicate prompts
        records[i + 1] = chat(records[i]["messages"][0]["content"] + "!", f"reply {i}")
    path = write_jsonl(tmp_path / "d.jsonl", records)

    first = load_splits(path, seed=1, valid_fraction=0.2, test_fraction=0.2)
    again = load_splits(path, seed=1, valid_fraction=0.2, test_fraction=0.2)
    other = load_splits(path, seed=2, valid_fraction=0.2, test_fraction=0.2)
    sources = lambda s: [[e.source for e in part] for part in (s.train, s.valid, s.test)]  # noqa: E731
    assert sources(first) == sources(again) != sources(other)
    assert [len(p) for p in (first.train, first.valid, first.test)] == [18, 6, 6]
    for split in (first, other):
        owner = {normalise(e.prompt): name for name in ("train", "valid", "test") for e in getattr(split, name)}
        assert len(owner) == 20  # each near-duplicate pair normalises to one prompt, and lives in one split
        assert all(owner[normalise(e.prompt)] == name for name in ("train", "valid", "test") for e in getattr(split, name))


def test_split_command_writes_mlx_lm_layout_and_refuses_to_overwrite(tmp_path, converted_models):
    from mlx_lm.tuner.datasets import load_local_dataset
    from mlx_lm.utils import load_tokenizer

    source = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi Bluey", "completion": "Hi! Wanna play?"}, *varied(19)])
    out = tmp_path / "split"

    result = invoke("data", "split", source, "--out", out, "--seed", 3)
    assert result.exit_code == 0, result.output
    assert "split\t" in result.stdout and "train 16, valid 2, test 2" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "split" and manifest["seed"] == 3 and manifest["counts"] == {"train": 16, "valid": 2, "test": 2}
    records = [json.loads(x) for name in ("train", "valid", "test") for x in (out / f"{name}.jsonl").read_text().splitlines()]
    assert len(records) == 20 and all(set(r) == {"messages"} for r in records)

    again = invoke("data", "split", source, "--out", out, "--seed", 3)
    assert again.exit_code == 0 and again.stdout.startswith("up-to-date")
    refused = invoke("data", "split", source, "--out", out, "--seed", 4)
    assert refused.exit_code == 1 and "--force" in refused.output and "Traceback" not in refused.output
    with pytest.raises(OutputExistsError):
        split_dataset(source, out, seed=4)
    assert split_dataset(source, out, seed=4, force=True).status == "split"

    tokenizer = load_tokenizer(converted_models["pt"])
    train, valid, test = load_local_dataset(out, tokenizer, types.SimpleNamespace())
    assert (len(train), len(valid), len(test)) == (16, 2, 2)
    tokens, offset = train.process(train[0])
    assert tokens[0] == 2 and tokens.count(105) == 2 and tokens.count(106) == 2 and offset == 0


def test_split_keeps_text_records_as_text(tmp_path):
    """A {"text"} dataset passes check and trains, so split (and run, which splits) takes it too."""
    texts = [f"Tell me about {TOPICS[i]}. Och, {TOPICS[i]} again, lass." for i in range(10)]
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    result = invoke("data", "split", source, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for name in ("train", "valid", "test")
               for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
    assert sorted(r["text"] for r in written) == sorted(texts) and all(set(r) == {"text"} for r in written)
    assert len(load_examples(tmp_path / "out")) == 10


# ---------------------------------------------------------------- the shipped dataset


def shipped_prompt_files() -> list[Path]:
    return sorted((REPO / "data" / "prompts").glob("*.txt"))


def test_shipped_dataset_is_clean_and_large_enough():
    report = check_dataset(SHIPPED, prompts=shipped_prompt_files())
    assert report.errors == []
    assert report.warnings == [], [str(w) for w in report.warnings]
    assert report.examples >= 120
    persona = load_persona(SHIPPED / "persona.yaml")
    assert persona.name and len(persona.markers) >= 5 and persona.out_of_character


def test_shipped_replies_vary_in_length_and_use_the_voice():
    stats = dataset_stats(SHIPPED)
    words = stats["reply_words"]
    assert words["min"] <= 15 and words["max"] >= 120 and words["cv"] >= 0.4, words
    assert stats["persona"]["replies_with_marker"] >= stats["examples"] // 2
    assert stats["persona"]["out_of_character"] == []


def test_no_shipped_prompt_overlaps_the_training_prompts():
    files = shipped_prompt_files()
    assert {f.name for f in files} >= {"comparison.txt", "personality.txt", "everyday.txt"}
    stats = dataset_stats(SHIPPED, prompts=files)
    assert stats["prompt_overlap"] == []
    assert len(read_prompts(REPO / "data" / "prompts" / "everyday.txt")) >= 16
    assert "Explain quantum physics" in read_prompts(REPO / "data" / "prompts" / "personality.txt")


@pytest.mark.parametrize("persona, prompt_files", [
    ("bluey", ["prompts/comparison.txt", "prompts/personality.txt", "prompts/everyday.txt"]),
    ("shipcat", ["shipcat/prompts.txt"]),
])
def test_shipped_held_out_prompts_are_not_in_their_training_data(persona, prompt_files):
    from gemma_mlx.data import overlap_findings

    examples = load_examples(REPO / "data" / persona)
    files = [REPO / "data" / name for name in prompt_files]
    assert sum(len(read_prompts(f)) for f in files) >= 20  # the held-out sets of the recipe study
    assert overlap_findings(examples, files) == []


def test_template_control_tokens_written_in_content_are_errors_with_their_line(tmp_path):
    """Chat logs pasted with their markers: '<end_of_turn>' in a reply would be tokenized as the real
    turn end (and weighted as one), so the reply would teach turns that end mid-text."""
    path = tmp_path / "pasted.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "G'day, lass."}]}
    pasted = {"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "Cheerio.<end_of_turn>\n<start_of_turn>user\nbye"}]}
    gemma4 = {"prompt": "hello", "completion": "fine <turn|> thanks"}
    formatted = {"text": "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>"}
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, pasted, gemma4, formatted)))
    report = check_dataset(path)
    problems = {e.where: e.message for e in report.errors}
    assert set(problems) == {f"{path}:2", f"{path}:3"}  # the plain reply and the formatted text record pass
    assert "message 2 (assistant) contains <end_of_turn>" in problems[f"{path}:2"]
    assert "'completion' contains <turn|>" in problems[f"{path}:3"]
    with pytest.raises(DataError, match="control tokens"):
        load_examples(path)


def test_encoding_a_reply_longer_than_the_tokenizers_maximum_says_nothing(converted_models, caplog):
    """transformers' "Token indices sequence length is longer than ..." reads like a crash; training cuts
    long examples itself and says so in its own words."""
    from mlx_lm.utils import load_tokenizer

    from gemma_mlx.chat_format import encode

    tokenizer = load_tokenizer(converted_models["pt"])
    limit = tokenizer._tokenizer.model_max_length
    assert limit < 10**6  # the tiny checkpoints' tokenizer has a maximum, as Gemma's do
    with caplog.at_level("WARNING"):
        ids = encode(tokenizer, "aye " * (limit + 100))
    assert len(ids) > limit and not [r for r in caplog.records if "sequence length" in r.getMessage()]


def test_other_tools_shapes_get_one_hint_not_a_flood(tmp_path):
    array = tmp_path / "export.json"
    array.write_text(json.dumps([chat("hi", "G'day!"), chat("bye", "See ya!")], indent=2))
    result = invoke("data", "check", array)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.count("error:") == 1 and f"{array}:1: error: the file is one JSON array" in result.output
    assert "export.jsonl" in result.output  # the conversion command names the file to write

    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": "answer"}]}
        for i in range(50)])
    result = invoke("data", "check", sharegpt)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if ": error: " in line]
    assert len(lines) == 4 and "looks like ShareGPT" in lines[0] and "human -> user" in lines[0]
    assert lines[3] == f"{sharegpt}:4: error: ... and 47 more with the same error (the last at {sharegpt}:50)"
    assert "50 errors" in result.output

    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi", "input": "", "output": "Hi!"}])
    assert "looks like Alpaca" in invoke("data", "check", alpaca).output


def test_small_mistakes_get_plain_words(tmp_path):
    nulls = tmp_path / "null.jsonl"
    nulls.write_text("null\n")
    assert "unknown record shape: a JSON null, expected an object" in invoke("data", "check", nulls).output
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nWhat is your name?\n")
    result = invoke("data", "check", write_jsonl(tmp_path / "d.jsonl", varied(4)), "--prompts", prompts)
    assert result.exit_code == 1 and "is a CSV file; prompt files are .txt" in result.output  # the header is no prompt
    assert "Traceback" not in result.output
