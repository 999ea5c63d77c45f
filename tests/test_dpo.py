"""DPO (`gemma-mlx train --preferences`): the loss against numpy, pairs from the arena, the margin rises."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_map

from gemma_mlx import models
from gemma_mlx.cli import cli
from gemma_mlx.config import LoraSettings, TrainSettings
from gemma_mlx.errors import DataError
from gemma_mlx.train import train_model
from gemma_mlx.training import dpo, trainee as tuning
from gemma_mlx.training.pairs import Pair, load_pair_splits, read_pairs

from .test_train import write_chat_data

LORA = LoraSettings(num_layers=2, rank=4)
PROMPTS = ["What should we play today?", "Tell me about your sister.", "What is for lunch?",
           "Where do you go after school?", "Who is your best friend?", "What scares you?"]


def pair_logps(lm, tokenizer, pairs) -> np.ndarray:
    """[P, 2] summed log-probs of the chosen and rejected replies under a loaded model."""
    _, sequences = dpo.tokenize_pairs(tokenizer, pairs, 512, print)
    batch = dpo.make_pair_batch(sequences, list(range(len(pairs))))
    trainee = tuning.Trainee(lm)
    arrays = (mx.array(batch.rows.inputs), mx.array(batch.rows.positions), mx.array(batch.rows.targets),
              mx.array(batch.segments))
    return np.array(dpo.sequence_logps(trainee, *arrays, gradient=False)).reshape(-1, 2)


def numpy_logp(lm, ids: list[int], trained: list[bool]) -> float:
    """log p of the trained tokens from the model's full logits, in float64 numpy."""
    logits = np.array(lm(mx.array([ids[:-1]]))[0].astype(mx.float32), dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return sum(logprobs[j - 1, ids[j]] for j in range(1, len(ids)) if trained[j])


def test_the_loss_matches_a_numpy_reference_dpo_loss(converted_models):
    lm, tokenizer = models.load(converted_models["it"])
    trainee = tuning.prepare(lm, LORA, False)
    mx.random.seed(3)  # move the LoRA weights off zero, so the policy differs from the reference
    trainee.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), trainee.trainable_parameters()))
    pairs = [Pair([{"role": "user", "content": "Hi there"}], "Hello friend, let's play!", "Go away now.", "t:1"),
             Pair([{"role": "user", "content": "What is for tea?"}], "Sausages!", "I do not know what tea is.", "t:2")]
    _, sequences = dpo.tokenize_pairs(tokenizer, pairs, 512, print)
    batch = dpo.make_pair_batch(sequences, [0, 1])
    reference = np.array([[-40.0, -35.5], [-20.25, -52.0]], dtype=np.float32)
    beta = 0.3
    arrays = (mx.array(batch.rows.inputs), mx.array(batch.rows.positions), mx.array(batch.rows.targets),
              mx.array(batch.segments), mx.array(reference))
    loss, count = dpo.dpo_loss(trainee, *arrays, beta=beta)

    policy = np.array([numpy_logp(trainee.lm, s.ids, s.trained) for s in sequences]).reshape(2, 2)
    margins = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    expected = np.mean(-np.log(1.0 / (1.0 + np.exp(-margins))))
    assert count.item() == 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # with the chosen replies' own loss added: their mean per-token negative log-prob, weighted
    chosen_tokens = np.array([sum(1 for j in range(1, len(s.ids)) if s.trained[j]) for s in sequences[0::2]])
    with_nll, _ = dpo.dpo_loss(trainee, *arrays, beta=beta, chosen_weight=0.5)
    assert with_nll.item() == pytest.approx(expected + 0.5 * np.mean(-policy[:, 0] / chosen_tokens), rel=1e-4)
    # the per-token reward: each reply's log-ratio over its own trained tokens
    tokens = np.array([sum(1 for j in range(1, len(s.ids)) if s.trained[j]) for s in sequences]).reshape(2, 2)
    assert tokens[:, 0].tolist() != tokens[:, 1].tolist()  # replies of different lengths, so the two rewards differ
    per_token_margins = beta * ((policy - reference) / tokens) @ np.array([1.0, -1.0])
    per_token, _ = dpo.dpo_loss(trainee, *arrays, beta=beta, per_token=True)
    assert per_token.item() == pytest.approx(np.mean(np.logaddexp(0, -per_token_margins)), rel=1e-4)
    assert per_token.item() != pytest.approx(expected, rel=1e-2)
    # the reference is the same network with the new adapters off: the model before prepare()
    with dpo.adapters_off(trainee):
        off = [numpy_logp(trainee.lm, s.ids, s.trained) for s in sequences]
    plain, _ = models.load(converted_models["it"])
    assert off == pytest.approx([numpy_logp(plain, s.ids, s.trained) for s in sequences], rel=1e-4)
    assert off != pytest.approx(policy.reshape(-1).tolist(), rel=1e-4)


def numpy_orpo(policy: np.ndarray, tokens: np.ndarray, beta: float) -> float:
    """ORPO's loss from summed log-probs and token counts [P, 2], in float64 numpy."""
    mean = policy / tokens
    log_odds = mean - np.log1p(-np.exp(mean))
    ratios = log_odds[:, 0] - log_odds[:, 1]
    return float(np.mean(-mean[:, 0] + beta * np.logaddexp(0, -ratios)))


def test_the_orpo_loss_matches_a_numpy_reference_and_needs_no_reference_model(converted_models):
    lm, tokenizer = models.load(converted_models["it"])
    trainee = tuning.prepare(lm, LORA, False)
    pairs = [Pair([{"role": "user", "content": "Hi there"}], "Hello friend, let's play!", "Go away now.", "t:1"),
             Pair([{"role": "user", "content": "What is for tea?"}], "Sausages!", "I do not know what tea is.", "t:2")]
    _, sequences = dpo.tokenize_pairs(tokenizer, pairs, 512, print)
    batch = dpo.make_pair_batch(sequences, [0, 1])
    arrays = [mx.array(batch.rows.inputs), mx.array(batch.rows.positions), mx.array(batch.rows.targets),
              mx.array(batch.segments)]
    policy = np.array([numpy_logp(trainee.lm, s.ids, s.trained) for s in sequences]).reshape(2, 2)
    tokens = np.array([sum(1 for j in range(1, len(s.ids)) if s.trained[j]) for s in sequences]).reshape(2, 2)
    for beta in (0.1, 1.0):
        for reference in (np.zeros((2, 2)), np.full((2, 2), -99.0)):  # ORPO never reads a reference
            loss, count = dpo.dpo_loss(trainee, *arrays, mx.array(reference, dtype=mx.float32), beta=beta, orpo=True,
                                       chosen_weight=5.0, per_token=False)  # neither applies to ORPO
            assert count.item() == 2 and loss.item() == pytest.approx(numpy_orpo(policy, tokens, beta), rel=1e-4)
    assert numpy_orpo(policy, tokens, 1.0) != pytest.approx(numpy_orpo(policy, tokens, 0.1), rel=1e-2)


def test_pairs_come_in_every_shape_and_a_bad_one_names_its_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},  # the arena's export
        {"prompt": [{"role": "system", "content": "Be Bluey."}, {"role": "user", "content": "Play?"}],  # TRL messages
         "chosen": [{"role": "assistant", "content": "Yes!"}], "rejected": [{"role": "assistant", "content": "No."}]},
        {"model_a": "x", "model_b": "y", "choice": "B", "prompt": "Tea?",  # a vote
         "reply_a": {"text": "No tea."}, "reply_b": {"text": "Tea party!"}},
        {"model_a": "x", "model_b": "y", "choice": "tie", "prompt": "Eh?", "reply_a": {"text": "a"}, "reply_b": {"text": "b"}},
        {"prompt": "Same?", "chosen": "Same.", "rejected": "Same."},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    same = []
    pairs = read_pairs(path, same)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Hi", "Hello!", "Go away."), ("Play?", "Yes!", "No."), ("Tea?", "Tea party!", "No tea.")]
    assert pairs[1].messages[0]["role"] == "system" and same == [f"{path}:5"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"prompt": "Hi", "chosen": "Hello!"}) + "\n")
    with pytest.raises(DataError, match=f"{bad}:2: .*'rejected' missing"):
        read_pairs(bad)
    bad.write_text(json.dumps({"prompt": "Hi", "chosen": 7, "rejected": "x"}) + "\n")
    with pytest.raises(DataError, match=f"{bad}:1: \"chosen\" must be the reply's text"):
        read_pairs(bad)

    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": "Yes!", "rejected": "No."}) + "\n"
                            for i in range(40)))
    train, valid = load_pair_splits(many)
    assert valid and len(train) + len(valid) == 40
    assert not {p.prompt for p in train} & {p.prompt for p in valid}


def test_a_bad_pair_stops_train_with_file_and_line(converted_models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "chosen": "Hello!", "rejected": "Bye."}\n{"prompt": "Hi"\n')
    result = CliRunner().invoke(cli, ["train", "--model", str(converted_models["it"]), "--preferences", str(bad),
                                      "--out", str(tmp_path / "dpo")])
    assert result.exit_code == 1 and f"{bad}:2: not valid JSON" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "dpo").exists()


@pytest.fixture(scope="module")
def persona(converted_models, tmp_path_factory):
    """A short supervised run on the tiny -pt model (turn-token rows included): the persona DPO starts from."""
    root = tmp_path_factory.mktemp("persona")
    data = write_chat_data(root / "chat.jsonl", count=12)
    out = root / "sft"
    train_model(converted_models["pt"], data, out=out, lora=LORA,
                train=TrainSettings(epochs=1, learning_rate=2e-3, val_generation_tokens=0))
    return out


def test_votes_cast_in_the_arena_train_a_model_whose_margin_rises(converted_models, persona, tmp_path):
    from starlette.testclient import TestClient

    from gemma_mlx.arena import arena_setup, make_app
    from gemma_mlx.serving.engine import Engine

    base = converted_models["pt"]
    setup = arena_setup([f"{base}::{persona}", str(base)], votes=tmp_path / "votes.jsonl")
    engine = Engine(setup.models)
    try:
        client = TestClient(make_app(setup, engine, {"testserver"}))
        for number, prompt in enumerate(PROMPTS):
            battle = client.post("/api/battle", json={"prompt": prompt, "max_tokens": "8"}).json()
            for side in "AB":
                with client.stream("GET", f"/api/battle/{battle['id']}/stream", params={"side": side}) as response:
                    assert "event: done" in response.read().decode()
            assert client.post("/api/vote", json={"id": battle["id"], "choice": "AB"[number % 2]}).status_code == 200
    finally:
        engine.close()
    exported = tmp_path / "prefs.jsonl"
    result = CliRunner().invoke(cli, ["arena", *setup.models.values(), "--votes", str(setup.votes),
                                      "--export-preferences", str(exported)])
    assert result.exit_code == 0, result.output
    pairs = read_pairs(exported)
    assert len(pairs) >= 4  # two models can give the same reply to a prompt; those pairs teach nothing

    out = tmp_path / "dpo"
    result = CliRunner().invoke(cli, ["train", "--model", str(persona), "--preferences", str(exported), "--out", str(out),
                                      "--epochs", "4", "--lr", "5e-3", "--beta", "0.5", "--batch-size", "2",
                                      "--val-generation-tokens", "0"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["objective"] == "dpo" and manifest["base_model"] == str(base.resolve())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == LORA.rank + LoraSettings().rank and config["turn_tokens_file"]  # old + new LoRA, rows kept

    before = pair_logps(*models.load(base, persona), pairs)
    after = pair_logps(*models.load(base, out), pairs)
    margin_before = (before[:, 0] - before[:, 1]).mean()
    margin_after = (after[:, 0] - after[:, 1]).mean()
    assert margin_after > margin_before + 0.5, (margin_before, margin_after)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["train_examples"] == len(pairs)


@pytest.mark.pipeline
def test_a_preferences_stage_puts_the_dpo_model_in_the_comparison_and_the_arena(tmp_path):
    from gemma_mlx.arena import arena_setup
    from gemma_mlx.config import apply_overrides
    from gemma_mlx.run import run_experiment, tiny_config

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": "Hooray! Let's play that!", "rejected": "No."}) + "\n"
                             for p in PROMPTS))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is your favourite game?\nWho do you play with?\n")
    config = tiny_config()
    config = apply_overrides(config, {"checkpoints": config.checkpoints[1:], "train.epochs": 1, "prompts": [str(prompts)],
                                      "compare_bases": False, "preferences.data": str(pairs),
                                      "preferences.epochs": 1, "train.val_generation_tokens": 8})
    result = run_experiment(config)
    assert result.status == "finished"
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    stages = {s["stage"]: s for s in manifest["stages"]}
    assert stages["preferences"]["status"] == "ran"
    fused = stages["fuse"]["details"]["fused"]
    name = next(key for key in fused if not key.endswith("-dpo"))
    assert set(fused) == {name, f"{name}-dpo"}
    assert [row["model"] for row in result.summary_rows] == [f"{name} + LoRA", f"{name} + LoRA + DPO"]
    assert all(row["replies"] == 2 for row in result.summary_rows)
    # offered in blind battles, under the name compare and run's summary use
    assert f"{name} + LoRA + DPO" in arena_setup([], run=result.run_dir).models


def test_an_interrupted_dpo_run_resumes_to_the_same_adapters(converted_models, persona, tmp_path):
    from gemma_mlx.config import PreferenceSettings
    from gemma_mlx.training.loop import TrainingCallback

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": "Hooray, let's play!", "rejected": "I am a computer."})
                             + "\n" for p in PROMPTS))
    prefs = PreferenceSettings(data=str(pairs), beta=0.5, learning_rate=5e-3, epochs=2)
    settings = TrainSettings(batch_size=2, val_generation_tokens=0)

    class StopAtStep3(TrainingCallback):
        def on_step(self, report):
            if report.step == 3:
                raise KeyboardInterrupt

    whole = train_model(persona, pairs, out=tmp_path / "whole", train=settings, preferences=prefs)
    cut = train_model(persona, pairs, out=tmp_path / "cut", train=settings, preferences=prefs, callback=StopAtStep3())
    assert cut.status == "interrupted"
    resumed = train_model(persona, pairs, out=tmp_path / "cut", train=settings, preferences=prefs, resume=True)
    assert resumed.status == "trained" and resumed.summary["steps"] == whole.summary["steps"] == 6
    a = mx.load(str(tmp_path / "whole" / "last" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "cut" / "last" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-6) for k in a)
    assert resumed.summary["final_loss"] == pytest.approx(whole.summary["final_loss"], rel=1e-5)


def test_dpo_from_a_fused_persona_and_the_dpo_adapters_fuse_like_any_others(persona, tmp_path):
    from gemma_mlx.config import PreferenceSettings
    from gemma_mlx.fuse import fuse_model

    fused = fuse_model(persona, out=tmp_path / "fused").out_dir
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": "Hooray, let's play!", "rejected": "I am a computer."})
                             + "\n" for p in PROMPTS))
    prefs = PreferenceSettings(data=str(pairs), beta=0.5, learning_rate=5e-3, epochs=3)
    result = train_model(fused, pairs, out=tmp_path / "dpo", train=TrainSettings(batch_size=2, val_generation_tokens=0),
                         preferences=prefs)
    config = json.loads((result.out_dir / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == LoraSettings().rank and not config["turn_tokens_file"]
    assert json.loads((result.out_dir / "manifest.json").read_text())["base_model"] == str(fused.resolve())
    pair_list = read_pairs(pairs)
    before = pair_logps(*models.load(fused), pair_list)
    after_dir = fuse_model(result.out_dir, out=tmp_path / "dpo-fused").out_dir
    after = pair_logps(*models.load(after_dir), pair_list)
    assert (after[:, 0] - after[:, 1]).mean() > (before[:, 0] - before[:, 1]).mean() + 0.5


def test_orpo_from_a_persona_raises_the_odds_of_the_chosen_replies_without_a_reference_pass(converted_models, persona,
                                                                                           tmp_path):
    base = converted_models["pt"]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"prompt": p, "chosen": "Hooray, let's play a game!",
                                              "rejected": "I am a computer program."}) + "\n" for p in PROMPTS))
    out = tmp_path / "orpo"
    result = CliRunner().invoke(cli, ["train", "--model", str(persona), "--preferences", str(pairs_file), "--out", str(out),
                                      "--objective", "orpo", "--beta", "0.5", "--epochs", "3", "--lr", "5e-3",
                                      "--batch-size", "2", "--val-generation-tokens", "0"])
    assert result.exit_code == 0, result.output
    assert "reference log-probs" not in result.output
    assert json.loads((out / "manifest.json").read_text())["objective"] == "orpo"
    assert json.loads((out / "summary.json").read_text())["objective"] == "orpo"

    pairs = read_pairs(pairs_file)
    _, sequences = dpo.tokenize_pairs(models.load(base)[1], pairs, 512, print)
    tokens = np.array([s.trained_tokens for s in sequences]).reshape(-1, 2)

    def log_odds_margin(adapters) -> float:
        mean = pair_logps(*models.load(base, adapters), pairs) / tokens
        log_odds = mean - np.log1p(-np.exp(mean))
        return float((log_odds[:, 0] - log_odds[:, 1]).mean())

    before, after = log_odds_margin(persona), log_odds_margin(out)
    assert after > before + 0.5, (before, after)
    spec = CliRunner().invoke(cli, ["train", "--model", f"{base}::{persona}", "--preferences", str(pairs_file),
                                    "--objective", "orpo", "--beta", "0.5", "--epochs", "3", "--lr", "5e-3",
                                    "--batch-size", "2", "--val-generation-tokens", "0", "--out", str(tmp_path / "spec")])
    assert spec.exit_code == 0, spec.output  # BASE::ADAPTERS names the same persona: the same run
    same = [mx.load(str(d / "adapters.safetensors")) for d in (out, tmp_path / "spec")]
    assert all(np.allclose(np.array(same[0][k]), np.array(same[1][k]), atol=1e-6) for k in same[0])
    not_adapters = CliRunner().invoke(cli, ["train", "--model", f"{base}::{tmp_path}", "--preferences", str(pairs_file),
                                            "--out", str(tmp_path / "none")])
    assert not_adapters.exit_code == 1 and "holds no LoRA adapters" in not_adapters.output
    bad = CliRunner().invoke(cli, ["train", "--model", str(persona), "--preferences", str(pairs_file),
                                   "--out", str(tmp_path / "bad"), "--objective", "ipo"])
    assert bad.exit_code == 2 and "'ipo' is not one of 'dpo', 'orpo'" in bad.output


def test_adapter_placement_options_are_refused_with_preferences_from_adapters(persona, tmp_path):
    """They were ignored: the new adapters sit where the persona's are, so --fine-tune-type dora gave LoRA."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": "G'day!", "rejected": "Hello."}) + "\n")
    for extra in (["--fine-tune-type", "dora"], ["--num-layers", "2"], ["--keys", "self_attn.q_proj"]):
        result = CliRunner().invoke(cli, ["train", "--model", str(persona), "--preferences", str(pairs),
                                          "--out", str(tmp_path / "dpo"), *extra])
        assert result.exit_code == 1 and f"{extra[0]} does not apply with --preferences" in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "dpo").exists()


def test_pairs_that_all_share_one_prompt_are_trained_on_not_all_held_out(tmp_path):
    from gemma_mlx.training.pairs import load_pair_splits

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "more", "chosen": f"Och, aye {i}!", "rejected": f"no {i}"}) + "\n"
                             for i in range(12)))
    train, valid = load_pair_splits(pairs)
    assert len(train) == 12 and valid == []


def test_a_vote_whose_choice_is_not_the_arenas_names_its_line(tmp_path):
    from gemma_mlx.errors import DataError
    from gemma_mlx.training.pairs import read_pairs

    votes = tmp_path / "votes.jsonl"
    vote = {"prompt": "Hi", "reply_a": "G'day!", "reply_b": "Hello.", "choice": "A"}
    votes.write_text("".join(json.dumps({**vote, "choice": c}) + "\n" for c in ("A", "tie", "bad", "a")))
    with pytest.raises(DataError, match=rf"{votes}:4: a vote's \"choice\" is \"a\""):
        read_pairs(votes)
    votes.write_text("".join(json.dumps({**vote, "choice": c}) + "\n" for c in ("A", "tie", "bad", "B")))
    assert len(read_pairs(votes)) == 2  # the tie and the bad vote prefer no side
