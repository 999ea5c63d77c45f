"""Base (-pt) or instruction-tuned (-it)? Decided from what cannot lie: the `<end_of_turn>` embedding.

A chat template says nothing: the GGUF of the 270M *base* model ships one, and hub -pt repos may too.
But a base model never saw `<end_of_turn>` (id 106) in pre-training, so its embedding row is still
where initialisation left it, next to the ~6,200 never-used `<unusedN>` rows. On the real 270M base,
cosine(row 106, mean of the `<unusedN>` rows) is 0.990; ordinary tokens sit near 0.2. An
instruction-tuned model uses the token on every turn, which moves its row away.

Evidence, strongest first: the weights when they show an untrained row (cosine >= 0.9); then the
name (`-pt` / `-it`); then the generation config (an -it config lists <end_of_turn> among its eos
ids, a -pt one only <eos>). A distinct row alone says "trained or random": random tiny test models
have distinct rows too, so it decides only when nothing else does.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .chat_format import END_OF_TURN_ID, UNUSED_TOKEN

UNTRAINED_COSINE = 0.9  # at or above: the turn row was never trained (base model)
FLAVOURS = ("pt", "it")
_BASE_NAMES = re.compile(r"(-pt|-base)(-|$)|^gemma-3-\d+m$", re.IGNORECASE)
_INSTRUCT_NAMES = re.compile(r"-it(-|$)|instruct|-chat(-|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Flavour:
    flavour: str  # "pt" | "it"
    decided_by: str  # "override" | "weights" | "name" | "generation_config" | "distinct turn row"
    end_of_turn_cosine: float | None  # cosine(row 106, mean <unusedN> row); None when not measurable
    eos_ids: list[int]
    name: str

    def explain(self) -> str:
        """One line for `convert`'s output: the flavour and the evidence behind it."""
        cosine = "n/a" if self.end_of_turn_cosine is None else f"{self.end_of_turn_cosine:.3f}"
        meaning = ""
        if self.end_of_turn_cosine is not None:
            meaning = " (never trained)" if self.end_of_turn_cosine >= UNTRAINED_COSINE else " (distinct)"
        return (f"flavour {self.flavour} (by {self.decided_by}): cosine(<end_of_turn>, mean <unusedN>) = {cosine}"
                f"{meaning}; generation eos ids {self.eos_ids}; name '{self.name}'")

    def record(self) -> dict:
        return asdict(self)


def unused_token_ids(model_dir: Path) -> list[int]:
    """Ids of the `<unusedN>` tokens in a model dir's tokenizer.json (vocabulary and added tokens)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return []
    spec = json.loads(path.read_text(encoding="utf-8"))
    ids = {int(t["id"]) for t in spec.get("added_tokens", []) if UNUSED_TOKEN.match(t.get("content", ""))}
    vocab = spec.get("model", {}).get("vocab", {})
    if isinstance(vocab, dict):
        ids.update(int(i) for token, i in vocab.items() if UNUSED_TOKEN.match(token))
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
    """cosine(<end_of_turn> row, mean of the <unusedN> rows); None without unused tokens or weights."""
    import mlx.core as mx

    unused = [i for i in unused_token_ids(model_dir) if i != END_OF_TURN_ID]
    if len(unused) < 8:
        return None
    rows = embedding_rows(model_dir, [END_OF_TURN_ID, *unused])
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
    if _INSTRUCT_NAMES.search(name):
        return "it"
    if _BASE_NAMES.search(name):
        return "pt"
    return None


def detect_flavour(model_dir: Path, name: str, source_eos_ids: list[int], override: str | None = None) -> Flavour:
    """The flavour of the model in `model_dir` (weights already converted), with the evidence.

    `source_eos_ids` are the eos ids of the *source* generation config, before convert added
    <end_of_turn> to them.
    """
    cosine = end_of_turn_cosine(model_dir)

    def decided(flavour: str, by: str) -> Flavour:
        return Flavour(flavour, by, cosine, list(source_eos_ids), name)

    if override is not None:
        return decided(override, "override")
    if cosine is not None and cosine >= UNTRAINED_COSINE:
        return decided("pt", "weights")
    by_name = flavour_from_name(name)
    if by_name:
        return decided(by_name, "name")
    if source_eos_ids:
        return decided("it" if END_OF_TURN_ID in source_eos_ids else "pt", "generation_config")
    return decided("it", "distinct turn row") if cosine is not None else decided("pt", "no evidence")
