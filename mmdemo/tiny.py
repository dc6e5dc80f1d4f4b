"""Tiny, randomly initialised checkpoints of the real model architectures, built offline.

The demo normally runs BLIP, ViLT, CLIP, SigLIP, Whisper (transformers and faster-whisper) and
Stable Diffusion checkpoints from the Hugging Face Hub.  For tests and offline development this
module builds the *same architectures* at toy size (hidden size 32, 2 layers, 32x32 images, a
vocabulary of a few hundred tokens learnt from a small local corpus) in a few seconds and saves
them with ``save_pretrained``, so the ordinary loading code (``from_pretrained(folder)``,
``pipeline(task, model=folder)``, ``AutoPipelineForText2Image.from_pretrained(folder)``,
``faster_whisper.WhisperModel(folder)``) works on them unchanged.  Nothing here touches the network.

Layout (``build_tiny_models(target_dir)``, about 4 MB)::

    target_dir/
      .tiny-version        TINY_BUILDER_VERSION of the builders that made the folders below
      .build.lock          fcntl lock held while building
      blip-caption/  blip-vqa/  vilt-vqa/  clip/  siglip/  whisper/  whisper-ct2/  stable-diffusion/

Builds are reproducible: torch is seeded before each model and the tokenizers are learnt with a
deterministic byte-pair encoding, so the same builder version writes byte-identical files.

The weights are random, so outputs are meaningless.  Two documented tweaks of the random
initialisation make the text decoders write ordinary words instead of special tokens:

* BLIP: the LM head's output bias is -20 for special tokens ([PAD], [SEP], [DEC], ...) and -5 for
  "##" pieces, digits and punctuation.  [SEP] never wins, so generation runs to the length limit.
* Whisper: the output projection is tied to the token embeddings and has no bias, so the decoder's
  final layer-norm bias gets one large coordinate and the matching embedding column a small value:
  whole words (" cat") then score about +5, other text tokens about 0, special and timestamp
  tokens (and <|endoftext|>) about -5.  One saved generation config thus serves
  ``return_timestamps`` False and True alike; a ``suppress_tokens`` list covering the timestamp
  tokens would break ``return_timestamps=True``, whose first token must be a timestamp.  The
  saved config also limits generation to 16 new tokens and sets ``no_repeat_ngram_size=1``.
  Caveats of a random model: with ``return_timestamps=True`` only the opening timestamp is
  predicted, so chunks come back as ``(start, None)``, and as ``(None, None)`` once the pipeline
  merges 30 s chunks of long audio; faster-whisper runs to its own limit (224 tokens per 30 s
  window) with temperature fallback, still well under a second for 5 s of audio.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import string
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

TINY_BUILDER_VERSION: int = 2  # bump whenever a builder changes what it writes

TINY_MODELS: tuple[str, ...] = (
    "blip-caption",
    "blip-vqa",
    "vilt-vqa",
    "clip",
    "siglip",
    "whisper",
    "whisper-ct2",
    "stable-diffusion",
)

MARKER_FILE = ".tiny-version"
LOCK_FILE = ".build.lock"

# Models that are made from another tiny model's folder.
_DEPENDENCIES = {"whisper-ct2": ("whisper",)}

# Shared toy sizes.
HIDDEN = 32
LAYERS = 2
HEADS = 2
FFN = 37
IMAGE = 32
PATCH = 8
# Every tiny transformer (vision towers, text encoders/decoders) has these sizes.
TINY_TRANSFORMER = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)

# Answers the tiny ViLT "knows" (a few of the commonest VQA answers).
VQA_ANSWERS = (
    "yes", "no", "0", "1", "2", "3", "4", "red", "blue", "green", "white", "black",
    "dog", "cat", "man", "woman", "tennis", "pizza", "left", "right",
)

_SENTENCES = (
    "a photo of a cat sitting on a couch",
    "a dog running on the grass in the park",
    "two people riding bikes down a city street",
    "a man holding a tennis racket on a court",
    "a woman eating a slice of pizza at a table",
    "a red car parked next to a blue truck",
    "a plate of food with broccoli and rice",
    "an airplane flying in a clear blue sky",
    "a group of children playing soccer on a field",
    "a bowl of fruit with apples, oranges and bananas",
    "a black and white photo of an old building",
    "a train traveling down the tracks near a station",
    "a kitchen with a stove, a sink and a refrigerator",
    "a bird standing on a branch of a tree",
    "a boat floating on the water at sunset",
    "what color is the car? how many dogs are there? is it raining?",
    "where is the cat? what is the man holding? who is on the left or right?",
    "is there a person in the picture? yes. no. maybe!",
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a test of the speech recognition system.",
    "please transcribe this sentence and translate it into english.",
    "astronaut riding a horse, oil painting, high quality, 4k",
    "a cozy cabin in snowy mountains at night, digital art",
    "one two three four five six seven eight nine ten",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024",
    " ".join(VQA_ANSWERS),
)


def _corpus() -> list[str]:
    """Small training corpus; every printable ASCII character appears on its own and in text,
    so punctuation and digits never become unknown tokens."""
    printable = [ch for ch in string.printable if not ch.isspace()]
    return [*_SENTENCES, " ".join(printable), "".join(printable), *(s.upper() for s in _SENTENCES[:4])]


def _learn_subwords(
    tokenizer, vocab_size: int, alphabet: Iterable[str] = ()
) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn a subword vocabulary for an (empty) transformers tokenizer from the local corpus.

    Plain byte-pair encoding on the words that the tokenizer's own normaliser and pre-tokeniser
    make of the corpus, honouring its WordPiece "##" prefix or BPE "</w>" suffix.  Returns the
    tokens (alphabet first) and the merges in order.  Ties are broken alphabetically, so the same
    corpus always gives the same vocabulary (the ``tokenizers`` trainers break ties in hash
    order, which changes from run to run)."""
    backend = tokenizer.backend_tokenizer
    prefix = getattr(backend.model, "continuing_subword_prefix", None) or ""
    suffix = getattr(backend.model, "end_of_word_suffix", None) or ""
    words: Counter[tuple[str, ...]] = Counter()
    for text in _corpus():
        text = backend.normalizer.normalize_str(text) if backend.normalizer else text
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            symbols = [word[0], *(prefix + ch for ch in word[1:])]
            symbols[-1] += suffix
            words[tuple(symbols)] += 1

    tokens = sorted({*alphabet, *(symbol for word in words for symbol in word)})
    known, merges = set(tokens), []
    while len(tokens) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(sorted(pairs), key=pairs.__getitem__)  # most frequent, then alphabetical
        merged = best[0] + best[1].removeprefix(prefix)
        merges.append(best)
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
        merged_words: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            merged_words[_merge_pair(word, best, merged)] += count
        words = merged_words
    return tokens, merges


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str], merged: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _train_tokenizer(tokenizer_cls, vocab_size: int, **init_kwargs):
    """A WordPiece (BERT) or BPE (CLIP) tokenizer of ``tokenizer_cls`` with a vocabulary of about
    ``vocab_size`` learnt from the local corpus; its special tokens come first."""
    from tokenizers.models import BPE

    empty = tokenizer_cls(**init_kwargs)
    specials = list(dict.fromkeys(empty.all_special_tokens))
    tokens, merges = _learn_subwords(empty, vocab_size - len(specials))
    vocab = {token: i for i, token in enumerate([*specials, *(t for t in tokens if t not in specials)])}
    if isinstance(empty.backend_tokenizer.model, BPE):
        return tokenizer_cls(vocab=vocab, merges=merges, **init_kwargs)
    return tokenizer_cls(vocab=vocab, **init_kwargs)


def _seed(name: str) -> None:
    import torch

    torch.manual_seed(zlib.crc32(name.encode()))


# --------------------------------------------------------------------------------------------
# BLIP
# --------------------------------------------------------------------------------------------


def _blip_processor():
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    tokenizer = _train_tokenizer(BertTokenizer, vocab_size=400)
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


def _build_blip(out: Path, model_cls_name: str) -> None:
    import transformers

    processor = _blip_processor()
    tokenizer = processor.tokenizer
    _seed(model_cls_name)
    model = getattr(transformers, model_cls_name)(_blip_config(tokenizer)).eval()
    _prefer_blip_word_tokens(model, tokenizer)
    # BLIP's generate() does not read this config (its text decoder keeps its own: max_length 20),
    # but pipelines do: with it set they no longer add their default of 256 new tokens.
    model.generation_config.max_new_tokens = 20
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_blip_caption(out: Path) -> None:
    _build_blip(out, "BlipForConditionalGeneration")


def _build_blip_vqa(out: Path) -> None:
    _build_blip(out, "BlipForQuestionAnswering")


# --------------------------------------------------------------------------------------------
# ViLT
# --------------------------------------------------------------------------------------------


def _build_vilt_vqa(out: Path) -> None:
    from transformers import (
        BertTokenizer,
        ViltConfig,
        ViltForQuestionAnswering,
        ViltImageProcessor,
        ViltProcessor,
    )

    tokenizer = _train_tokenizer(BertTokenizer, vocab_size=400, model_max_length=40)
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
    _seed("vilt-vqa")
    ViltForQuestionAnswering(config).eval().save_pretrained(out)
    processor.save_pretrained(out)


# --------------------------------------------------------------------------------------------
# CLIP and SigLIP
# --------------------------------------------------------------------------------------------


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    return _train_tokenizer(CLIPTokenizer, vocab_size=400, model_max_length=77)


def _clip_text_config(tokenizer) -> dict:
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


def _build_clip(out: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
    )
    vision = dict(TINY_TRANSFORMER, image_size=IMAGE, patch_size=PATCH)
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer), vision_config=vision, projection_dim=HIDDEN
    )
    _seed("clip")
    CLIPModel(config).eval().save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


def _sentencepiece_model(path: Path, vocab_size: int) -> None:
    """Train a sentencepiece model on the local corpus (the SigLIP tokenizer is sentencepiece only)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()  # not model_prefix: the file would record its (temporary) path
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
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


def _build_siglip(out: Path) -> None:
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
    _seed("siglip")
    SiglipModel(config).eval().save_pretrained(out)
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


# --------------------------------------------------------------------------------------------
# Whisper
# --------------------------------------------------------------------------------------------

# Whisper's special tokens follow the text vocabulary in this order (as in the real checkpoints;
# the transformers tokenizer, its timestamp logic and CTranslate2 all rely on it).
_WHISPER_TASK_TOKENS = (
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
_WHISPER_TIMESTAMPS = tuple("<|%.2f|>" % (i * 0.02) for i in range(1501))  # <|0.00|> .. <|30.00|>


def _whisper_tokenizer():
    """Byte-level BPE learnt locally, then Whisper's special and timestamp tokens after it."""
    from tokenizers import pre_tokenizers
    from transformers import AddedToken, WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    # All 256 byte symbols, as in GPT-2/Whisper, so any text can be encoded.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens, merges = _learn_subwords(WhisperTokenizer(), 400, alphabet=alphabet)
    # <|endoftext|> (unk/bos/eos) is added right after the text vocabulary by the constructor.
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, model_max_length=448)
    specials = ["<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), *_WHISPER_TASK_TOKENS]
    tokenizer.add_special_tokens({"extra_special_tokens": specials}, replace_extra_special_tokens=True)
    # Timestamps are ordinary (non-special) added tokens, as on the Hub.
    tokenizer.add_tokens(
        [AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False) for t in _WHISPER_TIMESTAMPS]
    )
    return tokenizer


def _whisper_generation_config(tokenizer):
    from transformers import GenerationConfig
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    ids = tokenizer.convert_tokens_to_ids
    eot, sot = tokenizer.eos_token_id, ids("<|startoftranscript|>")
    no_timestamps = ids("<|notimestamps|>")
    # Non-timestamp specials other than <|endoftext|> never make sense as output.
    suppress = [i for i in range(eot + 1, no_timestamps + 1)]
    return GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        lang_to_id={f"<|{code}|>": ids(f"<|{code}|>") for code in LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=no_timestamps,
        prev_sot_token_id=ids("<|startofprev|>"),
        is_multilingual=True,
        max_initial_timestamp_index=50,
        return_timestamps=False,
        suppress_tokens=suppress,
        begin_suppress_tokens=[ids("Ġ"), eot],
        alignment_heads=[[LAYERS - 1, h] for h in range(HEADS)],
        # Whisper's generate() reads max_length as the number of new tokens (it adds the prompt).
        # Saved like this (not as max_new_tokens, not the default 20) the ASR pipeline keeps it
        # instead of adding its own max_new_tokens=256, and generate() warns about nothing.
        max_length=16,
        no_repeat_ngram_size=1,  # the random model would otherwise repeat one word
    )


def _prefer_whisper_word_tokens(model, tokenizer) -> None:
    """Random init tweak (see module docstring): whole words (" cat") score about +5, other text
    tokens about 0, special and timestamp tokens about -5."""
    import torch

    decoder = model.model.decoder
    eot = tokenizer.eos_token_id  # ids below <|endoftext|> are the text vocabulary
    shift = torch.full((len(tokenizer),), -0.05)
    for token_id in range(eot):
        text = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])
        shift[token_id] = 0.05 if text[:1] == " " and text[1:].isalpha() and text.isascii() else 0.0
    with torch.no_grad():
        # The normalised hidden state's coordinate 0 lies within +-sqrt(d_model), far below 100,
        # so every logit gets about 100 * shift added.
        decoder.layer_norm.bias.zero_()
        decoder.layer_norm.bias[0] = 100.0
        decoder.embed_tokens.weight[:, 0] = shift


def _build_whisper(out: Path) -> None:
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    tokenizer = _whisper_tokenizer()
    feature_extractor = WhisperFeatureExtractor(
        feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
    )
    generation_config = _whisper_generation_config(tokenizer)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,  # 30 s = 3000 mel frames, halved by the second conv
        max_target_positions=448,
        decoder_start_token_id=generation_config.decoder_start_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        suppress_tokens=generation_config.suppress_tokens,  # the defaults are ids of the real vocabulary
        begin_suppress_tokens=generation_config.begin_suppress_tokens,
    )
    _seed("whisper")
    model = WhisperForConditionalGeneration(config).eval()
    _prefer_whisper_word_tokens(model, tokenizer)
    model.generation_config = generation_config
    model.save_pretrained(out)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out)
    # transformers 5 folds the feature extractor into processor_config.json; faster-whisper (and
    # older loaders) read preprocessor_config.json, so write that too.
    feature_extractor.save_pretrained(out)


def _build_whisper_ct2(out: Path, whisper_dir: Path) -> None:
    """Convert the tiny transformers Whisper into a CTranslate2 folder for faster-whisper.

    CTranslate2 treats a Whisper vocabulary of any size other than 51865 as English-only, so
    faster-whisper runs this model with language "en" (other languages fall back to "en")."""
    from ctranslate2.converters import TransformersConverter

    converter = TransformersConverter(
        str(whisper_dir),
        copy_files=["tokenizer.json", "preprocessor_config.json"],
        low_cpu_mem_usage=False,
    )
    converter.convert(str(out), quantization="float32", force=True)


# --------------------------------------------------------------------------------------------
# Stable Diffusion
# --------------------------------------------------------------------------------------------


def _build_stable_diffusion(out: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer()
    _seed("stable-diffusion")
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text_config(tokenizer)))
    # Four VAE levels -> scale factor 8, as in the real model: 64x64 images <-> 8x8 latents.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    unet = UNet2DConditionModel(
        sample_size=8,  # latent size; the pipeline's default image size is 8 * 8 = 64
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)


# --------------------------------------------------------------------------------------------
# Building, caching and locking
# --------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[Path], None]] = {
    "blip-caption": _build_blip_caption,
    "blip-vqa": _build_blip_vqa,
    "vilt-vqa": _build_vilt_vqa,
    "clip": _build_clip,
    "siglip": _build_siglip,
    "whisper": _build_whisper,
    # Built from the finished sibling "whisper" folder (see _DEPENDENCIES).
    "whisper-ct2": lambda out: _build_whisper_ct2(out, out.parent / "whisper"),
    "stable-diffusion": _build_stable_diffusion,
}


def tiny_model_dir(target_dir: Path, name: str) -> Path:
    """The folder that holds (or will hold) tiny model ``name`` under ``target_dir``."""
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    return Path(target_dir) / name


def _with_dependencies(names: Iterable[str]) -> list[str]:
    wanted = set()
    for name in names:
        tiny_model_dir(Path("."), name)  # validates the name
        wanted.add(name)
        wanted.update(_DEPENDENCIES.get(name, ()))
    return [name for name in TINY_MODELS if name in wanted]  # dependencies come first in TINY_MODELS


@contextlib.contextmanager
def _build_lock(target_dir: Path) -> Iterator[None]:
    with open(target_dir / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(target_dir: Path) -> int | None:
    try:
        return int((target_dir / MARKER_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _write_marker(target_dir: Path) -> None:
    tmp = target_dir / f"{MARKER_FILE}.tmp-{os.getpid()}"
    tmp.write_text(f"{TINY_BUILDER_VERSION}\n")
    os.replace(tmp, target_dir / MARKER_FILE)


def _remove_leftovers(target_dir: Path) -> None:
    """Delete temporary folders left by a build that crashed (we hold the lock, so none is live)."""
    for path in target_dir.glob(".*.tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _build_one(target_dir: Path, name: str) -> None:
    """Build into a temporary sibling folder, then swap it into place."""
    final = tiny_model_dir(target_dir, name)
    tmp = target_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _BUILDERS[name](tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # os.replace cannot replace a non-empty folder: move the old one aside
        old = target_dir / f".{name}.old.tmp-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def build_tiny_models(
    target_dir: Path, force: bool = False, names: Iterable[str] | None = None
) -> dict[str, Path]:
    """Build (once) every tiny checkpoint under target_dir/<name>; return name -> folder.

    ``names`` limits the build to some models (plus what they are made from, e.g. "whisper" for
    "whisper-ct2").  Folders built by the current TINY_BUILDER_VERSION are kept unless ``force``;
    after a version change every model folder is rebuilt.  Safe to call from several processes.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    target_dir = Path(target_dir)
    requested = list(TINY_MODELS) if names is None else list(dict.fromkeys(names))
    to_build = _with_dependencies(requested)
    target_dir.mkdir(parents=True, exist_ok=True)

    with _build_lock(target_dir):
        _remove_leftovers(target_dir)
        if _read_marker(target_dir) != TINY_BUILDER_VERSION:
            # Folders from other builder versions must not survive under the new marker.
            (target_dir / MARKER_FILE).unlink(missing_ok=True)
            for name in TINY_MODELS:
                shutil.rmtree(tiny_model_dir(target_dir, name), ignore_errors=True)
        for name in to_build:
            if force or not tiny_model_dir(target_dir, name).is_dir():
                _build_one(target_dir, name)
        _write_marker(target_dir)

    return {name: tiny_model_dir(target_dir, name) for name in requested}


def _main() -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Build the tiny offline checkpoints.")
    parser.add_argument("--target-dir", type=Path, default=Path("mmdemo-data/tiny-models"))
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("names", nargs="*", help=f"models to build (default: {' '.join(TINY_MODELS)})")
    args = parser.parse_args()
    start = time.perf_counter()
    folders = build_tiny_models(args.target_dir, force=args.force, names=args.names or None)
    for name, folder in folders.items():
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{name:18s} {size / 1e6:6.2f} MB  {folder}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":  # python -m mmdemo.tiny [--target-dir DIR] [--force] [names...]
    _main()
