"""The routed runtime on the embedded SmolLM2-135M-Instruct."""

import torch

import drllm


def chat_batch(tokenizer, questions):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def test_all_execute_generate_equals_vanilla(smollm):
    model, tokenizer = smollm
    batch = chat_batch(tokenizer, ["What is the capital of France?", "Name a primary colour."])
    kw = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=tokenizer.pad_token_id)
    ref = model.generate(**batch, **kw)
    drllm.patch(model)
    try:
        out = model.generate(**batch, **kw)
    finally:
        drllm.unpatch(model)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


@torch.no_grad()
def test_skipping_blocks_changes_the_model_but_matches_recomputation(smollm):
    model, tokenizer = smollm
    batch = chat_batch(tokenizer, ["Why is the sky blue?", "2+2="])
    L = model.config.num_hidden_layers
    paths = torch.ones(2, L, dtype=torch.long)
    paths[0, [3, 4, 20]] = 0
    paths[1, [7]] = 2
    with drllm.forced_paths(model, paths):
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        seq = out.sequences
        mask = torch.cat([batch["attention_mask"], torch.ones(2, 6, dtype=torch.long)], 1)
        full = model(input_ids=seq, attention_mask=mask, use_cache=False).logits[:, -7:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=1e-4, atol=1e-3)
