"""SecAgg+ as pure functions: exact sums under dropouts, the refusals that protect clients,
and masked inputs that look uniform to the server."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from flwr.common import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from scipy import stats

from smallfed.secagg import protocol
from smallfed.secagg.protocol import (
    Params,
    SecAggError,
    choose_degree,
    choose_graph,
    client_keys,
    client_masked,
    client_shares,
    client_unmask,
    server_unmask,
)

FULL = (10, *choose_degree(10, 1 / 3))  # (n, K, t) = (10, 10, 7)
SPARSE = (40, *choose_degree(40, 1 / 3))  # (40, 18, 6)


def stored(state: dict) -> dict:
    """The state as it comes back from a Flower ConfigRecord (protobuf and back)."""
    return dict(config_record_from_proto(config_record_to_proto(ConfigRecord(state))))


class Cohort:
    """Every party of one round in this process; the test plays the server and the network."""

    def __init__(self, n: int, degree: int, params: Params, seed: int = 0) -> None:
        self.params = params
        self.graph = choose_graph(n, degree, bytes([seed]))
        self.vectors = np.random.default_rng(seed).integers(
            0, 1 << params.bits, (n, params.length), dtype=np.uint64)
        keys = [client_keys(i) for i in range(n)]
        self.states = {i: stored(k[0]) for i, k in enumerate(keys)}
        self.c_publics = [k[1] for k in keys]
        self.s_publics = [k[2] for k in keys]
        self.texts: dict[tuple[int, int], bytes] = {}  # (sender, receiver) -> ciphertext
        self.senders: dict[int, list[int]] = {}
        self.masked: dict[int, np.ndarray] = {}

    def share(self, leave: tuple[int, ...] = ()) -> None:
        for i, nb in enumerate(self.graph):
            if i in leave:
                continue
            state, texts = client_shares(self.states[i], self.params, nb,
                                         [self.c_publics[j] for j in nb],
                                         [self.s_publics[j] for j in nb])
            self.states[i] = stored(state)
            self.texts.update({(i, j): text for j, text in zip(nb, texts)})
        shared = {i for i, _ in self.texts}
        self.senders = {i: [j for j in self.graph[i] if j in shared] for i in sorted(shared)}

    def mask(self, leave: tuple[int, ...] = ()) -> None:
        for i, senders in self.senders.items():
            if i in leave:
                continue
            state, self.masked[i] = client_masked(
                self.states[i], self.params, senders,
                [self.texts[(j, i)] for j in senders], self.vectors[i])
            self.states[i] = stored(state)

    def lists(self) -> tuple[list[int], list[int]]:
        """The server's global lists for round 4: survivors, dropped."""
        return sorted(self.masked), sorted(set(self.senders) - set(self.masked))

    def unmask(self, leave: tuple[int, ...] = ()) -> dict[int, tuple[list[int], list[bytes]]]:
        survivors, dropped = self.lists()
        return {i: client_unmask(self.states[i], survivors, dropped)
                for i in survivors if i not in leave}

    def total(self, shares: dict) -> np.ndarray:
        return server_unmask(self.params, self.graph, self.senders,
                             {i: self.s_publics[i] for i in self.senders}, self.masked, shares)

    def expected(self) -> np.ndarray:
        top = np.uint64((1 << self.params.bits) - 1)
        return self.vectors[sorted(self.masked)].sum(axis=0) & top


def cohort(shape: tuple[int, int, int], seed: int = 0, bits: int = 16, length: int = 50,
           min_survivors: int | None = None) -> Cohort:
    n, degree, threshold = shape
    floor = min_survivors if min_survivors is not None else n - math.floor(n / 3)
    params = Params(bits=bits, length=length, threshold=threshold, min_survivors=floor)
    return Cohort(n, degree, params, seed)


def picks(n: int, count: int, seed: int) -> tuple[int, ...]:
    return tuple(random.Random(seed).sample(range(n), count))


# --------------------------------------------------------------------------- exact sums

# (before sharing, before masked input, before unmasking): the share of floor(n/3) that
# leaves at each step
SCENARIOS = {
    "none": (0, 0, 0),
    "before-masked": (0, 1, 0),
    "after-masked": (0, 0, 1),
    "both": (0, 1 / 2, 1 / 2),
    "all-steps": (1 / 3, 1 / 3, 1 / 3),
}


@pytest.mark.parametrize("shape", [FULL, SPARSE], ids=["full-10", "sparse-40"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_exact_sum_of_survivors_comes_back(shape, scenario) -> None:
    n = shape[0]
    budget = math.floor(n / 3)
    shares = SCENARIOS[scenario]
    counts = [math.floor(f * budget) for f in shares]
    if any(shares):  # the whole budget of max_dropout * n leaves: the last step takes the rest
        last = max(k for k, f in enumerate(shares) if f)
        counts[last] += budget - sum(counts)
    leaving = picks(n, sum(counts), seed=len(scenario))
    steps = [leaving[:counts[0]], leaving[counts[0]:counts[0] + counts[1]],
             leaving[counts[0] + counts[1]:]]
    c = cohort(shape, seed=n)
    c.share(leave=steps[0])
    c.mask(leave=steps[1])
    total = c.total(c.unmask(leave=steps[2]))
    assert total.dtype == np.uint64
    assert len(c.masked) == n - counts[0] - counts[1]
    np.testing.assert_array_equal(total, c.expected())


def test_values_at_the_top_of_the_range_wrap_modulo_2_to_the_bits() -> None:
    c = cohort(FULL, bits=62, length=8)
    c.vectors[:] = (1 << 62) - 1
    c.share()
    c.mask()
    np.testing.assert_array_equal(c.total(c.unmask()), c.expected())


# --------------------------------------------------------------------------- failures

def test_too_few_masked_inputs_fails_on_both_sides() -> None:
    c = cohort(FULL)  # min_survivors 7
    c.share()
    c.mask(leave=(0, 1, 2, 3))
    survivors, dropped = c.lists()
    with pytest.raises(SecAggError, match="fewer than min_survivors = 7"):
        client_unmask(c.states[4], survivors, dropped)
    with pytest.raises(SecAggError, match="6 masked inputs arrived, fewer than min_survivors"):
        c.total({})


def test_too_many_silent_in_unmasking_names_the_party_and_the_count() -> None:
    c = cohort(FULL)  # t = 7
    c.share()
    c.mask()
    with pytest.raises(SecAggError, match=r"party \d: 6 shares of its self-mask seed arrived, "
                                          r"t = 7 needed"):
        c.total(c.unmask(leave=(0, 1, 2, 3)))


def test_a_masked_input_outside_the_range_is_refused_by_the_server() -> None:
    c = cohort(FULL)
    c.share()
    c.mask()
    shares = c.unmask()
    c.masked[3] = c.masked[3].copy()
    c.masked[3][0] = 1 << 16
    with pytest.raises(SecAggError, match="party 3's masked input has values outside"):
        c.total(shares)


def test_asymmetric_senders_between_survivors_are_refused() -> None:
    c = cohort(FULL)
    c.share()
    c.mask()
    shares = c.unmask()
    c.senders[0] = [j for j in c.senders[0] if j != 1]
    with pytest.raises(SecAggError, match="cannot cancel"):
        c.total(shares)


# --------------------------------------------------------------------------- client refusals

@pytest.fixture
def masked_sparse() -> Cohort:
    """Round 3 done on the sparse graph, min_survivors 20 so that the neighbourhood check
    can be reached on its own."""
    c = cohort(SPARSE, min_survivors=20)
    c.share()
    c.mask()
    return c


def test_client_unmask_refuses_lists_that_would_reveal_both_secrets(masked_sparse) -> None:
    c = masked_sparse
    survivors, _ = c.lists()
    j = c.senders[0][0]
    with pytest.raises(SecAggError, match=rf"parties \[{j}\] are named both"):
        client_unmask(c.states[0], survivors, [j])


def test_client_unmask_refuses_too_few_survivors(masked_sparse) -> None:
    c = masked_sparse
    survivors = [0, *c.senders[0]]  # 18: only its neighbourhood
    with pytest.raises(SecAggError, match="18 inputs, fewer than min_survivors = 20"):
        client_unmask(c.states[0], survivors, [])


def test_client_unmask_refuses_too_few_of_its_share_holders(masked_sparse) -> None:
    c = masked_sparse
    gone = c.senders[0][4:]  # 1 + 4 = 5 of its holders survive, t = 6
    survivors = [i for i in range(40) if i not in gone]
    assert len(survivors) >= 20
    with pytest.raises(SecAggError, match="only 5 of party 0's share-holders survived"):
        client_unmask(c.states[0], survivors, gone)
    owners, _ = client_unmask(c.states[0], *c.lists())  # the true lists pass
    assert owners == sorted([0, *c.senders[0]])


def test_client_unmask_refuses_inconsistent_names(masked_sparse) -> None:
    c = masked_sparse
    survivors, _ = c.lists()
    others = [i for i in survivors if i != 0]
    with pytest.raises(SecAggError, match="not among the survivors"):
        client_unmask(c.states[0], others, [])
    missing = c.senders[0][0]
    with pytest.raises(SecAggError, match=rf"senders \[{missing}\] of party 0 neither"):
        client_unmask(c.states[0], [i for i in survivors if i != missing], [])


def test_client_unmask_refuses_a_neighbour_that_never_shared() -> None:
    c = cohort(FULL)
    c.share(leave=(9,))
    c.mask()
    survivors, _ = c.lists()
    with pytest.raises(SecAggError, match=r"names \[9\], neighbours of party 0 that never"):
        client_unmask(c.states[0], survivors, [9])


def test_each_owner_gets_exactly_one_share() -> None:
    c = cohort(FULL)
    c.share()
    c.mask(leave=(9,))
    survivors, dropped = c.lists()
    owners, shares = client_unmask(c.states[0], survivors, dropped)
    assert owners == list(range(10)) and all(len(s) == 16 for s in shares)
    assert dropped == [9]


def test_after_masking_a_client_keeps_no_key_and_no_self_mask_seed() -> None:
    c = cohort(FULL)
    c.share()
    c.mask()
    assert not {"c-private", "s-seed", "b"} & set(c.states[0])


def test_a_tampered_or_misrouted_ciphertext_is_rejected() -> None:
    c = cohort(FULL)
    c.share()
    senders = c.senders[0]
    texts = [c.texts[(j, 0)] for j in senders]
    flipped = bytearray(texts[0])
    flipped[5] ^= 1
    bad = [bytes(flipped), *texts[1:]]
    with pytest.raises(SecAggError, match=f"from party {senders[0]} to party 0 fail"):
        client_masked(c.states[0], c.params, senders, bad, c.vectors[0])
    misrouted = [c.texts[(senders[0], 5)], *texts[1:]]  # addressed to party 5
    with pytest.raises(SecAggError, match="fail authentication"):
        client_masked(c.states[0], c.params, senders, misrouted, c.vectors[0])
    swapped = [texts[1], texts[0], *texts[2:]]  # right receiver, wrong sender's name
    with pytest.raises(SecAggError, match="fail authentication"):
        client_masked(c.states[0], c.params, senders, swapped, c.vectors[0])
    assert len(texts[0]) == 48


def test_client_shares_refuses_bad_neighbour_lists() -> None:
    params = Params(bits=16, length=4, threshold=3, min_survivors=3)
    state, c, s = client_keys(0)
    keys = [client_keys(i)[1:] for i in range(1, 4)]
    cs, ss = [k[0] for k in keys], [k[1] for k in keys]
    with pytest.raises(SecAggError, match="repeats a party"):
        client_shares(state, params, [1, 1, 2], cs, ss)
    with pytest.raises(SecAggError, match="its own neighbours"):
        client_shares(state, params, [0, 1, 2], cs, ss)
    with pytest.raises(SecAggError, match="32 raw bytes"):
        client_shares(state, params, [1, 2, 3], cs, [ss[0][:31], *ss[1:]])
    with pytest.raises(SecAggError, match="2 c_publics for 3 neighbours"):
        client_shares(state, params, [1, 2, 3], cs[:2], ss)
    with pytest.raises(SecAggError, match="not a usable X25519 key"):
        client_shares(state, params, [1, 2, 3], [bytes(32), *cs[1:]], ss)
    with pytest.raises(SecAggError, match="2 share-holders, fewer than t = 3"):
        client_shares(state, params, [1], cs[:1], ss[:1])
    _, texts = client_shares(state, params, [1, 2, 3], cs, ss)
    assert [len(t) for t in texts] == [48, 48, 48]


def test_client_masked_refuses_bad_inputs_and_steps_out_of_order() -> None:
    c = cohort(FULL)
    c.share()
    senders = c.senders[0]
    texts = [c.texts[(j, 0)] for j in senders]
    for vector, match in [(np.full(50, 1 << 16, np.uint64), "outside"),
                          (np.zeros(49, np.uint64), "shape"),
                          (np.zeros(50), "dtype")]:
        with pytest.raises(SecAggError, match=match):
            client_masked(c.states[0], c.params, senders, texts, vector)
    with pytest.raises(SecAggError, match="fewer than t = 7 could ever unmask"):
        client_masked(c.states[0], c.params, senders[:5], texts[:5], c.vectors[0])
    with pytest.raises(SecAggError, match="params changed"):
        client_masked(c.states[0], Params(16, 50, 7, 8), senders, texts, c.vectors[0])
    with pytest.raises(SecAggError, match="step 3 .* got one from step 2"):
        client_unmask(c.states[0], list(range(10)), [])


# --------------------------------------------------------------------------- wrong shares

def corrupt(shares: dict, responder: int, owner: int) -> None:
    owners, values = shares[responder]
    values = list(values)
    at = owners.index(owner)
    values[at] = bytes(b ^ 0xFF for b in values[at])
    shares[responder] = (owners, values)


def test_a_wrong_mask_secret_share_is_skipped_by_its_public_key() -> None:
    c = cohort(FULL)
    c.share()
    c.mask(leave=(9,))
    shares = c.unmask()
    corrupt(shares, 0, owner=9)
    np.testing.assert_array_equal(c.total(shares), c.expected())


def test_a_wrong_self_mask_share_is_outvoted_or_refused() -> None:
    c = cohort(FULL)  # t = 7
    c.share()
    c.mask()
    shares = c.unmask(leave=(8,))  # 9 shares each: two spare
    corrupt(shares, 1, owner=0)
    np.testing.assert_array_equal(c.total(shares), c.expected())
    del shares[7]  # 8 shares each: one spare, detects but cannot tell which is wrong
    with pytest.raises(SecAggError, match="party 0: its self-mask seed cannot be rebuilt"):
        c.total(shares)


def test_shares_no_party_could_hold_are_ignored() -> None:
    c = cohort(SPARSE)
    c.share()
    c.mask()
    shares = c.unmask()
    stranger = next(j for j in range(40) if j not in c.graph[0] and j != 0)
    owners, values = shares[0]
    shares[0] = ([*owners, stranger], [*values, bytes(16)])
    np.testing.assert_array_equal(c.total(shares), c.expected())


# --------------------------------------------------------------------------- what the server sees

def uniformity(values: np.ndarray, bits: int) -> float:
    return stats.chisquare(np.bincount(values.astype(np.int64), minlength=1 << bits)).pvalue


def two_sample(a: np.ndarray, b: np.ndarray, bits: int) -> float:
    table = np.stack([np.bincount(v.astype(np.int64), minlength=1 << bits) for v in (a, b)])
    return stats.chi2_contingency(table[:, table.sum(axis=0) > 0]).pvalue


def masked_for(vector: np.ndarray, seed: int, monkeypatch) -> np.ndarray:
    """Party 0's masked input in a 3-party round; the seeds (b, mask secrets) come from a
    seeded generator so that the test is deterministic."""
    rng = random.Random(seed)
    monkeypatch.setattr(protocol.os, "urandom", rng.randbytes)
    c = Cohort(3, 3, Params(bits=8, length=vector.size, threshold=2, min_survivors=2))
    c.vectors[0] = vector
    c.share()
    c.mask()
    return c.masked[0]


def test_a_masked_input_is_indistinguishable_from_uniform(monkeypatch) -> None:
    length, bits = 20_000, 8
    zeros = np.zeros(length, np.uint64)
    tops = np.full(length, 255, np.uint64)
    masked_zeros = masked_for(zeros, 1, monkeypatch)
    masked_tops = masked_for(tops, 2, monkeypatch)
    assert uniformity(masked_zeros, bits) > 1e-3
    assert uniformity(masked_tops, bits) > 1e-3
    assert two_sample(masked_zeros, masked_tops, bits) > 1e-3
    # The same tests see through no mask, and through a mask that covers a quarter of Z_256.
    assert uniformity(zeros, bits) < 1e-10
    assert two_sample(zeros, tops, bits) < 1e-10
    weak = np.random.default_rng(0).integers(0, 64, length).astype(np.uint64)
    assert uniformity((tops + weak) % 256, bits) < 1e-10
    assert two_sample((zeros + weak) % 256, (tops + weak) % 256, bits) < 1e-10


# --------------------------------------------------------------------------- degree and graph

def failure_bound(n: int, dropped: int, degree: int, threshold: int) -> float:
    return n * stats.hypergeom.sf(degree - threshold, n, dropped, degree)


def test_choose_degree_is_sparse_for_100_and_meets_its_bound() -> None:
    degree, threshold = choose_degree(100, 1 / 3)
    assert degree < 100
    assert max(2, math.ceil(degree / 3)) <= threshold < degree
    assert failure_bound(100, 33, degree, threshold) <= 1e-4
    smaller = degree - 1
    assert failure_bound(100, 33, smaller, max(2, math.ceil(smaller / 3))) > 1e-4


@pytest.mark.parametrize("n, expected", [(10, (10, 7)), (32, (32, 22)), (40, (18, 6)),
                                         (100, (30, 10)), (1000, (54, 18))])
def test_choose_degree_table(n, expected) -> None:
    assert choose_degree(n, 1 / 3) == expected


@pytest.mark.parametrize("n, dropout", [(1, 0.0), (2, 0.5), (10, 1.0), (10, -0.1)])
def test_choose_degree_refuses_impossible_cohorts(n, dropout) -> None:
    with pytest.raises(SecAggError):
        choose_degree(n, dropout)


@pytest.mark.parametrize("n, degree", [(40, 18), (41, 18), (40, 19), (101, 31), (10, 10)])
def test_choose_graph_is_symmetric_with_the_right_degree(n, degree) -> None:
    graph = choose_graph(n, degree, b"public seed")
    assert graph == choose_graph(n, degree, b"public seed")
    for i, nb in enumerate(graph):
        assert nb == sorted(nb) and i not in nb
        assert all(i in graph[j] for j in nb)
    degrees = sorted(len(nb) for nb in graph)
    extra = 1 if (degree - 1) % 2 and n % 2 else 0  # odd K-1 on an odd ring: one party more
    assert degrees == [degree - 1] * (n - extra) + [degree] * extra
    if degree < n:
        assert graph != choose_graph(n, degree, b"another seed")


# --------------------------------------------------------------------------- params

def test_params_round_trip_through_config() -> None:
    params = Params(bits=16, length=1064, threshold=10, min_survivors=67)
    config = {**params.to_config(), "round": 3}
    assert Params.from_config(ConfigRecord(config)) == params
    assert all(k.startswith("secagg-") for k in params.to_config())


@pytest.mark.parametrize("change", [{"bits": 0}, {"bits": 63}, {"length": 0},
                                    {"threshold": 1}, {"min_survivors": 1}, {"bits": True},
                                    {"length": 2.0}])
def test_params_refuse_bad_values(change) -> None:
    values = {"bits": 16, "length": 4, "threshold": 2, "min_survivors": 2, **change}
    with pytest.raises(SecAggError):
        Params(**values)


def test_params_from_config_names_a_missing_key() -> None:
    config = Params(16, 4, 2, 2).to_config()
    del config["secagg-threshold"]
    with pytest.raises(SecAggError, match="secagg-threshold"):
        Params.from_config(config)
