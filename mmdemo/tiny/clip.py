"""Tiny CLIP and SigLIP (zero-shot classification)."""

from __future__ import annotations

from pathlib import Path

from .common import HIDDEN, LAYERS, HEADS, FFN, IMAGE, PATCH, TINY_TRANSFORMER, corpus, train_tokenizer, seed


def clip_tokenizer():
    from transformers import CLIPTokenizer

    return train_tokenizer(CLIPTokenizer, vocab_size=400, model_max_length=77)


def clip_text_config(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_clip(out: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    )
    vision = dict(TINY_TRANSFORMER, image_size=IMAGE, patch_size=PATCH)
    config = CLIPConfig(
        text_config=clip_text_config(tokenizer), vision_config=vision, projection_dim=HIDDEN
    )
    seed("clip")
    CLIPModel(config).eval().save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


def _sentencepiece_model(path: Path, vocab_size: int) -> None:
    """Train a sentencepiece model on the local corpus (the SigLIP tokenizer is sentencepiece only)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()  # not model_prefix: the file would record its (temporary) path
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        normalization_rule_name="identity",  # SiglipTokenizer lowercases/cleans text itself
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def build_siglip(out: Path) -> None:
    import tempfile

    from transformers import (
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
        SiglipTokenizer,
    )

    with tempfile.TemporaryDirectory() as tmp:
        spm_file = Path(tmp) / "spiece.model"
        _sentencepiece_model(spm_file, vocab_size=300)
        tokenizer = SiglipTokenizer(vocab_file=str(spm_file), model_max_length=64)
    image_processor = SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE})
    text = dict(
        TINY_TRANSFORMER,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,  # the zero-shot pipeline pads SigLIP text to 64 tokens
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(TINY_TRANSFORMER, image_size=IMAGE, patch_size=PATCH)
    config = SiglipConfig(text_config=text, vision_config=vision)
    seed("siglip")
    SiglipModel(config).eval().save_pretrained(out)
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
