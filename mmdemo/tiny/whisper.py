"""Tiny Whisper, transformers and CTranslate2 (speech recognition)."""

from __future__ import annotations

from pathlib import Path

from .common import HIDDEN, LAYERS, HEADS, learn_subwords, seed

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
    tokens, merges = learn_subwords(WhisperTokenizer(), 400, alphabet=alphabet)
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


def build_whisper(out: Path) -> None:
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
    seed("whisper")
    model = WhisperForConditionalGeneration(config).eval()
    _prefer_whisper_word_tokens(model, tokenizer)
    model.generation_config = generation_config
    model.save_pretrained(out)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out)
    # transformers 5 folds the feature extractor into processor_config.json; faster-whisper (and
    # older loaders) read preprocessor_config.json, so write that too.
    feature_extractor.save_pretrained(out)


def build_whisper_ct2(out: Path, whisper_dir: Path) -> None:
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


def build_whisper_ct2_beside_whisper(out: Path) -> None:
    """The CTranslate2 conversion of the finished sibling ``whisper`` folder (a :class:`TinyBuilder` need)."""
    build_whisper_ct2(out, out.parent / "whisper")
