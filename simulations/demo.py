"""Placeholder demo until the SDK lands: load the built-in base and answer one question."""

from fedprefix.common.base_model import load_base
from fedprefix.common.generation import SamplingParams, generate

base = load_base("smollm2-135m-instruct")
prompt = base.tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
)
ids = base.tokenizer(prompt, add_special_tokens=False).input_ids
print(generate(base.model, base.tokenizer, [ids], [None], SamplingParams(max_new_tokens=16))[0])
