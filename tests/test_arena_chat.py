"""The arena as a chat (issue 22): sides that keep their own history, a system prompt, Stop that ends the
reply on the server, regenerate, saved conversations reopened, and blind replies that name no model
before the vote. The API here; the page in Chromium in tests/test_arena_page.py."""

import itertools
import json
import threading
import time
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from gemma_mlx.arena import ArenaSetup, arena_setup, make_app
from gemma_mlx.chat_format import render
from gemma_mlx.cli import cli
from gemma_mlx.serving.chats import read_conversations
from gemma_mlx.serving.ratings import read_votes

from .test_arena_safety import sse_events


class ScriptedEngine:
    """The engine's interface with scripted replies, written piece by piece from another thread.

    A reply names its model and the message it answers; a message with "slow" in it writes "tick "
    every 20 ms until cancelled; one with "long" is a single 200-character word. stop_tokens gives a
    model a stop token other than <end_of_turn> (a badge that would name it)."""

    def __init__(self, stop_tokens: dict | None = None):
        self.asked: list[tuple[str, list[dict]]] = []
        self.cancelled: list[int] = []
        self.stop_tokens = stop_tokens or {}
        self._handles = itertools.count(1)
        self._cancel: dict[int, threading.Event] = {}

    def submit(self, model, messages, settings, on_event):
        handle = next(self._handles)
        self.asked.append(self.record(model, messages, settings))
        self._cancel[handle] = threading.Event()
        last = messages[-1]["content"]
        text, reason = self.script(model, last, settings)
        threading.Thread(target=self._write, args=(model, text, reason, "slow" in last, handle, on_event),
                         daemon=True).start()
        return handle

    def record(self, model, messages, settings):
        """What `asked` keeps of a submit."""
        return model, [dict(m) for m in messages]

    def script(self, model, last, settings):
        """(text, finish reason) of a reply that is not "slow"."""
        return ("x" * 200 if "long" in last else f"{model} answers {last} (reply {len(self.asked)})."), "stop"

    def cancel(self, handle):
        self.cancelled.append(handle)
        self._cancel[handle].set()

    def _write(self, model, text, reason, slow, handle, on_event):
        stopped = self._cancel[handle]
        if slow:
            text = ""
            while not stopped.wait(0.02) and len(text) < 20000:
                text += "tick "
                on_event("text", "tick ")
            text = text.strip()
        else:
            for start in range(0, len(text), 7):
                on_event("text", text[start:start + 7])
        reason = "stopped" if stopped.is_set() else reason
        on_event("done", SimpleNamespace(text=text, tokens=len(text.split()), finish_reason=reason, seconds=0.01,
                                         stop_token=self.stop_tokens.get(model, "<end_of_turn>") if reason == "stop" else None))


def scripted_client(tmp_path, engine=None, models=("alpha", "beta")):
    from starlette.testclient import TestClient

    engine = engine or ScriptedEngine()
    setup = ArenaSetup(models={m: m for m in models}, votes=tmp_path / "votes.jsonl")
    return TestClient(make_app(setup, engine, {"testserver"})), engine, setup


def read_side(client, conversation, side) -> dict:
    """The finished reply of one side, read over its stream."""
    with client.stream("GET", f"/api/chat/{conversation}/stream", params={"side": side}) as response:
        assert response.status_code == 200, response.read()
        events = sse_events(response.read().decode())
    assert events[-1][0] == "done", events
    return events[-1][1]


def test_each_side_keeps_its_own_history_and_reads_all_of_it_with_the_system_prompt(tmp_path):
    client, engine, _ = scripted_client(tmp_path)
    started = client.post("/api/chat", json={"models": ["alpha", "beta"], "prompt": "Hi", "system": "Be Bluey."})
    assert started.status_code == 200, started.text
    chat = started.json()["id"]
    assert started.json()["sides"] == ["alpha", "beta"]
    first = {side: read_side(client, chat, side)["text"] for side in ("alpha", "beta")}
    assert client.post(f"/api/chat/{chat}/turn", json={"prompt": "And then?"}).status_code == 200
    for side in ("alpha", "beta"):
        read_side(client, chat, side)
    second = {model: messages for model, messages in engine.asked[2:]}
    for model, other in (("alpha", "beta"), ("beta", "alpha")):
        assert second[model] == [{"role": "system", "content": "Be Bluey."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": first[model]}, {"role": "user", "content": "And then?"}]
        assert first[other] not in json.dumps(second[model])  # a side never reads the other model's reply
    # what the model reads: the one turn format, the system prompt folded into the first user turn
    text = render(second["alpha"], add_generation_prompt=True)
    assert text.startswith("<bos><start_of_turn>user\nBe Bluey.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert text.endswith("<start_of_turn>user\nAnd then?<end_of_turn>\n<start_of_turn>model\n")
    view = client.get(f"/api/chat/{chat}").json()
    assert view["turns"] == 2 and [m["role"] for m in view["sides"]["alpha"]["messages"]] == ["user", "assistant"] * 2
    assert view["sides"]["beta"]["model"] == "beta" and view["system"] == "Be Bluey."


def test_a_turn_waits_for_the_replies_and_regenerate_replaces_one_side(tmp_path):
    client, engine, _ = scripted_client(tmp_path)
    chat = client.post("/api/chat", json={"models": ["alpha", "beta"], "prompt": "slow please"}).json()["id"]
    early = client.post(f"/api/chat/{chat}/turn", json={"prompt": "Next"})
    assert early.status_code == 409 and "Wait until every reply is finished" in early.json()["error"]
    assert client.post(f"/api/chat/{chat}/regenerate", json={"side": "alpha"}).status_code == 409  # still writing
    assert client.post(f"/api/chat/{chat}/stop", json={}).json() == {"stopped": 2}
    stopped = read_side(client, chat, "alpha")
    assert stopped["finish_reason"] == "stopped" and len(engine.cancelled) == 2
    read_side(client, chat, "beta")
    again = client.post(f"/api/chat/{chat}/regenerate", json={"side": "alpha", "max_tokens": "9"})
    assert again.status_code == 200 and again.json()["sides"] == ["alpha"]
    assert engine.asked[-1] == ("alpha", [{"role": "user", "content": "slow please"}])  # the same question again
    client.post(f"/api/chat/{chat}/stop", json={})
    read_side(client, chat, "alpha")
    view = client.get(f"/api/chat/{chat}").json()
    assert [m["role"] for m in view["sides"]["alpha"]["messages"]] == ["user", "assistant"]  # replaced, not added
    assert client.post(f"/api/chat/{chat}/regenerate", json={"side": "gamma"}).status_code == 400
    assert client.post("/api/chat/nope/turn", json={"prompt": "Hi"}).status_code == 404
    assert client.post(f"/api/chat/{chat}/stop", content="{}").status_code == 400  # JSON only, as every POST


def test_blind_replies_name_no_model_until_the_vote_which_keeps_the_whole_conversation(tmp_path):
    engine = ScriptedEngine(stop_tokens={"alpha": "<mask>"})
    client, _, setup = scripted_client(tmp_path, engine)
    battle = client.post("/api/battle", json={"prompt": "Hi", "system": "Be kind."}).json()["id"]
    for turn in range(2):
        for side in "AB":
            done = read_side(client, battle, side)
            assert set(done) == {"text", "words", "hidden"}  # no stop token, token count or cut before the vote
        if turn == 0:
            assert client.post(f"/api/chat/{battle}/turn", json={"prompt": "Go on"}).status_code == 200
    view = client.get(f"/api/chat/{battle}").json()
    assert view["blind"] and all(side["model"] is None for side in view["sides"].values())
    assert "<mask>" not in json.dumps(view) and "alpha" not in json.dumps(view).replace("alpha answers", "")
    assert client.post(f"/api/chat/{battle}/save", json={}).status_code == 200
    listed = client.get("/api/conversations").json()["conversations"]
    assert listed[0]["id"] == battle and listed[0]["models"] is None and listed[0]["turns"] == 2
    vote = client.post("/api/vote", json={"id": battle, "choice": "B"}).json()
    after = client.get(f"/api/chat/{battle}").json()
    assert {side["model"] for side in after["sides"].values()} == {"alpha", "beta"}
    stop_tokens = {side["model"]: side["messages"][-1]["reply"]["stop_token"] for side in after["sides"].values()}
    assert stop_tokens == {"alpha": "<mask>", "beta": "<end_of_turn>"}  # the badges' data, once voted
    saved = read_votes(setup.votes)[-1]
    assert saved["model_b"] == vote["model_b"] and saved["turns"] == 2 and saved["system"] == "Be kind."
    assert saved["prompt"] == "Go on" and saved["history_a"][0] == {"role": "user", "content": "Hi"}
    assert saved["history_a"][1]["content"] != saved["history_b"][1]["content"]  # each side's own first reply
    decided = client.post(f"/api/chat/{battle}/turn", json={"prompt": "More"})
    assert decided.status_code == 409 and "key N" in decided.json()["error"]


def test_conversations_are_saved_as_whole_lines_and_reopen_where_they_left_off(tmp_path):
    client, engine, setup = scripted_client(tmp_path)
    chat = client.post("/api/chat", json={"models": ["beta"], "prompt": "slow Hi", "system": "Short answers."}).json()["id"]
    assert client.post(f"/api/chat/{chat}/save", json={}).status_code == 409  # the reply is still being written
    client.post(f"/api/chat/{chat}/stop", json={})
    read_side(client, chat, "beta")
    saved = client.post(f"/api/chat/{chat}/save", json={})
    assert saved.status_code == 200 and saved.json()["saved"] == str(tmp_path / "conversations.jsonl")
    client.post(f"/api/chat/{chat}/turn", json={"prompt": "Again"})
    read_side(client, chat, "beta")
    client.post(f"/api/chat/{chat}/save", json={})
    lines = (tmp_path / "conversations.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["id"] == chat for line in lines)  # a newer line, same id
    assert len(read_conversations(tmp_path / "conversations.jsonl")) == 1

    from starlette.testclient import TestClient

    restarted = TestClient(make_app(setup, engine, {"testserver"}))  # a new server: nothing in memory
    listed = restarted.get("/api/conversations").json()["conversations"]
    assert [(c["id"], c["turns"], c["models"], c["title"]) for c in listed] == [(chat, 2, ["beta"], "slow Hi")]
    view = restarted.post(f"/api/conversations/{chat}/open", json={}).json()
    assert view["system"] == "Short answers." and len(view["sides"]["beta"]["messages"]) == 4
    assert restarted.post(f"/api/chat/{chat}/turn", json={"prompt": "Third"}).status_code == 200
    assert [m["content"] for m in engine.asked[-1][1]][:2] == ["Short answers.", "slow Hi"] and len(engine.asked[-1][1]) == 6
    assert restarted.post("/api/conversations/feedface/open", json={}).status_code == 404


def test_a_damaged_conversations_file_is_named_and_a_cut_off_line_is_moved_aside(converted_models, tmp_path):
    votes = tmp_path / "votes.jsonl"
    saved = tmp_path / "conversations.jsonl"
    whole = json.dumps({"id": "a1", "sides": {"m": {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}}})
    saved.write_text(whole + "\n" + whole[:25])
    messages = []
    arena_setup([str(converted_models["pt"])], votes=votes, progress=messages.append)
    assert saved.read_text() == whole + "\n" and "kept the 1 whole conversation(s)" in messages[0]
    saved.write_text(whole + "\n[1, 2]\n")
    result = CliRunner().invoke(cli, ["arena", str(converted_models["pt"]), "--votes", str(votes)])
    assert result.exit_code == 1 and f"{saved}:2: not a saved conversation" in result.output
    assert "Traceback" not in result.output and saved.read_text() == whole + "\n[1, 2]\n"  # left as it was


def test_stop_takes_the_row_out_of_the_real_engines_batch(converted_models, monkeypatch):
    """The page's Stop reaches the engine: the reply ends "stopped" with what it had, the row leaves the
    model's BatchGenerator (no more decoding for it), and the engine serves the next request."""
    from gemma_mlx.config import GenerationSettings
    from gemma_mlx.serving import engine as engine_module

    removed = []
    real_new_generator = engine_module.new_generator

    def watched(loaded, *args):
        generator = real_new_generator(loaded, *args)
        real_remove = generator.remove
        generator.remove = lambda uids, **kw: (removed.extend(uids), real_remove(uids, **kw))[1]
        return generator

    monkeypatch.setattr(engine_module, "new_generator", watched)
    engine = engine_module.Engine({"pt": str(converted_models["pt"])})
    try:
        events, first_text, ended = [], threading.Event(), threading.Event()

        def hear(kind, payload):
            events.append((kind, payload))
            if kind == "text":
                first_text.set()
            else:
                ended.set()

        long = GenerationSettings(max_tokens=20000, temperature=1.0, min_new_tokens=20000)
        handle = engine.submit("pt", [{"role": "user", "content": "Tell me a long story"}], long, hear)
        assert first_text.wait(60) and engine.decoding() == 1
        engine.cancel(handle)
        assert ended.wait(30)
        kind, reply = events[-1]
        assert kind == "done" and reply.finish_reason == "stopped" and 0 < reply.tokens < 20000
        assert "".join(p for k, p in events if k == "text").strip() == reply.text
        assert len(removed) == 1 and engine.decoding() == 0
        engine.cancel(handle)  # a second Stop, after the end: nothing happens
        short = []
        engine.submit("pt", [{"role": "user", "content": "Hi"}], GenerationSettings(max_tokens=3), lambda k, p: short.append(k))
        deadline = time.time() + 60
        while "done" not in short:
            assert time.time() < deadline, short
            time.sleep(0.05)
    finally:
        engine.close()


@pytest.mark.parametrize("body", [{"prompt": "x" * 4001}, {"prompt": "Hi", "system": "s" * 4001}])
def test_long_messages_are_refused_with_the_limit(tmp_path, body):
    client, engine, _ = scripted_client(tmp_path)
    refused = client.post("/api/chat", json=body)
    assert refused.status_code == 400 and "at most 4000" in refused.json()["error"] and engine.asked == []


def test_a_save_that_fails_adds_nothing_and_can_be_sent_again(tmp_path, monkeypatch):
    import errno
    import os

    from gemma_mlx.serving import journal

    client, _, setup = scripted_client(tmp_path)
    chat = client.post("/api/chat", json={"models": ["alpha"], "prompt": "Hi"}).json()["id"]
    read_side(client, chat, "alpha")
    assert client.post(f"/api/chat/{chat}/save", json={}).status_code == 200
    before = setup.conversations.read_bytes()
    real_write, calls = os.write, []

    def half_then_full(descriptor, data):  # os.write is the process's: only the conversations file fails
        if os.fstat(descriptor).st_ino != setup.conversations.stat().st_ino:
            return real_write(descriptor, data)
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(descriptor, data[:len(data) // 2])  # a short write ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(journal.os, "write", half_then_full)
    failed = client.post(f"/api/chat/{chat}/save", json={})
    assert failed.status_code == 507 and "could not be saved" in failed.json()["error"]
    assert setup.conversations.read_bytes() == before  # the half line was cut back off
    monkeypatch.setattr(journal.os, "write", real_write)
    assert client.post(f"/api/chat/{chat}/save", json={}).status_code == 200
    assert len(setup.conversations.read_text().splitlines()) == 2


def test_a_battle_saved_before_its_vote_cannot_be_voted_again_after_reopening(tmp_path):
    """The page saves after the vote; if that save never happens, reopening the earlier copy must not
    make the battle votable again (one battle, one vote), in this server or after a restart."""
    from starlette.testclient import TestClient

    client, engine, setup = scripted_client(tmp_path)
    battle = client.post("/api/battle", json={"prompt": "Hi"}).json()["id"]
    for side in ("A", "B"):
        with client.stream("GET", f"/api/battle/{battle}/stream", params={"side": side}) as response:
            response.read()
    assert client.post(f"/api/chat/{battle}/save", json={}).status_code == 200  # saved before the vote
    assert client.post("/api/vote", json={"id": battle, "choice": "A"}).status_code == 200
    reopened = client.post(f"/api/conversations/{battle}/open", json={})
    assert reopened.status_code == 200 and reopened.json()["choice"] == "A"
    assert client.post("/api/vote", json={"id": battle, "choice": "B"}).status_code == 409
    restarted = TestClient(make_app(setup, engine, {"testserver"}))  # the vote is read back from votes.jsonl
    assert restarted.post(f"/api/conversations/{battle}/open", json={}).json()["choice"] == "A"
    assert restarted.post("/api/vote", json={"id": battle, "choice": "tie"}).status_code == 409
    assert [v["choice"] for v in read_votes(setup.votes)] == ["A"]


def test_a_failed_blind_reply_does_not_name_its_model(tmp_path):
    class Refusing(ScriptedEngine):
        def _write(self, model, text, reason, slow, handle, on_event):
            on_event("error", f"max_tokens 9999 plus a prompt of 13 tokens is more than {model} can read.")

    client, _, _ = scripted_client(tmp_path, Refusing(), models=("secret-alpha", "secret-beta"))
    battle = client.post("/api/battle", json={"prompt": "Hi"}).json()["id"]
    for side in ("A", "B"):
        with client.stream("GET", f"/api/battle/{battle}/stream", params={"side": side}) as response:
            text = response.read().decode()
        assert "more than this side's model can read" in text and "secret" not in text
    again = client.post(f"/api/chat/{battle}/turn", json={"prompt": "More"})
    assert again.status_code == 409 and "secret" not in again.text


@pytest.mark.parametrize("path, body", [
    ("/api/chat", {"prompt": "hi", "models": [["x"]]}),
    ("/api/chat", {"prompt": "hi", "models": [{"a": 1}]}),
    ("/api/battle", {"prompt": ["hi"]}),
    ("/api/battle", {"prompt": 123}),
    ("/api/battle", {"prompt": "hi", "system": ["x"]}),
])
def test_wrong_typed_fields_are_a_400_not_a_500_or_a_stringified_value(tmp_path, path, body):
    client, engine, _ = scripted_client(tmp_path)
    response = client.post(path, json=body)
    assert response.status_code in (400, 404) and "error" in response.json(), response.text
    assert not engine.asked  # nothing was asked of a model


def test_a_regenerate_side_that_is_not_a_string_and_a_deeply_nested_body_are_a_400(tmp_path):
    client, _, _ = scripted_client(tmp_path)
    chat = client.post("/api/chat", json={"models": ["alpha"], "prompt": "Hi"}).json()["id"]
    read_side(client, chat, "alpha")
    for side in (["x"], {"a": 1}):
        response = client.post(f"/api/chat/{chat}/regenerate", json={"side": side})
        assert response.status_code == 400 and "side must be" in response.json()["error"]
    deep = client.post("/api/vote", content="[" * 100000 + "]" * 100000, headers={"content-type": "application/json"})
    assert deep.status_code == 400
