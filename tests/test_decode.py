"""The lean decode step gives the replies of mlx-lm's own step, and skips the work it claims to skip."""

import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx import decode_step, fast_exp
from gemma_mlx.chat_format import prompt_ids
from gemma_mlx.config import GenerationSettings as G
from gemma_mlx.generate import generate_replies, new_generator
from tests.test_generate import PROMPTS, lively  # noqa: F401  (lively is a fixture)

MIXED = [
    G(max_tokens=7, repetition_penalty=1.0),  # plain greedy, leaves the batch early
    G(max_tokens=20),  # the default repetition penalty (1.1)
    G(max_tokens=14, repetition_penalty=1.5, no_repeat_ngram=2),  # the penalty, then a row-by-row processor
    G(max_tokens=18, temperature=0.9, top_k=40, seed=5),  # sampled, penalised
    G(max_tokens=11, min_new_tokens=3, repetition_penalty=1.3),
]


def both_steps(monkeypatch, run):
    monkeypatch.setenv(decode_step.PLAIN_ENV, "1")
    plain = run()
    monkeypatch.delenv(decode_step.PLAIN_ENV)
    return plain, run()


def test_mixed_rows_give_the_same_replies_as_mlx_lms_step(lively, monkeypatch):
    plain, lean = both_steps(monkeypatch, lambda: generate_replies(lively, PROMPTS, MIXED))
    assert [(r.text, r.tokens, r.finish_reason) for r in lean] == [(r.text, r.tokens, r.finish_reason) for r in plain]
    assert [r.tokens for r in lean] == [s.max_tokens for s in MIXED]
    assert len({r.text for r in lean}) == len(PROMPTS)
    # the penalties changed those rows (so the batched penalty was really exercised)
    unpenalised = generate_replies(lively, PROMPTS[1:3], G(max_tokens=20, repetition_penalty=1.0))
    assert unpenalised[0].text != lean[1].text and unpenalised[1].text[:40] != lean[2].text[:40]


def test_greedy_replies_equal_mlx_lm_batch_generate(lively):
    from mlx_lm.generate import batch_generate

    tok = lively.tokenizer
    ids = [prompt_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    limits = [9, 25, 13, 30, 4]
    ours = generate_replies(lively, PROMPTS, [G(max_tokens=n, repetition_penalty=1.0) for n in limits])
    theirs = batch_generate(lively.model, tok, ids, max_tokens=limits, return_token_ids=True)
    assert [r.text for r in ours] == [tok.decode(t).strip() for t in theirs.token_ids]
    assert [r.tokens for r in ours] == limits == [len(t) for t in theirs.token_ids]


def count_logsumexp(monkeypatch) -> list:
    """The shapes normalised over the vocabulary: mlx-lm's step calls mx.logsumexp, ours fast_exp's."""
    calls = []

    def counting(real):
        def count(*args, **kwargs):
            calls.append(args[0].shape)
            return real(*args, **kwargs)
        return count

    monkeypatch.setattr(fast_exp, "logsumexp", counting(fast_exp.logsumexp))
    monkeypatch.setattr(mx, "logsumexp", counting(mx.logsumexp))
    monkeypatch.delenv(fast_exp.PLAIN_ENV, raising=False)  # its CPU form, which never calls mx.logsumexp
    return calls


def test_greedy_rows_are_never_normalised(lively, monkeypatch):
    monkeypatch.setenv(decode_step.PLAIN_ENV, "1")
    calls = count_logsumexp(monkeypatch)
    generate_replies(lively, PROMPTS[:3], G(max_tokens=12))
    assert len(calls) >= 11  # mlx-lm's step: every step
    monkeypatch.delenv(decode_step.PLAIN_ENV)
    calls.clear()
    generate_replies(lively, PROMPTS[:3], G(max_tokens=12))
    assert calls == []  # not even for the rows' first token, made as they join the decoding batch

    calls.clear()  # one sampled row among greedy ones: only that row is normalised
    generate_replies(lively, PROMPTS[:3], [G(max_tokens=12), G(max_tokens=12, temperature=0.8), G(max_tokens=12)])
    # each step computes the token after the one it hands out: the first token, then 12 steps
    assert len(calls) == 1 + 12 and all(shape[0] == 1 for shape in calls)


def test_generator_gets_the_lean_step_unless_plain_is_asked(lively, monkeypatch):
    generator = new_generator(lively)
    assert type(generator._generation_batch) is decode_step.LeanGenerationBatch
    assert type(generator._prompt_batch) is decode_step.LeanPromptBatch
    monkeypatch.setenv(decode_step.PLAIN_ENV, "1")
    generator = new_generator(lively)
    assert type(generator._generation_batch) is not decode_step.LeanGenerationBatch
    assert type(generator._prompt_batch) is not decode_step.LeanPromptBatch


def test_batched_penalty_equals_mlx_lms_processor_row_by_row():
    from mlx_lm.sample_utils import make_repetition_penalty

    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(5, 50)).astype(np.float32) * 3)
    # contexts longer than the penalty's window, shorter, a little shorter (10 + 1 of 20), and none but the input
    known = [rng.integers(0, 50, size=30).tolist(), [7, 7, 3], [], rng.integers(0, 50, size=12).tolist(),
             rng.permutation(50)[:10].tolist()]
    inputs = mx.array([5, 7, 9, 11, 13], dtype=mx.uint32)
    penalties = [decode_step.RepetitionPenalty(1.1), decode_step.RepetitionPenalty(1.5),
                 decode_step.RepetitionPenalty(2.0, context_size=4), decode_step.RepetitionPenalty(1.3, context_size=5),
                 decode_step.RepetitionPenalty(1.2)]
    rows = [0, 1, 3, 4]  # row 2 has no penalty: it must come back untouched
    batched = decode_step.penalize_rows(mx.array(logits), inputs, rows, [known[e] for e in rows],
                                        [penalties[e] for e in rows])
    for e in range(5):
        row = logits[e:e + 1]
        if e in rows:
            context = mx.array(known[e] + [int(inputs[e])], dtype=mx.int32)
            reference = make_repetition_penalty(penalties[e].penalty, penalties[e].context_size)
            row = reference(context, mx.array(row))
            assert np.array_equal(np.array(penalties[e](context, mx.array(logits[e:e + 1]))), np.array(row))
        assert np.array_equal(np.array(batched[e:e + 1]), np.array(row)), e
    assert not np.array_equal(np.array(batched[:2]), np.array(logits[:2]))


def test_penalty_refuses_a_negative_factor():
    with pytest.raises(ValueError, match="repetition penalty"):
        decode_step.RepetitionPenalty(-1.0)


def test_a_batch_holds_the_rows_memory_allows_and_the_rest_wait_their_turn(lively, monkeypatch):
    from gemma_mlx import backend, generate

    settings = G(max_tokens=10)
    rows = generate.prompt_rows(lively.tokenizer, PROMPTS, settings)
    args = lively.model.args
    per_token = decode_step.kv_bytes_per_token(lively.model)
    assert per_token == args.num_hidden_layers * 2 * args.num_key_value_heads * args.head_dim * 4  # float32
    assert decode_step.rows_that_fit(lively.model, rows, 128, 1024) == len(PROMPTS)  # tiny rows: all at once
    assert decode_step.rows_that_fit(lively.model, rows, 128, 3) == 3
    everyone = generate_replies(lively, PROMPTS, settings)

    per_row = per_token * max(len(r.ids) + 10 for r in rows) + 16 * args.vocab_size
    # a machine whose free half holds two and a half rows
    monkeypatch.setattr(backend, "machine_memory", lambda: int(2 * (mx.get_active_memory() + 2.5 * per_row)))
    assert decode_step.rows_that_fit(lively.model, rows, 128, 1024) == 2
    sizes = []
    real = generate.new_generator
    monkeypatch.setattr(generate, "new_generator", lambda loaded, n: sizes.append(n) or real(loaded, n))
    two_at_a_time = generate_replies(lively, PROMPTS, settings)
    assert sizes == [2]
    assert [r.text for r in two_at_a_time] == [r.text for r in everyone]
    monkeypatch.setattr(backend, "machine_memory", lambda: None)  # unknown: the old fixed batch
    assert decode_step.rows_that_fit(lively.model, rows, 4, 1024) == 4


def test_the_driver_streams_text_without_decoding_the_whole_reply_at_every_step(lively, monkeypatch):
    """chat (stream_reply) gets its text piece by piece from the one driver's incremental detokenizer: the pieces
    joined are the reply's text, and the reply's whole text is decoded at its end only, not once per token."""
    from gemma_mlx.generate import stream_reply

    hf = lively.tokenizer._tokenizer
    real, whole = hf.decode, []
    monkeypatch.setattr(hf, "decode", lambda ids, *a, **k: whole.append(len(ids)) or real(ids, *a, **k))
    pieces = []
    reply = stream_reply(lively, [{"role": "user", "content": PROMPTS[0]}], G(max_tokens=40, repetition_penalty=1.0),
                         on_text=pieces.append)
    assert reply.tokens == 40 and reply.finish_reason == "length" and len(pieces) > 5
    assert "".join(pieces) == reply.text
    assert whole and len(whole) <= 2 and set(whole) == {40}  # the driver's check at the end, and the Reply's text


def test_models_load_with_the_multiply_add_gelu_on_the_cpu_and_give_the_same_logits(lively, monkeypatch):
    from gemma_mlx.models import load_model

    monkeypatch.setenv(decode_step.PLAIN_ENV, "1")
    plain = load_model(lively.path)
    monkeypatch.delenv(decode_step.PLAIN_ENV)
    fast = load_model(lively.path)
    assert {type(layer.mlp).__name__ for layer in fast.model.layers} == {"FastGeluMLP"}
    assert {type(layer.mlp).__name__ for layer in plain.model.layers} == {"MLP"}
    ids = mx.array([prompt_ids(fast.tokenizer, [{"role": "user", "content": p}])[:12] for p in PROMPTS[:3]])
    ours, theirs = fast.model(ids), plain.model(ids)
    scale = mx.abs(theirs).max().item()
    assert 0 < mx.abs(ours - theirs).max().item() <= 1e-5 * scale  # the same function, rounded another way
    assert mx.array_equal(ours.argmax(axis=-1), theirs.argmax(axis=-1))


def test_narrowing_projections_of_a_batch_use_a_transposed_copy_with_the_same_bits(lively, monkeypatch):
    """fast_linear: o_proj and down_proj of a batch multiply by a contiguous [in, out] copy (about twice as
    fast with OpenBLAS), bit for bit the product of the weight transposed; a small batch keeps the original
    product (the small-matrix kernel adds in another order), and the weight stays the one parameter."""
    import mlx.nn as nn

    from gemma_mlx.fast_linear import use_transposed_copies
    from gemma_mlx.models import load_model

    for width, out in ((2048, 640), (1024, 640)):  # the 270M's down_proj and o_proj
        plain = nn.Linear(width, out, bias=False)
        fast = nn.Linear(width, out, bias=False)
        fast.weight = plain.weight
        holder = nn.Module()
        holder.proj = fast
        assert use_transposed_copies(holder) == 1 and set(dict(fast.parameters())) == {"weight"}
        for rows in (1, 3, 16, 64):
            x = mx.random.normal((rows, width), key=mx.random.key(rows))
            assert mx.array_equal(fast(x), plain(x)).item(), (width, rows)
        assert isinstance(fast._weight_t, mx.array) and fast._weight_t.shape == (width, out)  # used from 4 rows
    narrow_up = nn.Linear(640, 2048, bias=False)  # widening projections keep mlx-lm's product
    holder = nn.Module()
    holder.proj = narrow_up
    assert use_transposed_copies(holder) == 0 and type(narrow_up) is nn.Linear

    loaded = load_model(lively.path)
    layer = loaded.model.layers[0]
    assert type(layer.mlp.down_proj).__name__ == "BatchedLinear"  # 128 -> 64 in the tiny model
    assert type(layer.mlp.up_proj) is nn.Linear and type(layer.self_attn.o_proj) is nn.Linear  # 64 -> 128, 64 -> 64
    monkeypatch.setenv(decode_step.PLAIN_ENV, "1")
    assert type(load_model(lively.path).model.layers[0].mlp.down_proj) is nn.Linear


def test_new_weights_get_a_new_transposed_copy():
    """Weights loaded into a patched layer after its copy was made (load_weights, a fuse) are the ones used."""
    import mlx.nn as nn

    from gemma_mlx.fast_linear import use_transposed_copies

    layer = nn.Linear(2048, 640, bias=False)
    holder = nn.Module()
    holder.proj = layer
    use_transposed_copies(holder)
    x = mx.random.normal((16, 2048), key=mx.random.key(1))
    layer(x)
    layer.weight = layer.weight * 2
    assert mx.array_equal(layer(x), x @ layer.weight.T).item()


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 8.0}])  # the 1B's global layers
def test_attention_takes_norms_and_positions_from_shared_tables_with_mlx_lms_bits(lively, monkeypatch, tmp_path,
                                                                                  scaling):
    """fast_rope: a batch decode step's query/key norms and rotary positions come from tables of every
    position's cos/sin (grown as the context needs) and one compiled function, and the replies are mlx-lm's
    token for token: sliding-window layers whose caches wrap included, rows leaving the batch included."""
    import json
    import shutil

    from gemma_mlx import fast_rope
    from gemma_mlx.models import load_model

    path = lively.path
    if scaling:
        path = tmp_path / "scaled"
        shutil.copytree(lively.path, path)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "rope_scaling": scaling}))
    monkeypatch.setattr(fast_rope, "FIRST_ROWS", 4)  # so the tables grow inside these replies
    monkeypatch.setattr(fast_rope, "_TABLES", {})
    fast = load_model(path)
    if scaling:
        assert {t.scale for t in fast_rope._TABLES.values()} == {1.0, 1 / scaling["factor"]}
    attention = [layer.self_attn for layer in fast.model.layers]
    assert {type(a).__name__ for a in attention} == {"TableRopeAttention"}
    assert {t.rows for t in fast_rope._TABLES.values()} == {4}  # two settings (local and global layers)
    calls = []
    real_lines = fast_rope.RotaryTable.lines

    def lines(table, offsets, bound):
        calls.append((table.base, offsets.max().item(), bound))
        return real_lines(table, offsets, bound)

    monkeypatch.setattr(fast_rope.RotaryTable, "lines", lines)
    settings = [G(max_tokens=n, repetition_penalty=1.0) for n in (9, 30, 21, 26, 40)]
    ours = generate_replies(fast, PROMPTS, settings)
    assert len(calls) > 30 * len(attention)  # every layer, every step
    assert all(position <= bound for _, position, bound in calls)  # the sync-free bound holds, window layers too
    for table in fast_rope._TABLES.values():  # both grew past the 8-token window, as far as the replies went
        last = max(position for base, position, _ in calls if base == table.base)
        assert last > 40 and table.rows > last
    monkeypatch.setenv(decode_step.PLAIN_ENV, "1")
    plain = load_model(path)
    assert {type(layer.self_attn).__name__ for layer in plain.model.layers} == {"Attention"}
    theirs = generate_replies(plain, PROMPTS, settings)
    assert [(r.text, r.tokens) for r in ours] == [(r.text, r.tokens) for r in theirs]
    assert [r.tokens for r in ours] == [s.max_tokens for s in settings]


def test_a_layer_whose_tables_would_change_a_bit_keeps_mlx_lms_attention(lively, monkeypatch):
    from gemma_mlx import fast_rope
    from gemma_mlx.models import load_model

    rotate = fast_rope._rotate
    monkeypatch.setattr(fast_rope, "_rotate", lambda x, cos, sin: rotate(x, cos, -sin))  # turning the other way
    monkeypatch.setattr(fast_rope, "_norms_and_rotations", fast_rope._norms_and_rotations.__wrapped__)
    loaded = load_model(lively.path)
    assert {type(layer.self_attn).__name__ for layer in loaded.model.layers} == {"Attention"}
