"""The text of one choice as its tokens arrive: detokenized, cut at stop strings, with the logprobs that go with it.

`ChoiceText.push(token)` returns the text that token makes final: never a broken character
(`tokenizer.StreamDecoder`), never text that could still turn out to start a stop string (held back,
as `pipeline.TextGenerator` does), nothing from a stop string on, and nothing for an end-of-sequence
token. The same code serves streamed and non-streamed answers, so their text is the same.

Each token's logprob entry is released with the text it belongs to, with its offset in the choice's
text; a token that only completed a stop string (text dropped) has its entry dropped too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..pipeline import _split_at_stop
from ..tokenizer import StreamDecoder, Tokenizer
from .sampling import TokenLogprob

__all__ = ["ChoiceText", "Piece"]


@dataclass
class Piece:
    """Text made final by a push; `logprobs` pairs each released token's entry with its text offset."""

    text: str = ""
    logprobs: list[tuple[TokenLogprob, int]] = field(default_factory=list)
    stopped: bool = False  # a stop string was reached: the choice is over


class ChoiceText:
    def __init__(
        self, tokenizer: Tokenizer, stop: list[str], eos: frozenset[int], skip_special_tokens: bool = True
    ) -> None:
        # Special tokens are dropped from the text, but where the chat's parser looks for tags that
        # are special tokens (Jamba 1.5's tool tags, as vLLM's Jamba parser keeps them).
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stop = stop
        self.eos = eos
        self.text = ""  # released so far
        self.stopped = False
        self._pending = ""  # decoded, held back
        self._entries: list[tuple[TokenLogprob, int]] = []  # held back, offsets into _pending

    def push(self, token: int, logprob: TokenLogprob | None = None) -> Piece:
        if self.stopped or token in self.eos:
            return Piece(stopped=self.stopped)
        if logprob is not None:
            self._entries.append((logprob, len(self._pending)))
        self._pending += self.decoder.push(token)
        return self._release(final=False)

    def finish(self) -> Piece:
        """The held-back rest, once the sequence has ended."""
        if self.stopped:
            return Piece(stopped=True)
        self._pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> Piece:
        done, rest, stopped = _split_at_stop(self._pending, self.stop, final=final)
        if stopped:
            # Tokens whose text starts at or after the cut only formed the stop string.
            released = [(lp, off) for lp, off in self._entries if off < len(done)]
            self._entries = []
        elif rest:
            released = [(lp, off) for lp, off in self._entries if off < len(done)]
            self._entries = [(lp, off - len(done)) for lp, off in self._entries if off >= len(done)]
        else:
            released, self._entries = self._entries, []
        piece = Piece(done, [(lp, len(self.text) + off) for lp, off in released], stopped)
        self._pending = "" if stopped else rest
        self.text += done
        self.stopped = stopped
        return piece
