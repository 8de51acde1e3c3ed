"""Shared-prefix attention gives the logits of encoding each prefix + suffix whole."""
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


HEAD = [5, 9, 3, 17, 22]
PARTS = [[8, 41, 7, 2], [11, 4, 4, 30, 12, 60, 19, 23, 5], []]  # the last response adds nothing to the head
SUFFIXES = [[[3, 8], [14, 15, 16, 17, 18], [40, 2, 9]], [[7, 7, 7, 7], [21, 22]], [[1, 2, 3], [33, 34]]]


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query attention
@pytest.mark.parametrize("fused", [True, False])  # CPU fused kernel, and the plain path other devices take
@pytest.mark.parametrize("head", [HEAD, []])
def test_packed_checks_match_whole_sequences(kv_heads, fused, head, monkeypatch):
    from autorule_lib.verify import shared_prefix

    model = _model(kv_heads)
    keep = 2
    with torch.inference_mode():
        whole = [model(input_ids=torch.tensor([head + p + s])).logits[0, -keep:]
                 for p, rules in zip(PARTS, SUFFIXES) for s in rules]
        assert shared_prefix.enable(model)
        if not fused:
            monkeypatch.setattr(shared_prefix, "_CPU_FUSED", None)
        parts, suffixes = (PARTS, SUFFIXES) if head else (PARTS[:2], SUFFIXES[:2])
        packed = shared_prefix.check_logits(model, head, parts, suffixes, keep)
    assert packed.shape == (sum(map(len, suffixes)), keep, 64)
    for got, expected in zip(packed, whole):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_enabled_model_keeps_its_own_attention_elsewhere():
    """Generation and padded batches on the judge model are unchanged by enabling the dispatcher."""
    from autorule_lib.verify import shared_prefix

    model = _model(2)
    ids = torch.tensor([[0, 0, 5, 9, 3], [4, 8, 15, 16, 23]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).logits
        gen_before = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert shared_prefix.enable(model) and shared_prefix.enable(model)  # idempotent
        assert model.config._attn_implementation == "autorule_shared_prefix_sdpa"
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before)
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                           gen_before)


@pytest.mark.parametrize("parts, suffixes, message", [
    ([[1, 2]], [[]], "at least one suffix"),
    ([[1, 2], [3]], [[[4, 5]]], "at least one suffix"),
    ([[1, 2]], [[[4, 5], [6]]], "read-out tokens"),  # would read the conversation's last token as the answer
])
def test_malformed_layouts_are_refused(parts, suffixes, message):
    from autorule_lib.verify import shared_prefix

    model = _model(4)
    shared_prefix.enable(model)
    with torch.inference_mode(), pytest.raises(ValueError, match=message):
        shared_prefix.check_logits(model, [], parts, suffixes, 2)
