"""Model families: every fact about a kind of Gemma that the stages need, in one table.

A family says which checkpoints it takes (model types), its special tokens (strings and ids),
how a conversation is written as turns, which tokens end a reply, what tells a base model from an
instruction-tuned one in the weights, its names in other formats (GGUF, Hugging Face), which
mlx-lm MLP class the training-time fast GELU replaces, and the short names `convert` knows.
Stages ask `family_of_config`, `family_of_model_type` or `family_of_tokenizer` instead of
hard-coding any of it, so a new family is one more entry here (and its tests).

A shared helper: it imports no stage module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """One model family. Ids are the checkpoint's own; strings are the tokenizer's spelling."""

    name: str  # "gemma-3": what users type (`run --tiny-family`), not a model type
    title: str  # "Gemma 3", for messages
    text_model_type: str  # the config.json model_type of its text-only checkpoints (what convert writes)
    multimodal_model_types: tuple[str, ...]  # wrappers whose language model convert keeps (weights under language_model.)
    causal_lm_architecture: str  # the transformers class a text checkpoint loads as
    mlp_module: str  # the mlx-lm module whose `MLP` class fast_gelu replaces while training
    # special tokens
    bos: str
    eos: str
    pad: str
    turn_start: str
    turn_end: str
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    turn_start_id: int
    turn_end_id: int
    other_special: tuple[str, ...]  # further control tokens that must never be printed as reply text
    # control tokens at their ids in the real vocabulary, below the turn tokens (what tiny tokenizers mirror)
    control_tokens: dict[int, str]
    # the turn format
    system_role: str  # "fold": the system text opens the first user turn; "native": a system turn of its own
    model_role: str = "model"  # what an assistant turn is called inside the turn tokens
    unk: str = "<unk>"
    mask: str = "<mask>"
    # thinking: the system-prompt token that turns it on, and the channel a thought is written in
    # (<|channel>thought\n...<channel|>); None where the family has no thinking
    think: str | None = None
    channel_open: str | None = None
    channel_close: str | None = None
    # base vs instruct from the weights: a base model's turn-end row sits with the never-used rows
    unused_token: re.Pattern = field(default=re.compile(r"^<unused\d+>$"))
    base_name: re.Pattern = field(default=re.compile(r"(-pt|-base)(-|$)", re.IGNORECASE))
    # other formats
    gguf_architecture: str | None = None  # llama.cpp's name; None: no GGUF import or export for this family
    short_names: dict = field(default_factory=dict)  # short name -> hub id
    # what a model card says: the hub's tag and licence id, and the licence sentence
    hub_tag: str = ""
    licence_id: str = "gemma"
    licence: str = ("The weights derive from Google's Gemma and are subject to the Gemma Terms of Use "
                    "(https://ai.google.dev/gemma/terms) and its Prohibited Use Policy.")

    @property
    def model_types(self) -> tuple[str, ...]:
        """Every config.json model_type this family accepts, text model first."""
        return (self.text_model_type, *self.multimodal_model_types)

    @property
    def turn_token_ids(self) -> tuple[int, int]:
        """The ids a base model never trained and our training teaches: turn start and turn end."""
        return (self.turn_start_id, self.turn_end_id)

    @property
    def stop_token_ids(self) -> tuple[int, int]:
        """The ids an instruct generation config lists: <eos> and the turn end."""
        return (self.eos_id, self.turn_end_id)

    @property
    def special_names(self) -> frozenset[str]:
        return frozenset({self.bos, self.eos, self.pad, self.turn_start, self.turn_end, *self.other_special})

    def role(self, message: dict) -> str:
        return self.model_role if message["role"] == "assistant" else message["role"]

    @property
    def thinks(self) -> bool:
        return self.think is not None

    def without_thoughts(self, text: str) -> str:
        """A past model turn as it is fed back: every thought channel left out, as the family's own template does."""
        if not self.channel_open:
            return text
        kept = []
        for part in text.split(self.channel_close):
            kept.append(part.split(self.channel_open)[0] if self.channel_open in part else part)
        return "".join(kept)

    def _thinking_system(self, messages: list[dict]) -> list[dict]:
        """Thinking on: the conversation opens with a system turn (an empty one is made), which the think
        token will open. Gemma 4's own template turns thinking on the same way."""
        if not self.thinks or self.system_role != "native":
            raise ValueError(f"{self.title} models have no thinking")
        return messages if messages and messages[0]["role"] == "system" else [{"role": "system", "content": ""}, *messages]

    def render(self, messages: list[dict], add_generation_prompt: bool = False, thinking: bool = False) -> str:
        """The turn text of a conversation, with a leading <bos> (tokenize it without adding another).

        thinking: the model may think before it answers (families that can; see _thinking_system)."""
        parts, system = [self.bos], ""
        if thinking:
            messages = self._thinking_system(messages)
        for index, message in enumerate(messages):
            content = message["content"].strip()
            if message["role"] == "assistant":
                content = self.without_thoughts(content).strip()
            if thinking and index == 0:
                content = f"{self.think}\n{content}"
            if message["role"] == "system" and self.system_role == "fold":
                system = message["content"] + "\n\n"
                continue
            prefix = system if message["role"] == "user" else ""
            if message["role"] == "user":
                system = ""
            parts.append(f"{self.turn_start}{self.role(message)}\n{prefix}{content}{self.turn_end}\n")
        if add_generation_prompt:
            parts.append(f"{self.turn_start}{self.model_role}\n")
        return "".join(parts)

    def chat_template(self) -> str:
        """A Jinja chat template (our own) whose output is `render`'s, for tokenizers and GGUF files."""
        start, end, model = self.turn_start, self.turn_end, self.model_role
        if self.system_role == "native":
            body = (
                "{% set role = '" + model + "' if message['role'] == 'assistant' else message['role'] %}"
                "{{ '" + start + "' + role + '\n' }}{{ message['content'] | trim }}{{ '" + end + "\n' }}"
            )
            head = ""
        else:
            head = "{% set ns = namespace(system='') %}"
            body = (
                "{% if message['role'] == 'system' %}"
                "{% set ns.system = message['content'] + '\n\n' %}"
                "{% else %}"
                "{% set role = '" + model + "' if message['role'] == 'assistant' else message['role'] %}"
                "{{ '" + start + "' + role + '\n' }}"
                "{% if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
                "{{ message['content'] | trim }}{{ '" + end + "\n' }}"
                "{% endif %}"
            )
        return ("{{ bos_token }}" + head + "{% for message in messages %}" + body + "{% endfor %}"
                "{% if add_generation_prompt %}{{ '" + start + model + "\n' }}{% endif %}")


GEMMA3 = Family(
    name="gemma-3",
    title="Gemma 3",
    text_model_type="gemma3_text",
    multimodal_model_types=("gemma3",),
    causal_lm_architecture="Gemma3ForCausalLM",
    mlp_module="mlx_lm.models.gemma3_text",
    bos="<bos>", eos="<eos>", pad="<pad>", turn_start="<start_of_turn>", turn_end="<end_of_turn>",
    bos_id=2, eos_id=1, pad_id=0, unk_id=3, turn_start_id=105, turn_end_id=106,
    other_special=("<unk>", "<mask>", "[multimodal]", "<start_of_image>", "<end_of_image>", "<image_soft_token>"),
    control_tokens={4: "<mask>", 5: "[multimodal]"},
    system_role="fold",
    # the hub's base 270M is plain "gemma-3-270m"
    base_name=re.compile(r"(-pt|-base)(-|$)|^gemma-3-\d+m$", re.IGNORECASE),
    gguf_architecture="gemma3",
    hub_tag="gemma3",
    licence=("The weights derive from Google's Gemma 3 and are subject to the Gemma Terms of Use "
             "(https://ai.google.dev/gemma/terms) and its Prohibited Use Policy."),
    short_names={
        "gemma-3-270m": "google/gemma-3-270m",
        "gemma-3-270m-pt": "google/gemma-3-270m",
        "gemma-3-270m-it": "google/gemma-3-270m-it",
        "gemma-3-1b-pt": "google/gemma-3-1b-pt",
        "gemma-3-1b-it": "google/gemma-3-1b-it",
        "gemma-3-4b-pt": "google/gemma-3-4b-pt",
        "gemma-3-4b-it": "google/gemma-3-4b-it",
    },
)

# Gemma 4 keeps Gemma 3's ids for pad/eos/bos and the turn tokens, with new spellings, a native
# system turn, and thinking (<|channel>thought ... <channel|>) and tool tokens.
GEMMA4 = Family(
    name="gemma-4",
    title="Gemma 4",
    text_model_type="gemma4_text",
    multimodal_model_types=("gemma4",),
    causal_lm_architecture="Gemma4ForCausalLM",
    mlp_module="mlx_lm.models.gemma4_text",
    bos="<bos>", eos="<eos>", pad="<pad>", turn_start="<|turn>", turn_end="<turn|>",
    bos_id=2, eos_id=1, pad_id=0, unk_id=3, turn_start_id=105, turn_end_id=106,
    other_special=("<unk>", "<mask>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>",
                   "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>',
                   "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>"),
    control_tokens={4: "<mask>", 46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>",
                    50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>",
                    101: "<channel|>"},
    system_role="native",
    think="<|think|>", channel_open="<|channel>", channel_close="<channel|>",
    # the hub's base models are plain "gemma-4-E2B" etc.
    base_name=re.compile(r"(-pt|-base)(-|$)|^gemma-4-(e\d+b|\d+b(-a\d+b)?)$", re.IGNORECASE),
    gguf_architecture=None,
    hub_tag="gemma4",
    licence_id="apache-2.0",
    licence=("The weights derive from Google's Gemma 4, released under the Apache License 2.0 "
             "(https://www.apache.org/licenses/LICENSE-2.0)."),
    short_names={
        "gemma-4-e2b": "google/gemma-4-E2B",
        "gemma-4-e2b-pt": "google/gemma-4-E2B",
        "gemma-4-e2b-it": "google/gemma-4-E2B-it",
        "gemma-4-e4b": "google/gemma-4-E4B",
        "gemma-4-e4b-pt": "google/gemma-4-E4B",
        "gemma-4-e4b-it": "google/gemma-4-E4B-it",
    },
)

FAMILIES = (GEMMA3, GEMMA4)
DEFAULT = GEMMA3
INSTRUCT_NAME = re.compile(r"-it(-|$)|instruct|-chat(-|$)", re.IGNORECASE)


def family_of_model_type(model_type: str | None) -> Family | None:
    """The family that accepts this config.json model_type, or None."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_of_config(config: dict | None) -> Family:
    """The family of a model's config.json (the default family when it names none we know)."""
    return family_of_model_type((config or {}).get("model_type")) or DEFAULT


def is_multimodal(config: dict) -> bool:
    family = family_of_model_type(config.get("model_type"))
    return family is not None and config.get("model_type") in family.multimodal_model_types


def family_of_gguf_architecture(architecture: str | None) -> Family | None:
    return next((f for f in FAMILIES if f.gguf_architecture and f.gguf_architecture == architecture), None)


def accepted_model_types() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


def short_names() -> dict[str, str]:
    """Every family's short names -> hub ids."""
    return {name: hub for f in FAMILIES for name, hub in f.short_names.items()}


def family_of_name(name: str) -> Family | None:
    """The family a short name or hub id belongs to (by its registry entry), or None."""
    hub = short_names().get(name, name)
    return next((f for f in FAMILIES if hub in f.short_names.values() or name in f.short_names), None)


def _token_id(tokenizer, token: str) -> int | None:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    if hasattr(hf, "token_to_id"):  # a tokenizers.Tokenizer
        return hf.token_to_id(token)
    token_id = hf.convert_tokens_to_ids(token)
    unk = getattr(hf, "unk_token_id", None)
    return None if token_id is None or (token_id == unk and token != getattr(hf, "unk_token", None)) else token_id


def family_of_tokenizer(tokenizer) -> Family:
    """The family whose turn tokens this tokenizer holds at the family's ids (default when none fits)."""
    for family in FAMILIES:
        if _token_id(tokenizer, family.turn_end) == family.turn_end_id:
            return family
    return DEFAULT
