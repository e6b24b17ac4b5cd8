"""Step anatomy: where the milliseconds of one speculative decode step go.

The engine's step reads `propose -> verify -> emit -> commit` (`engine.loop.decode_step`). Here
each piece runs as its own jitted function on one realistic decode state (a real prefill of a
real prompt, then a few real steps), and so does the whole step:

    plain step       one decode step without a drafter (the cost a drafter must beat)
    propose          the drafter's `propose`
    verify forward   the target forward over the block the engine builds from the draft (at the
                     verify size the engine picks for this state, when the drafter sizes drafts)
    accept/emit      the acceptance rule plus writing the tokens to the output (`emit`)
    commit           the target cache commit (advance, or compact a tree path) + drafter commit
    spec step        the whole step (`engine.decode_one`)
    remainder        spec step minus the four parts (and its share of the step)
    loop step        `engine.decode` (the while_loop) over `loop_steps` steps, per step: what
                     `generate` pays; its own trajectory, so acceptance may differ from the state
    call overhead    an empty jitted call with the same arguments (each part pays it once, the
                     spec step once: the sum of parts holds three more of it than the step)
    cache copies in loop   copies of a whole KV-cache buffer (the target's, or a drafter's
                     own) XLA put in the compiled loop body (`cache_copies`): each one is a
                     pass over a layer's cache per step

A remainder well above zero means the step does work none of its parts does alone: copies of
buffers XLA could not update in place, or a `lax.switch` over verify sizes. Every piece donates
the state it updates (as the decode loop does), and runs on a fresh copy of the same snapshot
each time, so an in-place update stays in place and every repeat sees the same draft.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import jax

from specjax import engine
from specjax.engine.loop import emit
from specjax.engine.protocol import Drafter
from specjax.engine.verify import _padded_step, size_index, target_forward, verifier_for

if TYPE_CHECKING:
    from specjax.engine.protocol import Draft, TargetStep, TreeDraft, Verified
    from specjax.engine.state import EngineConfig, LoopState
    from specjax.engine.verify import AnyDraft
    from specjax.model import Model
    from specjax.models.cache import KVCache

_T = TypeVar("_T")

PARTS = ("propose", "verify forward", "accept/emit", "commit")
ROWS = (
    ("plain step",)
    + PARTS
    + (
        "sum of parts",
        "spec step",
        "remainder",
        "loop step",
        "call overhead",
        "cache copies in loop",
    )
)
DEFAULT_PROMPT = "Write a long story about a robot who learns to paint, with many details."


@dataclasses.dataclass(frozen=True)
class StepAnatomy:
    """Median milliseconds per piece (`ms`: one entry per name of ROWS except the derived sum
    and remainder) and what was measured."""

    drafter: str
    ms: dict[str, float]
    verify_tokens: int  # T of the verify forward timed (1 + draft tokens verified)
    loop_tokens_per_step: float  # tokens per step in the loop-step run (tau there)
    repeats: int
    loop_cache_copies: tuple[
        HloCopy, ...
    ] = ()  # HloCopy of KV-cache-sized buffers in the loop body

    @property
    def parts_ms(self) -> float:
        return sum(self.ms[p] for p in PARTS)

    @property
    def remainder_ms(self) -> float:
        return self.ms["spec step"] - self.parts_ms

    @property
    def remainder_share(self) -> float:
        return self.remainder_ms / self.ms["spec step"]

    def row(self, name: str) -> float:
        if name == "cache copies in loop":
            return len(self.loop_cache_copies)
        if name == "sum of parts":
            return self.parts_ms
        if name == "remainder":
            return self.remainder_ms
        return self.ms[name]


# ----------------------------------------------------------------------------- the pieces
# Each takes the fixed inputs first and the donated ones last; `ec` is static.


def _keys(state: LoopState) -> tuple[jax.Array, jax.Array]:
    """The step's key split, as `decode_step` splits it -> (k_draft, k_verify)."""
    _, k_draft, k_verify = jax.random.split(state.key, 3)
    return k_draft, k_verify


@functools.partial(jax.jit, static_argnames=("ec",), donate_argnums=(2,))
def _propose(
    dparams: Any, sp: dict, state: LoopState, *, ec: EngineConfig
) -> tuple[Draft | TreeDraft, Any]:
    """-> (draft, drafter state after proposing)."""
    return ec.drafter.propose(dparams, state.dstate, state.last, _keys(state)[0], ec.mode, sp)


@functools.partial(jax.jit, static_argnames=("ec",), donate_argnums=(2,))
def _verify_forward(
    params: dict, part: AnyDraft, state: LoopState, *, ec: EngineConfig
) -> tuple[jax.Array, TargetStep, KVCache]:
    """The target forward over the block the engine builds for `part` (None: a plain step)."""
    return target_forward(params, state, part, ec)


@functools.partial(jax.jit, static_argnames=("ec",), donate_argnums=(3,))
def _accept_emit(
    part: AnyDraft, logits: jax.Array, sp: dict, state: LoopState, *, ec: EngineConfig
) -> tuple[Verified, tuple[jax.Array, jax.Array, jax.Array]]:
    """-> (Verified, `emit`'s (out, n_out, done))."""
    verified = verifier_for(part).accept(_keys(state)[1], logits, part, sp, ec)
    return verified, emit(state, verified, ec)


@functools.partial(jax.jit, static_argnames=("ec",), donate_argnums=(5,))
def _commit(
    dparams: Any,
    draft: AnyDraft,
    part: AnyDraft,
    verified: Verified,
    step: TargetStep,
    state_cache: tuple[LoopState, KVCache],
    *,
    ec: EngineConfig,
) -> tuple[KVCache, Any]:
    """Target cache commit of the verified `part` + the drafter's commit of the whole `draft`
    (as `decode_step` hands it over). `state_cache` = (state, cache after the forward)."""
    state, cache = state_cache
    active = ~state.done
    cache = verifier_for(part).commit(cache, verified, active)
    dstate = None
    if ec.drafter is not None:
        dstate = ec.drafter.commit(dparams, state.dstate, draft, verified, active, step)
    return cache, dstate


@functools.partial(jax.jit, static_argnames=("ec",), donate_argnums=(3,))
def _empty(
    params: dict, dparams: Any, sp: dict, state: LoopState, *, ec: EngineConfig
) -> jax.Array:
    return state.steps + 1


# ----------------------------------------------------------------------------- measuring


def _fresh(tree: _T) -> _T:
    """A copy of every array of `tree` (the donated input of one timed call)."""
    return jax.block_until_ready(jax.tree.map(lambda x: x.copy(), tree))


def _time_once(fn: Callable[[Any], Any], donated: Any) -> float:
    arg = _fresh(donated)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(arg))
    return (time.perf_counter() - t0) * 1e3


def time_pieces(
    pieces: dict[str, tuple[Callable[[Any], Any], Any]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """{name: (fn(donated), donated snapshot)} -> {name: median ms}. Every piece is compiled
    and run `warmup` times first; the timed calls are interleaved over the pieces (order
    reversed every other round, to cancel drift), `repeats` rounds."""
    for fn, donated in pieces.values():
        for _ in range(warmup):
            _time_once(fn, donated)
    times = {name: [] for name in pieces}
    order = list(pieces.items())
    for r in range(repeats):
        for name, (fn, donated) in order if r % 2 == 0 else order[::-1]:
            times[name].append(_time_once(fn, donated))
    return {name: statistics.median(t) for name, t in times.items()}


def decode_state(
    model: Model,
    drafter: Drafter | None,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int,
    warm_steps: int,
    chat: bool = True,
    impl: str = "xla",
) -> tuple[EngineConfig, Any, dict, LoopState]:
    """A realistic decode state: `prepare`, `engine.prefill`, then `warm_steps` real steps.
    -> (ec, dparams, sp, state)."""
    from specjax.api import prepare

    prompts = [prompt] if isinstance(prompt, str) else [list(prompt)]
    ec, args, _ = prepare(
        model, prompts, max_new_tokens=max_new_tokens, chat=chat, drafter=drafter, impl=impl
    )
    dparams, max_len, sp = args.pop("dparams"), args.pop("max_len"), args["sp"]
    state = engine.prefill(model.params, dparams, **args, ec=ec, max_len=max_len)
    for _ in range(warm_steps):
        state = engine.decode_one(model.params, dparams, state, sp, ec=ec)
    return ec, dparams, sp, jax.block_until_ready(state)


def verified_part(ec: EngineConfig, draft: AnyDraft, state: LoopState) -> tuple[AnyDraft, int]:
    """The part of `draft` the engine verifies on `state` (None: a plain step), as `verify`
    chooses it: the whole draft, or the smallest static verify size covering every active
    row's request -> (part, T = tokens in the verify block)."""
    if draft is None or draft.size is None:
        part = draft
    else:
        sizes, K = tuple(ec.drafter.verify_sizes), ec.drafter.nodes
        n = ((0,) + sizes)[int(size_index(draft.size, ~state.done, sizes))]
        part = None if n == 0 else draft if n == K else draft.truncated(n)
    T = (
        1
        if part is None
        else 1 + (part.tokens if hasattr(part, "tokens") else part.tree.tokens).shape[1]
    )
    return part, T


def measure_step(
    model: Model,
    drafter: Drafter | None,
    prompt: str | Sequence[int] = DEFAULT_PROMPT,
    *,
    max_new_tokens: int = 128,
    warm_steps: int = 4,
    loop_steps: int = 16,
    repeats: int = 20,
    chat: bool = True,
    impl: str = "xla",
    name: str | None = None,
) -> StepAnatomy:
    """Time the pieces of one decode step of `model` with `drafter` on `prompt` (a string, or
    token ids) -> StepAnatomy. `max_new_tokens` sizes the cache as `generate` would; it must
    leave room for `warm_steps + loop_steps` steps of at most `max_accept + 1` tokens."""
    with warnings.catch_warnings():
        # Pieces that return part of the state leave some donated buffers unused: harmless.
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        return _measure_step(
            model,
            drafter,
            prompt,
            max_new_tokens,
            warm_steps,
            loop_steps,
            repeats,
            chat,
            impl,
            name,
        )


def _measure_step(
    model: Model,
    drafter: Drafter | None,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    warm_steps: int,
    loop_steps: int,
    repeats: int,
    chat: bool,
    impl: str,
    name: str | None,
) -> StepAnatomy:
    ec, dparams, sp, state = decode_state(
        model,
        drafter,
        prompt,
        max_new_tokens=max_new_tokens,
        warm_steps=warm_steps,
        chat=chat,
        impl=impl,
    )
    params, spec = model.params, ec.drafter

    # Inputs of the later pieces, computed once on copies of the snapshot.
    draft = None
    if spec is not None:
        draft, _ = _propose(dparams, sp, _fresh(state), ec=ec)
    part, T = verified_part(ec, draft, state)
    logits, step, cache = _verify_forward(params, part, _fresh(state), ec=ec)
    if draft is not None and draft.size is not None:
        step = _padded_step(step, spec.nodes + 1)  # the engine pads sized steps for the drafter
    verified, _ = _accept_emit(part, logits, sp, _fresh(state), ec=ec)

    plain_ec = dataclasses.replace(ec, drafter=None)
    pieces = {
        "plain step": (
            lambda s: engine.decode_one(params, None, s, sp, ec=plain_ec),
            state.replace(dstate=None),
        ),
        "verify forward": (lambda s: _verify_forward(params, part, s, ec=ec), state),
        "accept/emit": (lambda s: _accept_emit(part, logits, sp, s, ec=ec), state),
        "commit": (
            lambda sc: _commit(dparams, draft, part, verified, step, sc, ec=ec),
            (state, cache),
        ),
        "spec step": (lambda s: engine.decode_one(params, dparams, s, sp, ec=ec), state),
        "call overhead": (lambda s: _empty(params, dparams, sp, s, ec=ec), state),
    }
    if spec is not None:
        pieces["propose"] = (lambda s: _propose(dparams, sp, s, ec=ec), state)
    ms = time_pieces(pieces, repeats)
    loop_ms, tau, copies = time_loop_step(
        params, dparams, sp, state, ec, loop_steps, max(3, repeats // 4)
    )
    ms.setdefault("propose", 0.0)
    ms["loop step"] = loop_ms
    return StepAnatomy(
        drafter=name or (drafter.name if drafter else "none"),
        ms=ms,
        verify_tokens=T,
        loop_tokens_per_step=tau,
        repeats=repeats,
        loop_cache_copies=copies,
    )


def time_loop_step(
    params: dict,
    dparams: Any,
    sp: dict,
    state: LoopState,
    ec: EngineConfig,
    loop_steps: int,
    repeats: int,
) -> tuple[float, float, tuple[HloCopy, ...]]:
    """Median ms per step of `engine.decode` running `loop_steps` steps from `state` (the
    loop's step bound is moved; rows keep their budgets) -> (ms per step, tokens per step,
    the KV-cache-sized copies in the compiled loop body)."""
    steps0, n0 = int(state.steps), int(state.n_out.sum())
    lec = dataclasses.replace(ec, max_new=steps0 + loop_steps)
    compiled = engine.decode.lower(params, dparams, state, sp, ec=lec).compile()
    copies = tuple(cache_copies(compiled.as_text(), cache_shapes(state)))
    out = compiled(params, dparams, _fresh(state), sp)  # warm up
    per_step = []
    for _ in range(repeats):
        s = _fresh(state)
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(params, dparams, s, sp))
        per_step.append((time.perf_counter() - t0) * 1e3 / max(int(out.steps) - steps0, 1))
    steps = max(int(out.steps) - steps0, 1)
    return statistics.median(per_step), (int(out.n_out.sum()) - n0) / steps, copies


# ----------------------------------------------------------------------------- reporting


def anatomy_markdown(results: Sequence[StepAnatomy]) -> str:
    """One column per drafter, one row per piece (ms; remainder also as % of the step)."""
    head = "| ms per step | " + " | ".join(r.drafter for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for name in ROWS:
        cells = []
        for r in results:
            v = r.row(name)
            cell = str(v) if name == "cache copies in loop" else f"{v:.2f}"
            if name == "remainder":
                cell += f" ({100 * r.remainder_share:+.0f}%)"
            if name == "verify forward":
                cell += f" (T={r.verify_tokens})"
            if name == "loop step":
                cell += f" (tau {r.loop_tokens_per_step:.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_remainder(results: Sequence[StepAnatomy], limit: float = 0.10) -> list:
    """Drafters whose remainder exceeds `limit` of the step -> ["name: x ms (y%)"]. A negative
    remainder is no unexplained work: the parts paid more call overheads than the step."""
    return [
        f"{r.drafter}: {r.remainder_ms:.2f} ms ({100 * r.remainder_share:.0f}%)"
        for r in results
        if r.remainder_share > limit
    ]


# ----------------------------------------------------------------------------- compiled loop

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_CALLEES = re.compile(
    r"(?:calls|body|condition|to_apply|true_computation|false_computation)"
    r"=%([\w.\-]+)|branch_computations=\{([^}]*)\}"
)
_COPY = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) (copy|copy-start)\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class HloCopy:
    """A copy instruction of optimized HLO: its result shapes ((dtype, dims), ...), where."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    computation: str
    line: str


def _computations(hlo: str) -> tuple[dict, str]:
    """Optimized HLO text -> ({name: [instruction lines]}, name of the ENTRY computation)."""
    comps, entry, name = {}, None, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            name = m.group(1)
            comps[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif line == "}":
            name = None
        elif name is not None:
            comps[name].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return comps, entry


def _callees(line: str) -> list:
    out = []
    for one, many in _CALLEES.findall(line):
        out += [one] if one else [c.strip().lstrip("%") for c in many.split(",") if c.strip()]
    return out


def loop_body_copies(hlo: str) -> list:
    """Every copy (or copy-start) inside the outermost while loop of a compiled program: in its
    body and condition and in whatever they call (fusions, branches, nested loops) -> [HloCopy].
    The outermost loops are the first whiles reached from ENTRY without entering a loop."""
    comps, entry = _computations(hlo)
    roots, todo, seen = [], [entry], set()
    while todo:  # outside the loop: follow calls until a while is found
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            if " while(" in line:
                roots += _callees(line)
            else:
                todo += _callees(line)
    if not roots:
        raise ValueError("this program has no while loop")
    inside, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in inside or name not in comps:
            continue
        inside.add(name)
        for line in comps[name]:
            todo += _callees(line)
    copies = []
    for name in sorted(inside):
        for line in comps[name]:
            m = _COPY.match(line)
            if m:
                shapes = tuple(
                    (dt, tuple(int(d) for d in dims.split(",") if d))
                    for dt, dims in _SHAPE.findall(m.group(1))
                )
                copies.append(HloCopy(shapes, name, line.strip()))
    return copies


def cache_shapes(state: LoopState) -> set:
    """The shapes of the KV-cache buffers a decode loop carries (`state` or its
    `jax.eval_shape`): the target's, and a drafter's own per-layer caches [B, KV, S, hd] (an
    EAGLE drafter's, which may be longer than the target's)."""
    target = {x.shape for x in jax.tree.leaves((state.cache.k, state.cache.v))}
    return target | {x.shape for x in jax.tree.leaves(state.dstate) if x.ndim == 4}


def cache_copies(hlo: str, cache_shapes: Iterable[Sequence[int]]) -> list:
    """The loop-body copies whose result is a whole KV-cache buffer (one of `cache_shapes`, dims
    tuples) -> [HloCopy]. Each such copy moves a layer's cache (or all of them) every step."""
    wanted = {tuple(s) for s in cache_shapes}
    return [c for c in loop_body_copies(hlo) if any(dims in wanted for _, dims in c.shapes)]
