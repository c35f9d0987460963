"""The reference loops (torch_reference, horovod_reference): one flat all-reduce per step."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_one_flat_all_reduce_per_step_averages_every_gradient():
    from scaling.backends.torch_reference import FlatAllReduce
    from scaling.workloads import torch_models

    model = torch_models.build("mlp")
    params = list(model.parameters())
    calls = []

    def fake_sum(flat):  # two ranks with identical gradients: the sum doubles them
        calls.append(flat.numel())
        flat.mul_(2)

    opt = FlatAllReduce(torch.optim.SGD(params, lr=1.0), params, world=2, all_reduce_sum=fake_sum)
    before = [p.detach().clone() for p in params]
    x = torch.rand(8, 28, 28)
    y = torch.randint(0, 10, (8,))
    model.eval()  # no dropout: the expected gradient is reproducible
    opt.zero_grad()
    torch.nn.functional.nll_loss(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in params]
    opt.step()
    assert calls == [sum(p.numel() for p in params)]  # one call, the whole gradient
    for p, b, g in zip(params, before, grads):
        assert torch.allclose(p.detach(), b - g)  # sum over 2 ranks / 2 = the gradient itself
    opt.zero_grad()
    assert all(float(p.grad.abs().sum()) == 0 for p in params)  # the views survive zero_grad


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend, module", [("torch_reference", "torch.distributed"),
                                             ("horovod_reference", "horovod.torch")])
def test_reference_loop_tracks_one_worker_and_stays_in_sync(tmp_path, mnist_cache, backend, module):
    pytest.importorskip(module)
    from test_distributed import STEPS, TRACK_MAX, TRACK_MEAN, run_ok

    common = ["train.epochs=1", f"train.max_steps_per_epoch={STEPS}", "protocol.log_every=1",
              "protocol.warmup_steps=0", "scaling=strong", "train.global_batch=64"]
    one = run_ok(tmp_path, "one", "backend=torch", "devices=1", *common)
    two = run_ok(tmp_path, "two", f"backend={backend}", "devices=2", *common)
    assert two["metrics"]["ranks_in_sync"] is True
    a = np.array([v for _, v in one["metrics"]["train_loss"]])
    b = np.array([v for _, v in two["metrics"]["train_loss"]])
    rel = np.abs(a - b) / a
    assert len(a) == len(b) == STEPS and rel.mean() <= TRACK_MEAN and rel.max() <= TRACK_MAX, (a.round(3), b.round(3))
