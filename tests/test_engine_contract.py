"""The engine contract: the prefill input (ids, embeddings at chosen positions, positions) and the
position counter kept apart from cache slots."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from specjax import drafters, engine
from specjax.api import finish, prepare

from conftest import RAGGED_PROMPTS


def _run(model, inp_of, drafter=None, new=12):
    """prepare -> (a changed PrefillInput) -> prefill -> decode -> (tokens, final state)."""
    ec, args, rows = prepare(model, RAGGED_PROMPTS, max_new_tokens=new, drafter=drafter)
    dparams, max_len = args.pop("dparams"), args.pop("max_len")
    args["inp"] = inp_of(args["inp"])
    state = engine.prefill(model.params, dparams, **args, ec=ec, max_len=max_len)
    state = engine.decode(model.params, dparams, state, args["sp"], ec=ec)
    return finish(model, state, rows, 0.0, 1.0, False).tokens, state


def test_embeddings_at_chosen_positions(target):
    """Embeddings handed to the prefill replace the token embeddings exactly where the mask
    says: the target's own embeddings give the same tokens bit for bit, another token's
    embedding acts as that token."""
    embed = target.params["embed"]
    plain, _ = _run(target, lambda inp: inp)

    def own(inp):
        mask = (inp.positions % 3) == 1  # [B, P] every third position
        return inp.replace(embeds=embed[inp.tokens], embed_mask=mask)

    same, _ = _run(target, own)
    assert same == plain

    # Row 1's prompt is [7, 8, 9, 10] * 3: hand position 2 the embedding of token 50 instead.
    def swapped_embed(inp):
        e = embed[inp.tokens].at[1, 2].set(embed[50])
        return inp.replace(
            embeds=e, embed_mask=jnp.zeros(inp.tokens.shape, bool).at[1, 2].set(True)
        )

    def swapped_token(inp):
        return inp.replace(tokens=inp.tokens.at[1, 2].set(50))

    a, _ = _run(target, swapped_embed)
    b, _ = _run(target, swapped_token)
    assert a == b and a[1] != plain[1] and a[0] == plain[0]


def test_positions_are_counted_apart_from_slots(target):
    """For text the position counter ends where the cache does; prompt positions shifted by a
    constant move the counter by that constant while the cache slots stay put."""
    _, st = _run(target, lambda inp: inp, drafters.ngram(k=3))
    np.testing.assert_array_equal(np.asarray(st.pos), np.asarray(st.cache.lengths))
    _, shifted = _run(
        target, lambda inp: inp.replace(positions=inp.positions + 7), drafters.ngram(k=3)
    )
    np.testing.assert_array_equal(np.asarray(shifted.pos), np.asarray(shifted.cache.lengths) + 7)
