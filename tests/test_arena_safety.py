"""`gemma-mlx arena` under pressure (issue 20): other web sites, other names, a reply read twice, many
streams dropped, a port out of range, and Ctrl-C or SIGTERM while replies stream."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import httpx
import pytest
from click.testing import CliRunner

from gemma_mlx.arena import ArenaSetup, allowed_hosts_for, make_app
from gemma_mlx.cli import cli

LOCAL = "http://127.0.0.1:8765"


class HeldEngine:
    """Starts every reply with one piece of text and finishes it only when told: replies stay open.

    A prompt of "finish" is answered whole at once."""

    def __init__(self):
        self.listeners = []

    def submit(self, model, messages, settings, on_event):
        self.listeners.append(on_event)
        on_event("text", "Hello")
        if messages[-1]["content"] == "finish":
            self.finish(on_event)

    def finish(self, on_event):
        on_event("text", " there.")
        on_event("done", SimpleNamespace(text="Hello there.", tokens=3, finish_reason="stop", stop_token=106,
                                         seconds=0.01))


def held_app(tmp_path, engine, hosts=None):
    setup = ArenaSetup(models={"x": "x", "y": "y"}, votes=tmp_path / "votes.jsonl")
    return make_app(setup, engine, hosts if hosts is not None else allowed_hosts_for("127.0.0.1"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(app):
    """The app behind a real uvicorn on 127.0.0.1 (in a thread), so connections really open and close."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "the arena server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def sse_events(text: str) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: "):])))
    return events


# ---------------------------------------------------------------------------- other names, other sites

def test_the_open_network_keeps_the_host_and_origin_checks(tmp_path):
    hosts = allowed_hosts_for("0.0.0.0", ["Arena.LAN", "fd00::7"])
    assert hosts is not None and {"127.0.0.1", "localhost", "[::1]", "arena.lan", "[fd00::7]"} <= hosts
    assert socket.gethostname().lower() in hosts and "0.0.0.0" not in hosts and "evil.example" not in hosts
    engine = HeldEngine()
    client = held_app_client(tmp_path, engine, hosts, "http://arena.lan:8765")
    assert client.get("/api/models").status_code == 200  # an --allow-host name
    assert client.get("/api/models", headers={"host": f"{socket.gethostname()}:8765"}).status_code == 200
    rebound = client.get("/api/models", headers={"host": "evil.example:8765"})
    assert rebound.status_code == 403 and "--allow-host" in rebound.text  # DNS rebinding, on 0.0.0.0 too
    assert client.post("/api/battle", json={"prompt": "Hi"}, headers={"origin": "http://evil.example"}).status_code == 403
    assert client.get("/api/stream", params={"model": "x", "prompt": "Hi"},
                      headers={"origin": "http://evil.example"}).status_code == 403
    assert engine.listeners == []  # nothing was generated for them


def held_app_client(tmp_path, engine, hosts, base_url=LOCAL):
    from starlette.testclient import TestClient

    return TestClient(held_app(tmp_path, engine, hosts), base_url=base_url)


def test_allow_host_reaches_the_server_from_the_cli(converted_models, tmp_path, monkeypatch):
    import uvicorn
    from starlette.testclient import TestClient

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(options, app=app))
    monkeypatch.setattr("gemma_mlx.arena.check_port_free", lambda host, port: None)
    result = CliRunner().invoke(cli, ["arena", str(converted_models["pt"]), "--host", "0.0.0.0", "--allow-host",
                                      "arena.lan", "--votes", str(tmp_path / "v.jsonl")])
    assert result.exit_code == 0, result.output
    assert "add another name with --allow-host" in result.output
    client = TestClient(served["app"], base_url="http://arena.lan:8765")
    assert client.get("/api/models").status_code == 200
    assert client.get("/api/models", headers={"host": "evil.example"}).status_code == 403


def test_a_cross_site_get_of_a_stream_starts_no_reply(tmp_path):
    engine = HeldEngine()
    client = held_app_client(tmp_path, engine, allowed_hosts_for("127.0.0.1"))
    ask = {"model": "x", "prompt": "finish"}
    for headers in ({"sec-fetch-site": "cross-site"},  # another site's <img>/<script>: no Origin at all
                    {"sec-fetch-site": "same-site"},  # another page on this machine (another port)
                    {"origin": "http://127.0.0.1:3000"},  # another local web app's script
                    {"origin": "null"}):
        refused = client.get("/api/stream", params=ask, headers=headers)
        assert refused.status_code == 403, headers
    assert engine.listeners == []
    assert client.post("/api/battle", json={"prompt": "Hi"}, headers={"sec-fetch-site": "cross-site"}).status_code == 403
    assert engine.listeners == []
    # the page itself, a typed-in URL and a link to the page still work
    mine = client.get("/api/stream", params=ask, headers={"sec-fetch-site": "same-origin", "origin": LOCAL})
    assert mine.status_code == 200 and sse_events(mine.text)[-1][0] == "done"
    assert client.get("/", headers={"sec-fetch-site": "cross-site"}).status_code == 200
    assert client.get("/api/models", headers={"sec-fetch-site": "none"}).status_code == 200


def test_a_busy_engine_is_503_not_a_queue_without_end(tmp_path):
    from gemma_mlx.serving.engine import EngineBusy

    class BusyEngine:
        def submit(self, *args):
            raise EngineBusy("The arena is writing 64 replies already; try again when one has finished.")

    client = held_app_client(tmp_path, BusyEngine(), allowed_hosts_for("127.0.0.1"))
    busy = client.get("/api/stream", params={"model": "x", "prompt": "Hi"})
    assert busy.status_code == 503 and "try again" in busy.json()["error"]
    assert client.post("/api/battle", json={"prompt": "Hi"}).status_code == 503


def test_the_port_must_be_a_port():
    for port in ("70000", "-1"):
        result = CliRunner().invoke(cli, ["arena", "--port", port])
        assert result.exit_code == 2 and "--port" in result.output and "1<=x<=65535" in result.output, result.output
        assert "Traceback" not in result.output


# ---------------------------------------------------------------------------- one reader a reply

def test_a_second_reader_of_a_side_gets_409_and_the_first_gets_the_whole_reply(tmp_path):
    engine = HeldEngine()
    with serving(held_app(tmp_path, engine)) as url, httpx.Client(base_url=url, timeout=5) as http:
        battle = http.post("/api/battle", json={"prompt": "Hi"}).json()["id"]
        side_a = f"/api/battle/{battle}/stream"
        with http.stream("GET", side_a, params={"side": "A"}) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            assert next(lines) == "event: text"
            second = http.get(side_a, params={"side": "A"})  # before the fix: waited forever
            assert second.status_code == 409 and "being read already" in second.json()["error"]
            for on_event in engine.listeners:
                engine.finish(on_event)
            events = sse_events("event: text\n" + "\n".join(lines))
        assert events[-1][0] == "done" and events[-1][1]["text"] == "Hello there."
        assert "".join(data["text"] for kind, data in events if kind == "text") == "Hello there."
        # once the first reader is gone, the reply reads again (a reloaded page), and B was never taken
        for side in "AB":
            again = http.get(side_a, params={"side": side})
            assert again.status_code == 200 and sse_events(again.text)[-1][1]["text"] == "Hello there."


def test_a_reader_that_goes_away_frees_its_side_for_the_next(tmp_path):
    engine = HeldEngine()
    with serving(held_app(tmp_path, engine)) as url, httpx.Client(base_url=url, timeout=5) as http:
        battle = http.post("/api/battle", json={"prompt": "Hi"}).json()["id"]
        side_a = f"/api/battle/{battle}/stream"
        with http.stream("GET", side_a, params={"side": "A"}) as gone:
            assert next(gone.iter_lines()) == "event: text"
        deadline = time.time() + 5
        while True:
            with http.stream("GET", side_a, params={"side": "A"}) as next_reader:  # a 200 streams on: read no more
                if next_reader.status_code != 409:
                    break
            assert time.time() < deadline, "the side stayed taken after its reader left"
            time.sleep(0.1)
        assert next_reader.status_code == 200


def test_dropped_streams_hold_no_thread_and_the_next_stream_is_answered(tmp_path):
    """Before: each stream left by its reader kept a thread waiting for ever; after ~32 of them no stream
    was answered at all."""
    engine = HeldEngine()
    with serving(held_app(tmp_path, engine)) as url, httpx.Client(base_url=url, timeout=5) as http:
        with http.stream("GET", "/api/stream", params={"model": "x", "prompt": "Hi"}) as warm:
            next(warm.iter_lines())
        threads = threading.active_count()
        for _ in range(40):
            with http.stream("GET", "/api/stream", params={"model": "x", "prompt": "Hi"}) as dropped:
                assert next(dropped.iter_lines()) == "event: text"
        time.sleep(0.5)
        answered = http.get("/api/stream", params={"model": "x", "prompt": "finish"})
        assert answered.status_code == 200 and sse_events(answered.text)[-1][0] == "done"
        assert threading.active_count() <= threads + 2


def test_the_engine_holds_a_bounded_number_of_replies_and_stop_ends_them(converted_models, monkeypatch):
    from gemma_mlx.config import GenerationSettings
    from gemma_mlx.serving import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_REQUESTS", 2)
    engine = engine_module.Engine({"pt": str(converted_models["pt"])})
    heard: list[list] = [[], []]
    try:
        long = GenerationSettings(max_tokens=20000, temperature=1.0)
        for events in heard:
            engine.submit("pt", [{"role": "user", "content": "Hi"}], long, lambda kind, payload, e=events: e.append(kind))
        with pytest.raises(engine_module.EngineBusy, match="try again"):
            engine.submit("pt", [{"role": "user", "content": "Hi"}], long, lambda *_: None)
        started = time.time()
        engine.stop()
        engine.close()
        assert time.time() - started < 5 and not engine._thread.is_alive()
        assert [events[-1] for events in heard] == ["error", "error"]  # no listener is left waiting
        with pytest.raises(engine_module.EngineBusy):
            engine.submit("pt", [{"role": "user", "content": "Hi"}], long, lambda *_: None)
    finally:
        engine.close()


# ---------------------------------------------------------------------------- Ctrl-C, with streams open

@pytest.mark.pipeline
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_the_server_within_5_seconds_with_streams_open(converted_models, tmp_path, signum):
    port = free_port()
    log = tmp_path / "arena.log"
    with open(log, "w") as output:
        arena = subprocess.Popen([sys.executable, "-m", "gemma_mlx.cli", "arena", str(converted_models["pt"]),
                                  str(converted_models["it"]), "--port", str(port), "--votes",
                                  str(tmp_path / "votes.jsonl")], stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "open http://" not in log.read_text():
            assert arena.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        with ExitStack() as streams, httpx.Client(base_url=url, timeout=10) as http:
            ask = {"prompt": "Tell me a long story", "max_tokens": "20000", "temperature": "1.0"}
            battle = http.post("/api/battle", json=ask).json()["id"]
            side_a = f"{url}/api/battle/{battle}/stream?side=A"
            first = streams.enter_context(httpx.stream("GET", side_a, timeout=10))
            second = streams.enter_context(httpx.stream("GET", side_a, timeout=10))  # before: hung for ever
            model = http.get("/api/models").json()["models"][0]
            alone = streams.enter_context(httpx.stream("GET", f"{url}/api/stream", params={"model": model, **ask},
                                                       timeout=10))
            assert first.status_code == 200 and alone.status_code == 200 and second.status_code in (200, 409)
            time.sleep(2)  # the replies run on; before the fix one reader of side A now waited for ever
            started = time.time()
            arena.send_signal(signum)
            try:
                arena.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the arena did not stop within 5 s of {signum.name}:\n{log.read_text()}")
            took = time.time() - started
    finally:
        if arena.poll() is None:
            arena.kill()
            arena.wait()
    output = log.read_text()
    assert took < 5 and arena.returncode == 0, output
    assert "arena: stopped; 0 votes" in output and "Traceback" not in output
