"""--compile in training is regional (lmtune.train.regional): each decoder layer's forward compiled, one
compile shared by all layers and lengths, training numbers as eager's, validation and generation eager."""

from __future__ import annotations

import torch

from lmtune.train.regional import blocks, compile_blocks


def _lora_llama(layers: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0; a trained adapter is not
            torch.nn.init.normal_(p, std=0.02)
    return model


def _loss_and_grads(model, x):
    model.zero_grad()
    loss = model(input_ids=x, labels=x, use_cache=False).loss  # as lmtune's training forward runs
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_compiled_layers_train_as_eager_with_one_compile_for_all_layers_and_lengths():
    import torch._dynamo

    model = _lora_llama(layers=6)
    assert blocks(model) is model.get_base_model().model.layers
    inputs = [torch.randint(0, 256, (2, n)) for n in (17, 29, 40)]
    eager = [_loss_and_grads(model, x) for x in inputs]

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_blocks(model) == 6
    for x, (loss, grads) in zip(inputs, eager):
        got, got_grads = _loss_and_grads(model, x)
        assert abs(got - loss) < 1e-5
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got_grads, grads))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # one layer's graph (and at most one recompile, static to dynamic lengths), not one per layer or length
    assert 1 <= graphs <= 2, graphs

    with torch.no_grad():  # validation and generation (a growing KV cache) stay eager: nothing new compiled
        model.eval()
        model.generate(inputs[0][:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_a_model_without_a_block_stack_is_left_eager():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    assert blocks(model) is None and compile_blocks(model) == 0
