"""The caption tokenizer: training, fixed-length encoding with PAD, truncation, dropout, save/load."""

import json

import pytest
import torch

from dalle_fast.data.tokenizer import PAD, CaptionTokenizer

CAPTIONS = [
    "a small red circle above a large blue square",
    "A Large Green Triangle to the left of a small yellow circle",
    "a blue square below a red triangle",
    "two shapes: a purple circle and an orange square",
] * 20


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer.train(CAPTIONS, vocab_size=400, text_len=16)


def test_round_trip_lowercases(tok):
    ids = tok.encode("A small RED circle")
    assert ids.shape == (16,) and ids.dtype == torch.long
    assert tok.decode(ids) == "a small red circle"
    n = int((ids != PAD).sum())
    assert (ids[n:] == PAD).all() and (ids[:n] >= 0).all() and (ids[:n] < tok.vocab_size).all()


def test_batch_and_truncation_warns_once(tok):
    long = " ".join(["circle"] * 40)
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok.encode([long, "a red square"])
    assert ids.shape == (2, 16) and (ids[0] != PAD).all()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(long)  # no second warning


def test_dropout_only_when_asked(tok):
    text = "a large green triangle to the left of a small yellow circle"
    plain = tok.encode(text)
    assert all(torch.equal(plain, tok.encode(text)) for _ in range(5))
    torch.manual_seed(0)
    dropped = [tok.encode(text, dropout=True) for _ in range(20)]
    assert any(not torch.equal(plain, d) for d in dropped)
    assert all(tok.decode(d) == text for d in dropped)  # nothing cut off


def test_dropout_never_truncates_a_caption_that_fits():
    """A dropout encoding longer than text_len falls back to the clean one (no warning, nothing lost);
    captions with room keep their dropout variants."""
    import warnings

    long, short = CAPTIONS[1].lower(), "a red square"
    # Room for three extra tokens: at dropout 0.05 about half the encodings of the long caption fit.
    fitted = CaptionTokenizer.train(CAPTIONS, vocab_size=400, text_len=len(tok_ids(long)) + 3, dropout=0.05)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning
        rows = [fitted.encode([long, short], dropout=True) for _ in range(40)]
    clean = fitted.encode([long, short])
    assert all(fitted.decode(r[0]) == long for r in rows)
    assert any((r[0] != PAD).sum() > (clean[0] != PAD).sum() for r in rows)  # some dropout encodings fit
    assert any(not torch.equal(r[1], clean[1]) for r in rows)
    assert any(torch.equal(r[0], clean[0]) for r in rows)  # and the overlong ones fell back to clean


def tok_ids(text: str) -> list[int]:
    return CaptionTokenizer.train(CAPTIONS, vocab_size=400, text_len=64)._tok.encode(text).ids


def test_save_load(tok, tmp_path):
    path = tok.save(tmp_path / "tok.json")
    back = CaptionTokenizer.load(path)
    assert back.text_len == 16 and back.vocab_size == tok.vocab_size
    assert torch.equal(back.encode(CAPTIONS[:4]), tok.encode(CAPTIONS[:4]))
    bad = tmp_path / "bad.json"
    bad.write_text(path.read_text()[:100])  # a truncated file
    with pytest.raises(ValueError, match="not a dalle_fast tokenizer"):
        CaptionTokenizer.load(bad)
    with pytest.raises(FileNotFoundError):
        CaptionTokenizer.load(tmp_path / "missing.json")


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="vocab_size"):
        CaptionTokenizer.train(CAPTIONS, vocab_size=10, text_len=8)
    with pytest.raises(ValueError, match="text_len"):
        CaptionTokenizer.train(CAPTIONS, vocab_size=300, text_len=0)
    with pytest.raises(ValueError, match="strings"):
        tok.encode([1, 2])


def test_unseen_words_are_named_and_survive_a_save(tmp_path):
    """The words of the training captions travel with the tokenizer, so a caption's new words can be named
    (generate warns about them); a tokenizer file without them (an older run) names none."""
    tok = CaptionTokenizer.train(["A red circle", "a blue SQUARE above it"] * 20, vocab_size=300, text_len=16)
    assert tok.unseen_words("a Red square") == []  # normalised as the tokenizer normalises
    assert tok.unseen_words("a purple circle beside a purple zebra") == ["purple", "beside", "zebra"]
    loaded = CaptionTokenizer.load(tok.save(tmp_path / "tok.json"))
    assert loaded.unseen_words("a zebra") == ["zebra"]
    payload = json.loads((tmp_path / "tok.json").read_text())
    del payload["words"]
    (tmp_path / "old.json").write_text(json.dumps(payload))
    assert CaptionTokenizer.load(tmp_path / "old.json").unseen_words("a zebra") == []
