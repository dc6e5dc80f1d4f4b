"""Fine-tuning image captioning (``image-to-text``): BLIP on (image, corrected caption) rows.

The evaluation (:class:`CaptionEvaluation`) scores the captions a model writes against every caption people
gave for the image (several references when several people labelled it), with the three metrics of the COCO
caption evaluation, in pure Python: BLEU-4 (corpus level, brevity penalty), ROUGE-L (LCS F-measure) and
CIDEr-D (tf-idf weighted n-grams, clipped, with a length penalty). Captions are compared as lower-case words,
punctuation dropped (as the COCO tokenizer does).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Iterable

from ..catalog import ModelSpec
from ..placement import Placement
from ..tasks.base import load_kwargs
from .base import BLIP_TARGETS, FinetuneAdapter
from .evaluate import LabelledQuestion, TaskEvaluation, average, group_of, grouped_rows, image_of
from .labels import CampaignInput

TASK = "image-to-text"
MAX_N = 4                 # BLEU-4 and CIDEr-D use 1- to 4-grams
ROUGE_BETA = 1.2          # ROUGE-L weighs recall 1.2 times precision (as the COCO evaluation does)
CIDER_SIGMA = 6.0         # CIDEr-D's Gaussian length penalty
CIDER_SCALE = 10.0        # CIDEr-D is reported x10

# --- the metrics -------------------------------------------------------------------------------------------


def caption_words(text: str) -> list[str]:
    """A caption as the metrics read it: ``"A Cat, sitting."`` -> ``["a", "cat", "sitting"]``."""
    return re.findall(r"[^\W_]+(?:'[^\W_]+)?", str(text).lower())


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(pairs: list[tuple[list[str], list[list[str]]]]) -> float:
    """Corpus BLEU-4 of (candidate words, reference word lists) pairs: the geometric mean of the clipped 1- to
    4-gram precisions summed over the corpus, times the brevity penalty ``exp(1 - r / c)`` when the candidates'
    length ``c`` is below ``r``, the sum of each candidate's closest reference length. No smoothing: 0 when
    some n has no match."""
    matched, total = [0] * MAX_N, [0] * MAX_N
    length = closest = 0
    for candidate, references in pairs:
        length += len(candidate)
        closest += min((len(ref) for ref in references), key=lambda r: (abs(r - len(candidate)), r))
        for n in range(1, MAX_N + 1):
            counts = ngrams(candidate, n)
            most = Counter()
            for ref in references:
                most |= ngrams(ref, n)  # the most times each n-gram occurs in one reference
            matched[n - 1] += sum(min(count, most[gram]) for gram, count in counts.items())
            total[n - 1] += sum(counts.values())
    if not length or 0 in matched:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / MAX_N
    brevity = 1.0 if length > closest else math.exp(1 - closest / length)
    return brevity * math.exp(log_precision)


def lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: list[str], references: list[list[str]]) -> float:
    """ROUGE-L of one caption: the F-measure (beta 1.2) of the best LCS precision and the best LCS recall
    over the references."""
    if not candidate:
        return 0.0
    lcs = [lcs_length(candidate, ref) for ref in references]
    precision = max(common / len(candidate) for common in lcs)
    recall = max(common / len(ref) if ref else 0.0 for common, ref in zip(lcs, references))
    if not precision or not recall:
        return 0.0
    return (1 + ROUGE_BETA ** 2) * precision * recall / (recall + ROUGE_BETA ** 2 * precision)


def cider_d(pairs: list[tuple[list[str], list[list[str]]]]) -> list[float]:
    """CIDEr-D of each (candidate words, reference word lists) pair, as the COCO caption evaluation computes
    it: each n-gram (n = 1..4) weighs its count times ``log(images / images whose references hold it)``; per n,
    the cosine of candidate and reference vectors with the candidate's weights clipped to the reference's,
    times ``exp(-(length difference)^2 / (2 * 6^2))``; averaged over n and references, x10. The document
    frequencies come from the references of ``pairs``, so a corpus of one image scores 0."""
    def vectors(words: list[str]) -> list[dict[tuple[str, ...], float]]:
        return [{gram: count * (log_images - math.log(max(1, frequency[gram])))
                 for gram, count in ngrams(words, n).items()} for n in range(1, MAX_N + 1)]

    frequency: Counter = Counter()
    for _, references in pairs:
        frequency.update({gram for ref in references for n in range(1, MAX_N + 1) for gram in ngrams(ref, n)})
    log_images = math.log(len(pairs)) if pairs else 0.0
    scores = []
    for candidate, references in pairs:
        mine = vectors(candidate)
        total = 0.0
        for ref in references:
            theirs = vectors(ref)
            penalty = math.exp(-((len(candidate) - len(ref)) ** 2) / (2 * CIDER_SIGMA ** 2))
            for hyp_n, ref_n in zip(mine, theirs):
                norms = math.sqrt(sum(v * v for v in hyp_n.values())) * math.sqrt(sum(v * v for v in ref_n.values()))
                if norms:
                    dot = sum(min(v, ref_n.get(gram, 0.0)) * ref_n.get(gram, 0.0) for gram, v in hyp_n.items())
                    total += dot / norms * penalty / MAX_N
        scores.append(CIDER_SCALE * total / len(references))
    return scores


def caption_metrics(scored: list[tuple[Any, str]]) -> dict[str, Any]:
    """BLEU-4 (corpus), ROUGE-L and CIDEr-D (means over images) of (example, caption) pairs, an example's
    ``answers`` being its reference captions."""
    pairs = [(caption_words(caption), [caption_words(ref) for ref in example.answers]) for example, caption in scored]
    if not pairs:
        return {"bleu4": None, "rouge_l": None, "cider_d": None, "images": 0}
    return {"bleu4": round(bleu4(pairs), 4),
            "rouge_l": average([rouge_l(candidate, references) for candidate, references in pairs]),
            "cider_d": average(cider_d(pairs)), "images": len(pairs)}


class CaptionEvaluation(TaskEvaluation):
    """BLEU-4, ROUGE-L and CIDEr-D of the caption of each image against every caption people gave it."""

    task = TASK
    metrics = (("BLEU-4", "bleu4", "images"), ("ROUGE-L", "rouge_l", "images"), ("CIDEr-D", "cider_d", "images"))
    export_columns = ("image", "text", "merged_record_ids")

    def examples_from_rows(self, rows: Iterable[dict[str, Any]], *, split_groups: bool) -> list[LabelledQuestion]:
        """One example per image, with every caption given for it (one per person)."""
        return [LabelledQuestion(image_of(group["image"]), "", tuple(group["labels"]),
                                 group_of(group["corrected"], split_groups))
                for group in grouped_rows(rows, key=lambda row: None, label=lambda row: row["text"].strip())]

    def example_from_campaign(self, item: CampaignInput, campaign: str) -> LabelledQuestion:
        """The campaign's image and start of caption (``question``: the prefix it was asked with, if any)."""
        return LabelledQuestion(image_of(item.media), item.output.inputs.get("prefix", ""), item.answers,
                                suggested_by=item.suggested_by, output_ids=item.output_ids)

    def accepted_answer(self, output: dict[str, Any]) -> str:
        return output["text"]

    def task_inputs(self, example: LabelledQuestion) -> dict[str, Any]:
        return {"image": example.image, **({"prefix": example.question} if example.question else {})}

    def prediction(self, result: dict[str, Any]) -> str:
        return result["text"]

    def summarise(self, scored: list[tuple[LabelledQuestion, str]]) -> dict[str, Any]:
        return caption_metrics(scored)


# --- fine-tuning -------------------------------------------------------------------------------------------


class CaptionAdapter(FinetuneAdapter):
    task = TASK
    kinds = frozenset({"blip"})
    columns = ("image", "text", "corrected", "merged_record_ids", "output_id")
    evaluation = CaptionEvaluation()
    augmentations = ("crop", "flip", "colour")
    default_augmentations = ("crop", "colour")  # captions name left and right: flip only when asked for
    lora_targets = {"blip": BLIP_TARGETS}

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> tuple[Any, Any]:
        import torch
        from transformers import AutoProcessor, BlipForConditionalGeneration

        kwargs = load_kwargs(spec, placement)
        processor = AutoProcessor.from_pretrained(location, **kwargs)
        model = BlipForConditionalGeneration.from_pretrained(location, dtype=torch.float32, **kwargs)
        return model.to(placement.device), processor

    def collate(self, model: Any, processor: Any, rows: dict[str, list[Any]], max_length: int) -> dict[str, Any]:
        images = [image.convert("RGB") for image in rows["image"]]
        texts = [text.strip() for text in rows["text"]]
        encoded = processor(images=images, text=texts, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        # The tokenizer writes [CLS] caption [SEP]; BLIP's decoder starts from its [DEC] token instead,
        # as generate() does, and learns every token after it, [SEP] (the end) included.
        input_ids = encoded["input_ids"].clone()
        input_ids[:, 0] = model.config.text_config.bos_token_id
        labels = input_ids.masked_fill(encoded["attention_mask"] == 0, -100)  # no loss on padding
        return {"pixel_values": encoded["pixel_values"], "input_ids": input_ids,
                "attention_mask": encoded["attention_mask"], "labels": labels}
