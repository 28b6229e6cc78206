"""Caption tokenizer: byte-level BPE trained on the captions with HF `tokenizers` (Section 2.2).

Captions are lowercased; the vocabulary size is a config value (16384 for real data, far smaller for the
built-in shapes data). Encoding gives a fixed text length: longer captions are truncated (with a warning,
once per tokenizer), and unused slots are left as PAD (-1) for the model to fill with its learned
per-position padding tokens. BPE dropout (10% in the paper) applies only when asked for, when training
the transformer.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from dalle_fast.models.tokens import PAD

__all__ = ["PAD", "CaptionTokenizer"]


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("dalle_fast.data.tokenizer needs the `tokenizers` package: pip install tokenizers") from e
    return tokenizers


class CaptionTokenizer:
    """BPE over lowercased captions, encoding to a fixed `text_len` with PAD in unused slots."""

    def __init__(self, tokenizer, text_len: int, dropout: float = 0.1, words: set[str] | None = None):
        """words: the words of the training captions (for `unseen_words`; None: not known)."""
        if not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be an int >= 1, got {text_len!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self._tok = tokenizer
        self.text_len = text_len
        self.dropout = dropout
        self.words = words
        self._warned = False

    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int, text_len: int, dropout: float = 0.1, min_frequency: int = 2
    ) -> CaptionTokenizer:
        """Trains byte-level BPE on the captions (lowercased), and keeps their words."""
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"vocab_size must be an int >= 257 (the 256 bytes plus merges), got {vocab_size!r}")
        tk = _import_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.normalizer = _normalizer(tk)
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        # The words are counted with a normalizer of their own: tok is locked while it trains, and a call
        # into it from the iterator it reads would wait on that lock forever.
        words: Counter = Counter()
        normalizer = _normalizer(tk)

        def counted(captions):
            for c in captions:
                words.update(_words(normalizer, c))
                yield c

        tok.train_from_iterator(counted(captions), trainer=trainer)
        return cls(tok, text_len, dropout, set(words))

    def unseen_words(self, caption: str) -> list[str]:
        """The words of caption that no training caption had (BPE spells them from pieces the model saw in
        other words, so it has little to go on); [] when the tokenizer does not know its training words."""
        if self.words is None:
            return []
        return list(dict.fromkeys(w for w in _words(self._tok.normalizer, caption) if w not in self.words))

    def add_words(self, captions: Iterable[str]) -> None:
        """Counts the words of more training captions as seen (a tokenizer reused for new data: a run
        started from another run's weights keeps its tokenizer)."""
        if self.words is not None:
            self.words.update(w for c in captions for w in _words(self._tok.normalizer, c))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def _set_dropout(self, on: bool) -> None:
        self._tok.model.dropout = self.dropout if on and self.dropout > 0 else None

    def encode(self, captions: str | Sequence[str], dropout: bool = False) -> torch.Tensor:
        """LongTensor [len(captions), text_len] (or [text_len] for one string), PAD in unused slots.

        dropout=True applies BPE dropout (for training the transformer). Dropout splits words into more
        tokens; a caption whose dropout encoding would not fit text_len keeps its clean encoding, so it
        never loses its end (the second object of a caption, say) to regularisation."""
        single = isinstance(captions, str)
        batch = [captions] if single else list(captions)
        for c in batch:
            if not isinstance(c, str):
                raise ValueError(f"captions must be strings, got {type(c).__name__}")
        self._set_dropout(dropout)
        try:
            encs = self._tok.encode_batch(batch)
        finally:
            self._set_dropout(False)
        if dropout:
            long = [i for i, e in enumerate(encs) if len(e.ids) > self.text_len]
            for i, e in zip(long, self._tok.encode_batch([batch[i] for i in long]), strict=True):
                encs[i] = e
        out = torch.full((len(batch), self.text_len), PAD, dtype=torch.long)
        for i, e in enumerate(encs):
            ids = e.ids
            if len(ids) > self.text_len:
                if not self._warned:
                    warnings.warn(
                        f"caption of {len(ids)} tokens truncated to text_len={self.text_len} (warned once)",
                        stacklevel=2,
                    )
                    self._warned = True
                ids = ids[: self.text_len]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out[0] if single else out

    def length(self, caption: str) -> int:
        """How many tokens caption encodes to before any truncation to text_len."""
        return len(self._tok.encode(caption).ids)

    def decode(self, ids: torch.Tensor) -> str | list[str]:
        """Inverse of encode (PAD slots ignored); the text comes back lowercased."""
        if ids.dim() == 1:
            return self._tok.decode([int(i) for i in ids if int(i) != PAD])
        return [self.decode(row) for row in ids]

    def save(self, path: str | os.PathLike) -> Path:
        """One JSON file: the HF tokenizer plus text_len and dropout. Written to a temp file, then renamed."""
        path = Path(path)
        payload = {"text_len": self.text_len, "dropout": self.dropout, "tokenizer": json.loads(self._tok.to_str())}
        if self.words is not None:
            payload["words"] = sorted(self.words)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CaptionTokenizer:
        tk = _import_tokenizers()
        text = Path(path).read_text()  # a missing file raises FileNotFoundError as usual
        try:
            payload = json.loads(text)
            tok = tk.Tokenizer.from_str(json.dumps(payload["tokenizer"]))
            words = set(payload["words"]) if "words" in payload else None  # files of older runs have none
            return cls(tok, int(payload["text_len"]), float(payload.get("dropout", 0.1)), words)
        except Exception as e:  # truncated JSON, wrong keys, a file of something else
            raise ValueError(f"{path} is not a dalle_fast tokenizer file: {type(e).__name__}: {e}") from e


def _normalizer(tk):
    """NFKC, then lowercase: what captions go through before BPE."""
    return tk.normalizers.Sequence([tk.normalizers.NFKC(), tk.normalizers.Lowercase()])


def _words(normalizer, caption: str) -> list[str]:
    """The words (runs of letters and digits) of a caption, normalised as the tokenizer normalises it."""
    return re.findall(r"[^\W_]+", normalizer.normalize_str(caption))
