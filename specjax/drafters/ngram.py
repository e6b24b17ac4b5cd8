"""Prompt lookup / n-gram drafting (Saxena 2023, "prompt lookup decoding"), fully on device.

The drafter keeps the row's whole token history (prompt + emitted tokens) in a static buffer.
To draft, it takes the last n tokens (n = max_ngram down to min_ngram), finds their most recent
earlier occurrence in the history, and proposes the K tokens that followed it. Deterministic,
so the draft distribution is one-hot (verification handles that exactly).

A chain may also retrieve from a user-given datastore (REST, He et al. 2023): a corpus of
token-id documents indexed once on the host (`index_datastore`: every position sorted by the
max_ngram tokens that start there, a suffix array cut at max_ngram tokens) and searched on
device by binary search, log2(positions) steps of static shape per n-gram size. Each step the
longer match wins (the history on ties) and its continuation is drafted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from specjax.engine.protocol import (
    Draft,
    DrafterSpec,
    Params,
    TargetPrefill,
    TargetStep,
    Tree,
    TreeDraft,
    Verified,
)
from specjax.sampling import SamplingMode


@struct.dataclass
class Datastore:
    """A corpus indexed for n-gram lookup (the n-gram drafter's params)."""

    tokens: jax.Array  # [S + pad] int32 documents joined by SEPARATOR, padded with SEPARATOR
    order: jax.Array  # [S] int32 positions sorted by the window of max_ngram tokens at each


# Joins documents: no token id equals it, so no match spans two documents; the largest int32, so
# among the windows that match a query the ones ending a document sort last and the binary
# search's first match has a continuation whenever any match has one.
SEPARATOR = 2**31 - 1


def index_datastore(docs: Sequence[Sequence[int]], max_ngram: int, k: int) -> Datastore:
    """Index token-id documents once (host side): the positions of the joined corpus sorted
    lexicographically by the `max_ngram` (+ 1) tokens starting there. Any n <= max_ngram tokens then
    occupy one contiguous run of that order, found by binary search."""
    import numpy as np

    docs = [np.asarray(d, np.int64).ravel() for d in docs]
    if not docs or not any(len(d) for d in docs):
        raise ValueError("a datastore needs at least one non-empty document of token ids")
    for i, d in enumerate(docs):
        if len(d) and (d.min() < 0 or d.max() >= SEPARATOR):
            bad = d.min() if d.min() < 0 else d.max()
            raise ValueError(
                f"datastore document {i} holds token id {bad}; valid: 0 <= id < {SEPARATOR}"
            )
    parts = []
    for d in docs:
        parts += [d, np.full(1, SEPARATOR)]
    corpus = np.concatenate(parts)
    S = len(corpus)
    padded = np.concatenate([corpus, np.full(max_ngram + k, SEPARATOR)])
    # Sorted by max_ngram + 1 tokens: among equal max_ngram-grams the one that ends a document
    # (its next token is SEPARATOR) sorts last, as for shorter n-grams.
    windows = np.stack([padded[j : j + S] for j in range(max_ngram + 1)])  # [max_ngram + 1, S]
    order = np.lexsort(windows[::-1])  # sort by window[0], then window[1], ...
    return Datastore(
        tokens=jnp.asarray(padded, jnp.int32), order=jnp.asarray(order.astype(np.int32))
    )


def read_documents(path: str) -> list[str]:
    """The text documents of a datastore path: a `.jsonl` file holds one per line (a JSON string
    or an object with a "text" field), any other file is one document, and a directory holds
    such files (read in sorted order, hidden files skipped)."""
    import json
    import os

    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not files:
            raise ValueError(f"datastore directory {path!r} holds no files")
        return [doc for f in files for doc in read_documents(f)]
    if not os.path.isfile(path):
        raise ValueError(f"datastore {path!r} is neither a file nor a directory")
    with open(path, encoding="utf-8", errors="replace") as f:
        if not path.endswith(".jsonl"):
            return [f.read()]
        docs = []
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                item = item["text"]
            if not isinstance(item, str):
                raise ValueError(f'{path}:{i}: expected a JSON string or {{"text": ...}}')
            docs.append(item)
        return docs


def search_datastore(
    store: Datastore, hist: jax.Array, hist_len: jax.Array, sizes: Sequence[int], k: int
) -> tuple[jax.Array, jax.Array]:
    """The longest n in `sizes` whose last n history tokens occur in the store and are followed
    by a token there -> (continuation [B, k] int32, n [B] int32, 0 where none)."""
    B, H = hist.shape
    S = store.order.shape[0]
    best_n = jnp.zeros((B,), jnp.int32)
    best_at = jnp.zeros((B,), jnp.int32)
    for n in sorted(sizes):  # longer matches overwrite shorter ones
        qpos = hist_len[:, None] - n + jnp.arange(n)[None, :]
        query = jnp.take_along_axis(hist, jnp.clip(qpos, 0, H - 1), axis=1)  # [B, n]

        def window(i: jax.Array, n: int = n) -> jax.Array:  # [B] order indices -> [B, n]
            return store.tokens[store.order[jnp.clip(i, 0, S - 1)][:, None] + jnp.arange(n)]

        def less(w: jax.Array, q: jax.Array) -> jax.Array:  # lexicographic w < q, rows
            diff = w != q
            first = jnp.argmax(diff, axis=1)
            wf = jnp.take_along_axis(w, first[:, None], 1)[:, 0]
            qf = jnp.take_along_axis(q, first[:, None], 1)[:, 0]
            return jnp.any(diff, axis=1) & (wf < qf)

        lo, hi = jnp.zeros((B,), jnp.int32), jnp.full((B,), S, jnp.int32)
        for _ in range(max(1, S.bit_length())):  # lower bound: first window >= query
            mid = (lo + hi) // 2
            go_right = less(window(mid), query) & (lo < hi)
            lo = jnp.where(go_right, mid + 1, lo)
            hi = jnp.where(go_right | (lo >= hi), hi, mid)
        at = store.order[jnp.clip(lo, 0, S - 1)] + n  # where the continuation starts
        hit = (lo < S) & jnp.all(window(lo) == query, axis=1) & (hist_len >= n)
        hit &= store.tokens[at] != SEPARATOR  # at least one token follows
        best_n = jnp.where(hit, n, best_n)
        best_at = jnp.where(hit, at, best_at)
    cont = store.tokens[best_at[:, None] + jnp.arange(k)]  # [B, k]
    # Past a document's end (the next document follows) any guess is exact after
    # verification: repeat the continuation's first token.
    past_end = jnp.cumsum(cont == SEPARATOR, axis=1) > 0
    cont = jnp.where(past_end, cont[:, :1], cont)
    return jnp.where(cont == SEPARATOR, 0, cont).astype(jnp.int32), best_n


@struct.dataclass
class NgramState:
    hist: jax.Array  # [B, H] int32 prompt + emitted tokens
    hist_len: jax.Array  # [B] int32


def continuation_starts(
    hist: jax.Array, hist_len: jax.Array, sizes: Sequence[int], count: int
) -> tuple[jax.Array, jax.Array]:
    """The `count` best places to copy a continuation from: positions s such that the n tokens
    before s equal the last n tokens of the history (s < hist_len, so at least one token
    follows), ranked by longer n first, then the most recent s. Distinct s, so candidate
    continuations differ. -> (starts [B, count] int32, n [B, count] int32 the matched length,
    0 where nothing was found)."""
    B, H = hist.shape
    idx = jnp.arange(H)[None, :]  # [1, H]
    score = jnp.full((B, H), -1, jnp.int32)
    for n in sizes:  # n is small and static
        suffix_pos = hist_len[:, None] - n + jnp.arange(n)[None, :]  # [B, n]
        suffix = jnp.take_along_axis(hist, jnp.clip(suffix_pos, 0, H - 1), axis=1)  # [B, n]
        match = jnp.ones((B, H), bool)  # match[:, s]: hist[s-n : s] == suffix
        for j in range(n):
            match &= jnp.roll(hist, n - j, axis=1) == suffix[:, j : j + 1]  # hist[:, s - n + j]
        match &= (idx >= n) & (idx < hist_len[:, None]) & (hist_len[:, None] >= n + 1)
        score = jnp.maximum(score, jnp.where(match, n * H + idx, -1))
    best, starts = jax.lax.top_k(score, count)
    return starts.astype(jnp.int32), jnp.where(best >= 0, best // H, 0).astype(jnp.int32)


def copy_continuations(
    hist: jax.Array, hist_len: jax.Array, starts: jax.Array, k: int
) -> jax.Array:
    """[B, C] starts -> [B, C, k] tokens hist[s : s+k]; past the known history, repeat its last
    known token (an unknown continuation: any guess is exact after verification)."""
    B, H = hist.shape
    pos = starts[..., None] + jnp.arange(k)  # [B, C, k]
    known = jnp.clip(jnp.minimum(pos, hist_len[:, None, None] - 1), 0, H - 1)
    return jnp.take_along_axis(hist[:, None, :], known, axis=2)


def merge_prefixes(tokens: jax.Array, found: jax.Array) -> Tree:
    """C candidate chains [B, C, K] -> a tree of C*K nodes sharing common prefixes.

    Node c*K + j is token j of chain c. A chain that repeats the first m tokens of an earlier
    chain marks those m nodes invalid and hangs its token m under the earlier chain's node m-1.
    """
    B, C, K = tokens.shape
    j = jnp.arange(K)
    parents = [jnp.broadcast_to(j - 1, (B, K))]
    valid = [jnp.broadcast_to(found[:, :1], (B, K))]
    for c in range(1, C):
        same = jnp.cumprod((tokens[:, None, c] == tokens[:, :c]).astype(jnp.int32), axis=2)
        lcp = jnp.where(found[:, :c], same.sum(axis=2), 0)  # [B, c] common prefix with chain c'
        m = jnp.max(lcp, axis=1)  # [B]
        other = jnp.argmax(lcp, axis=1)  # [B]
        own = c * K + j - 1  # [K]
        hang = jnp.where(m > 0, other * K + m - 1, -1)  # [B]
        parents.append(jnp.where(j[None, :] == m[:, None], hang[:, None], own[None, :]))
        valid.append(found[:, c : c + 1] & (j[None, :] >= m[:, None]))
    parents = jnp.concatenate(parents, axis=1).astype(jnp.int32)  # [B, C*K]
    depth = jnp.broadcast_to(jnp.tile(j + 1, C), (B, C * K)).astype(jnp.int32)
    return Tree(
        tokens=tokens.reshape(B, C * K),
        parents=parents,
        depth=depth,
        valid=jnp.concatenate(valid, axis=1),
    )


@dataclasses.dataclass(frozen=True)
class NgramSpec(DrafterSpec):
    max_ngram: int = 4
    min_ngram: int = 1
    # > 1: propose a tree of that many candidate continuations (k tokens each, common prefixes
    # merged) instead of one chain.
    branches: int = 1
    # Chains only: verify fewer tokens when the match is weak. A match of max_ngram tokens
    # verifies k tokens, one of `short_from` to max_ngram - 1 tokens `short` tokens, shorter
    # matches take a plain step. Why: on a CPU verifying T tokens costs far more than one (this
    # 2-core VM, weights [out, in]: T = 4 1.38x, T = 8 1.68x, T = 9 2.17x: a second pass of the
    # reduction kernel), so a weak match earns only a short verify. The defaults (k 7, so a
    # verify stays within one pass; short 3 from 2-token matches) were chosen by replaying rules
    # over SmolLM2's greedy answers to 9,861 training prompts at the measured costs
    # (`benchmarks/ngram_rules.py`: 1.26x -> 1.39x of plain decoding against the earlier k 8,
    # short 1 after 3-token matches, 1.37x for k after any 2-token match) and confirmed end to
    # end on 16 held-out training prompts (1.09x -> 1.20x, benchmarks/RESULTS.md).
    adaptive: bool = True
    short: int | None = None  # None: min(3, k)
    short_from: int | None = None  # None: max(min_ngram, max_ngram - 2)
    # The params are a `Datastore` searched besides the history (chains only).
    datastore: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.datastore and self.branches > 1:
            raise ValueError("a datastore serves an n-gram chain (branches=1), not a tree")
        if not (1 <= self.min_ngram <= self.max_ngram):
            raise ValueError(
                f"need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram}, "
                f"max_ngram={self.max_ngram}"
            )
        if not isinstance(self.branches, int) or self.branches < 1:
            raise ValueError(f"branches must be a positive int, got {self.branches!r}")
        if not isinstance(self.short_size, int) or not 0 <= self.short_size <= self.k:
            raise ValueError(f"short must be an int in [0, k={self.k}], got {self.short!r}")
        lo, hi = self.min_ngram, self.max_ngram
        if not isinstance(self.short_min, int) or not lo <= self.short_min <= max(lo, hi - 1):
            raise ValueError(
                f"short_from must be an int in [min_ngram={lo}, max(min_ngram, max_ngram - 1)="
                f"{max(lo, hi - 1)}], got {self.short_from!r}"
            )

    @property
    def short_size(self) -> int:
        """Tokens verified after a weak match (`short`, resolved)."""
        return min(3, self.k) if self.short is None else self.short

    @property
    def short_min(self) -> int:
        """The shortest match that verifies `short_size` tokens (`short_from`, resolved)."""
        if self.short_from is None:
            return max(self.min_ngram, self.max_ngram - 2)
        return self.short_from

    @property
    def is_tree(self) -> bool:
        return self.branches > 1

    @property
    def nodes(self) -> int:
        return self.branches * self.k

    @property
    def cache_slack(self) -> int:
        return self.nodes  # tree nodes in the verify block

    @property
    def verify_sizes(self) -> tuple:
        # Trees: the whole tree or (size 0) a plain step when no branch found a match.
        if self.adaptive and not self.is_tree and self.max_ngram > self.min_ngram:
            return tuple(sorted({s for s in (self.short_size, self.k) if s > 0}))
        return (self.nodes,)

    def request(self, n: jax.Array, known: jax.Array) -> jax.Array:
        """Draft tokens worth verifying [B] for a match of length n [B] (0 = none) whose
        continuation has `known` [B] tokens in the history."""
        if not self.adaptive or self.max_ngram == self.min_ngram:
            return jnp.where(n > 0, self.k, 0).astype(jnp.int32)
        short = jnp.where(n >= self.short_min, self.short_size, 0)
        size = jnp.where(n >= self.max_ngram, self.k, short)
        return jnp.minimum(size, known).astype(jnp.int32)

    def init(self, params: Params, prefill: TargetPrefill, max_len: int) -> NgramState:
        B, P = prefill.tokens.shape
        hist = jnp.zeros((B, max_len), jnp.int32).at[:, :P].set(prefill.tokens)
        hist = hist.at[jnp.arange(B), prefill.lengths].set(prefill.first)
        return NgramState(hist=hist, hist_len=prefill.lengths + 1)

    def propose(
        self,
        params: Params,
        state: NgramState,
        last: jax.Array,
        key: jax.Array,
        mode: SamplingMode,
        sp: dict,
    ) -> tuple[Draft | TreeDraft, NgramState]:
        if self.is_tree:  # no match anywhere: the engine takes a plain step instead
            sizes = range(self.max_ngram, self.min_ngram - 1, -1)
            starts, n = continuation_starts(state.hist, state.hist_len, sizes, self.branches)
            found = n > 0
            tokens = copy_continuations(state.hist, state.hist_len, starts, self.k)  # [B, C, k]
            size = jnp.where(found[:, 0], self.nodes, 0).astype(jnp.int32)
            return TreeDraft(tree=merge_prefixes(tokens, found), size=size), state
        chain, n, known = self.match(params, state, last)
        return Draft(tokens=chain, logp=None, size=self.request(n, known)), state

    def match(
        self, params: Datastore | None, state: NgramState, last: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The chain's best match: (continuation [B, k] int32 (`last` repeated where nothing
        matched), matched length n [B] (0: none), tokens of the continuation known [B])."""
        sizes = range(self.max_ngram, self.min_ngram - 1, -1)
        starts, n = continuation_starts(state.hist, state.hist_len, sizes, 1)
        tokens = copy_continuations(state.hist, state.hist_len, starts, self.k)[:, 0]
        chain = jnp.where(n[:, :1] > 0, tokens, last[:, None])
        n, known = n[:, 0], state.hist_len - starts[:, 0]
        if self.datastore:  # the longer match wins, the history's on ties
            cont, n_store = search_datastore(params, state.hist, state.hist_len, sizes, self.k)
            store = n_store > n
            chain = jnp.where(store[:, None], cont, chain)
            n, known = jnp.maximum(n, n_store), jnp.where(store, self.k, known)
        return chain.astype(jnp.int32), n, known

    def rewind(
        self, params: Params, state: NgramState, n_drop: jax.Array, last: jax.Array
    ) -> NgramState:
        B, H = state.hist.shape
        at = state.hist_len - n_drop  # the history holds the whole sequence, `last` included
        hist = state.hist.at[jnp.arange(B), jnp.where(at < H, at, H)].set(last, mode="drop")
        return NgramState(hist=hist, hist_len=jnp.minimum(at + 1, H))

    def commit(
        self,
        params: Params,
        state: NgramState,
        draft: Draft | TreeDraft,
        verified: Verified,
        active: jax.Array,
        target: TargetStep,
    ) -> NgramState:
        B, H = state.hist.shape
        # The accepted tokens (a tree's accepted branch, root to leaf) are as wide as the most
        # one step accepts: k for an n-gram's own chains and trees, more inside a hybrid.
        K = verified.tokens.shape[1]
        j = jnp.arange(K + 1)[None, :]
        padded = jnp.concatenate([verified.tokens, jnp.zeros((B, 1), jnp.int32)], axis=1)
        emitted = jnp.where(j < verified.n[:, None], padded, verified.bonus[:, None])  # [B, K+1]
        count = jnp.where(active, verified.n + 1, 0)
        col = jnp.where(j < count[:, None], state.hist_len[:, None] + j, H)  # H = dropped
        hist = state.hist.at[jnp.arange(B)[:, None], col].set(emitted, mode="drop")
        return NgramState(hist=hist, hist_len=jnp.minimum(state.hist_len + count, H))
