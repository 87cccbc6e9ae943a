"""Token models: what a token is to the emulator.

Without a tokenizer, a token is a word with its leading white space (``" the"``, ``" emulator"``); a word longer than
twelve characters (a URL, code, a run of ``x``) is split every four characters, so it still counts roughly as a
real tokenizer would. Trailing white space is a token of its own. Ids are
given to pieces in the order they are first seen, per process (the filler words' pieces first), so ``/detokenize``
can read back what ``/tokenize`` made; an id never given is out of the vocabulary. With ``--tokenizer DIR`` the
Hugging Face tokenizer in ``DIR/tokenizer.json`` counts, splits and names tokens, so counts, ids and logprob tokens
are the model's real ones. Neither applies a chat template: a chat prompt is its messages' texts joined by a newline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

WORDS = tuple(
    (
        "the model answers with filler text because this server is an emulator and not a language model at all "
        "latency tokens stream one by one while the gateway measures time to first token inter token latency "
        "and cost per million output tokens for a side by side comparison on identical prompts"
    ).split(" ")
)
WORD = re.compile(r"\s*\S+|\s+")
LONG_WORD, LONG_PIECE = 12, 4
VOCAB_LIMIT = 1 << 18  # pieces beyond this many share the unknown id 0: a long load test stays bounded


class OutOfVocabulary(Exception):
    def __init__(self, token_id: int) -> None:
        super().__init__(f"Token id {token_id} is out of vocabulary")
        self.token_id = token_id


class TokenModel(Protocol):
    filler: list[int]  # ids the filler text is made of: the emulator's output and logprob alternatives
    words: list[list[int]]  # each filler word (with its leading space) as ids

    def encode(self, text: str, special: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def piece(self, token_id: int) -> str: ...  # the text of one token decoded alone
    def token_str(self, token_id: int) -> str: ...  # its vocabulary entry
    def info(self) -> dict[str, Any]: ...
    def size(self) -> int: ...  # the vocabulary's size (what ``logprobs: -1`` asks for)


class WordTokens:
    def __init__(self, max_model_len: int) -> None:
        self.pieces = ["<unk>"]
        self.ids: dict[str, int] = {}
        self.max_model_len = max_model_len
        self.words = [self.encode(" " + word) for word in WORDS]
        self.filler = sorted({i for word in self.words for i in word})

    def encode(self, text: str, special: bool = False) -> list[int]:
        out = []
        for piece in self._pieces(text):
            token_id = self.ids.get(piece)
            if token_id is None:
                token_id = 0
                if len(self.pieces) < VOCAB_LIMIT:
                    token_id = self.ids[piece] = len(self.pieces)
                    self.pieces.append(piece)
            out.append(token_id)
        return out

    @staticmethod
    def _pieces(text: str) -> list[str]:
        out = []
        for word in WORD.findall(text):
            bare = word.lstrip()
            if len(bare) <= LONG_WORD:
                out.append(word)
                continue
            space = word[: len(word) - len(bare)]
            out.extend(
                space + bare[i : i + LONG_PIECE] if i == 0 else bare[i : i + LONG_PIECE]
                for i in range(0, len(bare), LONG_PIECE)
            )
        return out

    def piece(self, token_id: int) -> str:
        if not 0 <= token_id < len(self.pieces):
            raise OutOfVocabulary(token_id)
        return self.pieces[token_id]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.piece(i) for i in ids)

    def token_str(self, token_id: int) -> str:
        return self.piece(token_id)

    def size(self) -> int:
        return len(self.pieces)

    def info(self) -> dict[str, Any]:
        return {"tokenizer_class": "WordPieces (vllm-emulator)", "model_max_length": self.max_model_len}


class HfTokens:
    """A Hugging Face ``tokenizers`` tokenizer (the light Rust package, not ``transformers``)."""

    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer

        root = Path(directory)
        if not (root / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer: no tokenizer.json in {directory}")
        self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        config_path = root / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.words = [self.encode(" " + word) for word in WORDS]
        self.filler = sorted({i for word in self.words for i in word})
        self.pieces: dict[int, str] = {}

    def encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special).ids)

    def _check(self, ids: Sequence[int]) -> None:
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise OutOfVocabulary(token_id)

    def decode(self, ids: Sequence[int]) -> str:
        self._check(ids)
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def piece(self, token_id: int) -> str:
        text = self.pieces.get(token_id)
        if text is None:
            text = self.pieces[token_id] = self.decode([token_id])  # bounded by the vocabulary
        return text

    def token_str(self, token_id: int) -> str:
        self._check([token_id])
        return str(self.tokenizer.id_to_token(token_id))

    def size(self) -> int:
        return int(self.vocab_size)

    def info(self) -> dict[str, Any]:
        """tokenizer_config.json as vLLM's /tokenizer_info gives it: file paths dropped, added tokens by content."""
        out = {k: v for k, v in self.config.items() if k not in ("vocab_file", "merges_file")}
        added = out.get("added_tokens_decoder")
        if isinstance(added, dict):
            out["added_tokens_decoder"] = {k: v.get("content", v) for k, v in added.items() if isinstance(v, dict)}
        out.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        return out


def token_model(tokenizer: str | None, max_model_len: int) -> TokenModel:
    return HfTokens(tokenizer) if tokenizer else WordTokens(max_model_len)


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list joined by newlines (as vLLM renders them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def chat_prompt(messages: list[Any]) -> str:
    return "\n".join(message_text(m.get("content")) for m in messages if isinstance(m, dict))
