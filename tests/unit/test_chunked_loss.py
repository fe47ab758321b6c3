"""The chunked cross-entropy equals Hugging Face's loss (value and gradients) and never holds the full logits."""

import copy

import pytest
import torch
import torch.nn.functional as F

from launcher.config import FinetuneSection
from launcher.train.adapters import apply_finetune_method
from launcher.train.chunked_loss import IGNORE_INDEX, causal_lm_loss, use_chunked_loss
from tiny_lm import tiny_llama


def reference_loss(hidden, weight, labels, num_items=None):
    """transformers' ForCausalLMLoss on full fp32 logits."""
    logits = F.linear(hidden, weight).float()
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets, ignore_index=IGNORE_INDEX,
                           reduction="sum" if num_items is not None else "mean")
    return loss / num_items if num_items is not None else loss


def masked_labels(batch=3, seq=17, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :5] = IGNORE_INDEX  # an SFT prompt
    labels[1, seq // 2] = IGNORE_INDEX  # a packed example's first token
    labels[-1, ::3] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
@pytest.mark.parametrize("num_items", [None, 37, "tensor"])
def test_loss_and_gradients_equal_plain_cross_entropy(chunk, num_items):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 17, 24, generator=g, requires_grad=True)
    weight = torch.randn(50, 24, generator=g, requires_grad=True)
    labels = masked_labels()
    items = torch.tensor(37) if num_items == "tensor" else num_items
    expected = reference_loss(hidden, weight, labels, items)
    want = torch.autograd.grad(expected, (hidden, weight))
    loss = causal_lm_loss(hidden, weight, labels, chunk, items)
    got = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_frozen_head_gets_no_gradient_and_autocast_matches_the_bf16_head():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g)
    labels = masked_labels(2, 9, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference_loss(hidden, weight, labels, 11)  # lm_head under autocast: bf16 logits, fp32 loss
        loss = causal_lm_loss(hidden, weight, labels, 4, 11)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert grad.dtype == torch.float32 and weight.grad is None


def test_an_fp32_head_trained_under_autocast_gets_an_fp32_gradient_like_the_bf16_products():
    """DDP's amp-bf16: fp32 weights, bf16 matmuls; the head's gradient accumulates the chunks' bf16 products."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, generator=g)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = masked_labels(2, 9, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (expected,) = torch.autograd.grad(reference_loss(hidden, weight, labels, 11), weight)
        (grad,) = torch.autograd.grad(causal_lm_loss(hidden, weight, labels, 4, 11), weight)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, expected, rtol=2e-2, atol=2e-3)


def batch(vocab, seed=3):
    """Two packed rows: position_ids restart where an example starts, labels mask each example's prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[:, 10:13] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "num_items_in_batch": 29}


def loss_and_grads(model, inputs):
    model.train()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_models_train_on_the_same_loss_and_gradients(tied, method):
    base = tiny_llama(64, seed=0)
    if tied:
        base.config.tie_word_embeddings = True
        base.lm_head.weight = base.model.embed_tokens.weight
    plain = apply_finetune_method(base, FinetuneSection(method=method, r=4, lora_dropout=0.0))
    chunked = copy.deepcopy(plain)
    assert use_chunked_loss(chunked, chunk=5)
    inputs = batch(64)
    want_loss, want = loss_and_grads(plain, inputs)
    got_loss, got = loss_and_grads(chunked, inputs)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    ids = inputs["input_ids"]
    with torch.no_grad():  # without labels (evaluation by logits, generation) the model's own forward runs
        torch.testing.assert_close(chunked(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_wrapped_head_keeps_the_models_own_loss():
    model = apply_finetune_method(tiny_llama(64), FinetuneSection(method="lora", r=2, modules_to_save=["lm_head"]))
    assert not use_chunked_loss(model, chunk=8)
    assert not use_chunked_loss(tiny_llama(64), chunk=0)


def test_the_full_logits_are_never_allocated():
    """The largest tensor autograd saves or the loss allocates is one chunk of logits, not [tokens, vocab]."""
    tokens, vocab, chunk = 256, 4096, 32
    hidden = torch.randn(1, tokens, 16, requires_grad=True)
    weight = torch.randn(vocab, 16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))

    def largest_allocation(loss_fn):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Largest(TorchDispatchMode):
            most = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor):
                        Largest.most = max(Largest.most, t.numel())
                return out

        with Largest():
            loss_fn().backward()
        return Largest.most

    plain = largest_allocation(lambda: reference_loss(hidden, weight, labels))
    chunked = largest_allocation(lambda: causal_lm_loss(hidden, weight, labels, chunk))
    assert plain >= tokens * vocab
    assert chunked == chunk * vocab  # one chunk of logits


def tiny_moe(model_type: str, vocab: int):
    """A 2-layer Mixtral or Qwen3-MoE with 4 experts, 2 per token, random init (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                  moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, router_aux_loss_coef=0.1,
                                  **({"num_local_experts": 4} if model_type == "mixtral" else {"num_experts": 4}))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_a_mixture_of_experts_adds_its_router_loss_as_hugging_face_does(model_type):
    plain = tiny_moe(model_type, 64)
    plain.config.output_router_logits = True  # HF's own loss: cross-entropy + coef x load-balancing loss
    chunked = copy.deepcopy(plain)
    assert use_chunked_loss(chunked, chunk=5)
    inputs = {**batch(64), "num_items_in_batch": 36}  # the micro-batch is the whole window: 36 counted tokens
    want_loss, want = loss_and_grads(plain, inputs)
    got_loss, got = loss_and_grads(chunked, inputs)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    assert got.keys() == want.keys() and any("gate" in name for name in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)

    aux = chunked(**inputs).aux_loss
    assert 2.0 <= aux.item() < 4.0  # top_k = 2 when the experts are evenly loaded
    half = chunked(**{**inputs, "num_items_in_batch": 72})  # half the window: half the weight in the step's mean
    torch.testing.assert_close(half.aux_loss, aux / 2)
    torch.testing.assert_close(half.loss, (want_loss - 0.1 * aux) / 2 + 0.1 * aux / 2)
    chunked.eval()  # evaluation reports the language-model loss alone
    torch.testing.assert_close(chunked(**inputs).loss, want_loss - 0.1 * aux)


def test_the_heads_gradient_accumulates_in_place_without_a_second_head_sized_tensor():
    """Each chunk adds its share of the LM head's gradient into one buffer: a product then an add would hold a
    second [vocab, hidden] tensor at every chunk (1 GiB for a 128K-vocabulary 4096-wide bf16 head). MemTracker on
    fake tensors: what the backward adds beside the inputs stays under 1.5 heads (the gradient, one chunk's
    logits and the hidden states' gradient)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    vocab, width, tokens, chunk = 32000, 4096, 1024, 128
    with FakeTensorMode():
        hidden = torch.randn(1, tokens, width, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(vocab, width, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (1, tokens))
        tracker = MemTracker()
        with tracker:
            causal_lm_loss(hidden, weight, labels, chunk).backward()
        peak = max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    head = vocab * width * 2
    assert peak - head - hidden.numel() * 2 < 1.5 * head, peak / head
