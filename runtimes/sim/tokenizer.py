"""The sim engine's tokenizer: words to token ids and back, counting as the rest of the sim counts.

The sim has no vocabulary file, so a word's id is a hash of the word into a Llama-sized vocabulary
(ids 3 and up; 0-2 are `<unk>`, `<s>`, `</s>` as Llama's). A text is its whitespace-separated
words, one token each, which is how `textgen.count_prompt_tokens` measures prompts; an empty text
is the begin-of-sequence token alone, as a real tokenizer would give. So `/tokenize`'s count, an
embedding's `prompt_tokens` and a completion's `prompt_tokens` agree for the same text.

Ids are not reversible by themselves, so the tokenizer remembers the words it has seen (a bounded
table); `/detokenize` of ids it never produced reads them as words of the sim's own vocabulary.
"""

from __future__ import annotations

import hashlib

from runtimes.sim.textgen import VOCABULARY

VOCAB_SIZE = 32000  # Llama's
BOS_ID = 1
SPECIAL_TOKENS = {0: "<unk>", BOS_ID: "<s>", 2: "</s>"}
_FIRST_WORD_ID = len(SPECIAL_TOKENS)
_WORD_PREFIX = "\u0120"  # byte-level BPE's "Ġ": a word that follows a space
_REMEMBERED_WORDS = 100_000


def word_id(word: str) -> int:
    digest = hashlib.sha256(word.encode("utf-8", "surrogatepass")).digest()
    return _FIRST_WORD_ID + int.from_bytes(digest[:8], "big") % (VOCAB_SIZE - _FIRST_WORD_ID)


class SimTokenizer:
    """Words to ids (`encode`), ids to words (`decode`), and the token strings vLLM can show."""

    def __init__(self) -> None:
        self._words: dict[int, str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        words = text.split()
        if not words:
            return [BOS_ID] if add_special_tokens else []
        ids = []
        for word in words:
            token = word_id(word)
            if len(self._words) < _REMEMBERED_WORDS:
                self._words.setdefault(token, word)
            ids.append(token)
        return ids

    def word(self, token: int) -> str:
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[token]
        return self._words.get(token) or VOCABULARY[token % len(VOCABULARY)]

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`; ids outside the vocabulary are dropped, as vLLM's tokenizer does."""
        return " ".join(self.word(token) for token in ids if 0 <= token < VOCAB_SIZE)

    def token_strs(self, ids: list[int]) -> list[str]:
        """Each token as the vocabulary spells it: words after the first carry their space."""
        strs = []
        for position, token in enumerate(ids):
            text = self.word(token)
            joined = position > 0 and token not in SPECIAL_TOKENS and ids[position - 1] != BOS_ID
            strs.append(_WORD_PREFIX + text if joined else text)
        return strs

    @staticmethod
    def in_vocabulary(token: int) -> bool:
        return 0 <= token < VOCAB_SIZE
