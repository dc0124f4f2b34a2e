"""Hashtag and weak-label vocabularies of sources of any size, counted in one streaming pass.

``prepretrain data vocab`` and WSP's preparation both call these, so the vocabulary a user
inspects and the one training uses cannot disagree: raw tags per sample (:func:`iter_hashtags`,
through :func:`~prepretrain.data.records.iter_annotations`, which decodes no image), counts
(:func:`count_hashtags`), the vocabulary (:func:`build_vocab_streaming`,
:func:`build_label_vocab` with its coverage) and the hashtag -> class aliases (:func:`tag_aliases`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prepretrain.data.labels.hashtags import (
    HashtagVocab,
    annotation_tags,
    check_vocab_limits,
    image_tags,
    load_synonyms,
    prune_rarest,
    synonym_map,
    vocab_from_counts,
)
from prepretrain.data.labels.weaklabels import LabelCounts, WeakLabeler
from prepretrain.data.records import BadSample, iter_annotations, scratch_skips
from prepretrain.data.synthetic.images import (
    ATTRIBUTE_TAGS,
    SyntheticSource,
)


def iter_hashtags(source: Any, labels: Callable[[Any], list[str]] = annotation_tags) -> Iterator[list[str]]:
    """Every sample's raw tags (``labels`` of its annotation: hashtags by default, see
    :class:`~prepretrain.data.labels.weaklabels.WeakLabeler`) in :func:`iter_annotations` order (shards:
    shard order, no image read), ``[]`` for a sample whose annotations cannot be read (as
    :func:`~prepretrain.data.labels.hashtags.source_hashtags`); the source's own ``skips`` are left alone."""
    with scratch_skips(source):
        for outcome in iter_annotations(source):
            yield [] if isinstance(outcome, BadSample) else labels(outcome)


# -- counting hashtags in one pass ----------------------------------------------------------------


def count_hashtags(source: Any, *, max_distinct: int = 5_000_000, aliases: dict[str, str] | None = None,
                   labels: Callable[[Any], list[str]] = annotation_tags) -> tuple[Counter, dict[str, Any]]:
    """In how many images each tag appears, from one streaming pass that decodes no image.

    Tags are counted as :func:`~prepretrain.data.labels.hashtags.build_vocab` counts them: normalised
    (:func:`~prepretrain.data.labels.hashtags.normalize_hashtag`), mapped through ``aliases``
    (synonym -> class tag) and counted once per image. Annotations come from
    :func:`iter_annotations` (shards: ``json``/``txt`` members only; manifests: their rows).
    A sample whose annotations cannot be read counts as an image without tags, as in
    :func:`~prepretrain.data.labels.hashtags.source_hashtags`.

    Memory is bounded by ``max_distinct`` distinct tags: whenever there are more, every tag
    whose count is at most the median is dropped (at least the rarest half) and counts again
    from zero if it reappears. That is an approximation: a kept tag's count can then be too low
    by at most ``stats["count_error_bound"]`` (the sum of the largest count dropped at each
    pruning), a tag dropped late may be missing, and ``stats["exact"]`` is false. Without
    pruning the counts are exact.

    ``labels``: what an annotation's tags are (its hashtags; captions, Flickr tags or synsets
    through a :class:`~prepretrain.data.labels.weaklabels.WeakLabeler`).

    Returns ``(counts, stats)``; ``stats``: ``images`` (samples read), ``images_without_tags``
    (including ``unreadable`` ones), ``tag_occurrences`` (image-tag pairs counted),
    ``distinct_tags`` (in ``counts``), ``max_distinct``, ``prunings``, ``pruned_tags`` (entries
    dropped, a tag dropped twice counts twice), ``count_error_bound``, ``exact`` and
    ``skipped`` (bad samples and shard problems by reason).
    """
    if max_distinct < 2:
        raise ValueError(f"max_distinct must be >= 2, got {max_distinct}")
    aliases = dict(aliases or {})
    counts: Counter = Counter()
    images = without = unreadable = occurrences = prunings = pruned_tags = error_bound = 0
    with scratch_skips(source) as skips:
        for outcome in iter_annotations(source):
            images += 1
            if isinstance(outcome, BadSample):
                skips.skip(outcome)
                unreadable += 1
                without += 1
                continue
            tags = image_tags(labels(outcome), aliases)
            if not tags:
                without += 1
                continue
            occurrences += len(tags)
            counts.update(tags)
            if len(counts) > max_distinct:
                counts, dropped, threshold = prune_rarest(counts)
                prunings += 1
                pruned_tags += dropped
                error_bound += threshold
    stats = {
        "images": images,
        "images_without_tags": without,
        "unreadable": unreadable,
        "tag_occurrences": occurrences,
        "distinct_tags": len(counts),
        "max_distinct": max_distinct,
        "prunings": prunings,
        "pruned_tags": pruned_tags,
        "count_error_bound": error_bound,
        "exact": prunings == 0,
        "skipped": dict(skips.skipped),
    }
    return counts, stats


def build_vocab_streaming(source: Any, *, min_count: int = 1, max_size: int = 28_000,
                          aliases: dict[str, str] | None = None, max_distinct: int = 5_000_000,
                          labels: Callable[[Any], list[str]] = annotation_tags) -> HashtagVocab:
    """The vocabulary ``build_vocab(source_hashtags(source), min_count=..., max_size=...,
    aliases=...)`` builds, from one streaming pass (:func:`count_hashtags`) that holds at most
    ``max_distinct`` distinct tags and decodes no image: for shards (which ``source_hashtags``
    cannot read) and sources too large to hold every tag list.

    Identical to ``build_vocab`` (tags, order, counts, kept synonyms, ``info``) whenever no
    pruning happened. Otherwise ``info`` also holds ``approximate: true``, ``prunings``,
    ``pruned_tags`` and ``count_error_bound`` (see :func:`count_hashtags`).
    """
    return _streamed_vocab(source, min_count, max_size, aliases, max_distinct, labels)[0]


def _streamed_vocab(source: Any, min_count: int, max_size: int, aliases: dict[str, str] | None, max_distinct: int,
                    labels: Callable[[Any], list[str]]) -> tuple[HashtagVocab, Counter, dict[str, Any]]:
    """(vocabulary, counts, :func:`count_hashtags` stats) of one streaming pass; an approximate
    count (pruned) is said so in the vocabulary's info."""
    check_vocab_limits(min_count, max_size)
    counts, stats = count_hashtags(source, max_distinct=max_distinct, aliases=aliases, labels=labels)
    vocab = vocab_from_counts(counts, stats["images"], min_count=min_count, max_size=max_size, aliases=aliases)
    if not stats["exact"]:
        vocab.info.update(approximate=True, prunings=stats["prunings"], pruned_tags=stats["pruned_tags"],
                          count_error_bound=stats["count_error_bound"])
    return vocab, counts, stats


def build_label_vocab(source: Any, labels: WeakLabeler, *, min_count: int = 1, max_size: int = 28_000,
                      aliases: dict[str, str] | None = None,
                      max_distinct: int = 5_000_000) -> tuple[HashtagVocab, dict[str, Any]]:
    """``prepretrain data vocab``: the vocabulary of ``labels`` (a
    :class:`~prepretrain.data.labels.weaklabels.WeakLabeler`) over ``source`` from one streaming pass
    (:func:`count_hashtags`: bounded memory, no image decoded), and its coverage.

    Coverage (also saved in ``vocab.info["coverage"]``): images; the share with at least one label;
    labels per image; the share of label occurrences the vocabulary keeps; what labelling left out
    (empty captions, words in other scripts, machine tags); the vocabulary's 10 most and 10 least
    frequent entries with their image counts. The share of images left with a *vocabulary* label
    needs a second pass: a WSP run reports it (``train_images_without_known_tag``)."""
    labels.counts = LabelCounts()
    vocab, counts, stats = _streamed_vocab(source, min_count, max_size, aliases, max_distinct, labels)
    images = stats["images"]
    occurrences = stats["tag_occurrences"]
    names = labels.display_name
    coverage = {
        "labels_from": labels.labels_from,
        "images": images,
        "images_with_labels": images - stats["images_without_tags"],
        "share_with_labels": (images - stats["images_without_tags"]) / images if images else 0.0,
        "labels_per_image": occurrences / images if images else 0.0,
        "distinct_labels": len(counts),
        "vocab_size": len(vocab),
        "share_of_occurrences_in_vocab": sum(vocab.counts) / occurrences if occurrences else 0.0,
        "unreadable": stats["unreadable"],
        **{key: value for key, value in labels.counts.as_dict().items() if key != "images"},
        "head": [[tag, count, names(tag)] for tag, count in zip(vocab.tags[:10], vocab.counts[:10])],
        "tail": [[tag, count, names(tag)] for tag, count in zip(vocab.tags[-10:], vocab.counts[-10:])],
        "exact": stats["exact"],
    }
    vocab.info.update(labels_from=labels.labels_from, coverage=coverage)
    return vocab, coverage


def coverage_text(coverage: dict[str, Any]) -> str:
    """The coverage of :func:`build_label_vocab` as a few readable lines."""

    def entries(rows: list[list[Any]]) -> str:
        return ", ".join(f"{tag}{'' if name == tag else f' ({name})'} {count}" for tag, count, name in rows)

    lines = [
        f"images: {coverage['images']}, {100 * coverage['share_with_labels']:.1f}% with at least one label, "
        f"{coverage['labels_per_image']:.2f} labels per image, {coverage['distinct_labels']} distinct labels",
        f"vocabulary: {coverage['vocab_size']} labels, {100 * coverage['share_of_occurrences_in_vocab']:.1f}% of the "
        "label occurrences" + ("" if coverage["exact"] else " (counts approximate: the rarest labels were pruned)"),
        f"left out: {coverage['empty_captions']} empty captions, {coverage['non_latin_words']} words in non-Latin "
        f"scripts, {coverage['machine_tags']} machine tags, {coverage['unreadable']} unreadable annotations",
        f"head: {entries(coverage['head'])}",
        f"tail: {entries(coverage['tail'])}",
    ]
    return "\n".join(lines)




def tag_aliases(source: Any, choice: str = "auto", labels: WeakLabeler | None = None) -> dict[str, str]:
    """The hashtag -> class map (the paper's hashtag-to-synset step): ``none``; a synonym file;
    or, with ``auto``, the table the source ships (``source.hashtag_synonyms`` groups; for the
    synthetic set, its attribute tag groups such as ``circle/round/disc``). That table is a hashtag
    table: with ``labels`` that do not include hashtags (captions, Flickr tags, synsets), ``auto``
    gives none."""
    if choice == "none" or (choice == "auto" and labels is not None and "hashtags" not in labels.kinds):
        return {}
    if choice != "auto":
        return load_synonyms(choice)
    groups = getattr(source, "hashtag_synonyms", None)
    if groups is None and isinstance(source, SyntheticSource):
        groups = [group for attribute in ATTRIBUTE_TAGS.values() for group in attribute]
    return synonym_map(groups) if groups else {}


# -- a rehearsal of the paper-scale data layout ---------------------------------------------
