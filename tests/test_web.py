"""The web page: llama.cpp in WebAssembly answers in Chromium with MLX's greedy tokens; the server and the writer."""

import errno
import http.client
import json
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from gemma_mlx.chat_format import STOP_TOKEN_IDS, encode, render
from gemma_mlx.errors import ConfigError, GemmaMlxError, OutputExistsError, ServeError
from gemma_mlx.text import loop_coverage
from gemma_mlx.web import check_page_settings, make_server, serve_in_thread, write_web_page

# Debian's chromium (what .ci/run installs); elsewhere Playwright's own (`playwright install chromium`).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
SETTINGS = {"name": "Bluey", "temperature": 0.7, "top_p": 0.95, "repeat_penalty": 1.0, "max_tokens": 64}
REPLY_SECONDS = 60


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from gemma_mlx.tiny import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", flavour="pt", quant="F32")


@pytest.fixture(scope="module")
def reference(tiny_gguf, tmp_path_factory):
    """greedy(messages, n) -> MLX's first n greedy token ids for the turn-format prompt, on the same GGUF."""
    import mlx.core as mx
    import mlx_lm

    from gemma_mlx.convert import convert_checkpoint

    converted = convert_checkpoint(str(tiny_gguf), out=tmp_path_factory.mktemp("mlx") / "tiny", dtype="float32")
    model, tokenizer = mlx_lm.load(str(converted.path))

    def greedy(messages: list[dict], n: int = 16) -> list[int]:
        ids = encode(tokenizer, render(messages, add_generation_prompt=True))  # the text has its own <bos>
        out = []
        for _ in range(n):
            out.append(int(mx.argmax(model(mx.array([ids + out]))[0, -1]).item()))
        return out

    return greedy


SYSTEM = "You are Bluey, a cheerful puppy."


@pytest.fixture(scope="module")
def served(tiny_gguf, tmp_path_factory):
    """{system prompt or None: (url, page dir)}: the tiny model's page without and with a system prompt."""
    pages, stops = {}, []
    for system in (None, SYSTEM):
        settings = {**SETTINGS, "system": system} if system else SETTINGS
        page = write_web_page(tiny_gguf, tmp_path_factory.mktemp("web") / "page", settings)
        url, shutdown = serve_in_thread(page)
        pages[system] = (url, page)
        stops.append(shutdown)
    yield pages
    for shutdown in stops:
        shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


class Tab:
    """A page in its own context that remembers console errors and every request that left the server."""

    def __init__(self, browser, url: str, **context):
        self.context = browser.new_context(viewport={"width": 900, "height": 760}, **context)
        self.page = self.context.new_page()
        self.console, self.outside = [], []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: None if r.url.startswith((url, "blob:", "data:")) else self.outside.append(r.url))

    def reply(self) -> dict:
        """Wait for the reply in #reply to end; its text and data attributes."""
        element = self.page.locator("#reply[data-done='1']")
        try:
            element.wait_for(timeout=REPLY_SECONDS * 1000)
        except Exception:
            raise AssertionError("no reply; the browser console said:\n" + "\n".join(self.console[-30:])) from None
        data = {key: element.get_attribute(f"data-{key}") for key in ("finish", "tokens", "tokens-per-second", "error")}
        data["text"] = element.text_content()
        data["ids"] = [int(i) for i in data["tokens"].split(",")] if data["tokens"] else []
        return data

    def close(self):
        self.context.close()


def same_as_greedy(reply: dict, mlx_ids: list[int], n: int) -> None:
    """The page's tokens are MLX's; a reply that stopped early stopped on what MLX would generate next."""
    assert reply["finish"] in ("stop", "length"), (
        f"the page gave no reply: {reply['error']}. If llama.cpp complains of a byte that is not UTF-8, the tiny "
        "random model wrote one for this prompt and wllama cannot return it: choose another prompt.")
    page_ids = reply["ids"]
    assert page_ids == mlx_ids[: len(page_ids)], (page_ids, mlx_ids)
    if reply["finish"] == "length":
        assert len(page_ids) == n
    else:
        assert mlx_ids[len(page_ids)] in STOP_TOKEN_IDS, (page_ids, mlx_ids)


def messages(system: str | None, *turns: str) -> list[dict]:
    roles = ["user", "assistant"]
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


# The tiny model is random: for many prompts its greedy reply holds a byte that is not UTF-8, which
# wllama 3.13 cannot hand back (see the error test below). These prompts give clean replies.
@pytest.mark.parametrize("system, prompt", [(None, "Hello"), (None, "Can you help me with my homework?"),
                                            (SYSTEM, "What is your name?")])
def test_the_page_answers_with_mlx_greedy_tokens(served, browser, reference, system, prompt):
    url, _ = served[system]
    tab = Tab(browser, url)
    tab.page.goto(f"{url}index.html?prompt={quote(prompt)}&max_tokens=16&temperature=0")
    reply = tab.reply()
    same_as_greedy(reply, reference(messages(system, prompt)), 16)
    # the persona's name is the title, its defaults are shown (the URL's overrides), a cut reply is flagged
    assert tab.page.inner_text("h1") == "Bluey"
    shown = tab.page.inner_text("#defaults")
    assert "0 (greedy)" in shown and "0.95" in shown and "16" in shown
    meta = tab.page.inner_text(".message.model .meta")
    assert ("cut" in meta) == (reply["finish"] == "length") and "tokens/s" in meta
    assert float(reply["tokens-per-second"]) > 0
    assert tab.outside == []  # nothing from a CDN or anywhere else
    tab.close()


def stop_when_enabled(page) -> None:
    """Press Stop inside the page the moment it becomes enabled (a reply has started)."""
    page.evaluate("""() => {
        const stop = document.getElementById('stop');
        const watcher = new MutationObserver(() => {
            if (!stop.disabled) { watcher.disconnect(); stop.click(); }
        });
        watcher.observe(stop, { attributes: true });
    }""")


def test_a_second_turn_sees_the_first_and_stop_ends_a_reply(served, browser, reference):
    url, _ = served[None]
    tab = Tab(browser, url)
    page = tab.page
    page.goto(f"{url}index.html?prompt=Hello&max_tokens=16&temperature=0")
    first = tab.reply()

    page.fill("#input", "Thank you very much")
    page.press("#input", "Shift+Enter")  # a new line, not a message
    assert page.input_value("#input") == "Thank you very much\n"
    assert page.locator(".message.user").count() == 1
    page.press("#input", "Enter")
    assert page.locator(".message.user").count() == 2
    second = tab.reply()
    conversation = messages(None, "Hello", first["text"], "Thank you very much\n")
    same_as_greedy(second, reference(conversation), 16)
    assert page.input_value("#input") == ""

    page.click("#clear")  # a new chat forgets the conversation
    assert page.locator(".message").count() == 0
    tab.close()

    long = Tab(browser, url)  # a reply that would run for seconds, stopped by the button
    long.page.goto(f"{url}index.html?max_tokens=3000&temperature=0")
    long.page.locator("#input:enabled").wait_for(timeout=REPLY_SECONDS * 1000)
    long.page.fill("#input", "Hello")
    stop_when_enabled(long.page)  # the tiny model can finish a reply before a Python-side click lands
    long.page.press("#input", "Enter")
    stopped = long.reply()
    assert stopped["finish"] == "abort" and "stopped" in long.page.inner_text(".message.model .meta")
    long.page.click("#clear")  # the model still answers after a stop (in a new chat: the same reply again)
    long.page.fill("#input", "Hello")
    stop_when_enabled(long.page)
    long.page.press("#input", "Enter")
    assert long.reply()["finish"] == "abort"
    long.close()


def test_the_safari_build_answers_the_same_offline(served, browser, reference):
    """Without JSPI (Safari), wllama switches to its compat build: the vendored copy, never the CDN."""
    url, _ = served[None]
    tab = Tab(browser, url)
    compat = []
    tab.page.on("request", lambda r: compat.append(r.url) if "/compat/" in r.url else None)
    tab.page.add_init_script("delete WebAssembly.Suspending; delete WebAssembly.promising;")
    tab.page.goto(f"{url}index.html?prompt=Hello&max_tokens=16&temperature=0")
    reply = tab.reply()
    same_as_greedy(reply, reference(messages(None, "Hello")), 16)
    assert any(u.endswith("/vendor/wllama/compat/wllama.wasm") for u in compat) and tab.outside == []
    tab.close()


def test_a_reply_that_breaks_llama_cpp_is_reported_and_the_next_one_works(tiny_gguf, browser, tmp_path):
    """wllama 3.13 aborts its wasm module when a reply holds a byte that is not UTF-8 (this prompt makes the
    tiny model write a lone 0x8B). The page must say so, restart the model and answer the next message."""
    page_dir = write_web_page(tiny_gguf, tmp_path / "page", SETTINGS)
    url, shutdown = serve_in_thread(page_dir)
    try:
        tab = Tab(browser, url)
        tab.page.goto(f"{url}index.html?prompt={quote('What should I do today?')}&max_tokens=16&temperature=0")
        reply = tab.reply()
        if reply["finish"] == "error":
            assert "UTF-8" in reply["error"]
            assert "restarts for your next message" in tab.page.inner_text(".message.model .error")
        tab.page.fill("#input", "Hello")
        tab.page.press("#input", "Enter")
        assert tab.reply()["finish"] in ("stop", "length")
        tab.close()
    finally:
        shutdown()


def test_the_page_rules_match_ours(served, browser):
    """turns.js renders prompts like chat_format.render and flags loops like text.loop_coverage."""
    url, _ = served[None]
    tab = Tab(browser, url, bypass_csp=True)  # the page's own CSP forbids eval, which this test needs
    tab.page.goto(f"{url}index.html")
    texts = ["a big house with a big house with a big house", "I'm going to the zoo! Today I'm going to see lions.",
             "Don\u2019t stop, don't stop, don't stop me now, don't stop me now, don't stop me now", "",
             "one two three", "Élan vital élan vital élan vital élan vital", "x_y x_y x_y x_y x_y x_y"]
    conversations = [
        [{"role": "user", "content": "  Hi there \n"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": " Hello!\n"}, {"role": "user", "content": "Bye"}],
    ]
    turns = [[{"role": "model" if m["role"] == "assistant" else "user", "text": m["content"]}
              for m in c if m["role"] != "system"] for c in conversations]
    systems = [next((m["content"] for m in c if m["role"] == "system"), None) for c in conversations]
    got = tab.page.evaluate("""async ([texts, turns, systems]) => {
        const rules = await import('./turns.js');
        return {
            loops: texts.map((t) => rules.loopCoverage(t, 4, 3)),
            prompts: turns.map((t, i) => rules.renderPrompt(t, systems[i], true)),
            bare: rules.renderPrompt(turns[0], null, false),
        };
    }""", [texts, turns, systems])
    assert got["loops"] == pytest.approx([loop_coverage(t) for t in texts])
    assert got["prompts"] == [render(c, add_generation_prompt=True) for c in conversations]
    assert got["bare"] == render(conversations[0], add_generation_prompt=True).removeprefix("<bos>")
    tab.close()


# ---------------------------------------------------------------------------- the server


def raw_get(url: str, path: str, host: str | None = None) -> tuple[int, dict, bytes]:
    """A GET with the path sent exactly as given (no client-side normalising of '..')."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.putrequest("GET", path, skip_host=host is not None)
    if host is not None:
        connection.putheader("Host", host)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def test_the_server_sends_isolation_headers_and_types_and_stays_in_its_folder(served, tmp_path):
    url, page = served[None]
    status, headers, body = raw_get(url, "/index.html")
    assert status == 200 and b'id="composer"' in body
    assert headers["cross-origin-opener-policy"] == "same-origin"
    assert headers["cross-origin-embedder-policy"] == "require-corp"
    assert raw_get(url, "/vendor/wllama/wllama.wasm")[1]["content-type"] == "application/wasm"
    assert raw_get(url, "/chat.js")[1]["content-type"].startswith("text/javascript")
    assert raw_get(url, "/vendor/wllama/wllama.js")[1]["content-type"].startswith("text/javascript")
    status, headers, body = raw_get(url, "/model.gguf")
    assert status == 200 and headers["content-type"] == "application/octet-stream" and body[:4] == b"GGUF"
    assert json.loads(raw_get(url, "/settings.json")[2])["name"] == "Bluey"

    # nothing outside the folder: '..' in any spelling, links that lead out, directory listings
    outside = page.parent / "secret.txt"
    outside.write_text("not for the browser")
    (page / "link.txt").symlink_to(outside)
    try:
        for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/vendor/../../secret.txt", "/..%2fsecret.txt",
                     "/link.txt", "/vendor/", "/vendor/wllama/", "/%00", "/index%00.html"):
            status, _, body = raw_get(url, path)
            assert status == 404 and b"not for the browser" not in body, path
    finally:
        (page / "link.txt").unlink()
    # DNS rebinding: a page from another site that resolves its name to 127.0.0.1 gets nothing
    assert raw_get(url, "/index.html", host="evil.example:80")[0] == 403
    assert raw_get(url, "/index.html", host=f"localhost:{urlsplit(url).port}")[0] == 200


def test_a_busy_port_and_a_folder_that_is_not_a_page_are_one_paragraph(served, tmp_path):
    _, page = served[None]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ServeError, match=f"port is in use.*--port {port + 1}") as error:
            make_server(page, port=port)
    assert "\n" not in str(error.value)
    with pytest.raises(GemmaMlxError, match="not a web page written by `gemma-mlx export --web`"):
        serve_in_thread(tmp_path)
    with pytest.raises(GemmaMlxError, match="missing does not exist; give the folder"):
        serve_in_thread(tmp_path / "missing")


# ---------------------------------------------------------------------------- writing the page


def test_write_web_page_makes_a_complete_folder(tiny_gguf, tmp_path):
    out = write_web_page(tiny_gguf, tmp_path / "page", {**SETTINGS, "system": "Be kind."})
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"index.html", "chat.js", "turns.js", "chat.css", "model.gguf", "settings.json", "vendor/wllama/wllama.js",
            "vendor/wllama/wllama.wasm", "vendor/wllama/compat/wllama.js", "vendor/wllama/compat/wllama.wasm",
            "vendor/wllama/LICENCE", "vendor/wllama/VERSION"} <= names
    settings = json.loads((out / "settings.json").read_text())
    assert settings == {**SETTINGS, "system": "Be kind.", "stop": ["<end_of_turn>"],
                        "loop": {"ngram": 4, "repeats": 3, "coverage": 0.5}}
    assert os.path.samefile(out / "model.gguf", tiny_gguf)  # a hard link on one file system: no copy
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (write_web_page(tiny_gguf, empty, SETTINGS) / "model.gguf").is_file()  # an empty folder is fine


def test_write_web_page_refuses_a_used_folder_bad_settings_and_other_files(tiny_gguf, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not an empty directory") as error:
        write_web_page(tiny_gguf, used, SETTINGS)
    assert "\n" not in str(error.value) and (used / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in used.iterdir()) == ["notes.txt"]

    with pytest.raises(ConfigError) as error:
        write_web_page(tiny_gguf, tmp_path / "bad", {"name": "", "temperature": -1, "top_p": 2, "max_tokens": 1.5,
                                                     "stop": [], "colour": "red"})
    message = str(error.value)
    for part in ("name must be", "temperature is -1", "top_p is 2", "max_tokens is 1.5", "stop is []",
                 "unknown setting colour"):
        assert part in message
    assert not (tmp_path / "bad").exists()

    not_gguf = tmp_path / "model.safetensors"
    not_gguf.write_bytes(b"\x00" * 64)
    with pytest.raises(GemmaMlxError, match="is not a GGUF file"):
        write_web_page(not_gguf, tmp_path / "page", SETTINGS)
    assert check_page_settings({"name": "Bingo"})["repeat_penalty"] == 1.1  # compare's default


def test_a_hard_link_that_fails_becomes_a_copy(tiny_gguf, tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    out = write_web_page(tiny_gguf, tmp_path / "page", SETTINGS)
    assert not os.path.samefile(out / "model.gguf", tiny_gguf)
    assert (out / "model.gguf").read_bytes() == Path(tiny_gguf).read_bytes()
