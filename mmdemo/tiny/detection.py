"""Tiny OWL-ViT, OWLv2 and Grounding DINO (zero-shot object detection).

Each loads with ``AutoModelForZeroShotObjectDetection`` / ``AutoProcessor`` and through
``pipeline("zero-shot-object-detection", model=folder)``.

Traps these builders avoid:

* OWL-ViT and OWLv2 treat a query whose first token id is 0 as padding (an empty query) and give it no
  box, silently. Their CLIP tokenizer therefore keeps the learnt vocabulary first and the special tokens
  last, as real CLIP does (its BOS is id 49406), so that every query starts with a non-zero id.
* Grounding DINO needs at least two decoder layers, and images of at least 64 px for 32 GroupNorm groups
  over its three feature levels (a four-stage Swin of embed_dim 8, patch 4, window 2).

Init tweaks, so that a random model finds *some* boxes above a low threshold, deterministically (scores
stay random; only their level is chosen):

* OWL-ViT / OWLv2: the class head's learnt shift is 0 and its scale 5 (``elu(4) + 1``), so a score is
  ``sigmoid(5 * cosine(patch, query))``, about 0.1-0.9, instead of saturating at 0 or 1; the box head's last
  layer is zero, so each box is its patch's prior box (random box deltas give boxes of a hundredth of a
  pixel or far outside the image).
* Grounding DINO: a score is the dot product of decoder and text features; the decoder's final layer norm
  is scaled by ``DECODER_SCALE`` so that scores spread over about 0.3-0.8 instead of all being 1.0.
"""

from __future__ import annotations

from pathlib import Path

from .common import FFN, HEADS, HIDDEN, IMAGE, PATCH, TINY_TRANSFORMER, learn_subwords, seed, train_tokenizer

OWL_TEXT_POSITIONS = 16  # OWL-ViT and OWLv2 pad every query to 16 tokens
DINO_IMAGE = 64  # Grounding DINO's smallest working image (GroupNorm over three feature levels)
DINO_TEXT_POSITIONS = 256  # its max_text_len: all queries of a request as one text
DECODER_SCALE = 0.1  # Grounding DINO init tweak, see above


def owl_tokenizer():
    """A CLIP tokenizer learnt from the local corpus, its special tokens after the learnt vocabulary."""
    from transformers import CLIPTokenizer

    empty = CLIPTokenizer(model_max_length=OWL_TEXT_POSITIONS)
    specials = list(dict.fromkeys(empty.all_special_tokens))
    tokens, merges = learn_subwords(empty, 400 - len(specials))
    vocab = {token: i for i, token in enumerate([*(t for t in tokens if t not in specials), *specials])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=OWL_TEXT_POSITIONS)


def _owl_config(config_cls, tokenizer):
    text = dict(
        TINY_TRANSFORMER,
        vocab_size=len(tokenizer),
        max_position_embeddings=OWL_TEXT_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(TINY_TRANSFORMER, image_size=IMAGE, patch_size=PATCH)
    return config_cls(text_config=text, vision_config=vision, projection_dim=HIDDEN)


def _raise_owl_scores(model) -> None:
    import torch

    with torch.no_grad():
        # logit = (cosine(patch, query) + shift) * scale: shift 0, scale elu(4) + 1 = 5
        for layer, bias in ((model.class_head.logit_shift, 0.0), (model.class_head.logit_scale, 4.0)):
            layer.weight.zero_()
            layer.bias.fill_(bias)
        model.box_head.dense2.weight.zero_()  # each box is its patch's prior box (box_bias): inside the image
        model.box_head.dense2.bias.zero_()


def build_owlvit(out: Path) -> None:
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    tokenizer = owl_tokenizer()
    image_processor = OwlViTImageProcessor(size={"height": IMAGE, "width": IMAGE},
                                           crop_size={"height": IMAGE, "width": IMAGE})
    seed("owlvit")
    model = OwlViTForObjectDetection(_owl_config(OwlViTConfig, tokenizer)).eval()
    _raise_owl_scores(model)
    model.save_pretrained(out)
    OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


def build_owlv2(out: Path) -> None:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = owl_tokenizer()
    image_processor = Owlv2ImageProcessor(size={"height": IMAGE, "width": IMAGE})
    seed("owlv2")
    model = Owlv2ForObjectDetection(_owl_config(Owlv2Config, tokenizer)).eval()
    _raise_owl_scores(model)
    model.save_pretrained(out)
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


def build_grounding_dino(out: Path) -> None:
    import torch
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tokenizer = train_tokenizer(BertTokenizer, vocab_size=400, model_max_length=DINO_TEXT_POSITIONS)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": DINO_IMAGE, "longest_edge": 2 * DINO_IMAGE})
    backbone = SwinConfig(image_size=DINO_IMAGE, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 2, 2], window_size=2, out_features=["stage2", "stage3", "stage4"])
    text = dict(TINY_TRANSFORMER, vocab_size=len(tokenizer), max_position_embeddings=DINO_TEXT_POSITIONS,
                pad_token_id=tokenizer.pad_token_id)
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=HIDDEN, num_queries=10, num_feature_levels=3,
        encoder_layers=1, decoder_layers=2, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_n_points=2, decoder_n_points=2,
        max_text_len=DINO_TEXT_POSITIONS,
    )
    seed("grounding-dino")
    model = GroundingDinoForObjectDetection(config).eval()
    with torch.no_grad():  # logits are dot products of decoder and text features: shrink the decoder's
        model.model.decoder.layer_norm.weight.mul_(DECODER_SCALE)
        model.model.decoder.layer_norm.bias.mul_(DECODER_SCALE)
    model.save_pretrained(out)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
