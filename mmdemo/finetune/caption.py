"""Fine-tuning image captioning (``image-to-text``): BLIP on (image, corrected caption) rows.

Captioning has no metric yet (its adapter's ``evaluation`` is None): a job trains without a before/after
table and ``mmdemo evaluate`` refuses the task."""

from __future__ import annotations

from typing import Any

from ..catalog import ModelSpec
from ..placement import Placement
from ..tasks.base import load_kwargs
from .base import BLIP_TARGETS, FinetuneAdapter


class CaptionAdapter(FinetuneAdapter):
    task = "image-to-text"
    kinds = frozenset({"blip"})
    columns = ("image", "text")
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
