"""`gemma-mlx arena --best-of N` through the arena's API: every side's reply is the best of N engine replies,
the candidates are not streamed, Stop ends all of them, and a blind battle shows nothing of the choice."""

import json
from types import SimpleNamespace

from click.testing import CliRunner

from gemma_mlx.arena import ArenaSetup, make_app
from gemma_mlx.cli import cli
from gemma_mlx.serving.engine import EngineBusy

from .test_arena_chat import ScriptedEngine
from .test_arena_safety import sse_events

LOOP = "a big house with " * 8
SHORT = "Yes."
PERSONA = "I reckon we should build a fort out of the couch cushions and then play in it all day long."  # 20 words


class SeededEngine(ScriptedEngine):
    """ScriptedEngine whose candidate's text follows its seed: scripts[seed] = (text, finish_reason); `asked`
    keeps (model, settings). busy_after: refuse the submit after that many."""

    def __init__(self, scripts, busy_after=None, models=None):
        super().__init__()
        self.scripts, self.busy_after = scripts, busy_after
        self.models = models or {}

    def submit(self, model, messages, settings, on_event):
        if self.busy_after is not None and len(self.asked) >= self.busy_after:
            raise EngineBusy("The arena is writing 64 replies already; try again when one has finished.")
        return super().submit(model, messages, settings, on_event)

    def record(self, model, messages, settings):
        return model, settings

    def script(self, model, last, settings):
        return self.scripts[settings.seed]


def client_for(tmp_path, engine, best_of=3, models=("alpha", "beta")):
    from starlette.testclient import TestClient

    setup = ArenaSetup(models={m: m for m in models}, votes=tmp_path / "votes.jsonl", best_of=best_of)
    return TestClient(make_app(setup, engine, {"testserver"}))


def side_events(client, chat, side):
    with client.stream("GET", f"/api/chat/{chat}/stream", params={"side": side}) as response:
        assert response.status_code == 200, response.read()
        return sse_events(response.read().decode())


def test_each_side_keeps_the_clean_reply_and_streams_only_that_one(tmp_path):
    engine = SeededEngine({0: (LOOP, "stop"), 1: (PERSONA + " and on", "length"), 2: (PERSONA, "stop")})
    client = client_for(tmp_path, engine)
    assert client.get("/api/models").json()["best_of"] == 3
    started = client.post("/api/chat", json={"models": ["alpha", "beta"], "prompt": "Let's play!"})
    assert started.status_code == 200, started.text
    chat = started.json()["id"]
    for side in ("alpha", "beta"):
        events = side_events(client, chat, side)
        texts = "".join(data["text"] for kind, data in events if kind == "text")
        assert texts == PERSONA  # neither the loop nor the cut candidate reached the page
        done = events[-1][1]
        assert events[-1][0] == "done" and done["text"] == PERSONA and done["best_of"] == {"n": 3, "kept": 2}
        assert done["finish_reason"] == "stop" and not done["loop"]
    # three rows per side: the first with the settings as given (greedy), the others sampled with seeds 1, 2
    for model in ("alpha", "beta"):
        rows = [s for m, s in engine.asked if m == model]
        assert [(s.temperature, s.seed) for s in rows] == [(0.0, 0), (0.7, 1), (0.7, 2)]
    view = client.get(f"/api/chat/{chat}").json()
    assert view["sides"]["alpha"]["messages"][-1]["content"] == PERSONA
    assert view["sides"]["alpha"]["messages"][-1]["reply"]["best_of"]["n"] == 3


def test_the_persona_length_from_the_training_run_decides_between_clean_replies(tmp_path):
    fused = SimpleNamespace(manifest={"stage": "fuse", "train_manifest": {"summary": {"train_reply_words": 20}}},
                            adapter_dir=None)
    base = SimpleNamespace(manifest={"stage": "convert"}, adapter_dir=None)
    engine = SeededEngine({0: (SHORT, "stop"), 1: (PERSONA, "stop")}, models={"alpha": fused, "beta": base})
    client = client_for(tmp_path, engine, best_of=2)
    chat = client.post("/api/chat", json={"models": ["alpha", "beta"], "prompt": "Hi"}).json()["id"]
    assert side_events(client, chat, "alpha")[-1][1]["text"] == PERSONA  # nearest the persona's 20 words
    assert side_events(client, chat, "beta")[-1][1]["text"] == SHORT  # no persona length: the first clean one


def test_a_blind_battle_shows_nothing_of_the_choice_before_the_vote(tmp_path):
    engine = SeededEngine({0: (LOOP, "stop"), 1: (PERSONA, "stop"), 2: (SHORT, "stop")})
    client = client_for(tmp_path, engine)
    battle = client.post("/api/battle", json={"prompt": "Hi"}).json()
    for side in ("A", "B"):
        events = side_events(client, battle["id"], side)
        assert events[-1][1] == {"text": PERSONA, "words": 20, "hidden": True}
        assert all(set(data) == {"text"} for kind, data in events[:-1])
    view = client.get(f"/api/chat/{battle['id']}").json()
    assert "best_of" not in json.dumps(view) and "alpha" not in json.dumps(view) and "beta" not in json.dumps(view)
    assert client.post("/api/vote", json={"id": battle["id"], "choice": "A"}).status_code == 200
    shown = client.get(f"/api/chat/{battle['id']}").json()
    assert shown["sides"]["A"]["messages"][-1]["reply"]["best_of"] == {"n": 3, "kept": 1}
    vote = json.loads((tmp_path / "votes.jsonl").read_text().splitlines()[-1])
    assert vote["reply_a"]["text"] == PERSONA and vote["reply_a"]["best_of"]["n"] == 3


def test_stop_ends_every_candidate_and_keeps_what_was_written(tmp_path):
    engine = SeededEngine({0: ("", "stop"), 1: ("", "stop")})
    client = client_for(tmp_path, engine, best_of=2)
    chat = client.post("/api/chat", json={"models": ["alpha"], "prompt": "slow please"}).json()["id"]
    assert client.post(f"/api/chat/{chat}/stop", json={}).json() == {"stopped": 1}
    done = side_events(client, chat, "alpha")[-1][1]
    assert sorted(engine.cancelled) == [1, 2]  # both candidate rows left the engine
    assert done["finish_reason"] == "stopped" and done["best_of"]["n"] == 2


def test_a_refused_candidate_cancels_the_others_and_the_conversation_is_as_it_was(tmp_path):
    engine = SeededEngine({0: (PERSONA, "stop"), 1: (PERSONA, "stop"), 2: (PERSONA, "stop")}, busy_after=4)
    client = client_for(tmp_path, engine)
    chat = client.post("/api/chat", json={"models": ["alpha"], "prompt": "Hi"}).json()["id"]
    side_events(client, chat, "alpha")
    refused = client.post(f"/api/chat/{chat}/turn", json={"prompt": "And then?"})
    assert refused.status_code == 503 and "try again" in refused.json()["error"]
    assert engine.cancelled == [4]  # the one candidate of the refused turn that had started
    view = client.get(f"/api/chat/{chat}").json()
    assert [m["role"] for m in view["sides"]["alpha"]["messages"]] == ["user", "assistant"]


def test_cli_arena_best_of_reaches_the_setup(tmp_path, converted_models, monkeypatch):
    seen = {}

    def serve(setup, **kwargs):
        seen["best_of"] = setup.best_of

    monkeypatch.setattr("gemma_mlx.arena.serve_arena", serve)
    result = CliRunner().invoke(cli, ["arena", str(converted_models["pt"]), "--votes", str(tmp_path / "v.jsonl"),
                                      "--best-of", "4"])
    assert result.exit_code == 0, result.output
    assert seen == {"best_of": 4} and "best of 4 samples" in result.output
    bad = CliRunner().invoke(cli, ["arena", str(converted_models["pt"]), "--best-of", "17"])
    assert bad.exit_code == 2 and "17 is not in the range 1<=x<=16" in bad.output
