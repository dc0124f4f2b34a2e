"""Weak labels for WSP from what public image-text data has: Flickr tags, captions, WordNet synsets.

The paper's WSP classifies Instagram hashtags, which are not public. Public web datasets carry
captions (DataComp, LAION, CC3M/CC12M) or Flickr user tags, titles and descriptions (YFCC100M).
This module turns each of them into a per-image list of label strings, which WSP then treats
exactly as hashtags (:mod:`prepretrain.data.labels.hashtags`: normalisation, vocabulary, resampling,
metrics). One :class:`WeakLabeler` is used by ``prepretrain data vocab`` and by training, so the
vocabulary and the targets are always derived the same way.

``labels_from`` (``WeakLabeler(labels_from)``), one kind or several joined by ``+``:

* ``hashtags``: the annotation's tag list as it is (the default, the paper's setting).
* ``tags``: Flickr user tags, as YFCC100M stores them: URL-encoded with ``+`` for a space
  (``new+york`` -> ``new york``), case folded; machine tags (``namespace:predicate=value``, e.g.
  ``geo:lat=48.85`` or ``upload:by=flickrmobile``) are dropped, they describe the upload.
* ``caption``: the words of the caption (YFCC: title and description), Joulin et al. 2016's
  labels: tokenised into letter runs, stop words and one-letter words dropped, each word
  lemmatised as a noun (``dogs`` -> ``dog``, ``mice`` -> ``mouse``; lemminflect, which ships its
  data), each word once per image.
* ``synsets``: the WordNet noun synsets the caption names, CatLIP's labels: the longest run of
  words that is a WordNet lemma wins (``hot dog`` before ``hot`` and ``dog``), its last word
  lemmatised (``hot dogs``), labelled by the synset id (``n07697537``). The lemma table is the
  one timm ships for ImageNet-21k (21,843 noun synsets) unless ``synset_table=`` names another
  (``wnid<TAB>lemma, lemma, ...`` lines, e.g. exported from NLTK's WordNet).

Stated rules (assumptions where the sources say nothing):

* A caption word is kept only if it is written in Latin script (accents allowed). Words in other
  scripts are left out and counted (``non_latin_words``): the stop words, the lemmatiser and the
  lemma table are English, so such words would enter the vocabulary unnormalised. Non-English
  words in Latin script are kept; rare ones fall below the vocabulary's ``min_count``.
* Numbers are not words (``2019``, ``4k`` -> ``k`` is then a one-letter word, dropped).
* A one-word lemma names a synset only where it is the synset's first lemma (``dog`` is the
  domestic dog's, not the andiron's, where it is the third; ``red`` names no synset, because its
  only entry is the third lemma of ``Bolshevik``); a lemma of several words counts at any
  position (``hot dog``, the second lemma of ``hotdog``). A lemma that is the first of several
  synsets (``mouse``: the rodent and the device) labels all of them: timm's table has no sense
  frequencies, so the most frequent sense, which CatLIP takes from NLTK, cannot be chosen. A
  ``synset_table`` with one synset per lemma makes the mapping one-to-one.
* Lemmas are matched as nouns without part-of-speech tagging: an adjective that is also a noun
  lemma (``green``, the colour) is labelled with the noun's synset.
* An empty caption gives no label and is counted (``empty_captions``); a caption with no word
  left (``of the``) gives no label either. Neither is an error: such an image is one without a
  label, counted in the coverage, and WSP never draws an image without a known label.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

LABEL_KINDS = ("hashtags", "tags", "caption", "synsets")

# Runs of letters (any script), with inner apostrophes (don't, o'clock); digits and '_' split words.
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
# Flickr machine tags: namespace:predicate=value (https://www.flickr.com/groups/api/discuss/72157594497877875/)
_MACHINE_TAG = re.compile(r"^[a-z_][\w.-]*:[\w.-]+=", re.IGNORECASE)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})

# English function words and caption boilerplate; written here, the usual closed-class words.
STOP_WORDS = frozenset("""
a about above after again against all almost along also although am among an and another any anybody anyone
anything are around as at be became because become been before behind being below beside besides between beyond
both but by can cannot could did do does doing done down during each either else enough etc even ever every
everyone everything few for from further had has have having he her here hers herself him himself his how however
i if in inside into is it its itself just least less like many may me might mine more most much must my myself
near neither never next no nobody none nor not nothing now of off often on once one only onto or other others
otherwise our ours ourselves out outside over own per perhaps quite rather really same several shall she should
since so some somebody someone something sometimes still such than that the their theirs them themselves then
there these they this those though through throughout thus to together too toward towards under until up upon us
very via was we well were what whatever when where whether which while who whom whose why will with within without
would yet you your yours yourself yourselves don't doesn't didn't isn't aren't wasn't weren't can't couldn't won't
wouldn't shouldn't it's i'm i've i'd i'll you're you've we're they're that's there's here's let's
two three four five six seven eight nine ten photo photos image images picture pictures stock view
""".split())


def tokenize(text: str) -> list[str]:
    """Case-folded words of ``text`` (NFKC; letters of any script; possessive ``'s`` removed)."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).casefold()
    words = []
    for word in _WORD.findall(text):
        if word.endswith("'s"):
            word = word[:-2]
        words.append(word)
    return words


def is_latin(word: str) -> bool:
    """Every character is in a Latin block (Basic Latin to Latin Extended-B, Latin Extended
    Additional) or is an apostrophe."""
    return word.isascii() or all(ch < "\u0250" or "\u1e00" <= ch <= "\u1eff" for ch in word)


@functools.lru_cache(maxsize=1 << 18)
def noun_lemma(word: str) -> str:
    """The noun lemma of an English word (``berries`` -> ``berry``, ``geese`` -> ``goose``); the
    word itself when lemminflect knows no other form, or when it is shorter than 3 letters."""
    if len(word) < 3 or not is_latin(word):
        return word
    from lemminflect import getLemma  # its tables load on first use (~0.1 s)

    lemmas = getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


def flickr_tags(raw_tags: Iterable[str], counts: LabelCounts | None = None) -> list[str]:
    """Flickr user tags as words: URL-decoded (``+`` is a space), whitespace collapsed, case
    folded; machine tags (counted in ``counts``) and empty tags dropped; each tag once, in order."""
    out: dict[str, None] = {}
    for raw in raw_tags:
        tag = " ".join(unquote_plus(str(raw)).split()).casefold()
        if _MACHINE_TAG.match(tag):
            if counts is not None:
                counts.machine_tags += 1
        elif tag:
            out[tag] = None
    return list(out)


def split_flickr_tags(field_text: str) -> list[str]:
    """A YFCC100M tag field (``tag1,new+york,...``) as its raw tags (split on commas only: a
    tag's spaces are encoded as ``+``)."""
    return [tag for tag in field_text.split(",") if tag.strip()]


@dataclass
class LabelCounts:
    """What labelling a stream left out, for the coverage report."""

    images: int = 0
    empty_captions: int = 0  # a caption-based kind found no caption text at all
    non_latin_words: int = 0
    machine_tags: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def caption_words(caption: str, counts: LabelCounts | None = None) -> list[str]:
    """The caption's content words, lemmatised as nouns, each once, in order (see the module
    docstring for the rules)."""
    out: dict[str, None] = {}
    for word in tokenize(caption):
        if not is_latin(word):
            if counts is not None:
                counts.non_latin_words += 1
            continue
        if len(word) < 2 or word in STOP_WORDS:
            continue
        lemma = noun_lemma(word)
        if lemma not in STOP_WORDS:
            out[lemma] = None
    return list(out)


def default_synset_table() -> Path:
    """timm's ImageNet-21k lemma table (``wnid<TAB>lemma, lemma``), installed with timm."""
    import timm.data

    return Path(timm.data.__file__).parent / "_info" / "imagenet_synset_to_lemma.txt"


@dataclass
class SynsetIndex:
    """Lemma word sequences -> synset ids, from a ``wnid<TAB>lemma, lemma, ...`` table."""

    lemmas: dict[tuple[str, ...], tuple[str, ...]]
    names: dict[str, str]  # synset id -> its first lemma, for display
    longest: int  # words in the longest lemma
    starts: dict[str, int] = field(default_factory=dict)  # first word -> words in its longest lemma

    def __post_init__(self) -> None:
        if not self.starts:
            for words in self.lemmas:
                self.starts[words[0]] = max(self.starts.get(words[0], 0), len(words))

    @classmethod
    def read(cls, path: str | Path) -> SynsetIndex:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"synset table not found: {path}")
        best: dict[tuple[str, ...], tuple[int, list[str]]] = {}
        names: dict[str, str] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            wnid, sep, lemma_text = line.partition("\t")
            wnid = wnid.strip()
            if not sep or not wnid or not lemma_text.strip():
                raise ValueError(f"{path}:{number}: expected 'synset_id<TAB>lemma, lemma, ...', got {line[:80]!r}")
            lemmas = [lemma.strip() for lemma in lemma_text.split(",") if lemma.strip()]
            names.setdefault(wnid, lemmas[0])
            for position, lemma in enumerate(lemmas):
                words = tuple(tokenize(lemma))
                if not words or (len(words) == 1 and (position > 0 or words[0] in STOP_WORDS)):
                    continue
                rank, synsets = best.get(words, (len(lemmas), []))
                if position < rank:
                    best[words] = (position, [wnid])
                elif position == rank and wnid not in synsets:
                    synsets.append(wnid)
        if not best:
            raise ValueError(f"{path}: no lemma found")
        lemmas_index = {words: tuple(synsets) for words, (_, synsets) in best.items()}
        return cls(lemmas_index, names, max(len(words) for words in lemmas_index))

    def find(self, words: list[str]) -> list[str]:
        """Synset ids named in ``words`` (tokens), longest match first, left to right, each once."""
        out: dict[str, None] = {}
        position = 0
        while position < len(words):
            matched = 0
            for size in range(min(self.starts.get(words[position], 1), len(words) - position), 0, -1):
                span = words[position : position + size]
                if size == 1 and (span[0] in STOP_WORDS or len(span[0]) < 2):
                    break
                synsets = self.lemmas.get(tuple(span))
                if synsets is None:  # the last word in its singular form: "hot dogs" -> "hot dog"
                    lemma = noun_lemma(span[-1])
                    if lemma != span[-1]:
                        synsets = self.lemmas.get((*span[:-1], lemma))
                if synsets is not None:
                    out.update(dict.fromkeys(synsets))
                    matched = size
                    break
            position += max(matched, 1)
        return list(out)


@functools.lru_cache(maxsize=4)
def synset_index(path: str = "") -> SynsetIndex:
    """The (cached, per process) index of ``path``, or of timm's table when empty."""
    return SynsetIndex.read(path or default_synset_table())


def parse_labels_from(text: str) -> tuple[str, ...]:
    """``"caption+tags"`` -> ``("caption", "tags")``; ValueError naming the valid kinds."""
    kinds = tuple(dict.fromkeys(part.strip() for part in str(text).split("+") if part.strip()))
    bad = [kind for kind in kinds if kind not in LABEL_KINDS]
    if not kinds or bad:
        shown = bad[0] if bad else text
        raise ValueError(f"unknown label kind {shown!r}: use one of {', '.join(LABEL_KINDS)}, or several joined by '+'")
    return kinds


@dataclass
class WeakLabeler:
    """Annotation -> the label strings WSP counts and predicts (see the module docstring).

    A small picklable object (a DataLoader worker rebuilds its tables lazily); ``counts``
    accumulates what was left out in this process, for reports."""

    labels_from: str = "hashtags"
    synset_table: str = ""
    counts: LabelCounts = field(default_factory=LabelCounts, compare=False)

    def __post_init__(self) -> None:
        self.kinds = parse_labels_from(self.labels_from)
        self.labels_from = "+".join(self.kinds)
        if "synsets" in self.kinds and self.synset_table and not Path(self.synset_table).is_file():
            raise FileNotFoundError(f"synset table not found: {self.synset_table}")

    @property
    def identity(self) -> str:
        """What decides the labels, for cache keys and run records."""
        table = ""
        if "synsets" in self.kinds:
            path = Path(self.synset_table) if self.synset_table else default_synset_table()
            stat = path.stat()
            table = f":{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return self.labels_from + table

    def __call__(self, annotation: Any) -> list[str]:
        self.counts.images += 1
        if self.kinds == ("hashtags",):
            return list(annotation.hashtags)
        labels: dict[str, None] = {}
        caption = str(getattr(annotation, "caption", "") or "")
        if ("caption" in self.kinds or "synsets" in self.kinds) and not caption.strip():
            self.counts.empty_captions += 1
        for kind in self.kinds:
            if kind == "hashtags":
                labels.update(dict.fromkeys(str(tag) for tag in annotation.hashtags))
            elif kind == "tags":
                labels.update(dict.fromkeys(flickr_tags(annotation.hashtags, self.counts)))
            elif kind == "caption":
                labels.update(dict.fromkeys(caption_words(caption, self.counts)))
            else:
                words = tokenize(caption)
                if "caption" not in self.kinds:  # counted once when both kinds read the caption
                    self.counts.non_latin_words += sum(1 for word in words if not is_latin(word))
                labels.update(dict.fromkeys(synset_index(self.synset_table).find(words)))
        return list(labels)

    def display_name(self, label: str) -> str:
        """A readable name for a label (a synset's first lemma; other labels as they are)."""
        if "synsets" in self.kinds:
            return synset_index(self.synset_table).names.get(label, label)
        return label


__all__ = [
    "LABEL_KINDS",
    "STOP_WORDS",
    "LabelCounts",
    "SynsetIndex",
    "WeakLabeler",
    "caption_words",
    "default_synset_table",
    "flickr_tags",
    "is_latin",
    "noun_lemma",
    "parse_labels_from",
    "split_flickr_tags",
    "synset_index",
    "tokenize",
]
