"""`gemma-mlx arena`: the API with the real engine and two tiny models, then the page in a real browser."""

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gemma_mlx.arena import arena_setup, make_app
from gemma_mlx.cli import cli
from gemma_mlx.serving.engine import Engine
from gemma_mlx.serving.ratings import bradley_terry, leaderboard, preference_rows, read_votes

# Debian's chromium (what .ci/run installs); elsewhere Playwright's own (`playwright install chromium`).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def arena(converted_models, tmp_path_factory):
    """An arena over the tiny -pt and -it models, its engine running; votes in a tmp file."""
    votes = tmp_path_factory.mktemp("arena") / "votes.jsonl"
    setup = arena_setup([str(converted_models["pt"]), str(converted_models["it"])], votes=votes)
    engine = Engine(setup.models)
    yield setup, engine
    engine.close()


@pytest.fixture
def client(arena):
    from starlette.testclient import TestClient

    setup, engine = arena
    return TestClient(make_app(setup, engine, {"testserver", "127.0.0.1", "localhost"}))


def sse(response) -> list[tuple[str, dict]]:
    """(event, data) pairs of a server-sent-events response."""
    events, kind = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: "):])))
    return events


def test_a_reply_streams_piece_by_piece_then_carries_the_flags(client, arena):
    model = next(iter(arena[0].models))
    with client.stream("GET", "/api/stream", params={"model": model, "prompt": "Hi", "max_tokens": "6",
                                                      "repetition_penalty": "1.0"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("text") >= 1
    done = events[-1][1]
    assert "".join(d["text"] for k, d in events if k == "text").strip() == done["text"]
    assert done["finish_reason"] in ("stop", "length") and done["cut"] == (done["finish_reason"] == "length")
    assert set(done) >= {"loop", "words", "tokens", "stop_token"}


def test_errors_are_clear(client, tmp_path):
    assert "Unknown model" in client.get("/api/stream", params={"model": "nope", "prompt": "Hi"}).json()["error"]
    model = client.get("/api/models").json()["models"][0]
    bad = client.get("/api/stream", params={"model": model, "prompt": "Hi", "top_p": "2"})
    assert bad.status_code == 400 and "top_p is 2.0; it must be in (0, 1]" in bad.json()["error"]
    assert "prompt is empty" in client.get("/api/stream", params={"model": model, "prompt": " "}).json()["error"]
    assert client.post("/api/vote", content="not json").status_code == 400
    broken = client.post("/api/vote", content="{", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "A vote is JSON" in broken.json()["error"]
    assert "A vote is JSON" in client.post("/api/vote", json={"choice": "A"}).json()["error"]  # no id
    assert client.post("/api/vote", json={"id": "feedface", "choice": "A"}).status_code == 404
    assert client.post("/api/battle", content="{").status_code == 400
    # files: only from the run's directory, nothing else
    assert client.get("/reports/../../etc/passwd").status_code == 404
    assert client.get("/static/../arena.py").status_code == 404
    # a missing run is one paragraph from the CLI
    result = CliRunner().invoke(cli, ["arena", "--run", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


def test_host_header_is_checked_and_model_text_is_never_html(arena):
    from starlette.testclient import TestClient

    from gemma_mlx.arena import allowed_hosts_for, host_name

    setup, engine = arena
    local = TestClient(make_app(setup, engine, allowed_hosts_for("127.0.0.1")), base_url="http://127.0.0.1:8765")
    assert local.get("/").status_code == 200
    rebound = local.get("/", headers={"host": "evil.example:8765"})
    assert rebound.status_code == 403  # DNS rebinding: a foreign name pointing at 127.0.0.1
    assert host_name("[::1]:8765") == "[::1]" and host_name("localhost:80") == "localhost"
    page = local.get("/").text + local.get("/static/arena.js").text + local.get("/static/messages.js").text
    assert "function streamInto" in page
    assert "innerHTML" not in page  # replies are set with textContent only
    assert "default-src 'self'" in local.get("/").headers["content-security-policy"]
    # another site's script: the browser adds its Origin; a plain-text POST would need no preflight
    assert local.post("/api/battle", headers={"origin": "http://evil.example"}, json={"prompt": "Hi"}).status_code == 403
    assert local.get("/api/leaderboard", headers={"origin": "null"}).status_code == 403
    assert local.get("/api/leaderboard", headers={"origin": "http://127.0.0.1:8765"}).status_code == 200
    plain = local.post("/api/battle", content='{"prompt": "Hi"}', headers={"content-type": "text/plain"})
    assert plain.status_code == 400 and "Content-Type: application/json" in plain.json()["error"]


def test_blind_battle_vote_is_durable_and_moves_the_ratings(arena, tmp_path):
    import dataclasses

    from starlette.testclient import TestClient

    setup, engine = arena
    setup = dataclasses.replace(setup, votes=tmp_path / "votes.jsonl")  # this test's votes alone
    client = TestClient(make_app(setup, engine, {"testserver"}))
    battle = client.post("/api/battle", json={"prompt": "What should I do today?", "max_tokens": "5"}).json()
    early = client.post("/api/vote", json={"id": battle["id"], "choice": "A"})
    assert early.status_code == 409  # replies not read yet
    for side in "AB":
        with client.stream("GET", f"/api/battle/{battle['id']}/stream", params={"side": side}) as response:
            assert sse(response)[-1][0] == "done"
    assert client.post("/api/vote", json={"id": battle["id"], "choice": "maybe"}).status_code == 400
    vote = client.post("/api/vote", json={"id": battle["id"], "choice": "A"})
    assert vote.status_code == 200 and set(vote.json()) == {"model_a", "model_b", "choice"}
    assert client.post("/api/vote", json={"id": battle["id"], "choice": "B"}).status_code == 409  # one vote a battle
    votes = read_votes(setup.votes)
    assert len(votes) == 1
    saved = votes[-1]
    assert saved["model_a"] == vote.json()["model_a"] and saved["choice"] == "A"
    assert saved["prompt"] == "What should I do today?" and saved["settings"]["max_tokens"] == 5
    assert {"text", "cut", "loop", "finish_reason"} <= set(saved["reply_a"])
    board = client.get("/api/leaderboard").json()
    winner = next(m for m in board["models"] if m["model"] == saved["model_a"])
    loser = next(m for m in board["models"] if m["model"] == saved["model_b"])
    assert winner["rating"] > loser["rating"] and winner["votes"] >= 1
    preferences = [json.loads(line) for line in client.get("/api/preferences").text.splitlines()]
    assert preferences[-1]["chosen"] == saved["reply_a"]["text"]


def test_ratings_and_intervals():
    votes = [{"model_a": "x", "model_b": "y", "choice": "A"}] * 8 + [{"model_a": "x", "model_b": "y", "choice": "B"}] * 2
    ratings = bradley_terry(votes, ["x", "y"])
    assert ratings["x"] > ratings["y"] and abs((ratings["x"] + ratings["y"]) / 2 - 1000) < 1e-6
    board = leaderboard(votes, ["x", "y"])
    top = board["models"][0]
    assert top["model"] == "x" and top["low"] <= top["rating"] <= top["high"] and top["votes"] == 10
    assert board["pairs"] == [{"a": "x", "b": "y", "votes": 10, "a_wins": 8, "b_wins": 2, "ties": 0}]
    few = leaderboard(votes[:4], ["x", "y"])["models"][0]
    assert few["low"] is None and few["high"] is None and few["votes"] == 4  # 4 votes: no interval claimed
    ties = bradley_terry([{"model_a": "x", "model_b": "y", "choice": "tie"}] * 4, ["x", "y"])
    assert abs(ties["x"] - ties["y"]) < 1e-6
    rows = preference_rows([{"prompt": "p", "model_a": "x", "model_b": "y", "choice": "B",
                             "reply_a": {"text": "a"}, "reply_b": {"text": "b"}}])
    assert rows == [{"prompt": "p", "chosen": "b", "rejected": "a", "chosen_model": "y", "rejected_model": "x"}]
    # a hand-edited decided vote without its prompt or a reply's text makes no pair (it used to raise KeyError)
    assert preference_rows([{"model_a": "x", "model_b": "y", "choice": "A", "reply_a": {"text": "a"}},
                            {"prompt": "p", "model_a": "x", "model_b": "y", "choice": "B"}]) == []


def test_export_preferences_from_the_cli(arena, tmp_path):
    setup, _ = arena
    out = tmp_path / "prefs.jsonl"
    result = CliRunner().invoke(cli, ["arena", *setup.models.values(), "--votes", str(setup.votes),
                                      "--export-preferences", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "preference pairs" in result.output


# ---------------------------------------------------------------------------- a real browser

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served(arena):
    import uvicorn

    from gemma_mlx.arena import allowed_hosts_for

    setup, engine = arena
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(setup, engine, allowed_hosts_for("127.0.0.1")), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "the arena server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", setup
    server.should_exit = True
    thread.join(timeout=10)


def test_in_chromium_a_two_turn_chat_side_by_side_then_a_blind_vote(served, tmp_path):
    """The real engine behind the page: each column's second reply answers that model's own conversation."""
    from playwright.sync_api import expect, sync_playwright

    import dataclasses

    from gemma_mlx.generate import generate_replies
    from gemma_mlx.models import load_model

    url, setup = served
    before = len(read_votes(setup.votes))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.click("#settings summary")  # the settings panel opens like a person would open it
        page.fill("#max_tokens", "12")
        page.fill("#temperature", "0")
        columns = page.locator("#side-columns .column")
        for turn, message in enumerate(["What should I do today?", "Why?"], 1):
            page.fill("#prompt", message)
            page.press("#prompt", "Enter")
            for i in range(2):  # expect(), not wait_for_function(): the page's CSP forbids eval, as it should
                expect(columns.nth(i).locator(".message.model .badges")).to_have_count(turn, timeout=60_000)
                expect(columns.nth(i).locator(".message.model .badges").last).to_contain_text("word", timeout=60_000)
        assert columns.count() == 2
        model = columns.first.get_attribute("data-side")
        texts = columns.first.locator("pre.reply").all_inner_texts()
        assert len(texts) == 2 and texts[0], texts  # both turns reached the column (the tiny model may say nothing)

        page.click("button[data-tab=blind]")
        page.fill("#prompt", "Tell me about your day")
        page.press("#prompt", "Enter")
        page.press("#prompt", "Escape")  # out of the message box: the keys vote
        expect(page.locator("#votes button").first).to_be_enabled(timeout=60_000)
        page.keyboard.press("1")  # A is better
        expect(page.locator("#verdict")).to_contain_text("A was")
        for side in "AB":  # the names are revealed after the verdict line: wait for both
            expect(page.locator(f"#col-{side} .name")).not_to_be_empty(timeout=30_000)
        names = [page.inner_text(f"#col-{side} .name") for side in "AB"]
        assert set(names) <= set(setup.models) and names[0] != names[1]
        page.click("button[data-tab=board]")
        expect(page.locator("#ratings tbody tr")).to_have_count(2)
        first = page.inner_text("#ratings tbody tr:first-child td:first-child")
        page.screenshot(path=str(tmp_path / "arena.png"), full_page=True)
        browser.close()
    assert (tmp_path / "arena.png").stat().st_size > 10_000
    votes = read_votes(setup.votes)
    assert len(votes) == before + 1 and votes[-1]["choice"] == "A" and votes[-1]["model_a"] == names[0]
    board = leaderboard(votes, list(setup.models))
    assert first == board["models"][0]["model"]
    greedy = dataclasses.replace(setup.settings, max_tokens=12, temperature=0.0)
    conversation = [{"role": "user", "content": "What should I do today?"}, {"role": "assistant", "content": texts[0]},
                    {"role": "user", "content": "Why?"}]
    assert generate_replies(load_model(setup.models[model]), [conversation], greedy)[0].text == texts[1]


def test_cli_errors_for_bad_models_and_a_warning_for_the_open_network(converted_models, tmp_path, monkeypatch):
    import uvicorn

    runner = CliRunner()
    missing = runner.invoke(cli, ["arena", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "does not exist" in missing.output and "Traceback" not in missing.output
    assert "No models for the arena" in runner.invoke(cli, ["arena"]).output
    twice = runner.invoke(cli, ["arena", str(converted_models["pt"]), str(converted_models["pt"]) + "/"])
    assert twice.exit_code == 1 and "given twice" in twice.output

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(options))
    monkeypatch.setattr("gemma_mlx.arena.check_port_free", lambda host, port: None)  # 8765 may be busy here
    opened = runner.invoke(cli, ["arena", str(converted_models["pt"]), "--host", "0.0.0.0", "--votes",
                                 str(tmp_path / "v.jsonl")])
    assert opened.exit_code == 0, opened.output
    assert "warning: the arena listens on 0.0.0.0" in opened.output and served["host"] == "0.0.0.0"
    local = runner.invoke(cli, ["arena", str(converted_models["pt"]), "--votes", str(tmp_path / "v.jsonl")])
    assert "warning" not in local.output and served["host"] == "127.0.0.1" and served["port"] == 8765
    assert "arena: stopped; 0 votes in" in local.output


def test_concurrent_requests_share_the_batch_and_get_the_replies_they_would_get_alone(served):
    """Several prompts at once (two tabs, many columns): each reply is its own, as if asked alone."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    url, setup = served
    model = next(iter(setup.models))
    prompts = ["Hi", "What should I do today?", "Tell me a story", "Why is the sky blue?", "Hi there", "Bye"]

    def ask(prompt):
        params = {"model": model, "prompt": prompt, "max_tokens": "8", "temperature": "0"}
        with httpx.stream("GET", f"{url}/api/stream", params=params, timeout=60) as response:
            return sse(response)[-1][1]["text"]

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone and len(set(alone)) > 1


def test_votes_from_many_threads_are_whole_lines(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from gemma_mlx.serving.ratings import append_vote

    votes = tmp_path / "votes.jsonl"
    vote = {"model_a": "x", "model_b": "y", "choice": "A", "prompt": "p" * 5000}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: append_vote(votes, {**vote, "n": i}), range(64)))
    assert sorted(v["n"] for v in read_votes(votes)) == list(range(64))
    votes.write_text(votes.read_text() + "{half a vote\n")
    with pytest.raises(Exception, match=r"votes.jsonl:65: not a vote"):
        read_votes(votes)


def test_a_damaged_votes_file_stops_the_arena_before_it_serves(converted_models, tmp_path):
    votes = tmp_path / "votes.jsonl"
    votes.write_text('{"model_a": "x", "model_b": "y", "choice": "A"}\n[1, 2]\n')
    result = CliRunner().invoke(cli, ["arena", str(converted_models["pt"]), "--votes", str(votes)])
    assert result.exit_code == 1 and f"{votes}:2: not a vote" in result.output and "Traceback" not in result.output
    assert votes.read_text().count("\n") == 2  # the file is left as it was


def test_a_runs_relative_paths_are_found_from_any_directory(tmp_path, monkeypatch):
    """`run` records paths relative to where it was started; the arena may be started elsewhere."""
    from gemma_mlx.arena import _found

    project = tmp_path / "project"
    run_dir = project / "outputs" / "runs" / "demo"
    (run_dir / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert Path(_found("outputs/runs/demo/models/m", run_dir)) == project / "outputs/runs/demo/models/m"
    assert _found("outputs/runs/demo/models/gone", run_dir) == "outputs/runs/demo/models/gone"
    monkeypatch.chdir(project)
    assert _found("outputs/runs/demo/models/m", run_dir) == "outputs/runs/demo/models/m"


def test_a_port_in_use_is_one_paragraph_before_any_model_loads(converted_models, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(cli, ["arena", str(converted_models["pt"]), "--port", str(port),
                                          "--votes", str(tmp_path / "v.jsonl")])
    assert result.exit_code == 1 and f"Cannot listen on 127.0.0.1:{port}" in result.output
    assert "--port" in result.output and "loading" not in result.output and "Traceback" not in result.output


def test_the_engine_makes_each_models_greedy_screen_as_it_loads_it(converted_models, monkeypatch):
    """Battles are one greedy row a side, many of them: the output layer's screen is made once per model."""
    from gemma_mlx import decode_step

    warmed = []
    monkeypatch.setattr(decode_step, "warm_up", lambda model: warmed.append(model) or True)
    engine = Engine({"pt": str(converted_models["pt"]), "it": str(converted_models["it"])})
    try:
        assert [id(m) for m in warmed] == [id(engine.models[name].model) for name in ("pt", "it")]
    finally:
        engine.close()
