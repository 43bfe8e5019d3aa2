"""The cohort engine: a round's clients trained as one batch agree with one after another.

Tolerance: a client's parameters after a round agree with the sequential path within
2e-5 (absolute) and its reported loss within 1e-5 (relative). Grouped convolutions sum
in another order than one small convolution per client, so results are equal up to
float rounding, not bit for bit; over whole runs rounding differences grow with the
rounds, so the end-to-end tests compare the first rounds closely and later ones loosely.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from smallfed.compact.pruning import masked_training
from smallfed.cohort.stacked import StackedModel, refusal
from smallfed.cohort.trainer import DpPlan, Job, _Group, lanes_of, train_cohort
from smallfed.config import Config, ConfigError
from smallfed.models import build_model
from smallfed.privacy.local_dp import planned_step, train_private
from smallfed.simulation import simulate
from smallfed.training import TrainResult, client_generator, torch_threads, train

CPU = torch.device("cpu")
SIZES = [17, 40, 3, 25, 0]  # steps differ; one client has no data


def client_data(shape: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen))
            for n in SIZES]


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name,shape", [("cnn-tiny", (1, 28, 28)), ("cnn-seed", (1, 12, 12)),
                                        ("mlp", (64,)), ("scatter-cnn", (1, 8, 8)),
                                        ("cnn-tiny-tanh", (1, 8, 8))])
def test_the_stacked_forward_is_each_copys_own(name: str, shape: tuple[int, ...]) -> None:
    models = [build_model(name, shape, 10, seed) for seed in range(3)]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
              for n, _ in models[0].named_parameters()}
    x = torch.randn(5, 3, *shape, generator=torch.Generator().manual_seed(1))
    stacked = StackedModel(models[0])(params, x)
    for i, model in enumerate(models):
        torch.testing.assert_close(stacked[:, i], model(x[:, i]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, (3, 2), stride=2, padding=(2, 1), bias=False),
    nn.Conv2d(1, 4, 3, dilation=2), nn.Conv2d(1, 4, 3, padding="same"), nn.Conv2d(2, 4, 3)])
def test_a_stacked_convolution_and_its_gradient_are_each_copys_own(conv: nn.Conv2d) -> None:
    """One input channel takes the unfolded form, others the grouped convolution."""
    gen = torch.Generator().manual_seed(2)
    models = [nn.Sequential(copy.deepcopy(conv), nn.Flatten()) for _ in range(3)]
    for model in models:
        for p in model.parameters():
            p.data = torch.randn(p.shape, generator=gen)
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
              .requires_grad_() for n, _ in models[0].named_parameters()}
    x = torch.randn(5, 3, conv.in_channels, 9, 8, generator=gen)
    stacked = StackedModel(models[0])
    unfolded = conv.in_channels == 1 and not isinstance(conv.padding, str)
    assert ("_conv_one_channel" in stacked.layers[0].__qualname__) == unfolded
    out = stacked(params, x)
    weights = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * weights).sum(), list(params.values()))
    for i, model in enumerate(models):
        own = model(x[:, i])
        torch.testing.assert_close(out[:, i], own, atol=1e-5, rtol=1e-5)
        for grad, want in zip(grads, torch.autograd.grad((own * weights[:, i]).sum(),
                                                         list(model.parameters()))):
            torch.testing.assert_close(grad[i], want, atol=1e-4, rtol=1e-5)


def test_stacked_linear_layers_and_their_gradients_are_each_copys_own() -> None:
    gen = torch.Generator().manual_seed(4)
    models = [nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3, bias=False))
              for _ in range(3)]
    for model in models:
        for p in model.parameters():
            p.data = torch.randn(p.shape, generator=gen)
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
              .requires_grad_() for n, _ in models[0].named_parameters()}
    x = torch.randn(5, 3, 6, generator=gen).requires_grad_()
    out = StackedModel(models[0])(params, x)
    weights = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * weights).sum(), [x, *params.values()])
    for i, model in enumerate(models):
        alone = x.detach()[:, i].clone().requires_grad_()
        own = model(alone)
        torch.testing.assert_close(out[:, i], own, atol=1e-6, rtol=1e-6)
        want = torch.autograd.grad((own * weights[:, i]).sum(), [alone, *model.parameters()])
        torch.testing.assert_close(grads[0][:, i], want[0], atol=1e-6, rtol=1e-6)
        for grad, expected in zip(grads[1:], want[1:]):
            torch.testing.assert_close(grad[i], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layers", [
    (nn.ReLU(), nn.MaxPool2d(2)), (nn.MaxPool2d(2),), (nn.Tanh(), nn.MaxPool2d(2)),
    (nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)),
    (nn.MaxPool2d((2, 3), dilation=2), nn.ReLU())])
def test_stacked_max_pooling_is_bit_for_bit_torchs(layers: tuple[nn.Module, ...]) -> None:
    """Pooling takes the channels-last forward, and a ReLU before it runs after it:
    values (up to the sign of a zero) and gradients must still be exactly those of the
    layers as written, with ties (zeros after the ReLU, equal values) and a NaN in the
    input."""
    model = nn.Sequential(*layers, nn.Flatten())
    stacked = StackedModel(model)
    assert any("_max_pool" in layer.__qualname__ for layer in stacked.layers)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 2, 9, 10, generator=gen).round()  # many equal values
    x[0, 1, 0, 2, 3] = float("nan")
    x.requires_grad_()
    out = stacked({}, x)
    weights = torch.randn(out.shape, generator=gen)
    (grad,) = torch.autograd.grad((out.nan_to_num() * weights).sum(), [x])
    alone = x.detach().clone().requires_grad_()
    want = model(alone.reshape(12, 2, 9, 10)).reshape(out.shape)
    (want_grad,) = torch.autograd.grad((want.nan_to_num() * weights).sum(), [alone])
    assert out.isnan().any()
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0, equal_nan=True)


def test_models_that_cannot_be_stacked_say_why() -> None:
    assert "not an nn.Sequential" in refusal(build_model("cnn-shared", (1, 8, 8), 10, 0))
    with_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    assert "BatchNorm2d" in refusal(with_bn)
    assert refusal(build_model("cnn-tiny", (1, 8, 8), 10, 0)) == ""


@pytest.mark.parametrize("lanes", [1, 3])
def test_a_cohort_trains_each_client_as_it_would_train_alone(lanes: int) -> None:
    """Different sizes and steps, momentum, weight decay, FedProx and pruning masks; in
    one stack or in several trained at once."""
    cfg = Config(batch_size=8, local_epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-3)
    base = build_model("cnn-tiny", (1, 12, 12), 10, 0)
    said: list[str] = []
    mus = [0.0, 0.1, 0.0, 0.5, 0.0]
    rng = np.random.default_rng(3)
    masks = [{"0.weight": rng.random((16, 1, 3, 3)) > 0.5} if i % 2 else {}
             for i in range(len(SIZES))]
    alone, together = ([copy.deepcopy(base) for _ in SIZES] for _ in range(2))
    expected = []
    for i, ((x, y), model) in enumerate(zip(client_data((1, 12, 12)), alone)):
        with masked_training(model, masks[i]):
            expected.append(train(model, x, y, cfg, client_generator(1, 2, i), mus[i]))
    jobs = [Job(model, x, y, cfg, client_generator(1, 2, i), mus[i], masks[i])
            for i, ((x, y), model) in enumerate(zip(client_data((1, 12, 12)), together))]
    got = train_cohort(jobs, CPU, said.append, lanes=lanes)
    assert not said
    for want, have, a, b in zip(expected, got, alone, together):
        assert isinstance(have, TrainResult)
        assert (have.steps, have.num_examples) == (want.steps, want.num_examples)
        assert have.loss == pytest.approx(want.loss, rel=1e-5, abs=1e-7)
        assert max_difference(a, b) < 2e-5
    assert got[-1].steps == 0 and max_difference(together[-1], base) == 0  # no data, no move
    assert max_difference(together[1], base) > 1e-3  # and the others did train


@pytest.mark.parametrize("name,shape,masks,lanes,subspace", [
    ("cnn-tiny", (1, 12, 12), {"0.weight": (16, 1, 3, 3), "11.weight": (10, 64)}, 1, False),
    ("cnn-tiny", (1, 12, 12), {"0.weight": (16, 1, 3, 3), "11.weight": (10, 64)}, 2, False),
    ("mlp", (64,), {"1.weight": (64, 64)}, 1, False),
    ("cnn-tiny", (1, 12, 12), {"0.weight": (16, 1, 3, 3), "11.weight": (10, 64)}, 1, True)])
def test_dp_sgd_in_a_cohort_draws_opacus_batches_and_noise(
        name: str, shape: tuple[int, ...], masks: dict[str, tuple[int, ...]],
        lanes: int, subspace: bool) -> None:
    """Same seeds, same Poisson batches and Gaussian noise as Opacus: the same models,
    with pruning masks on some clients (a convolution's and a linear layer's), and
    clients of different sizes, so different sample rates, noise multipliers (a target
    epsilon) and expected batch sizes in one batch; and in a shared random subspace
    (the gradients projected before clipping, the noise zeroed outside it)."""
    cfg = Config(privacy="sample", batch_size=8, local_epochs=2, lr=0.05, momentum=0.9,
                 dp_target_epsilon=6.0, num_server_rounds=4, dp_clip=0.7)
    base = build_model(name, shape, 10, 0)
    with_data = client_data(shape)[:4]
    rng = np.random.default_rng(4)
    kept = [{k: rng.random(s) > 0.4 for k, s in masks.items()} if i % 2 else {}
            for i in range(4)]
    inside = {n: rng.random(p.shape) < 0.3 for n, p in base.named_parameters()} \
        if subspace else {}
    alone, together = ([copy.deepcopy(base) for _ in with_data] for _ in range(2))
    expected = []
    for i, (model, (x, y)) in enumerate(zip(alone, with_data)):
        with masked_training(model, kept[i]):
            expected.append(train_private(model, x, y, cfg, 100 + i, [], kept[i],
                                          subspace=inside).result)
    jobs = []
    for i, (model, (x, y)) in enumerate(zip(together, with_data)):
        noise, rate, _ = planned_step(cfg, len(y))
        jobs.append(Job(model, x, y, cfg, torch.Generator().manual_seed(100 + i),
                        masks=kept[i], dp=DpPlan(noise, rate, int(len(y) * rate), len(y)),
                        subspace=inside))
    assert len({job.dp.noise_multiplier for job in jobs}) > 1
    said: list[str] = []
    got = train_cohort(jobs, CPU, said.append, lanes=lanes)
    assert not said
    for want, have, a, b in zip(expected, got, alone, together):
        assert want is not None and isinstance(have, TrainResult)
        assert (have.steps, have.num_examples) == (want.steps, want.num_examples)
        assert have.loss == pytest.approx(want.loss, rel=1e-5)
        assert max_difference(a, b) < 2e-5
    for n, param in together[0].named_parameters():  # unpruned: only the subspace moved
        moved = (param != dict(base.named_parameters())[n]).detach().numpy()
        assert not subspace or (moved <= inside[n]).all()
    other_seed = copy.deepcopy(base)
    train_private(other_seed, *with_data[1], cfg, 999, [], subspace=inside)
    assert max_difference(other_seed, together[1]) > 1e-2  # the noise is there, and seeded


def test_clipped_sums_are_each_samples_clipped_gradient_summed_with_an_empty_batch() -> None:
    """The packed per-sample pass against autograd one sample at a time: a client whose
    Poisson draw came up empty in the middle of the stack, batches of other sizes,
    pruning masks on one client only."""
    cfg = Config(privacy="sample", batch_size=4, dp_clip=0.5, dp_noise=1.0)
    gen = torch.Generator().manual_seed(5)
    models = [build_model("cnn-tiny", (1, 12, 12), 10, seed) for seed in range(3)]
    data = [(torch.randn(n, 1, 12, 12, generator=gen), torch.randint(0, 10, (n,), generator=gen))
            for n in (5, 4, 6)]
    masks = [{}, {}, {"0.weight": np.random.default_rng(0).random((16, 1, 3, 3)) > 0.5,
                      "11.weight": np.random.default_rng(1).random((10, 64)) > 0.5}]
    jobs = [Job(m, x, y, cfg, torch.Generator(), masks=mask, dp=DpPlan(1.0, 0.5, 2, len(y)))
            for m, (x, y), mask in zip(models, data, masks)]
    group = _Group(jobs, CPU)
    assert group.jobs == jobs  # equal step counts: the stack keeps their order
    picked = [[0, 2, 4], [], [1]]
    rows = torch.full((3, 3), -1, dtype=torch.long)
    for c, own in enumerate(picked):
        rows[c, :len(own)] = torch.tensor(own, dtype=torch.long) + int(group.offsets[c])
    loss, summed = group._clipped_sums(rows, 3, 3)  # pylint: disable=protected-access
    for c, (model, (x, y)) in enumerate(zip(models, data)):
        want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        losses = []
        for j in picked[c]:
            sample_loss = F.cross_entropy(model(x[j:j + 1]), y[j:j + 1])
            grads = dict(zip(want, torch.autograd.grad(sample_loss, list(model.parameters()))))
            for name, keep in masks[c].items():
                grads[name] = grads[name] * torch.from_numpy(keep).float()
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
            factor = (cfg.dp_clip / (norm + 1e-6)).clamp(max=1.0)
            for name, grad in grads.items():
                want[name] += factor * grad
            losses.append(float(sample_loss))
        assert float(loss[c]) == pytest.approx(np.mean(losses) if losses else 0.0, rel=1e-5)
        for name, expected in want.items():
            torch.testing.assert_close(summed[name][c], expected, atol=1e-6, rtol=1e-5)
    assert all(float(t[1].abs().max()) == 0.0 for t in summed.values())  # the empty client


def test_lanes_split_a_cohort_into_stacks_of_about_equal_cost() -> None:
    steps = [125, 90, 85, 70, 50, 45, 45, 45, 30, 25]
    stacks = lanes_of(list(range(10)), steps, 2)
    assert sorted(i for stack in stacks for i in stack) == list(range(10))
    assert [0] in [stack[:1] for stack in stacks] and [1] in [stack[:1] for stack in stacks]
    costs = [max(steps[i] for i in s) + sum(steps[i] for i in s) for s in stacks]
    assert max(costs) / min(costs) < 1.1
    assert lanes_of(list(range(10)), steps, 2) == stacks  # deterministic
    assert lanes_of([4, 7], [3, 3], 5) == [[4], [7]] and lanes_of([], [], 2) == []
    assert lanes_of([1, 2, 3], [5, 1, 9], 1) == [[1, 2, 3]]


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_failed_batch_trains_its_clients_alone(monkeypatch: pytest.MonkeyPatch,
                                                 lanes: int) -> None:
    """Out of memory, say, after the batch drew its row orders: the batch's clients
    train on their own paths instead, from their generators as they were, so exactly
    as they train alone; the run says why (once per failed stack)."""
    cfg = Config(batch_size=8, local_epochs=1)
    base = build_model("cnn-tiny", (1, 12, 12), 10, 0)
    models, alone = ([copy.deepcopy(base) for _ in SIZES] for _ in range(2))
    jobs = [Job(m, x, y, cfg, client_generator(1, 2, i))
            for i, (m, (x, y)) in enumerate(zip(models, client_data((1, 12, 12))))]
    for job in jobs:
        job.alone = lambda job=job: train(job.model, job.x, job.y, cfg, job.generator)
    for i, (model, (x, y)) in enumerate(zip(alone, client_data((1, 12, 12)))):
        with torch_threads(1):  # as a client trains alone
            train(model, x, y, cfg, client_generator(1, 2, i))

    def no_memory(self: object) -> None:
        self._row_plan(self.steps)  # type: ignore[attr-defined]  # draws, then fails
        raise RuntimeError("out of memory")

    monkeypatch.setattr("smallfed.cohort.trainer._Group.train", no_memory)
    said: list[str] = []
    got = train_cohort(jobs, CPU, said.append, lanes=lanes)
    assert len(said) == lanes and "out of memory" in said[0]
    assert [r.steps for r in got] == [3, 5, 1, 4, 0]  # type: ignore[union-attr]
    assert max_difference(models[1], base) > 1e-3
    assert all(max_difference(a, b) == 0 for a, b in zip(models, alone))


def close_runs(a: dict, b: dict, first: int) -> None:
    """The first ``first`` rounds agree closely, all of them loosely."""
    for ra, rb in zip(a["rounds"], b["rounds"]):
        assert ra["clients"] == rb["clients"]
        assert ra["bytes_up"] == rb["bytes_up"]
        tight = ra["round"] <= first
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4 if tight else 5e-2)
        assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=0.01 if tight else 0.05)


def count_batched(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of jobs of every batch the cohort trains from now on."""
    import smallfed.cohort.trainer as trainer

    sizes: list[int] = []
    real = trainer.train_cohort

    def spy(jobs: list[Job], *args: object, **kwargs: object) -> list:
        sizes.append(len(jobs))
        return real(jobs, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_cohort", spy)
    return sizes


def test_a_cohort_run_agrees_with_a_sequential_run(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config(num_server_rounds=3, num_clients=12, clients_per_round=6, seed=7,
                 local_epochs=2, batch_size=8, partitioner="dirichlet", alpha=0.5,
                 prune="unstructured", prune_sparsity=0.5, strategy="fedprox", proximal_mu=0.01)
    sequential = simulate(cfg, tmp_path / "seq", progress=False)
    batched = count_batched(monkeypatch)
    together = simulate(cfg.replace(cohort_size=4), tmp_path / "cohort", progress=False)
    assert batched == [4, 2] * 3  # 6 clients a round, 4 at a time, all of them batched
    close_runs(sequential, together, first=2)


def test_a_cohort_run_is_reproducible(tmp_path: Path) -> None:
    """Node ids are random per run, so the strategy's message order is too; the cohort
    must batch in partition order, or which clients share a batch (and their float
    rounding) changes from run to run."""
    cfg = Config(num_server_rounds=3, num_clients=12, clients_per_round=6, seed=7,
                 local_epochs=2, batch_size=8, partitioner="dirichlet", alpha=0.5,
                 cohort_size=4)
    runs = [simulate(cfg, tmp_path / str(i), progress=False) for i in range(3)]
    strip = [[{k: v for k, v in r.items() if k != "wall_time_s"} for r in run["rounds"]]
             for run in runs]
    assert strip[0] == strip[1] == strip[2]


def test_private_cohort_run_keeps_the_ledger_and_declines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DP-SGD in a cohort: the same epsilon, and clients past their budget decline while
    the rest of the cohort trains (a handler that never reaches training leaves)."""
    cfg = Config(num_server_rounds=3, num_clients=6, clients_per_round=6, seed=7,
                 batch_size=16, privacy="sample", dp_noise=0.8, dp_reproducible=True,
                 dp_budget=6.0, fraction_evaluate=0.0)
    sequential = simulate(cfg, tmp_path / "seq", progress=False)
    batched = count_batched(monkeypatch)
    together = simulate(cfg.replace(cohort_size=6), tmp_path / "cohort", progress=False)
    declined = [r["clients_declined"] for r in together["rounds"][1:]]
    assert batched == [6 - d for d in declined if d < 6]
    close_runs(sequential, together, first=3)
    assert [r["clients_declined"] for r in together["rounds"]] == \
        [r["clients_declined"] for r in sequential["rounds"]]
    assert sum(r["clients_declined"] for r in together["rounds"]) > 0
    assert together["summary"]["epsilon"] == sequential["summary"]["epsilon"]


def test_unbatchable_features_train_alone_and_say_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """adam falls back to the sequential path: then a cohort run is the sequential run."""
    cfg = Config(num_server_rounds=2, num_clients=4, clients_per_round=4, seed=7,
                 optimizer="adam", lr=0.01, batch_size=16)
    sequential = simulate(cfg, tmp_path / "seq", progress=False)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        together = simulate(cfg.replace(cohort_size=4), tmp_path / "cohort", progress=False)
    said = [r.getMessage() for r in caplog.records if "cohort engine" in r.getMessage()]
    assert len(said) == 1 and "adam" in said[0]
    strip = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in sequential["rounds"]]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time_s"}
                     for r in together["rounds"]]


def test_private_clients_in_a_subspace_train_in_the_batch(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """DP-SGD in a shared subspace trains in the cohort, no fallback, as it would alone."""
    cfg = Config(num_server_rounds=2, num_clients=4, clients_per_round=4, seed=7,
                 batch_size=16, privacy="sample", dp_noise=0.8, subspace=0.5,
                 fraction_evaluate=0.0, dp_reproducible=True)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        together = simulate(cfg.replace(cohort_size=4), tmp_path / "cohort", progress=False)
    assert not [r for r in caplog.records if "cohort engine" in r.getMessage()]
    alone = simulate(cfg, tmp_path / "alone", progress=False)
    for a, b in zip(alone["rounds"], together["rounds"]):
        assert b["clients"] == a["clients"] and b["clients_failed"] == 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_cohort_settings_that_cannot_run_fail_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cohort-size"):
        Config(cohort_size=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: cuda"):
            simulate(Config(cohort_size=4, device="cuda"), tmp_path, progress=False)
        assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cohort_on_the_gpu_agrees_with_the_cpu() -> None:
    cfg = Config(batch_size=8, local_epochs=1, lr=0.05, momentum=0.9)
    base = build_model("cnn-tiny", (1, 12, 12), 10, 0)
    cpu, gpu = ([copy.deepcopy(base) for _ in SIZES] for _ in range(2))
    data = client_data((1, 12, 12))
    for models, device in ((cpu, CPU), (gpu, torch.device("cuda"))):
        train_cohort([Job(m, x, y, cfg, client_generator(1, 1, i))
                      for i, (m, (x, y)) in enumerate(zip(models, data))], device, print)
    for a, b in zip(cpu, gpu):
        assert max_difference(a, b) < 1e-4
