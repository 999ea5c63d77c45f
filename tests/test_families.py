"""The model-family table: one place for every Gemma fact, and the code outside it asks it."""

import ast
from pathlib import Path

import pytest

from gemma_mlx import chat_format
from gemma_mlx.families import (
    FAMILIES,
    GEMMA3,
    GEMMA4,
    family_of_config,
    family_of_model_type,
    family_of_tokenizer,
    short_names,
)

PACKAGE = Path(__file__).resolve().parents[1] / "gemma_mlx"
FAMILY_MODULE = PACKAGE / "families.py"
MODEL_TYPES = {t for f in FAMILIES for t in f.model_types}
TURN_STRINGS = {s for f in FAMILIES for s in (f.turn_start, f.turn_end)}
# every family's special and control token spellings (<eos>, <unk>, <|channel>, ...)
SPECIAL_STRINGS = {s for f in FAMILIES for s in (*f.special_names, *f.control_tokens.values(), f.unk, f.mask)}
TURN_IDS = {i for f in FAMILIES for i in f.turn_token_ids}  # 105, 106: ids no other code has a reason to write
TOKEN_ID_KEYS = {"bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "eot_token_id"}


def _docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _is_template(text: str) -> bool:
    """A literal that writes turns (a turn token next to a role or a newline), not prose that names one."""
    return any(token + role in text or role + token in text
               for token in TURN_STRINGS for role in ("user", "model", "system", "\n"))


def gemma_facts_in(path: Path) -> list[str]:
    """Model-type strings, special-token spellings, turn templates and Gemma token ids written into one
    module's code (docstrings aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and id(node) not in docs:
            value = node.value
            if isinstance(value, str) and (value in MODEL_TYPES or value in SPECIAL_STRINGS or _is_template(value)):
                found.append(f"{where}: {value!r}")
            if isinstance(value, int) and not isinstance(value, bool) and value in TURN_IDS:
                found.append(f"{where}: token id {value}")
        pairs = []
        if isinstance(node, ast.Dict):
            pairs = [(k.value, v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.Call):
            pairs = [(k.arg, k.value) for k in node.keywords]
        for key, value in pairs:
            if key in TOKEN_ID_KEYS and isinstance(value, ast.Constant) and isinstance(value.value, int):
                found.append(f"{where}: {key}={value.value}")
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "").startswith("add_") and \
                getattr(node.func, "attr", "").endswith("_token_id") and node.args and \
                isinstance(node.args[0], ast.Constant):
            found.append(f"{where}: {node.func.attr}({node.args[0].value})")
    return found


def test_no_gemma_fact_outside_the_family_module():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != FAMILY_MODULE for hit in gemma_facts_in(path)]
    assert not found, "Gemma facts written outside gemma_mlx/families.py (ask the family instead):\n" + "\n".join(found)


def test_the_checker_finds_what_it_looks_for(tmp_path):
    planted = PACKAGE / "_planted_for_test.py"
    planted.write_text('X = {"model_type": "gemma3_text", "eos_token_id": 1}\nY = [1, 105]\nZ = "<start_of_turn>user\\n"\n'
                       'def f(w):\n    w.add_bos_token_id(2)\n    return {98: "<|think|>", "unk": "<unk>", "t": "gemma4"}\n')
    try:
        hits = gemma_facts_in(planted)
    finally:
        planted.unlink()
    assert len(hits) == 8, hits


def test_gemma3_format_is_unchanged():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello."}]
    assert chat_format.render(messages, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>model\n")
    assert (chat_format.START_OF_TURN_ID, chat_format.END_OF_TURN_ID, chat_format.EOS_ID) == (105, 106, 1)


def test_gemma4_has_a_native_system_turn():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert GEMMA4.render(messages, add_generation_prompt=True) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_chat_template_writes_what_render_writes(family):
    from jinja2 import Template

    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "one "},
                    {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}]
    for messages in (conversation, conversation[1:]):
        text = Template(family.chat_template()).render(messages=messages, bos_token=family.bos, add_generation_prompt=True)
        assert text == family.render(messages, add_generation_prompt=True)


def test_lookups():
    assert family_of_model_type("gemma3_text") is GEMMA3 and family_of_model_type("gemma3") is GEMMA3
    assert family_of_model_type("gemma4_text") is GEMMA4 and family_of_model_type("llama") is None
    assert family_of_config({"model_type": "gemma4"}) is GEMMA4 and family_of_config(None) is GEMMA3
    assert short_names()["gemma-4-e2b-it"] == "google/gemma-4-E2B-it"
    assert short_names()["gemma-3-270m"] == "google/gemma-3-270m"


def test_family_of_tokenizer():
    from gemma_mlx.tiny import GEMMA4_SPECIAL_TOKENS, SPECIAL_TOKENS, build_tokenizer

    assert family_of_tokenizer(build_tokenizer(vocab_size=400, special_tokens=SPECIAL_TOKENS)) is GEMMA3
    assert family_of_tokenizer(build_tokenizer(vocab_size=400, special_tokens=GEMMA4_SPECIAL_TOKENS)) is GEMMA4


def test_training_asks_the_models_family():
    """The training code takes turn-token ids and the reply end from the model's family (sft.py passes it
    to trainee.prepare; tests/test_family_training.py shows it), never chat_format's default-family names."""
    defaults = {name for name in vars(chat_format) if name.isupper()}
    for path in sorted((PACKAGE / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("chat_format"):
                used = {alias.name for alias in node.names} & defaults
                assert not used, f"{path.name} imports the default family's {sorted(used)} from chat_format"
