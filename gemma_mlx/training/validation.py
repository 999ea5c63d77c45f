"""The greedy half of a validation: answer the validation prompts as the weights are now, and measure
what a reader would (clean endings, length against the validation replies', and optionally on topic).

Teacher-forced numbers (loss, p(<end_of_turn>)) cannot show a loop or a reply of the wrong length;
these can. The numbers go into the validation's metrics record (the `gen_*` keys) and, through
selection.checkpoint_score, into `best_by: score`.

The on-topic term needs an un-tuned base model to score with (scoring/ontopic.py's measure). A LoRA
trainee has one inside it: the same model with every LoRA layer's scale at 0 (`trainee.adapters_off`). The
scorer itself comes from outside (the CLI and `run` pass scoring/best_of.on_topic_flags), since a
training module may not import a later stage.
"""

from __future__ import annotations

from typing import Callable

from ..distributed import sum_numbers
from ..selection import checkpoint_score
from .trainee import adapters_off, turn_rows_in_model

# (model, tokenizer, [(message, reply)]) -> [on topic?]: scoring/best_of.on_topic_flags
OnTopic = Callable[[object, object, list[tuple[str, str]]], list[bool]]


def measures_on_topic(setup, on_topic: OnTopic | None) -> bool:
    """On topic joins the score with best_by: score, a scorer, and LoRA (DoRA and full fine-tuning hold no base)."""
    return (on_topic is not None and setup.train.best_by == "score" and setup.lora.fine_tune_type == "lora"
            and setup.train.val_generation_tokens > 0)  # no greedy replies: nothing to score


def greedy_validation(run, on_topic: OnTopic | None = None) -> dict:
    """Greedy replies to the validation prompts with the weights as they are now: how many end by themselves
    without looping, their words against the validation replies', on topic when measured, and the score.
    `run` is the training loop's Run (its setup, trainee, tokenizer, objective and world)."""
    tokens = run.setup.train.val_generation_tokens
    prompts = run.objective.valid_prompts
    if not tokens or not prompts:
        return {}
    from ..config import GenerationSettings
    from ..generate import LoadedModel, generate_replies
    from ..text import is_loop, word_count

    prompts = prompts[run.world.rank::run.world.size]  # each rank answers its share
    topical = measures_on_topic(run.setup, on_topic)
    run.trainee.eval()
    try:
        with turn_rows_in_model(run.trainee):
            loaded = LoadedModel("validation", run.setup.model_dir, run.trainee.lm, run.tokenizer, None, None)
            # plain greedy, whatever the generation defaults: this measures the model, not the decoder
            plain = GenerationSettings(max_tokens=tokens, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=0)
            replies = generate_replies(loaded, prompts, plain) if prompts else []
        if topical and replies:
            with adapters_off(run.trainee.lm):
                flags = on_topic(run.trainee.lm, run.tokenizer, [(r.prompt, r.text) for r in replies])
    finally:
        run.trainee.train()
    counts = sum_numbers({"replies": len(replies), "stops": sum(not r.cut for r in replies),
                          "loops": sum(is_loop(r.text) for r in replies),
                          "clean": sum(not r.cut and not is_loop(r.text) for r in replies),
                          "words": sum(word_count(r.text) for r in replies),
                          "on_topic": sum(bool(f) for f in flags) if topical and replies else 0})
    n = int(counts["replies"])
    mean_words, reference = counts["words"] / n, getattr(run.objective, "valid_reply_words", None)
    on_topic_rate = counts["on_topic"] / n if topical else None
    record = {"gen_replies": n, "gen_stops": int(counts["stops"]), "gen_loops": int(counts["loops"]),
              "gen_clean": int(counts["clean"]), "gen_clean_rate": counts["clean"] / n, "gen_mean_words": mean_words,
              "gen_words_vs_valid": round(mean_words / reference, 4) if reference else None,
              "gen_score": round(checkpoint_score(counts["clean"] / n, mean_words, reference, on_topic_rate), 4)}
    if topical:
        record["gen_on_topic"], record["gen_on_topic_rate"] = int(counts["on_topic"]), on_topic_rate
    return record
