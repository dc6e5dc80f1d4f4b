"""Tiny ViLT (VQA)."""

from __future__ import annotations

from pathlib import Path

from .common import HIDDEN, LAYERS, HEADS, FFN, IMAGE, PATCH, VQA_ANSWERS, train_tokenizer, seed


def build_vilt_vqa(out: Path) -> None:
    from transformers import (
        BertTokenizer,
        ViltConfig,
        ViltForQuestionAnswering,
        ViltImageProcessor,
        ViltProcessor,
    )

    tokenizer = train_tokenizer(BertTokenizer, vocab_size=400, model_max_length=40)
    image_processor = ViltImageProcessor(size={"shortest_edge": IMAGE}, size_divisor=PATCH)
    processor = ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)
    id2label = dict(enumerate(VQA_ANSWERS))
    config = ViltConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        image_size=IMAGE,
        patch_size=PATCH,
        max_position_embeddings=40,
        id2label=id2label,
        label2id={label: i for i, label in id2label.items()},
        pad_token_id=tokenizer.pad_token_id,
    )
    seed("vilt-vqa")
    ViltForQuestionAnswering(config).eval().save_pretrained(out)
    processor.save_pretrained(out)
