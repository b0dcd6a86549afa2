"""One rule for a prompt's token ids in training, the SDK and serving: plain text gets the BOS
the tokenizer puts in front (read from its post-processor), text a chat template wrote none."""

from __future__ import annotations

import copy

import pytest
from fastapi.testclient import TestClient
from fedprefix.client.data import PromptCompletion, read_rows, tokenize_rows
from fedprefix.common.base_model import BaseModelHandle, byte_tokenizer, load_base
from fedprefix.common.chat import format_prompt, generation_ids, generation_prompts, leading_bos, prompt_ids
from fedprefix.common.errors import ConfigError
from fedprefix.common.generation import SamplingParams
from fedprefix.coordinator.serving import Engine, GenerationRequest
from fedprefix.coordinator.serving.server import create_app
from tokenizers import processors

BOS = 256  # the tiny tokenizer's <|endoftext|>


def with_post_processor(template: str):
    """The tiny byte tokenizer with a post-processor like Llama 2's (`template` around $A)."""
    tokenizer = byte_tokenizer()
    specials = [(token, tokenizer.convert_tokens_to_ids(token)) for token in ("<|endoftext|>", "<|im_end|>")]
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    return tokenizer


def test_the_bos_is_read_from_what_the_tokenizer_does():
    assert leading_bos(byte_tokenizer()) is None
    assert leading_bos(with_post_processor("<|endoftext|> $A")) == BOS
    assert leading_bos(with_post_processor("<|endoftext|> $A <|im_end|>")) == BOS  # a prompt gets no EOS
    assert leading_bos(with_post_processor("$A <|im_end|>")) is None
    tokenizer = with_post_processor("<|endoftext|> $A")
    assert getattr(tokenizer, "add_bos_token", False) is False  # what the old rule read
    assert prompt_ids(tokenizer, "hi", BOS) == [BOS, *tokenizer("hi", add_special_tokens=False).input_ids]


def test_training_and_serving_give_a_prompt_the_same_ids():
    """Before, training added a BOS only where `add_bos_token` said so (False in transformers 5
    for Llama 2 style tokenizers), the SDK's generate where the tokenizer did, and the server never."""
    tokenizer = with_post_processor("<|endoftext|> $A")
    tiny = load_base("tiny-llama")
    base = BaseModelHandle("tiny-llama-bos", tiny.model, tokenizer, tiny.fingerprint)
    row = PromptCompletion(prompt="Describe The Eagle.", completion="A pub.")
    plain = tokenize_rows([row], tokenizer, 128, use_chat_template=False)[0].prompt
    templated = tokenize_rows([row], tokenizer, 128, use_chat_template=True)[0].prompt
    assert (
        plain[0] == BOS
        and templated == tokenizer(format_prompt(tokenizer, row.prompt), add_special_tokens=False).input_ids
    )
    with Engine(base) as engine:
        params = SamplingParams(max_new_tokens=1)
        completion = engine.submit(GenerationRequest(row.prompt, params=params))
        chat = engine.submit(GenerationRequest(format_prompt(tokenizer, row.prompt), params=params, templated=True))
        assert completion.prompt_ids == plain and chat.prompt_ids == templated
        completion.result(timeout=60), chat.result(timeout=60)
        with TestClient(create_app(engine, "m")) as client:  # the endpoints mark what they send
            body = {"max_tokens": 1, "temperature": 0}
            done = client.post("/v1/completions", json={**body, "prompt": row.prompt}).json()
            chatted = client.post(
                "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": row.prompt}]}
            )
        assert done["usage"]["prompt_tokens"] == len(plain)
        assert chatted.json()["usage"]["prompt_tokens"] == len(templated)


def test_a_chat_prompt_gets_the_ids_its_training_row_had():
    """Personalizer.generate's chat prompt is framed as a chat training row's prompt: the
    template over every message (the system one too), ending where the assistant replies."""
    tokenizer = load_base("tiny-llama").tokenizer
    history = [
        {"role": "system", "content": "Answer as a pirate."},
        {"role": "user", "content": "Describe The Eagle."},
        {"role": "assistant", "content": "A pub, arr."},
        {"role": "user", "content": "And its beer?"},
    ]
    rows = read_rows([{"messages": [*history, {"role": "assistant", "content": "Dark."}]}])
    trained = tokenize_rows(rows, tokenizer, 512, use_chat_template=False)[-1].prompt  # the last reply's
    prompts, single = generation_prompts(history)
    assert single and generation_ids(tokenizer, prompts[0], use_chat_template=False) == trained
    assert generation_ids(tokenizer, history[1]["content"], True) == generation_ids(tokenizer, [history[1]], False)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ConfigError, match="a chat prompt needs a base with a chat template"):
        generation_ids(plain, prompts[0], use_chat_template=False)
