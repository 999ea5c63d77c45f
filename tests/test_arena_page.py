"""The arena page in Chromium (issue 22), over the scripted engine of test_arena_chat: a multi-turn chat
with a system prompt, Enter and Shift+Enter, Stop, Regenerate, Copy, long words, blind badges hidden
until the vote, N for the next battle, saved conversations reopened, and reports in a new tab."""

import contextlib
import json
import shutil

import pytest

from gemma_mlx.arena import ArenaSetup, allowed_hosts_for, make_app
from gemma_mlx.serving.ratings import read_votes

from .test_arena_chat import ScriptedEngine
from .test_arena_safety import serving

# Debian's chromium (what .ci/run installs); elsewhere Playwright's own (`playwright install chromium`).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"]
WAIT = 20_000  # ms; the scripted replies take well under a second


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def arena(tmp_path):
    """(url, engine, setup): a served arena over two scripted models, with one report in its run."""
    run = tmp_path / "run"
    (run / "compare").mkdir(parents=True)
    (run / "compare" / "report.html").write_text("<html><body><h1>The report</h1></body></html>")
    engine = ScriptedEngine(stop_tokens={"alpha": "<mask>"})
    setup = ArenaSetup(models={"alpha": "alpha", "beta": "beta"}, votes=run / "votes.jsonl", run_dir=run.resolve(),
                       reports=["compare/report.html"], prompt_sets={"starters": ["What should I do today?"]})
    with serving(make_app(setup, engine, allowed_hosts_for("127.0.0.1"))) as url:
        yield url, engine, setup


@contextlib.contextmanager
def open_page(browser, url, **context_options):
    """The arena's page in a fresh browser context, loaded; no script error may happen while it is open."""
    context = browser.new_context(viewport={"width": 1100, "height": 800}, **context_options)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.locator("#model-picks input").first.wait_for()
    yield page
    context.close()
    assert errors == []


@pytest.fixture
def page(browser, arena):
    with open_page(browser, arena[0], permissions=["clipboard-read", "clipboard-write"]) as page:
        yield page


def finished(page, column, count):
    """Wait until `column` shows `count` finished model messages."""
    from playwright.sync_api import expect

    expect(page.locator(f"{column} .message.model .badge")).not_to_have_count(0, timeout=WAIT)
    expect(page.locator(f"{column} .message.model")).to_have_count(count, timeout=WAIT)
    expect(page.locator(f"{column} .message.model .badges", has_text="writing")).to_have_count(0, timeout=WAIT)


def test_side_by_side_is_a_multi_turn_chat_with_a_system_prompt(page, arena):
    from playwright.sync_api import expect

    _, engine, _ = arena
    page.click("#system-box summary")
    page.fill("#system", "You are Bluey.")
    page.fill("#prompt", "Hello")
    page.press("#prompt", "Shift+Enter")  # a new line, not a message
    assert page.input_value("#prompt") == "Hello\n" and engine.asked == []
    page.keyboard.type("there")
    page.press("#prompt", "Enter")
    columns = page.locator("#side-columns .column")
    expect(columns).to_have_count(2, timeout=WAIT)
    for name in ("alpha", "beta"):
        finished(page, f"#side-columns .column[data-side={name}]", 1)
    assert page.input_value("#prompt") == ""
    page.fill("#prompt", "And then?")
    page.press("#prompt", "Enter")
    for name in ("alpha", "beta"):
        finished(page, f"#side-columns .column[data-side={name}]", 2)
    alpha = page.locator("#side-columns .column[data-side=alpha]")
    assert alpha.locator(".message.user").all_inner_texts() == ["Hello\nthere", "And then?"]
    first_reply = alpha.locator("pre.reply").first.inner_text()
    asked = dict(engine.asked[2:])
    assert asked["alpha"] == [{"role": "system", "content": "You are Bluey."}, {"role": "user", "content": "Hello\nthere"},
                              {"role": "assistant", "content": first_reply}, {"role": "user", "content": "And then?"}]

    assert alpha.locator(".regenerate").count() == 1  # on the last reply only
    before = alpha.locator("pre.reply").last.inner_text()
    alpha.locator(".regenerate").click()
    expect(alpha.locator("pre.reply").last).not_to_have_text(before, timeout=WAIT)
    finished(page, "#side-columns .column[data-side=alpha]", 2)
    assert engine.asked[-1][0] == "alpha" and engine.asked[-1][1][-1]["content"] == "And then?"

    alpha.locator(".copy").first.click()
    expect(alpha.locator(".copy").first).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == first_reply

    page.click("#new-chat")  # a new chat forgets the conversation
    expect(page.locator("#side-columns .message")).to_have_count(0)


def test_stop_ends_the_replies_on_the_server(page, arena):
    from playwright.sync_api import expect

    _, engine, _ = arena
    page.fill("#prompt", "slow story")
    page.press("#prompt", "Enter")
    expect(page.locator("#stop")).to_be_enabled(timeout=WAIT)
    expect(page.locator("#side-columns pre.reply").first).to_contain_text("tick", timeout=WAIT)
    page.click("#stop")
    expect(page.locator("#side-columns .badge", has_text="stopped by you")).to_have_count(2, timeout=WAIT)
    assert len(engine.cancelled) == 2  # both rows were cancelled in the engine, not just left unread
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


def test_a_200_character_word_does_not_widen_the_page(page):
    page.fill("#prompt", "long " + "y" * 300)
    page.press("#prompt", "Enter")
    finished(page, "#side-columns .column[data-side=alpha]", 1)
    assert page.locator("#side-columns pre.reply").first.inner_text() == "x" * 200
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], widths
    page.set_viewport_size({"width": 420, "height": 800})  # a phone
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], widths


def test_blind_badges_wait_for_the_vote_and_n_starts_the_next_battle(page, arena):
    from playwright.sync_api import expect

    _, _, setup = arena
    page.click("button[data-tab=blind]")
    for message in ("Hi", "Tell me more"):
        page.fill("#prompt", message)
        page.press("#prompt", "Enter")
        for side in "AB":
            finished(page, f"#col-{side}", 1 if message == "Hi" else 2)
    blind = page.locator("#blind")
    assert "<mask>" not in blind.inner_text() and "stopped by" not in blind.inner_text()  # alpha's stop token
    assert page.inner_text("#col-A .name") == "" and "alpha" not in blind.inner_text().replace("alpha answers", "")
    page.press("#prompt", "Escape")  # out of the box, so the keys vote
    expect(page.locator("#votes button[data-choice=A]")).to_be_enabled(timeout=WAIT)
    page.keyboard.press("2")
    expect(page.locator("#verdict")).to_contain_text("A was", timeout=WAIT)
    expect(blind.locator(".badge", has_text="stopped by <mask>")).to_have_count(2)  # alpha's two replies
    names = [page.inner_text(f"#col-{side} .name") for side in "AB"]
    assert sorted(names) == ["alpha", "beta"]
    expect(page.locator("#blind .regenerate")).to_have_count(0)  # a decided battle is not asked again
    vote = read_votes(setup.votes)[-1]
    assert vote["choice"] == "B" and vote["turns"] == 2 and [vote["model_a"], vote["model_b"]] == names

    page.keyboard.press("n")
    expect(page.locator("#blind .message")).to_have_count(0)
    assert page.inner_text("#verdict") == "" and page.inner_text("#col-A .name") == ""
    expect(page.locator("#votes button[data-choice=A]")).to_be_disabled()
    page.fill("#prompt", "A new battle")
    page.press("#prompt", "Enter")
    finished(page, "#col-A", 1)
    assert page.locator("#col-A .message.user").all_inner_texts() == ["A new battle"]


def test_conversations_are_saved_and_reopen_from_the_list(page, arena, browser):
    from playwright.sync_api import expect

    url, engine, setup = arena
    page.fill("#prompt", "Remember me")
    page.press("#prompt", "Enter")
    finished(page, "#side-columns .column[data-side=beta]", 1)
    expect(page.locator("#saved-note")).to_contain_text("conversations.jsonl", timeout=WAIT)
    saved = [json.loads(line) for line in setup.conversations.read_text().splitlines()]
    assert saved[-1]["title"] == "Remember me" and set(saved[-1]["sides"]) == {"alpha", "beta"}

    fresh = browser.new_context().new_page()  # another visit: nothing on the page, the list has it
    fresh.goto(url)
    fresh.click("button[data-tab=saved]")
    fresh.locator("#saved-list button.open", has_text="Remember me").click()
    expect(fresh.locator("#side-columns .message.user")).to_have_count(2, timeout=WAIT)
    assert fresh.locator("#side-columns .column[data-side=beta] pre.reply").inner_text() == \
        saved[-1]["sides"]["beta"]["messages"][1]["content"]
    fresh.fill("#prompt", "Still there?")
    fresh.press("#prompt", "Enter")
    finished(fresh, "#side-columns .column[data-side=beta]", 2)
    assert [m["content"] for m in engine.asked[-1][1]][0] == "Remember me" and len(engine.asked[-1][1]) == 3
    fresh.context.close()


def test_a_report_opens_in_a_new_tab_and_the_replies_stay(page):
    page.fill("#prompt", "Hi")
    page.press("#prompt", "Enter")
    finished(page, "#side-columns .column[data-side=alpha]", 1)
    reply = page.locator("#side-columns pre.reply").first.inner_text()
    page.click("button[data-tab=reports]")
    with page.context.expect_page() as opened:
        page.click("#report-list a")
    report = opened.value
    report.wait_for_load_state()
    assert "The report" in report.inner_text("h1") and report.url.endswith("/reports/compare/report.html")
    report.close()
    page.click("button[data-tab=side]")
    assert page.locator("#side-columns pre.reply").first.inner_text() == reply  # this page never left


def test_best_of_n_says_it_samples_and_a_blind_battle_shows_nothing_of_the_choice(browser, tmp_path):
    """arena --best-of 3: the page says it samples 3 replies (the candidates' text never streams), then
    shows the kept one with a "best of 3" badge; in a blind battle that badge waits for the vote."""
    from playwright.sync_api import expect

    engine = ScriptedEngine()
    setup = ArenaSetup(models={"alpha": "alpha", "beta": "beta"}, votes=tmp_path / "votes.jsonl", best_of=3)
    with serving(make_app(setup, engine, allowed_hosts_for("127.0.0.1"))) as url, open_page(browser, url) as page:
        expect(page.locator("#best-of-note")).to_have_text("Every reply is the best of 3 samples, shown once all have "
                                                           "ended.")
        page.fill("#prompt", "slow story")
        page.press("#prompt", "Enter")
        badges = page.locator("#side-columns .message.model .badges")
        expect(badges.filter(has_text="sampling 3 replies...")).to_have_count(2, timeout=WAIT)
        expect(page.locator("#stop")).to_be_enabled(timeout=WAIT)
        assert len(engine.asked) == 6  # three rows a side
        page.wait_for_timeout(300)  # the scripted rows write "tick " every 20 ms meanwhile
        assert page.locator("#side-columns pre.reply").all_inner_texts() == ["", ""]  # no candidate streams
        page.click("#stop")
        expect(page.locator("#side-columns .badge", has_text="best of 3")).to_have_count(2, timeout=WAIT)
        expect(page.locator("#side-columns .badge", has_text="stopped by you")).to_have_count(2)
        assert len(engine.cancelled) == 6  # all three rows of both sides left the engine

        page.click("button[data-tab=blind]")
        page.fill("#prompt", "Hi")
        page.press("#prompt", "Enter")
        for side in "AB":
            finished(page, f"#col-{side}", 1)
        assert "best of" not in page.inner_text("#blind")  # before the vote: text and words only
        page.press("#prompt", "Escape")
        expect(page.locator("#votes button[data-choice=A]")).to_be_enabled(timeout=WAIT)
        page.keyboard.press("1")
        expect(page.locator("#blind .badge", has_text="best of 3")).to_have_count(2, timeout=WAIT)


def test_on_topic_badges_in_both_modes(browser, tmp_path, monkeypatch):
    """arena --on-topic-model: every reply gets an "on topic" or "off topic" badge once the turn has ended, in a
    blind battle too (it is about the reply's text, like its words), and the page says what the badge means."""
    from types import SimpleNamespace

    from playwright.sync_api import expect

    import gemma_mlx.scoring.ontopic as ontopic

    monkeypatch.setattr(ontopic, "on_topic_scores",  # alpha's replies answer, beta's do not
                        lambda model, tokenizer, pairs: [1.0 if reply.startswith("alpha") else -1.0 for _, reply in pairs])
    engine = ScriptedEngine()
    engine.models = {"alpha": SimpleNamespace(model=None, tokenizer=None, manifest={}, adapter_dir=None)}
    setup = ArenaSetup(models={"alpha": "alpha", "beta": "beta"}, votes=tmp_path / "votes.jsonl", on_topic_model="alpha")
    with serving(make_app(setup, engine, allowed_hosts_for("127.0.0.1"))) as url, open_page(browser, url) as page:
        expect(page.locator("#best-of-note")).to_contain_text("marked on or off topic")
        page.fill("#prompt", "Hi")
        page.press("#prompt", "Enter")
        expect(page.locator("#side-columns .badge", has_text="off topic")).to_have_count(1, timeout=WAIT)
        expect(page.locator("#side-columns .badge", has_text="on topic")).to_have_count(1)
        expect(page.locator("#side-columns .badge.off")).to_have_count(1)

        page.click("button[data-tab=blind]")
        page.fill("#prompt", "Hi")
        page.press("#prompt", "Enter")
        for side in "AB":
            finished(page, f"#col-{side}", 1)
        expect(page.locator("#blind .badge.off")).to_have_count(1, timeout=WAIT)  # before the vote
        expect(page.locator("#blind .badge", has_text="on topic")).to_have_count(1)
        assert "stopped by" not in page.inner_text("#blind") and page.inner_text("#col-A .name") == ""
