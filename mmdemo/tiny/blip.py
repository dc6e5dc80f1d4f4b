"""Tiny BLIP (captioning and VQA)."""

from __future__ import annotations

from pathlib import Path

from .common import HIDDEN, IMAGE, PATCH, TINY_TRANSFORMER, train_tokenizer, seed


def _blip_processor():
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    tokenizer = train_tokenizer(BertTokenizer, vocab_size=400)
    # BLIP's text decoder starts from a [DEC] token; [ENC] is used by its text encoder.
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "extra_special_tokens": ["[ENC]"]})
    tokenizer.model_max_length = 512
    image_processor = BlipImageProcessor(size={"height": IMAGE, "width": IMAGE})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _blip_config(tokenizer):
    from transformers import BlipConfig

    text = dict(
        TINY_TRANSFORMER,
        vocab_size=len(tokenizer),
        encoder_hidden_size=HIDDEN,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(TINY_TRANSFORMER, image_size=IMAGE, patch_size=PATCH)
    return BlipConfig(
        text_config=text, vision_config=vision, projection_dim=HIDDEN, image_text_hidden_size=HIDDEN
    )


def _prefer_blip_word_tokens(model, tokenizer) -> None:
    """Random init tweak (see module docstring): the LM-head output bias is very negative for
    special tokens and negative for "##" pieces, digits and punctuation, so the random decoder
    writes whole words and never stops early on [SEP]: it runs to the length limit."""
    import torch

    not_words = [i for token, i in tokenizer.get_vocab().items() if not token.isalpha()]
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        bias[not_words] = -5.0
        bias[tokenizer.all_special_ids] = -20.0


def build_blip(out: Path, model_cls_name: str) -> None:
    import transformers

    processor = _blip_processor()
    tokenizer = processor.tokenizer
    seed(model_cls_name)
    model = getattr(transformers, model_cls_name)(_blip_config(tokenizer)).eval()
    _prefer_blip_word_tokens(model, tokenizer)
    # BLIP's generate() does not read this config (its text decoder keeps its own: max_length 20),
    # but pipelines do: with it set they no longer add their default of 256 new tokens.
    model.generation_config.max_new_tokens = 20
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_blip_caption(out: Path) -> None:
    build_blip(out, "BlipForConditionalGeneration")


def build_blip_vqa(out: Path) -> None:
    build_blip(out, "BlipForQuestionAnswering")
