"""SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead") as pure functions: four client steps and the server's unmasking, no transport.

Parties are cohort indices ``0..n-1``. Each party's inputs are integer vectors in
Z_{2^bits}; the server learns their sum modulo 2^bits.

The four rounds (the server relays every message):

1. ``client_keys``: each party advertises two fresh X25519 public keys: ``c`` (to encrypt
   shares to it) and ``s`` (for pairwise masks).
2. ``client_shares``: the server picks a public graph (``choose_graph``); each party draws a
   self-mask seed ``b``, Shamir-shares ``b`` and its mask secret (t of K) among itself and
   its K-1 neighbours, and encrypts each neighbour's two shares to it.
3. ``client_masked``: each party receives the ciphertexts of its neighbours that shared
   (its *senders*) and sends ``x + PRG(b) + sum_j +-PRG(s_ij)`` mod 2^bits, with a pairwise
   mask for each sender; in the sum of survivors the pairwise masks cancel.
4. ``client_unmask``: told who survived (sent a masked input) and who dropped (shared but
   sent none), each survivor reveals, per owner, one share: of ``b`` for survivors, of the
   mask secret for dropped parties. ``server_unmask`` rebuilds those secrets, removes the
   self-masks and the dropped parties' pairwise masks, and returns the survivors' sum.

What it guarantees and what it trusts:

- An honest-but-curious server (it follows the protocol, it may look at everything it
  relays) learns the sum of the survivors' vectors and nothing else about any one of them,
  provided it does not collude with t or more of one party's K share-holders: the server
  plus any t-1 of them learn nothing about that party's ``b`` or mask secret.
- In a sparse graph the server learns the sum of each connected component of the
  survivors' graph; with the Harary graph on a random permutation it splits only if two
  runs of (K-1)//2 ring-consecutive parties all drop (probability about
  (n * delta^((K-1)//2))^2 / 2 for a drop rate delta: ~2e-10 for n = 100, K = 30,
  delta = 1/3).
- A malicious server could lie about dropouts: tell some holders a party survived and
  others that it dropped, and so collect both of its secrets. What each client enforces
  in round 4: survivors and dropped are disjoint, every sender is in one of them, at least
  ``min_survivors`` survivors and at least t among its own share-holders (so at least one
  surviving pairwise mask still hides it), and one answer per round (the caller deletes the
  state afterwards). A client cannot check names outside its neighbourhood, so in a
  sparse graph ``min_survivors`` holds only against a server that does not lie about
  them. When 2t > K (the full graph with max_dropout < 1/2) two disjoint sets
  of t holders do not exist, so those lies cannot rebuild both secrets of anyone.
  Public keys are not authenticated (no PKI): a malicious server could substitute them.
- No integrity against hostile clients: a client may send any vector in Z_{2^bits}, or a
  wrong share (which ``server_unmask`` detects when it has spare shares). Bound the
  decoded sum where it is used.

Every refusal is a :class:`SecAggError` that says what went wrong and what to do.
All client state is a flat dict of int, bytes, list[int] and list[bytes]: it fits a
Flower ConfigRecord.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "CIPHERTEXT_BYTES", "Params", "SecAggError", "State", "check_public_key", "check_vector",
    "choose_degree", "choose_graph",
    "client_keys", "client_masked", "client_shares", "client_unmask", "server_unmask",
]

_log = logging.getLogger(__name__)

State = dict[str, int | bytes | list[int] | list[bytes] | bool | str]

SEED_BYTES = 16  # b and the mask secret: one Shamir block each (PyCryptodome takes 16 bytes)
KEY_BYTES = 32  # raw X25519 public keys
CIPHERTEXT_BYTES = 2 * SEED_BYTES + 16  # a neighbour's two shares and the AEAD tag
FULL_GRAPH_MAX = 32  # cohorts this small always use the full graph
FAILURE_BOUND = 1e-4  # choose_degree: P(some party cannot be unmasked) at max_dropout
# Every ChaCha20 / ChaCha20-Poly1305 key below is fresh and used for exactly one message or
# keystream (HKDF binds it to its purpose and to both parties' indices, and the X25519 keys
# are new every round), so a fixed all-zero nonce never repeats under one key.
_PRG_NONCE = bytes(16)
_AEAD_NONCE = bytes(12)
_MAX_INDEX = 2**31  # indices travel as 4 bytes in the key derivation and associated data


class SecAggError(ValueError):
    """A refused or failed step of secure aggregation; the message says what to do."""


@dataclass(frozen=True)
class Params:
    """One round's numbers, shared by the server and every client."""

    bits: int  # masked values live in Z_{2^bits}; 1 <= bits <= 62
    length: int  # coordinates of each input vector
    threshold: int  # t: Shamir shares needed to rebuild one party's secret
    min_survivors: int  # the server refuses to unmask fewer masked inputs than this

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SecAggError(f"secagg {field.name} must be an int, got {value!r}")
        if not 1 <= self.bits <= 62:
            raise SecAggError(f"secagg bits must be in [1, 62], got {self.bits}")
        if self.length < 1:
            raise SecAggError(f"secagg length must be at least 1, got {self.length}")
        if self.threshold < 2:
            raise SecAggError(f"secagg threshold must be at least 2 (with 1, any single "
                              f"share-holder unmasks a party), got {self.threshold}")
        if self.min_survivors < 2:
            raise SecAggError(f"secagg min_survivors must be at least 2 (a sum of one input "
                              f"is that input), got {self.min_survivors}")

    def to_config(self) -> dict[str, int]:
        """Flat ``secagg-*`` keys, so they can share a ConfigRecord with other settings."""
        return {_config_key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping) -> Params:
        """Read what :meth:`to_config` wrote; other keys are ignored."""
        values = {}
        for field in fields(cls):
            key = _config_key(field.name)
            if key not in config:
                raise SecAggError(f"secagg config lacks {key!r}: build it with Params.to_config")
            value = config[key]
            if isinstance(value, np.integer):
                value = int(value)
            values[field.name] = value
        return cls(**values)

    def as_list(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]


def _config_key(name: str) -> str:
    return "secagg-" + name.replace("_", "-")


def check_vector(params: Params, vector: np.ndarray, what: str = "vector") -> np.ndarray:
    """``vector`` as uint64 after checking it is ``length`` integers in [0, 2^bits).

    The server should run it on every masked input as it arrives, and treat a bad one as
    dropped: once round 4 has started, a survivor's role can no longer change.
    """
    array = np.asarray(vector)
    if array.shape != (params.length,):
        raise SecAggError(f"{what} has shape {array.shape}, expected ({params.length},)")
    if array.dtype.kind not in "iu":
        raise SecAggError(f"{what} has dtype {array.dtype}; it must hold integers "
                          f"(uint64 or int64) in [0, 2^{params.bits})")
    if int(array.min()) < 0 or int(array.max()) >= 1 << params.bits:
        raise SecAggError(f"{what} has values outside [0, 2^{params.bits}): "
                          f"min {int(array.min())}, max {int(array.max())}")
    return array.astype(np.uint64)


# --------------------------------------------------------------------------- the graph

def choose_degree(n: int, max_dropout: float) -> tuple[int, int]:
    """(K, t) for a cohort of n: each party shares its secrets among K parties (itself and
    K-1 graph neighbours), and any t of them rebuild one.

    t is what collusion costs: the server plus t-1 of a party's share-holders learn nothing
    about it; t of them can unmask its input. So t is as large as dropouts allow.

    Rule, with d = floor(max_dropout * n) parties dropping (at any round):

    - n <= 32, or no sparse K < n qualifies: the full graph, K = n and t = n - d (exactly
      n - d share-holders survive). With max_dropout < 1/2 this gives 2t > K.
    - otherwise the smallest K < n for which some t >= max(2, ceil(K/3)) satisfies
      n * P[fewer than t of K share-holders survive] <= 1e-4 when d parties chosen uniformly
      at random drop (exact hypergeometric tail, union bound over the n parties); t is the
      largest such value. K stays small: each neighbour costs ~64 bytes of upload.

    For n = 100 and max_dropout = 1/3 this gives (30, 10). Pair it with
    ``min_survivors = n - d``.
    """
    if not isinstance(n, int) or n < 2:
        raise SecAggError(f"secure aggregation needs a cohort of at least 2, got {n}")
    if not 0 <= max_dropout < 1:
        raise SecAggError(f"max_dropout must be in [0, 1), got {max_dropout}")
    dropped = math.floor(max_dropout * n + 1e-9)
    if n - dropped < 2:
        raise SecAggError(f"a cohort of {n} with max_dropout {max_dropout} may leave "
                          f"{n - dropped} survivor(s): lower max_dropout or enlarge the cohort")
    if n > FULL_GRAPH_MAX:
        for degree in range(2, n):
            threshold = _largest_threshold(n, dropped, degree)
            if threshold >= max(2, math.ceil(degree / 3)):
                return degree, threshold
    return n, n - dropped


def _largest_threshold(n: int, dropped: int, degree: int) -> int:
    """The largest t with n * P[more than K - t of K holders drop] <= FAILURE_BOUND (0 if none)."""
    from scipy.stats import hypergeom  # here: clients import this module, only servers plan

    # tails[m] = P[X > m - 1], X = dropped holders ~ Hypergeom(n, dropped, K)
    tails = hypergeom.sf(np.arange(-1, degree + 1), n, dropped, degree)
    ok = [t for t in range(1, degree + 1) if n * tails[degree - t + 1] <= FAILURE_BOUND]
    return max(ok, default=0)


def choose_graph(n: int, degree: int, seed: bytes) -> list[list[int]]:
    """neighbours[i]: the sorted K-1 parties i shares with, symmetric, from public randomness.

    As in Bell et al.: a Harary graph on a random permutation of the parties, i.e. a ring
    in random order where each party links to the (K-1)//2 nearest on each side; when K-1
    is odd, each party also links to the one opposite it (for odd n one party gets K
    neighbours). ``degree == n`` is the full graph.
    """
    if not isinstance(n, int) or n < 2:
        raise SecAggError(f"a graph needs at least 2 parties, got {n}")
    if not isinstance(degree, int) or not 2 <= degree <= n:
        raise SecAggError(f"degree K must be in [2, n={n}], got {degree}")
    if not isinstance(seed, bytes):
        raise SecAggError("the graph seed must be bytes (the server's public randomness)")
    if degree == n:
        return [[j for j in range(n) if j != i] for i in range(n)]
    digest = hashlib.sha256(b"smallfed-secagg/graph" + seed).digest()
    ring = np.random.default_rng(int.from_bytes(digest, "big")).permutation(n).tolist()
    links: list[set[int]] = [set() for _ in range(n)]

    def link(p: int, q: int) -> None:
        a, b = ring[p % n], ring[q % n]
        links[a].add(b)
        links[b].add(a)

    for p in range(n):
        for step in range(1, (degree - 1) // 2 + 1):
            link(p, p + step)
    if (degree - 1) % 2:
        for p in range((n + 1) // 2):
            link(p, p + n // 2)
    return [sorted(nb) for nb in links]


# --------------------------------------------------------------------------- crypto helpers

def _kdf(material: bytes, purpose: bytes, *indices: int) -> bytes:
    """A 32-byte key for one purpose and these parties (HKDF-SHA256)."""
    info = b"smallfed-secagg/" + purpose + b"".join(i.to_bytes(4, "big") for i in indices)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


def _prg(key: bytes, params: Params) -> np.ndarray:
    """``length`` uniform values mod 2^bits: ChaCha20's keystream as 64-bit words.

    Not Flower's ``pseudo_rand_gen``: it seeds numpy's Mersenne Twister with 32 bits of the
    seed, so whoever holds a masked vector can try all 2^32 masks. 2^bits divides 2^64,
    so each word mod 2^bits stays uniform.
    """
    stream = Cipher(algorithms.ChaCha20(key, _PRG_NONCE), mode=None).encryptor().update(
        bytes(8 * params.length))
    return np.frombuffer(stream, dtype="<u8") & _modulus_mask(params)


def _modulus_mask(params: Params) -> np.uint64:
    return np.uint64((1 << params.bits) - 1)


def _mask_private(seed: bytes) -> X25519PrivateKey:
    """The mask key pair derives from a 16-byte seed so that the secret shared in round 2
    fits one Shamir block (a raw X25519 key is 32 bytes: two blocks, twice the shares)."""
    return X25519PrivateKey.from_private_bytes(_kdf(seed, b"mask-key"))


def _public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def check_public_key(public: bytes, party: int) -> None:
    """SecAggError unless ``public`` is an X25519 key a party can agree with: a low-order
    point (32 zero bytes, say) makes every neighbour's key agreement fail, so the server
    leaves such a party out before its neighbours see it."""
    if not isinstance(public, bytes) or len(public) != KEY_BYTES:
        raise SecAggError(f"party {party}'s public key is not {KEY_BYTES} bytes")
    _agree(X25519PrivateKey.generate(), public, party)


def _agree(private: X25519PrivateKey, public: bytes, party: int) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as err:
        raise SecAggError(f"party {party}'s public key is not a usable X25519 key ({err}); "
                          f"leave it out of the round") from err


def _pair_mask(private: X25519PrivateKey, public: bytes, me: int, other: int,
               params: Params) -> np.ndarray:
    """PRG(s_ij): the same for i and j (both indices in the key derivation, low first)."""
    key = _kdf(_agree(private, public, other), b"pair-mask", min(me, other), max(me, other))
    return _prg(key, params)


def _self_mask(b: bytes, params: Params) -> np.ndarray:
    return _prg(_kdf(b, b"self-mask"), params)


def _share_cipher(private: X25519PrivateKey, public: bytes, sender: int, receiver: int,
                  other: int) -> tuple[ChaCha20Poly1305, bytes]:
    """The AEAD for the one message sender -> receiver (``public`` is party ``other``'s c
    key) and its associated data: both indices, so a ciphertext relayed to another party or
    under another sender's name fails."""
    label = sender.to_bytes(4, "big") + receiver.to_bytes(4, "big")
    key = _kdf(_agree(private, public, other), b"share-key", sender, receiver)
    return ChaCha20Poly1305(key), label


def _split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shares at x = 1..holders of a 16-byte secret, t of which rebuild it.

    PyCryptodome's Shamir directly: Flower's ``create_shares`` pads a 16-byte secret to two
    blocks and prefixes a 4-byte index (36 bytes per share, twice the field arithmetic).
    """
    return [share for _, share in Shamir.split(threshold, holders, secret)]


# --------------------------------------------------------------------------- validation

def _check_index(index: object, what: str) -> int:
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) \
            or not 0 <= index < _MAX_INDEX:
        raise SecAggError(f"{what} must be a party index in [0, 2^31), got {index!r}")
    return int(index)


def _check_parties(parties: Sequence[int], what: str) -> list[int]:
    """Party indices without repeats."""
    out = [_check_index(p, f"each of {what}") for p in parties]
    if len(set(out)) != len(out):
        raise SecAggError(f"{what} repeats a party: {sorted(out)}")
    return out


def _check_keys(keys: Sequence[bytes], count: int, what: str) -> list[bytes]:
    if len(keys) != count:
        raise SecAggError(f"{len(keys)} {what} for {count} neighbours: one each, same order")
    for key in keys:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise SecAggError(f"each of {what} must be {KEY_BYTES} raw bytes (X25519)")
    return list(keys)


def _expect_step(state: Mapping, step: int, caller: str) -> int:
    """The state's party index, after checking the previous step produced it."""
    if state.get("step") != step:
        raise SecAggError(f"{caller} needs the state from step {step} of secure aggregation, "
                          f"got one from step {state.get('step')}: run the rounds in order "
                          f"with fresh keys every round")
    return int(state["index"])


def _expect_params(state: Mapping, params: Params) -> None:
    if list(state["params"]) != params.as_list():
        raise SecAggError(f"the round's params changed between steps: {params.as_list()} "
                          f"now, {list(state['params'])} when secrets were shared")


# --------------------------------------------------------------------------- client

def client_keys(index: int) -> tuple[State, bytes, bytes]:
    """Round 1: fresh key pairs, ``c`` to receive shares and ``s`` for pairwise masks.

    Returns (state, c_public, s_public), public keys as 32 raw bytes. Call it every round:
    per-round freshness of every derived key comes from these keys.
    """
    index = _check_index(index, "index")
    c_private = X25519PrivateKey.generate()
    s_seed = os.urandom(SEED_BYTES)
    state: State = {"step": 1, "index": index, "c-private": c_private.private_bytes_raw(),
                    "s-seed": s_seed}
    return state, _public(c_private), _public(_mask_private(s_seed))


def client_shares(state: State, params: Params, neighbours: list[int], c_publics: list[bytes],
                  s_publics: list[bytes]) -> tuple[State, list[bytes]]:
    """Round 2: t-of-K shares of ``b`` (fresh) and of the mask secret among self and the
    neighbours, each neighbour's pair encrypted to it (48 bytes).

    Share x-coordinates are positions 1..K in ``sorted([index] + neighbours)``; the server
    recomputes them from the same neighbour lists. Returns the ciphertexts in the order of
    ``neighbours``.
    """
    index = _expect_step(state, 1, "client_shares")
    neighbours = _check_parties(neighbours, "neighbours")
    if index in neighbours:
        raise SecAggError(f"party {index} is listed among its own neighbours")
    c_publics = _check_keys(c_publics, len(neighbours), "c_publics")
    s_publics = _check_keys(s_publics, len(neighbours), "s_publics")
    holders = sorted([index, *neighbours])
    if len(holders) < params.threshold:
        raise SecAggError(f"party {index} has {len(neighbours)} neighbours: {len(holders)} "
                          f"share-holders, fewer than t = {params.threshold}; pick the graph "
                          f"and threshold together (choose_degree)")
    b = os.urandom(SEED_BYTES)
    b_shares = _split(b, params.threshold, len(holders))
    s_shares = _split(state["s-seed"], params.threshold, len(holders))
    position = {party: p for p, party in enumerate(holders)}
    c_private = X25519PrivateKey.from_private_bytes(state["c-private"])
    ciphertexts = []
    for j, public in zip(neighbours, c_publics):
        cipher, label = _share_cipher(c_private, public, index, j, j)
        ciphertexts.append(cipher.encrypt(_AEAD_NONCE, b_shares[position[j]]
                                          + s_shares[position[j]], label))
    # The own share of the mask secret is never revealed (a party answering round 4 is a
    # survivor), so it is not kept.
    new_state: State = {
        "step": 2, "index": index, "params": params.as_list(),
        "c-private": state["c-private"], "s-seed": state["s-seed"], "b": b,
        "own-b-share": b_shares[position[index]], "neighbours": neighbours,
        "c-publics": c_publics, "s-publics": s_publics,
    }
    return new_state, ciphertexts


def client_masked(state: State, params: Params, senders: list[int], ciphertexts: list[bytes],
                  vector: np.ndarray) -> tuple[State, np.ndarray]:
    """Round 3: decrypt and keep the senders' shares, then send the masked input.

    masked = vector + PRG(b) + sum over senders j of (+PRG(s_ij) if i < j else -PRG(s_ij))
    mod 2^bits, as uint64. Neighbours that are not senders left before sharing: no mask
    with them. The returned state keeps only what round 4 needs (no keys, no ``b``).
    """
    index = _expect_step(state, 2, "client_masked")
    _expect_params(state, params)
    senders = _check_parties(senders, "senders")
    position = {j: p for p, j in enumerate(state["neighbours"])}
    strangers = [j for j in senders if j not in position]
    if strangers:
        raise SecAggError(f"senders {strangers} are not neighbours of party {index}")
    if len(ciphertexts) != len(senders):
        raise SecAggError(f"{len(ciphertexts)} ciphertexts for {len(senders)} senders")
    if len(senders) + 1 < params.threshold:
        raise SecAggError(f"only {len(senders)} of party {index}'s neighbours shared "
                          f"secrets: with itself, fewer than t = {params.threshold} could "
                          f"ever unmask it, so it sits this round out")
    vector = check_vector(params, vector, f"party {index}'s input")
    c_private = X25519PrivateKey.from_private_bytes(state["c-private"])
    plains = [_open(c_private, state["c-publics"][position[j]], j, index, text)
              for j, text in zip(senders, ciphertexts)]
    s_private = _mask_private(state["s-seed"])
    masked = vector + _self_mask(state["b"], params)
    for j in senders:
        mask = _pair_mask(s_private, state["s-publics"][position[j]], index, j, params)
        masked = masked + mask if index < j else masked - mask
    new_state: State = {
        "step": 3, "index": index, "params": params.as_list(),
        "neighbours": state["neighbours"], "senders": senders,
        "own-b-share": state["own-b-share"],
        "b-shares": [p[:SEED_BYTES] for p in plains],
        "s-shares": [p[SEED_BYTES:] for p in plains],
    }
    return new_state, masked & _modulus_mask(params)


def _open(c_private: X25519PrivateKey, public: bytes, sender: int, receiver: int,
          ciphertext: bytes) -> bytes:
    cipher, label = _share_cipher(c_private, public, sender, receiver, sender)
    try:
        plain = cipher.decrypt(_AEAD_NONCE, bytes(ciphertext), label)
    except InvalidTag as err:
        raise SecAggError(f"the shares from party {sender} to party {receiver} fail "
                          f"authentication (tampered, or relayed to the wrong party); "
                          f"leave party {receiver} out of this round") from err
    if len(plain) != 2 * SEED_BYTES:
        raise SecAggError(f"the shares from party {sender} have {len(plain)} bytes, "
                          f"expected {2 * SEED_BYTES}")
    return plain


def client_unmask(state: State, survivors: list[int], dropped: list[int]
                  ) -> tuple[list[int], list[bytes]]:
    """Round 4: per owner among self and the senders, one 16-byte share: of its ``b`` if it
    survived, of its mask secret if it dropped. Returns (owners, shares), owners sorted.

    ``survivors`` and ``dropped`` are the server's global lists (every party whose masked
    input it holds; every party that shared but sent none): the count of survivors is
    checked against ``min_survivors``. Names this party cannot check (parties outside its
    neighbourhood) only count. Refused: overlapping lists, a neighbour that never shared
    named in either, a sender in neither, itself not a survivor, fewer than
    ``min_survivors`` survivors, or fewer than t survivors among itself and its senders
    (then an honest round cannot unmask it anyway, and its input would be left with too few
    pairwise masks). Answer once per round: two answers with different lists would reveal
    both secrets of a party, so delete the state afterwards.
    """
    index = _expect_step(state, 3, "client_unmask")
    _, _, threshold, floor = state["params"]
    alive = set(_check_parties(survivors, "survivors"))
    gone = set(_check_parties(dropped, "dropped"))
    if alive & gone:
        raise SecAggError(f"parties {sorted(alive & gone)} are named both survivors and "
                          f"dropped: revealing both their secrets would unmask them; the "
                          f"server's lists are wrong")
    if len(alive) < floor:
        raise SecAggError(f"the server would unmask {len(alive)} inputs, fewer than "
                          f"min_survivors = {floor}: party {index} refuses")
    if index not in alive:
        raise SecAggError(f"party {index} is not among the survivors: a party answers round 4 "
                          f"only if its masked input arrived")
    senders = list(state["senders"])
    silent = (alive | gone) & (set(state["neighbours"]) - set(senders))
    if silent:
        raise SecAggError(f"the server names {sorted(silent)}, neighbours of party {index} "
                          f"that never shared secrets with it, as survivors or dropped")
    missing = set(senders) - alive - gone
    if missing:
        raise SecAggError(f"the server names senders {sorted(missing)} of party {index} "
                          f"neither survivors nor dropped")
    holders_alive = 1 + len(alive & set(senders))
    if holders_alive < threshold:
        raise SecAggError(f"only {holders_alive} of party {index}'s share-holders survived, "
                          f"fewer than t = {threshold}: its input cannot be unmasked safely")
    answer = {index: state["own-b-share"]}
    for j, b_share, s_share in zip(senders, state["b-shares"], state["s-shares"]):
        answer[j] = b_share if j in alive else s_share
    owners = sorted(answer)
    return owners, [answer[j] for j in owners]


# --------------------------------------------------------------------------- server

def server_unmask(params: Params, neighbours: list[list[int]], senders: dict[int, list[int]],
                  s_publics: dict[int, bytes], masked: dict[int, np.ndarray],
                  shares: dict[int, tuple[list[int], list[bytes]]]) -> np.ndarray:
    """The sum of the survivors' inputs mod 2^bits (uint64).

    ``neighbours[i]`` must be the list party i was given in round 2 (share x-coordinates
    are positions in it), ``senders[i]`` the list it was given in round 3, ``s_publics``
    the mask keys of round-2 parties, ``masked`` the survivors' masked inputs, ``shares``
    what each responder's ``client_unmask`` returned. Shares that no party could hold are
    ignored with a warning; a rebuilt mask secret must match its public key, a rebuilt
    ``b`` must come out the same from two sets of t shares when more than t arrived.
    """
    if len(masked) < params.min_survivors:
        raise SecAggError(f"{len(masked)} masked inputs arrived, fewer than min_survivors = "
                          f"{params.min_survivors}: the round cannot be unmasked")
    alive = set(masked)
    total = np.zeros(params.length, dtype=np.uint64)
    for i, vector in masked.items():
        if i not in senders or i not in s_publics:
            raise SecAggError(f"party {i}'s masked input arrived but it has no senders list "
                              f"or mask key: it did not take part in rounds 2 and 3")
        total += check_vector(params, vector, f"party {i}'s masked input")
    _check_cancel(alive, senders)
    points = _collect(neighbours, senders, alive, shares)
    for i in sorted(alive):
        b = _rebuild(i, "self-mask seed", points.get(i, []), params.threshold, None)
        total -= _self_mask(b, params)
    dropped = sorted({j for i in alive for j in senders[i]} - alive)
    for j in dropped:
        if j not in s_publics:
            raise SecAggError(f"dropped party {j} has no mask key: it did not take part in "
                              f"round 2, so no survivor should list it among its senders")
        seed = _rebuild(j, "mask secret", points.get(j, []), params.threshold,
                        lambda s, j=j: _public(_mask_private(s)) == s_publics[j])
        total = _remove_pair_masks(total, j, _mask_private(seed), alive, senders, s_publics,
                                   params)
    return total & _modulus_mask(params)


def _check_cancel(alive: set[int], senders: Mapping[int, Sequence[int]]) -> None:
    """Two survivors' pairwise mask cancels only if each listed the other as a sender."""
    for i in alive:
        for j in senders[i]:
            if j in alive and i not in senders[j]:
                raise SecAggError(f"survivor {i} lists {j} as a sender but not the reverse: "
                                  f"their pairwise mask cannot cancel; fix the senders lists")


def _collect(neighbours: Sequence[Sequence[int]], senders: Mapping[int, Sequence[int]],
             alive: set[int], shares: Mapping[int, tuple[Sequence[int], Sequence[bytes]]]
             ) -> dict[int, list[tuple[int, bytes, int]]]:
    """owner -> [(x, share, responder)], keeping only shares the responder could hold."""
    points: dict[int, list[tuple[int, bytes, int]]] = {}
    for responder, (owners, values) in shares.items():
        if len(owners) != len(values):
            _log.warning("secagg: party %d sent %d owners for %d shares; ignored",
                         responder, len(owners), len(values))
            continue
        seen = set()
        for owner, value in zip(owners, values):
            held = (owner == responder and owner in alive) or (
                owner in senders.get(responder, ()) and responder in neighbours[owner])
            if not held or owner in seen or not isinstance(value, bytes) \
                    or len(value) != SEED_BYTES:
                _log.warning("secagg: party %d sent a share for party %d that it cannot "
                             "hold (or twice, or malformed); ignored", responder, owner)
                continue
            seen.add(owner)
            x = sorted([owner, *neighbours[owner]]).index(responder) + 1
            points.setdefault(owner, []).append((x, value, responder))
    return points


def _rebuild(owner: int, what: str, points: list[tuple[int, bytes, int]], threshold: int,
             verify: Callable[[bytes], bool] | None) -> bytes:
    """The secret from windows of t shares: the first that ``verify`` accepts, or (without
    ``verify``) the first value two windows agree on; exactly t shares cannot be checked."""
    if len(points) < threshold:
        raise SecAggError(f"party {owner}: {len(points)} shares of its {what} arrived, "
                          f"t = {threshold} needed; too many of its share-holders dropped "
                          f"before unmasking (plan for more dropout in choose_degree)")
    tries = len(points) if len(points) > threshold else 1
    seen: set[bytes] = set()
    for start in range(tries):
        window = [points[(start + k) % len(points)] for k in range(threshold)]
        secret = Shamir.combine([(x, share) for x, share, _ in window])
        if (verify(secret) if verify is not None else tries == 1 or secret in seen):
            if start > 1 or (verify is not None and start > 0):
                _log.warning("secagg: party %d's %s rebuilt from the shares of parties %s; "
                             "some of %s sent wrong shares", owner, what,
                             sorted(r for _, _, r in window),
                             sorted(r for _, _, r in points))
            return secret
        seen.add(secret)
    raise SecAggError(f"party {owner}: its {what} cannot be rebuilt: the {len(points)} "
                      f"shares from parties {sorted(r for _, _, r in points)} disagree (a "
                      f"responder sent a wrong share, or neighbours lists differ from round 2)")


def _remove_pair_masks(total: np.ndarray, dropped: int, private: X25519PrivateKey,
                       alive: set[int], senders: Mapping[int, Sequence[int]],
                       s_publics: Mapping[int, bytes], params: Params) -> np.ndarray:
    """Undo the masks survivors added with a party that then dropped."""
    for i in sorted(alive):
        if dropped in senders[i]:
            mask = _pair_mask(private, s_publics[i], dropped, i, params)
            total = total - mask if i < dropped else total + mask
    return total
