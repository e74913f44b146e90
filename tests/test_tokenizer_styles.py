"""Prompt ids equal PaliGemmaProcessor's for every tokenizer style the processor accepts.

Each style is built here, independently of ``export.tiny``'s tokenizer: Gemma's own layout (via
transformers' GemmaTokenizer), SentencePiece-style Metaspace with ``first`` and ``always``,
byte-level BPE and WordPiece. The processor's constructor turns bos/eos adding off, which rewrites
any post-processor a style brings to a plain ``$A`` template, and export saves that tokenizer; the
pre-tokenizers and normalizers are what differ. Each goes into a random PaliGemma checkpoint, is exported through
the CLI (whose validation compares prompt ids too) and the bundle's runtime tokenizer is
compared with the checkpoint's processor, loaded the way a user loads it, in the same test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from .conftest import run_cli

LOC_SEG = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CORPUS = [
    "caption en", "describe en", "answer en what is in the image", "detect cat ; dog", "segment the red car",
    "a red circle and a blue square on a white table", "There are 3 shapes, 12 cats and 450 dogs.",
    "Ça coûte 12,50 € à Paris", "Привет мир", "猫が好きです", "مرحبا بالعالم", "नमस्ते दुनिया",
]
# Prompts a user sends: spaces at either end and doubled, tabs and newlines inside, non-Latin
# scripts, emoji, digits, punctuation, literal loc/seg text, an empty prompt.
PROMPTS = [
    "caption en", "", " caption en", "caption en ", "answer en what's in the  picture?", "  two  leading",
    "answer en tab\there", "describe en line one\nline two", "ocr\n", "answer ru Что это?", "describe ja 猫と犬",
    "answer ar ما هذا", "describe hi यह क्या है", "caption en 🐈‍⬛ 🚗🚓", "answer en 2024 or 1,000,000.5?",
    "detect <loc0001> cat ; dog", "segment <seg127><loc1023>", "answer en Ça coûte 12,50 €?", "a\u00a0b\u3000c",
]


def _add_paligemma_tokens(tokenizer):
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in LOC_SEG])
    tokenizer.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    return tokenizer


def gemma_style():
    """transformers' GemmaTokenizer layout (``Replace(" ", "▁")`` normalizer, byte fallback), vocab trained here."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer_tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS + byte_pieces, show_progress=False)
    trainer_tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    # transformers annotates merges as strings; the BPE model it builds takes (left, right) pairs
    gemma = GemmaTokenizer(vocab=trained["vocab"], merges=[tuple(pair) for pair in trained["merges"]])  # type: ignore[misc]
    return _add_paligemma_tokens(gemma.backend_tokenizer)


def metaspace_style(prepend_scheme: str, split: bool, unigram: bool):
    """SentencePiece-converted tokenizers: ``first`` is add_dummy_prefix (Llama-style), ``always`` T5-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    trainer: trainers.Trainer
    if unigram:
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=SPECIALS, unk_token="<unk>",
                                          show_progress=False)
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme, split=split)
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme, split=split)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return _add_paligemma_tokens(tokenizer)


def byte_level_style():
    """GPT-2 / RoBERTa-style byte-level BPE (every byte has a symbol; a space is prefixed to sections)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return _add_paligemma_tokens(tokenizer)


def wordpiece_style():
    """BERT-style WordPiece: a lower-casing normalizer and a saved truncation (its [CLS]/[SEP] template is
    replaced by the processor, see the module doc)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=500, special_tokens=SPECIALS + ["[CLS]", "[SEP]"],
                                        show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")),
                                                 ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    # BERT's tokenizer.json carries a 512-token truncation, which the processor applies through its saved
    # kwargs (the runtime never truncates: past 512 the processor would cut image tokens).
    tokenizer.enable_truncation(max_length=512)
    return _add_paligemma_tokens(tokenizer)


STYLES = {
    "gemma": gemma_style,
    "metaspace-first": lambda: metaspace_style("first", split=False, unigram=False),
    "metaspace-always": lambda: metaspace_style("always", split=True, unigram=True),
    "byte-level-bpe": byte_level_style,
    "wordpiece": wordpiece_style,
}


@pytest.fixture(scope="module", params=list(STYLES))
def styled(request, tmp_path_factory):
    """(checkpoint, bundle) for one tokenizer style, exported through the CLI."""
    from paligemma_edge.fixtures.tiny import TinySpec, build_model

    directory = tmp_path_factory.mktemp(f"tokenizer-{request.param}")
    model, processor = build_model(TinySpec(family=2), tokenizer_object=STYLES[request.param]())
    checkpoint = directory / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    bundle = directory / "bundle"
    run_cli("export", str(checkpoint), "--output", str(bundle), "--max-seq-len", "96", check=True)
    return checkpoint, bundle


def test_prompt_ids_equal_the_processor_for_every_tokenizer_style(styled):
    from transformers import AutoProcessor

    import paligemma_edge

    checkpoint, bundle = styled
    processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
    picture = Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8))
    with paligemma_edge.load(bundle) as runtime:
        for prompt in PROMPTS:
            theirs = processor(images=[picture], text=[f"<image>{prompt}"])["input_ids"][0]
            assert runtime.tokenizer.encode(prompt) == list(theirs), prompt
        batch = runtime.tokenizer.batch(PROMPTS[:4])
    inputs = processor(images=[picture] * 4, text=[f"<image>{p}" for p in PROMPTS[:4]], padding="longest",
                       return_tensors="np")
    np.testing.assert_array_equal(batch.input_ids, inputs["input_ids"])
    np.testing.assert_array_equal(batch.valid, inputs["attention_mask"].astype(bool))


def test_decoded_answers_equal_the_processor_for_every_tokenizer_style(styled):
    from transformers import AutoProcessor

    import paligemma_edge

    checkpoint, bundle = styled
    processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
    answers = ["a red circle", "<loc0010><loc0020><loc0300><loc0400> cat ; <loc0001><loc0002><loc0003><loc0004> dog",
               "12,50 € à Paris", "猫が好き 🐈", "two  spaces"]
    with paligemma_edge.load(bundle) as runtime:
        for answer in answers:
            ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = ids + [runtime.manifest.tokens.eos[0]]
            assert runtime.tokenizer.decode(ids) == processor.decode(ids, skip_special_tokens=True), answer
