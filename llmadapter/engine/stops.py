"""Incremental detokenization and stop-string matching on the generated text only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters.

    Decodes a small window of recent ids (the approach of TGI and vLLM) so each step costs O(1)
    instead of re-decoding the whole output; text ending in U+FFFD waits for the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


@dataclass
class StopMatcher:
    """Finds the earliest stop string in the generated text and says how much text is safe to emit.

    Text is emitted only up to the start of the longest suffix that is still a prefix of some stop
    string, so a stream never shows text that a later token turns into a stop match. `include` keeps
    the matched stop string in the text (vLLM's include_stop_str_in_output); text fed with
    `searchable=False` (vLLM's min_tokens) is never searched.
    """

    stops: tuple[str, ...]
    include: bool = False
    text: str = ""
    emitted: int = 0
    stopped_at: int | None = field(default=None)  # where the text ends once a stop matched
    searched_from: int = 0

    def feed(self, delta: str, *, searchable: bool = True) -> str:
        """Add generated text; return the newly safe text (the cut text once a stop matches)."""
        if self.stopped_at is not None:
            return ""
        self.text += delta
        if not searchable:
            self.searched_from = len(self.text)
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        longest = max((len(s) for s in self.stops), default=0)
        start = max(self.searched_from, len(self.text) - len(delta) - longest + 1)
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) != -1]
        if hits:
            at, stop = min(hits)
            self.stopped_at = at + len(stop) if self.include else at
            out = self.text[self.emitted : self.stopped_at]
            self.emitted = self.stopped_at
            return out
        safe = len(self.text) - self._held_back()
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out

    def _held_back(self) -> int:
        longest = 0
        searchable = len(self.text) - self.searched_from
        for stop in self.stops:
            for k in range(min(len(stop) - 1, searchable), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def finish(self) -> str:
        """End of generation without a stop match: release the held-back tail."""
        if self.stopped_at is not None:
            return ""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    @property
    def final_text(self) -> str:
        return self.text if self.stopped_at is None else self.text[: self.stopped_at]
