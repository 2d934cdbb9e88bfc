"""The trainable set, frozen weights, the loss, and learning: what a training step must and must not touch."""

import torch
import torch.nn.functional as F

from epalm.data.text import ANSWER_TOKEN, build_labels, format_qa, tokenize
from epalm.model.epalm import TRAINABLE_MODULES, summed_lm_loss


def _qa_batch(tokenizer):
    texts = [
        format_qa("what digit is this?", "seven", tokenizer.eos_token),
        format_qa("what digit is this?", "three", tokenizer.eos_token),
    ]
    ids, mask = tokenize(tokenizer, texts, "right")
    return ids, mask, build_labels(ids, mask)


def test_gradients_exactly_on_trainable_parameters(tiny_model, tiny_tokenizer):
    m = tiny_model
    m.train()
    ids, mask, labels = _qa_batch(tiny_tokenizer)
    m(ids, mask, labels=labels, media=torch.randn(2, 3, 16, 16)).loss.backward()
    trainable = {n for n, _ in m.trainable_named_parameters()}
    assert trainable and all(n.split(".")[0] in TRAINABLE_MODULES for n in trainable)
    for name, p in m.named_parameters():
        if name in trainable:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert not m.lm.training and not m.encoder.training  # frozen parts stay in eval mode


def test_frozen_tensors_bit_identical_after_optimizer_step(tiny_model, tiny_tokenizer):
    m = tiny_model
    frozen_before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith(TRAINABLE_MODULES)}
    adapter_before = {k: v.clone() for k, v in m.adapter_state_dict().items()}
    opt = torch.optim.AdamW([p for _, p in m.trainable_named_parameters()], lr=1e-2, weight_decay=0.02)
    ids, mask, labels = _qa_batch(tiny_tokenizer)
    m(ids, mask, labels=labels, media=torch.randn(2, 3, 16, 16)).loss.backward()
    opt.step()
    after = m.state_dict()
    for k, v in frozen_before.items():
        assert torch.equal(after[k], v), k
    assert all(not torch.equal(after[k], v) for k, v in adapter_before.items())


def test_loss_is_summed_per_sample_times_weight(tiny_model, tiny_tokenizer):
    m = tiny_model
    ids, mask, labels = _qa_batch(tiny_tokenizer)
    media = torch.randn(2, 3, 16, 16)
    out = m(ids, mask, labels=labels, media=media)
    per_token = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    per_sample = per_token.view(2, -1).sum(1)  # ignored labels give 0
    torch.testing.assert_close(out.loss, 0.1 * per_sample.mean())
    torch.testing.assert_close(summed_lm_loss(out.logits, labels), per_sample)


def test_answer_only_labels_ignore_the_question(tiny_tokenizer):
    ids, mask, labels = _qa_batch(tiny_tokenizer)
    sep = tiny_tokenizer.convert_tokens_to_ids(ANSWER_TOKEN)
    answer_labels = build_labels(ids, mask, sep, answer_only=True)
    for row in range(2):
        kept = tiny_tokenizer.decode(answer_labels[row][answer_labels[row] != -100])
        assert kept in ("seven</s>", "three</s>")
    assert (labels != -100).sum() > (answer_labels != -100).sum()


def test_tiny_model_overfits_one_batch(tiny_tokenizer):
    """Only the adapter learns, through a frozen random LM: the loss must fall at least 10x.

    Random OPT's default init (std 0.02) gives near-uniform logits that no input can sharpen, so
    this LM is initialised wider (std 0.3), standing in for a pretrained one's expressive output.
    """
    from epalm.config import build_config
    from epalm.model.epalm import build_model
    from testing.support import tiny_tree

    tree = tiny_tree(prompt_tokens=10)
    tree["model"]["lm"]["config_overrides"].update(
        hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, init_std=0.3
    )
    torch.manual_seed(0)
    m = build_model(build_config(tree).model)
    m.train()
    texts = [
        format_qa("what digit is this?", a, tiny_tokenizer.eos_token)
        for a in ("seven", "three", "one", "nine")
    ]
    ids, mask = tokenize(tiny_tokenizer, texts, "right")
    labels = build_labels(ids, mask)
    media = torch.randn(4, 3, 16, 16)
    opt = torch.optim.AdamW([p for _, p in m.trainable_named_parameters()], lr=3e-3)
    losses = []
    for _ in range(200):
        loss = m(ids, mask, labels=labels, media=media).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert min(losses[-10:]) < losses[0] / 10, (losses[0], losses[-10:])
