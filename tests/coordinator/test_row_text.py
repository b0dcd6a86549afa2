"""A row's text as its tokens arrive, one at a time: what streams is exactly the result, for a
byte-level tokenizer and a byte-fallback one (Llama 2, Mistral, Gemma), where decoding more
tokens rewrites text already decoded, and no piece of a stop string is ever streamed, also one
whose characters are split over several tokens."""

from __future__ import annotations

import pytest
from fedprefix.common.base_model import load_base
from fedprefix.common.generation import SamplingParams
from fedprefix.coordinator.serving.requests import EngineStats, GenerationRequest, RequestHandle
from fedprefix.coordinator.serving.rows import Row, finish, take_token, text_decoder
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

EOS = 2


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama 2 style tokenizer: BPE with byte fallback (<0xNN> tokens for what the vocabulary
    lacks) and the decoder chain that turns an unfinished byte run into one U+FFFD per byte."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": EOS} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ("▁", "a", "b", ".", "▁a", "▁b", "x", "I", "▁love", "▁emojis"):
        vocab[piece] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    model.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte-level": lambda: load_base("tiny-llama").tokenizer, "byte-fallback": byte_fallback_tokenizer}


def run_row(tokenizer, ids: list[int], stops=(), max_new_tokens=1000) -> tuple[list[str], object]:
    """Feed `ids` to a row as the engine does; (the streamed pieces, the result)."""
    pieces: list[str] = []
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=list(stops))
    handle = RequestHandle(GenerationRequest(prompt=[1], params=params), [1], None, listener=pieces.append)
    row, decode, stats = Row(handle, params, None, position=1), text_decoder(tokenizer), EngineStats()
    for token in ids:
        take_token(row, token, decode, {EOS}, stats)
        if handle.done:
            break
    if not handle.done:
        finish(row, "length", decode, stats)
    assert pieces[-1] is None
    return pieces[:-1], handle.result()


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("text", ["a中😀", "x é e\u0301 😀🎉 中文 b", "I love emojis. 🎉"])
def test_the_stream_is_the_result_and_the_text(kind, text):
    tokenizer = TOKENIZERS[kind]()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text), "characters are split over tokens"
    pieces, result = run_row(tokenizer, ids + [EOS])
    assert "".join(pieces) == result.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert result.text.strip() == text and result.finish_reason == "stop"
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_no_piece_of_a_stop_string_is_streamed(kind):
    """'. 🎉' starts with text whose tokens are complete, then a character still being built:
    the '.' was streamed before the emoji's bytes completed the stop string."""
    tokenizer = TOKENIZERS[kind]()
    for text, stop, kept in (
        ("I love emojis. 🎉 a", ". 🎉", "I love emojis"),
        ('a "中文" b', '"中', "a "),
        ("x中😀b", "中😀", "x"),
    ):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        pieces, result = run_row(tokenizer, ids + [EOS], stops=[stop])
        assert result.text == kept and result.finish_reason == "stop"
        assert "".join(pieces) == kept, (text, pieces)


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_a_row_cut_inside_a_character_streams_what_its_result_says(kind):
    tokenizer = TOKENIZERS[kind]()
    ids = tokenizer("a中😀", add_special_tokens=False).input_ids
    for length in range(1, len(ids) + 1):
        pieces, result = run_row(tokenizer, ids, max_new_tokens=length)
        assert "".join(pieces) == result.text and result.finish_reason == "length"
        assert "a中😀".startswith(result.text.rstrip("\ufffd"))  # an unfinished character: U+FFFD
