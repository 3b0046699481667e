"""A small in-memory retriever: passages ranked by overlap of words with the query."""

import math
import re
from pathlib import Path

from shared.errors import ConfigError

_WORD = re.compile(r"\w+", re.UNICODE)

SAMPLE_CORPUS = (
    "NATS is a lightweight messaging system with subjects, publish-subscribe and request-reply.",
    "JetStream adds persistence to NATS: streams store messages and consumers track delivery.",
    "A work-queue stream deletes each message once a consumer acknowledges it.",
    "Pull consumers let each worker fetch a batch of messages when it has capacity.",
    "max_ack_pending bounds how many delivered messages may be unacknowledged at once.",
    "Backpressure: when a bounded stream is full, new messages are rejected instead of queued.",
    "A dead-letter stream keeps messages that could not be processed, with the reason why.",
    "Retrieval-augmented generation adds relevant passages to the prompt before inference.",
    "Session affinity sends all requests of one conversation to the same worker instance.",
    "Large language models generate text one token at a time.",
)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class Retriever:
    """Ranks passages by TF-IDF weighted word overlap with the query."""

    def __init__(self, passages: list[str]) -> None:
        self.passages = passages
        # An inverted index: a query costs a lookup per word of its own, not a pass over
        # every passage.
        self._postings: dict[str, list[int]] = {}
        for i, passage in enumerate(passages):
            for word in dict.fromkeys(_words(passage)):
                self._postings.setdefault(word, []).append(i)
        n = len(passages)
        self._idf = {w: math.log(1 + n / len(found)) for w, found in self._postings.items()}

    @classmethod
    def from_file(cls, path: Path | None) -> "Retriever":
        """Load one passage per non-empty line of `path`, or the sample corpus when None."""
        if path is None:
            return cls(list(SAMPLE_CORPUS))
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read corpus {path}: {exc}") from None
        return cls([line.strip() for line in lines if line.strip()])

    def search(self, query: str, k: int) -> list[str]:
        """The `k` best passages for `query`, best first; none when nothing overlaps."""
        scores: dict[int, float] = {}
        for word in set(_words(query)):
            found = self._postings.get(word)
            if found is not None:
                weight = self._idf[word]
                for i in found:
                    scores[i] = scores.get(i, 0.0) + weight
        best = sorted((-score, i) for i, score in scores.items())
        return [self.passages[i] for _, i in best[:k]]
