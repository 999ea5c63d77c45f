"""`gemma-mlx arena --on-topic-model` through the arena's API: every reply's "done" carries on_topic (ontopic's
rule), the replies of one turn (both sides, every best-of candidate) are scored in one call once all have
ended, a blind battle shows the flag (it is about the text) and nothing that names a model, and a scoring
model that does not load leaves the replies without the badge."""

import json
import threading
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import gemma_mlx.scoring.ontopic as ontopic
from gemma_mlx.arena import ArenaSetup, make_app
from gemma_mlx.cli import cli
from gemma_mlx.scoring.ontopic import ON_TOPIC_THRESHOLD, is_on_topic, on_topic_scores

from .test_arena_best_of import LOOP, PERSONA, SHORT, SeededEngine, side_events

OTHER = "My dad says the best forts have a secret door, a flag and a lookout for the grannies."  # 18 words
HIGH, LOW = ON_TOPIC_THRESHOLD + 0.5, ON_TOPIC_THRESHOLD - 0.5


class SidedEngine(SeededEngine):
    """SeededEngine whose script follows the model too: scripts[(model, seed)] = (text, finish_reason)."""

    def script(self, model, last, settings):
        return self.scripts[(model, settings.seed)]


def served(**extra):
    return SimpleNamespace(manifest={"stage": "convert"}, adapter_dir=None, model="weights", tokenizer="tokenizer",
                           **extra)


@pytest.fixture
def scored(monkeypatch):
    """ontopic.on_topic_scores, replaced: records each call's pairs, scores PERSONA and OTHER high, the rest low."""
    calls = []

    def fake(model, tokenizer, pairs):
        calls.append((model, pairs))
        return [HIGH if reply in (PERSONA, OTHER) else LOW for _, reply in pairs]

    monkeypatch.setattr(ontopic, "on_topic_scores", fake)
    return calls


def client_for(tmp_path, engine, on_topic_model="alpha", best_of=1, progress=None):
    from starlette.testclient import TestClient

    setup = ArenaSetup(models={"alpha": "alpha", "beta": "beta"}, votes=tmp_path / "votes.jsonl", best_of=best_of,
                       on_topic_model=on_topic_model)
    return TestClient(make_app(setup, engine, {"testserver"}, progress=progress or (lambda _: None)))


def test_side_by_side_streams_and_scores_both_sides_in_one_call(tmp_path, scored):
    engine = SidedEngine({("alpha", 0): (PERSONA, "stop"), ("beta", 0): (SHORT, "stop")},
                         models={"alpha": served(), "beta": served()})
    client = client_for(tmp_path, engine)
    assert client.get("/api/models").json()["on_topic"] is True
    chat = client.post("/api/chat", json={"models": ["alpha", "beta"], "prompt": "What makes a good fort?"}).json()["id"]
    alpha, beta = side_events(client, chat, "alpha"), side_events(client, chat, "beta")
    assert sum(kind == "text" for kind, _ in alpha) > 1  # one candidate: streamed as written, not sent whole
    assert alpha[-1][1]["on_topic"] is True and beta[-1][1]["on_topic"] is False
    assert "best_of" not in alpha[-1][1]
    # one scoring call with both sides' replies, by the served model given as the on-topic model (not loaded again)
    assert len(scored) == 1 and scored[0][0] == "weights"
    assert sorted(scored[0][1]) == [("What makes a good fort?", PERSONA), ("What makes a good fort?", SHORT)]
    view = client.get(f"/api/chat/{chat}").json()
    assert view["sides"]["alpha"]["messages"][-1]["reply"]["on_topic"] is True


def test_a_blind_battle_shows_the_badge_and_nothing_that_names_a_model(tmp_path, scored):
    engine = SidedEngine({("alpha", 0): (PERSONA, "stop"), ("beta", 0): (LOOP, "length")},
                         models={"alpha": served(), "beta": served()})
    client = client_for(tmp_path, engine)
    battle = client.post("/api/battle", json={"prompt": "What makes a good fort?"}).json()
    flags = {}
    for side in ("A", "B"):
        done = side_events(client, battle["id"], side)[-1][1]
        assert set(done) == {"text", "words", "hidden", "on_topic"}  # no stop token, tokens or cut before the vote
        flags[side] = done["on_topic"]
    assert sorted(flags.values()) == [False, True]  # the loop scores low: off topic
    view = client.get(f"/api/chat/{battle['id']}").json()
    for side in ("A", "B"):
        reply = view["sides"][side]["messages"][-1]["reply"]
        assert reply == {"words": reply["words"], "hidden": True, "on_topic": flags[side]}
    assert "alpha" not in json.dumps(view) and "beta" not in json.dumps(view) and "cut" not in json.dumps(view)
    assert client.post("/api/vote", json={"id": battle["id"], "choice": "A"}).status_code == 200
    vote = json.loads((tmp_path / "votes.jsonl").read_text().splitlines()[-1])
    assert vote["reply_a"]["on_topic"] == flags["A"] and vote["reply_b"]["on_topic"] == flags["B"]
    shown = client.get(f"/api/chat/{battle['id']}").json()["sides"]["A"]["messages"][-1]["reply"]
    assert "finish_reason" in shown and shown["on_topic"] == flags["A"]


def test_best_of_scores_every_candidate_of_both_sides_at_once(tmp_path, scored):
    # both candidates end cleanly at the persona's length; only the on-topic score tells them apart
    scripts = {("alpha", 0): (SHORT + " " + "word " * 18 + "end.", "stop"), ("alpha", 1): (PERSONA, "stop"),
               ("beta", 0): (OTHER, "stop"), ("beta", 1): (SHORT, "stop")}
    engine = SidedEngine(scripts, models={"alpha": served(), "beta": served()})
    client = client_for(tmp_path, engine, best_of=2)
    chat = client.post("/api/chat", json={"models": ["alpha", "beta"], "prompt": "Hi"}).json()["id"]
    alpha, beta = side_events(client, chat, "alpha")[-1][1], side_events(client, chat, "beta")[-1][1]
    assert len(scored) == 1 and len(scored[0][1]) == 4  # 2 sides x 2 candidates, one call
    assert alpha["text"] == PERSONA and alpha["best_of"] == {"n": 2, "kept": 1} and alpha["on_topic"] is True
    assert beta["text"] == OTHER and beta["on_topic"] is True


def test_the_scoring_model_loads_on_first_use_and_scores_for_real(tmp_path, converted_models):
    """An on-topic model the arena does not serve is loaded once, by the thread that scores; the flag is
    ontopic's rule on the score the tiny base gives."""
    engine = SidedEngine({("alpha", 0): (PERSONA, "stop"), ("beta", 0): (OTHER, "stop")},
                         models={"alpha": served(), "beta": served()})
    said = []
    client = client_for(tmp_path, engine, on_topic_model=str(converted_models["pt"]), progress=said.append)
    from gemma_mlx.models import load_model

    loaded = load_model(converted_models["pt"])
    for prompt in ("What makes a good fort?", "Tell me about your dad"):
        chat = client.post("/api/chat", json={"models": ["alpha", "beta"], "prompt": prompt}).json()["id"]
        flags = {side: side_events(client, chat, side)[-1][1]["on_topic"] for side in ("alpha", "beta")}
        scores = on_topic_scores(loaded.model, loaded.tokenizer, [(prompt, PERSONA), (prompt, OTHER)])
        assert flags == {"alpha": is_on_topic(scores[0], prompt, PERSONA), "beta": is_on_topic(scores[1], prompt, OTHER)}
    assert sum("to score whether replies answer the message" in line for line in said) == 1  # loaded once


def test_a_scoring_model_that_does_not_load_leaves_the_badge_off(tmp_path, monkeypatch):
    def broken(spec):
        raise OSError("no such model")

    monkeypatch.setattr("gemma_mlx.models.load_model", broken)
    engine = SidedEngine({("alpha", 0): (PERSONA, "stop"), ("beta", 0): (OTHER, "stop")},
                         models={"alpha": served(), "beta": served()})
    said = []
    client = client_for(tmp_path, engine, on_topic_model="elsewhere", progress=said.append)
    for _ in range(2):
        chat = client.post("/api/chat", json={"models": ["alpha", "beta"], "prompt": "Hi"}).json()["id"]
        done = side_events(client, chat, "alpha")[-1][1]
        assert done["text"] == PERSONA and "on_topic" not in done
    failures = [line for line in said if "on-topic scoring failed" in line]
    assert len(failures) == 1 and "no such model" in failures[0]  # said once
    assert sum("loading elsewhere" in line for line in said) == 1  # tried once, not at every turn


def test_cli_arena_on_topic_model(tmp_path, converted_models, monkeypatch):
    seen = {}

    def serve(setup, **kwargs):
        seen["on_topic_model"] = setup.on_topic_model

    monkeypatch.setattr("gemma_mlx.arena.serve_arena", serve)
    base = str(converted_models["pt"])
    result = CliRunner().invoke(cli, ["arena", base, "--votes", str(tmp_path / "v.jsonl"), "--on-topic-model", base])
    assert result.exit_code == 0, result.output
    assert seen == {"on_topic_model": base} and "on-topic badge" in result.output
    missing = CliRunner().invoke(cli, ["arena", base, "--votes", str(tmp_path / "v.jsonl"),
                                       "--on-topic-model", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "nowhere" in missing.output and "Traceback" not in missing.output
    assert seen == {"on_topic_model": base}  # refused before serving


def test_scoring_runs_in_the_thread_that_ends_the_turn_even_when_replies_end_at_once():
    """MLX belongs to the engine thread: a turn whose replies all end before submit_turn returns is still
    scored there (by the last reply's "done"), never in the request's thread."""
    import queue

    from gemma_mlx.config import GenerationSettings
    from gemma_mlx.serving.best_of import BestOfEngine

    class InstantEngine:
        """Each reply ends in the engine thread before submit returns."""

        def __init__(self):
            self.jobs = queue.Queue()
            self.thread = threading.Thread(target=self._main, name="engine", daemon=True)
            self.thread.start()

        def _main(self):
            while True:
                on_event, ended = self.jobs.get()
                on_event("done", SimpleNamespace(text=PERSONA, tokens=20, finish_reason="stop", seconds=0.0,
                                                 stop_token="<end_of_turn>"))
                ended.set()

        def submit(self, model, messages, settings, on_event):
            ended = threading.Event()
            self.jobs.put((on_event, ended))
            ended.wait()
            return 1

    threads, heard = [], []

    def scorer(pairs):
        threads.append((threading.current_thread().name, len(pairs)))
        return [HIGH] * len(pairs)

    engine = BestOfEngine(InstantEngine(), 1, scorer)
    messages = [{"role": "user", "content": "Hi"}]
    engine.submit_turn([("alpha", messages, GenerationSettings(), lambda kind, reply: heard.append(reply)),
                        ("beta", messages, GenerationSettings(), lambda kind, reply: heard.append(reply))])
    assert threads == [("engine", 2)] and [reply.on_topic for reply in heard] == [True, True]


def test_the_real_engine_scores_in_its_own_thread(tmp_path, converted_models, monkeypatch):
    """The arena's engine over the tiny -it model, the un-served tiny -pt base as the on-topic model: the base
    is loaded and run in the engine thread, and the badge is ontopic's rule on its score."""
    from starlette.testclient import TestClient

    from gemma_mlx.arena import arena_setup
    from gemma_mlx.models import load_model
    from gemma_mlx.serving.engine import Engine

    real, threads = ontopic.on_topic_scores, []

    def watched(model, tokenizer, pairs):
        threads.append(threading.current_thread().name)
        return real(model, tokenizer, pairs)

    monkeypatch.setattr(ontopic, "on_topic_scores", watched)
    setup = arena_setup([str(converted_models["it"])], votes=tmp_path / "votes.jsonl")
    setup.on_topic_model = str(converted_models["pt"])
    (name,) = setup.models
    engine = Engine(setup.models)
    try:
        client = TestClient(make_app(setup, engine, {"testserver"}))
        chat = client.post("/api/chat", json={"models": [name], "prompt": "Tell me a story",
                                              "max_tokens": 6}).json()
        assert "id" in chat, chat
        done = side_events(client, chat["id"], name)[-1][1]
    finally:
        engine.close()
    assert threads == ["gemma-mlx-engine"]
    base = load_model(converted_models["pt"])
    (score,) = real(base.model, base.tokenizer, [("Tell me a story", done["text"])])
    assert done["on_topic"] == is_on_topic(score, "Tell me a story", done["text"])
