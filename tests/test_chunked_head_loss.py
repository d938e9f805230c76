"""``ParcaeForCausalLM(..., chunked_loss=True)``: the loss of the head without its logits, equal to the plain loss."""

import pytest
import torch
from conftest import tiny_model


@pytest.mark.parametrize("given", ["labels", "shift_labels"])
def test_the_chunked_loss_and_its_gradients_equal_the_plain_loss(given):
    model = tiny_model(seed=4)
    model.train()
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    targets = {"labels": labels} if given == "labels" else {"shift_labels": shifted}
    losses, grads = [], []
    for chunked in (False, True):
        model.zero_grad()
        out = model(ids, num_loops=(1, 2), chunked_loss=chunked, state_generator=torch.Generator().manual_seed(1),
                    **targets)
        out.loss.backward()
        assert (out.logits is None) == chunked
        losses.append(out.loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_under_bf16_autocast_the_chunked_loss_runs_the_head_in_bf16_as_the_plain_loss():
    """The final norm returns float32 under autocast; the plain head's matmul still runs in bf16, and so must the
    chunked one (a float32 head matmul costs the GPU several times the bf16 time). Both losses then come from the
    same bf16 logits: equal within 1e-6 (a float32 head would differ by bf16's rounding of the logits). Gradients:
    the logits' gradient is rounded to bf16 at different points, so within 2e-2 of each gradient's scale."""
    model = tiny_model(seed=4)
    model.train()
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for chunked in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids, num_loops=(1, 2), chunked_loss=chunked,
                        state_generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    for name, want in grads[0].items():
        assert (grads[1][name] - want).abs().max() <= 2e-2 * want.abs().max(), name


def test_the_chunked_loss_refuses_what_it_cannot_compute():
    model = tiny_model()
    ids = torch.randint(3, 250, (1, 6))
    with pytest.raises(ValueError, match="needs labels or shift_labels"):
        model(ids, chunked_loss=True)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, chunked_loss=True, logits_to_keep=1)
