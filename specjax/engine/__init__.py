"""The decode engine: prefill, then one on-device `lax.while_loop` of
propose -> verify -> emit -> commit steps.

    protocol.py  the drafter protocol (Drafter, DrafterSpec: init / propose / commit) and the
                 records the engine and drafters exchange (Draft, TreeDraft, Verified,
                 PrefillInput, TargetPrefill, TargetStep); drafters import it, the engine
                 imports no drafter
    state.py     EngineConfig (static settings of one compiled program), PrefillConfig (the
                 part the target's prefill depends on), LoopState (the carry)
    loop.py      prefill (the target's, shared by every drafter, then the drafter's start),
                 the step, decode (while_loop), start_and_decode (start and loop as one
                 program: generate's) and decode_one (its Python-loop twin)
    verify.py    one verifier per draft shape (plain step, chain, tree) and the size choice
    accept.py    the acceptance rules (greedy, lossless rejection sampling), AcceptRules
    tree.py      masks, positions and paths derived from a draft tree's parents
    xla.py       xla_options: XLA settings per compiled entry point, not per process
"""

from specjax.engine.accept import DEFAULT_RULES, AcceptRules
from specjax.engine.loop import (
    TRACE_COUNTS,
    decode,
    decode_one,
    decode_step,
    emit,
    prefill,
    start_and_decode,
    start_loop,
    target_prefill,
    target_prefill_after,
    target_prefill_shared,
)
from specjax.engine.protocol import PrefillInput, Verified
from specjax.engine.state import EngineConfig, LoopState, PrefillConfig
from specjax.engine.verify import verify, verify_block
from specjax.engine.xla import xla_options

__all__ = [
    "AcceptRules",
    "DEFAULT_RULES",
    "EngineConfig",
    "LoopState",
    "PrefillConfig",
    "PrefillInput",
    "TRACE_COUNTS",
    "Verified",
    "decode",
    "decode_one",
    "decode_step",
    "emit",
    "prefill",
    "start_and_decode",
    "start_loop",
    "target_prefill",
    "target_prefill_after",
    "target_prefill_shared",
    "verify",
    "verify_block",
    "xla_options",
]
