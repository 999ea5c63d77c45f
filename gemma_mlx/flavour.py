"""Base (-pt) or instruction-tuned (-it)? Decided from what cannot lie: the turn-end embedding row.

A chat template says nothing: the GGUF of the 270M *base* model ships one, and hub -pt repos may too.
But a base Gemma 3 never saw `<end_of_turn>` in pre-training, so its embedding row is still
where initialisation left it, next to the ~6,200 never-used `<unusedN>` rows. On the real 270M base,
cosine(its row, mean of the `<unusedN>` rows) is 0.990; ordinary tokens sit near 0.2. An
instruction-tuned model uses the token on every turn, which moves its row away. The turn-end
token and the never-used tokens are the model's family's (families.py; Gemma 4's is `<turn|>`).

Evidence, strongest first: the weights when they show an untrained row (cosine >= 0.9); then the
name (`-pt` / `-it`); then the generation config (an -it config lists <end_of_turn> among its eos
ids, a -pt one only <eos>). A distinct row alone says "trained or random": random tiny test models
have distinct rows too, so it decides only when nothing else does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .families import DEFAULT, FAMILIES, INSTRUCT_NAME, Family, family_of_config

UNTRAINED_COSINE = 0.9  # at or above: the turn row was never trained (base model)
FLAVOURS = ("pt", "it")


@dataclass(frozen=True)
class Flavour:
    flavour: str  # "pt" | "it"
    decided_by: str  # "override" | "weights" | "name" | "generation_config" | "distinct turn row"
    end_of_turn_cosine: float | None  # cosine(turn-end row, mean <unusedN> row); None when not measurable
    eos_ids: list[int]
    name: str
    turn_end: str = DEFAULT.turn_end  # the family's turn-end token, as the evidence names it

    def explain(self) -> str:
        """One line for `convert`'s output: the flavour and the evidence behind it."""
        cosine = "n/a" if self.end_of_turn_cosine is None else f"{self.end_of_turn_cosine:.3f}"
        meaning = ""
        if self.end_of_turn_cosine is not None:
            meaning = " (never trained)" if self.end_of_turn_cosine >= UNTRAINED_COSINE else " (distinct)"
        return (f"flavour {self.flavour} (by {self.decided_by}): cosine({self.turn_end}, mean <unusedN>) = {cosine}"
                f"{meaning}; generation eos ids {self.eos_ids}; name '{self.name}'")

    def record(self) -> dict:
        return asdict(self)


def family_of_dir(model_dir: Path) -> Family:
    """The family of a model dir, from its config.json (the default family without one)."""
    path = Path(model_dir) / "config.json"
    try:
        return family_of_config(json.loads(path.read_text()) if path.is_file() else None)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return DEFAULT


def unused_token_ids(model_dir: Path, family: Family | None = None) -> list[int]:
    """Ids of the never-used tokens (`<unusedN>`) in a model dir's tokenizer.json (vocabulary and added tokens)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return []
    unused = (family or family_of_dir(model_dir)).unused_token
    spec = json.loads(path.read_text(encoding="utf-8"))
    ids = {int(t["id"]) for t in spec.get("added_tokens", []) if unused.match(t.get("content", ""))}
    vocab = spec.get("model", {}).get("vocab", {})
    if isinstance(vocab, dict):
        ids.update(int(i) for token, i in vocab.items() if unused.match(token))
    return sorted(ids)


def embedding_rows(model_dir: Path, ids: list[int]):
    """Float32 embedding rows of an MLX model dir (de-quantized when the table is quantized)."""
    import mlx.core as mx

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    for file in sorted(model_dir.glob("*.safetensors")):
        weights = mx.load(str(file))  # lazy: only the arrays used below are read
        for prefix in ("model.embed_tokens", "language_model.model.embed_tokens", "embed_tokens"):
            if f"{prefix}.weight" not in weights:
                continue
            index = mx.array(ids, dtype=mx.int32)
            weight = weights[f"{prefix}.weight"][index]
            if f"{prefix}.scales" in weights:
                quant = config.get("quantization") or config.get("quantization_config") or {}
                weight = mx.dequantize(weight, weights[f"{prefix}.scales"][index], weights.get(f"{prefix}.biases")[index],
                                       group_size=quant.get("group_size", 64), bits=quant.get("bits", 4))
            return weight.astype(mx.float32)
    return None


def end_of_turn_cosine(model_dir: Path) -> float | None:
    """cosine(turn-end row, mean of the <unusedN> rows); None without unused tokens or weights."""
    import mlx.core as mx

    family = family_of_dir(model_dir)
    unused = [i for i in unused_token_ids(model_dir, family) if i != family.turn_end_id]
    if len(unused) < 8:
        return None
    rows = embedding_rows(model_dir, [family.turn_end_id, *unused])
    if rows is None:
        return None
    turn, mean = rows[0], mx.mean(rows[1:], axis=0)
    cosine = mx.sum(turn * mean) / (mx.linalg.norm(turn) * mx.linalg.norm(mean) + 1e-12)
    return round(float(cosine.item()), 4)


def eos_ids_of(config: dict | None) -> list[int]:
    eos = (config or {}).get("eos_token_id")
    if eos is None:
        return []
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


def flavour_from_name(name: str) -> str | None:
    if INSTRUCT_NAME.search(name):
        return "it"
    if any(f.base_name.search(name) for f in FAMILIES):
        return "pt"
    return None


def detect_flavour(model_dir: Path, name: str, source_eos_ids: list[int], override: str | None = None) -> Flavour:
    """The flavour of the model in `model_dir` (weights already converted), with the evidence.

    `source_eos_ids` are the eos ids of the *source* generation config, before convert added
    the turn end to them.
    """
    family = family_of_dir(model_dir)
    cosine = end_of_turn_cosine(model_dir)

    def decided(flavour: str, by: str) -> Flavour:
        return Flavour(flavour, by, cosine, list(source_eos_ids), name, family.turn_end)

    if override is not None:
        return decided(override, "override")
    if cosine is not None and cosine >= UNTRAINED_COSINE:
        return decided("pt", "weights")
    by_name = flavour_from_name(name)
    if by_name:
        return decided(by_name, "name")
    if source_eos_ids:
        return decided("it" if family.turn_end_id in source_eos_ids else "pt", "generation_config")
    return decided("it", "distinct turn row") if cosine is not None else decided("pt", "no evidence")
