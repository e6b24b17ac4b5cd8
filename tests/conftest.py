"""Shared fixtures: tiny random-weight HF transformers models built on the fly (no downloads)."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Compile tests' programs with XLA's cheaper CPU backend passes: most of the suite's time is
# compilation, and on this 2-core machine these flags cut a compile-bound file by ~40% (test_tree
# greedy-equality tests: 110 s -> 68 s). XLA's older (non-"fusion emitter") CPU code generator
# compiles tiny-model programs faster still (4 tiny-model generate configs: 13.8 s -> 7.8-9.7 s
# first call; tests/test_tree_sampling.py 111 s -> 104 s; no change on the 30-layer model).
# XLA splits each program's LLVM module for parallel code generation; a test worker is pinned
# to one core, so the split only adds work: one module per program cut backend compile time by
# ~20% (3 tiny-model tree decode programs, one core: 5.7 s -> 4.6 s; the 8-device
# tensor-parallel subprocess of test_multidevice.py 30.5 s -> 24.2 s of compilation) with the
# same tokens, and the same time for the 30-layer model's file.
# Every invariant is checked against the same compiled code paths (speculative vs plain
# decoding in one process, HF parity within tolerances);
# `SPECJAX_TEST_XLA_OPT=full` runs the suite with XLA's defaults, as production compiles.
# Set before JAX starts its backend (it reads XLA_FLAGS once); workers and subprocesses inherit.
if os.environ.get("SPECJAX_TEST_XLA_OPT", "fast") != "full":
    os.environ["XLA_FLAGS"] = " ".join(
        [
            os.environ.get("XLA_FLAGS", ""),
            "--xla_backend_optimization_level=0",
            "--xla_llvm_disable_expensive_passes=true",
            "--xla_cpu_use_fusion_emitters=false",
            "--xla_cpu_parallel_codegen_split_count=1",
        ]
    ).strip()

# The 8192-row decodes of the statistical tests (`test_spec_sampling.sample_rows`, the VLM's
# `_sample_counts`) compile with YNNPACK's elementwise kernels besides its dots (XLA's default):
# their running time is mostly elementwise code (softmax `exp`, selects), which XLA's level-0
# loops run slowly and YNNPACK runs vectorized. Only these programs, through `xla_options`: as
# a process-wide flag it made the tiny-model programs compile ~7% slower and the 30-layer
# model run ~5% slower. Measured side by side on the two cores (swapped once), same results:
# tests/test_tree_sampling.py 104.8 / 107.8 s -> 92.6 / 90.6 s, test_hybrid.py 132.8 -> 126.1
# s, test_spec_sampling.py 62.3 -> 60.6 s.
MANY_ROWS_XLA = (
    {}
    if os.environ.get("SPECJAX_TEST_XLA_OPT", "fast") == "full"
    else {
        "xla_cpu_experimental_ynn_fusion_type": (
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_ELTWISE"
        )
    }
)

VOCAB = 101  # build_hf_model's default vocabulary
_rng = np.random.default_rng(0)

# Most of the suite's time is XLA compilation. Files run on two xdist workers (`--dist loadfile`,
# whole files), so the slowest files go first: a long file started last would leave the other
# worker idle at the end. (The README command passes --no-loadscope-reorder, which makes xdist
# keep this order instead of sorting files by their number of tests.) Measured wall time, longest
# first; files not listed follow in their usual order. Re-measure with --durations=0 when a file
# grows (a long file missing here runs last and leaves the other worker idle).
SLOWEST_FIRST = [  # worker-seconds per file, whole suite on two workers (2026-12-04, with a
    # background job sharing the CPU: relative sizes, not times)
    "test_smollm2.py",  # 324
    "test_tree_sampling.py",  # 169
    "test_multidevice.py",  # 165
    "test_vlm.py",  # 149
    "test_hybrid.py",  # 128
    "test_eagle.py",  # 123
    "test_spec_sampling.py",  # 108
    "test_cascade.py",  # 102
    "test_datastore.py",  # 65
    "test_horizontal.py",  # 62
    "test_medusa.py",  # 62
    "test_generate.py",  # 60
    "test_notebooks.py",  # 59
    "test_train.py",  # 57
    "test_tree.py",  # 53
    "test_cli.py",  # 43
    "test_cache.py",  # 42
    "test_autotune.py",  # 37
    "test_models.py",  # 31
    "test_verify_sizing.py",  # 31
    "test_streaming.py",  # 30
    "test_tree_attention.py",  # 29
    "test_static_tree.py",  # 22
    "test_storage.py",  # 18 (2026-12-07, alone on one core)
    "test_decode_fn.py",  # 21
    "test_eagle_producers.py",  # 15
    "test_device_check.py",  # 15
    "test_step_anatomy.py",  # 15
    "test_eagle_hf.py",  # 14
    "test_engine_contract.py",  # 7
    "test_convert.py",  # 6
    "test_registry.py",  # 5
    "test_magpie.py",  # 4
    "test_robustness.py",  # 2
]


# The extended tier (`-m extended`; `-m ""` runs both tiers): further cases of rules the default
# tier already checks, each named here with the default test that covers the same rule. The
# README's command (and CI) deselects them (pyproject's addopts) so that it stays under 9
# minutes on the 2-core VM; they run before each release, and the closing notes say so. A
# file's every case of a test when the key has no "[", else that one case. Worker-seconds on
# the 2-core VM (2026-12-06, a slow hour: the whole suite 849 s on two workers).
EXTENDED = {
    # The real model: logits and greedy output against HF, the n-gram chain (ragged batch and
    # batch 1) and the bundled EAGLE-3 tree stay in the default tier; each drafter below has
    # its greedy identity checked on tiny models there (ragged batches, both layouts).
    "test_smollm2.py::test_scan_layout_ragged_batch_equals_unrolled": 10.6,  # every scan run
    "test_smollm2.py::test_ngram_at_batch_1_equals_ar": 8.0,  # its ragged batch stays
    "test_smollm2.py::test_speculative_greedy_equals_ar[layer_skip]": 15.4,  # test_tree.py
    "test_smollm2.py::test_small_model_drafter_equals_ar": 14.5,  # test_generate.py
    "test_smollm2.py::test_bundled_drafters_equal_ar[medusa]": 15.0,  # test_medusa.py
    "test_smollm2.py::test_cascade_equals_ar": 29.7,  # test_cascade.py
    "test_smollm2.py::test_eagle_top_cascade_equals_ar": 18.4,  # test_cascade.py
    "test_smollm2.py::test_hybrid_equals_ar": 43.3,  # test_hybrid.py (both modes)
    "test_smollm2.py::test_horizontal_equals_ar": 15.9,  # test_horizontal.py
    # the same repair on a tiny model: test_named_cache_is_reconverted_when_damaged
    "test_cache.py::test_damaged_smollm2_cache_heals_with_the_same_output": 25.1,
    # min_match 2 (the default) and the sized tree's greedy cases stay
    "test_hybrid.py::test_hybrid_greedy_equals_ar[1]": 12.5,
    # switch and merge stay, each with its broken-rule control; sized trees: test_tree_sampling
    "test_hybrid.py::test_hybrid_sampling_matches_target[switch_sized]": 13.7,
    "test_datastore.py::test_hybrid_retrieves_from_a_store[switch]": 11.2,  # merge stays
    # the 3-level and the lenient 2-level cascades stay, with both broken-rule controls
    "test_cascade.py::test_cascade_sampling_matches_target[model>model]": 10.0,
    "test_cascade.py::test_cascade_sampling_matches_target[ngram>model]": 6.6,
    "test_cascade.py::test_cascade_sampling_matches_target[ngram>model lenient]": 5.7,
    "test_cascade.py::test_eagle_top_sampling_matches_target[1-plain]": 7.1,  # the EAGLE law stays
    # gated trees stay in test_verify_sizing.py; the 2-layer chain stays in top-k/top-p mode
    "test_eagle.py::test_sampling_matches_target[eagle3-tree-gated-topk5_topp0.8]": 12.1,
    "test_eagle.py::test_sampling_matches_target[eagle3-chain-reduced-2layers-plain]": 10.9,
    # the tree rule with EAGLE's own law: EAGLE-3's sized tree stays
    "test_eagle.py::test_sampling_matches_target[eagle1-tree-topk5_topp0.8]": 11.2,
    # training over images stays (test_eagle3_training_over_images_learns); the CLI's
    # train-drafter: tests/test_cli.py
    "test_vlm.py::test_cli_train_drafter_on_images": 10.6,
    # the text LM's chain stays
    "test_vlm.py::test_sampling_follows_target_with_image[layer_skip_tree-4102]": 13.8,
    # the small model's tree (model_tree) stays; the n-gram tree stays in plain mode
    "test_tree_sampling.py::test_tree_drafter_matches_target[self_tree-plain]": 9.1,
    "test_tree_sampling.py::test_tree_drafter_matches_target[ngram_tree-topk5_topp0.8]": 7.6,
    # the layer-skip tree with verify sizing (sized_tree) stays
    "test_tree_sampling.py::test_tree_drafter_matches_target[layer_skip_tree-topk5_topp0.8]": 9.0,
    # the gated tree stays
    "test_verify_sizing.py::test_gated_drafters_greedy_equal_ar[eagle1_chain_gated]": 7.0,
    # a 4 x 2 mesh for the other drafters (ar, n-gram, cascade, EAGLE-3 tree stay)
    "test_multidevice.py::test_tensor_parallel_more_drafters": 30.0,
    # the 8-device CLI run; the API on the same mesh stays, and so does the bad --mesh check
    "test_multidevice.py::test_cli_generate_on_a_mesh": 15.3,
    # Moved 2026-12-06 (stop 49; worker-seconds of a slow hour, the whole default tier 664 s):
    # merge's broken-rule control stays, and the chain and tree rules a switch step takes keep
    # theirs (test_spec_sampling.py, test_tree_sampling.py)
    "test_hybrid.py::test_hybrid_broken_rule_is_detected[switch]": 11.9,
    # the horizontal schedule's broken-rule control stays
    "test_horizontal.py::test_horizontal_without_point_masses_is_detected": 9.0,
    # the unrolled layout's shared prefill stays (the scan layout's decodes: test_generate.py)
    "test_generate.py::test_repeated_prompts_share_one_prefill[scan]": 6.8,
    # the EAGLE-shaped static tree's full-depth acceptance (eagle_small: branches beside the
    # spine, the harder commit) stays
    "test_static_tree.py::test_self_drafting_accepts_full_depth[chain3]": 5.4,
    # Medusa training and export: test_train.py::test_medusa_kind_trains_and_exports
    "test_medusa.py::test_trained_heads_are_accepted": 12.2,
    # every drafter keeps one sampling mode here, and both modes stay covered
    "test_spec_sampling.py::test_first_tokens_match_target[self-topk5_topp0.8]": 3.4,
    "test_spec_sampling.py::test_first_tokens_match_target[ngram-topk5_topp0.8]": 3.2,
    "test_spec_sampling.py::test_first_tokens_match_target[layer_skip-topk5_topp0.8]": 2.8,
    "test_spec_sampling.py::test_first_tokens_match_target[small_model-plain]": 3.4,
    # the residual_is_p and bonus_off_by_one controls stay; the tree's residual_is_p stays
    "test_spec_sampling.py::test_broken_rule_is_detected[accept_all-small_model-plain]": 4.0,
    "test_tree_sampling.py::test_broken_tree_rule_is_detected[accept_first-topk5_topp0.8]": 4.0,
    # the AR and sampled small-model decodes under a user's jit stay
    "test_decode_fn.py::test_under_user_jit_equals_generate[ngram-greedy]": 3.6,
    # the other six drafter configurations stay
    "test_generate.py::test_speculative_greedy_equals_ar[small_model-other-k3]": 2.6,
    "test_generate.py::test_speculative_greedy_equals_ar[ngram-fixed-k4]": 2.2,
    # 3 levels greedy: test_eagle_top_greedy_equals_ar (n-gram > layer skip > EAGLE), and 3
    # levels sampled: test_cascade_sampling_matches_target[ngram>model>model]
    "test_cascade.py::test_cascade_greedy_equals_ar[ngram>layer_skip>layer_skip]": 11.2,
    # an EAGLE chain's own law (reduced draft vocabulary): the EAGLE top of a cascade by that
    # law (test_cascade.py::test_eagle_top_sampling_matches_target[None-topk5_topp0.8])
    "test_eagle.py::test_sampling_matches_target[eagle3-chain-reduced-2layers-topk5_topp0.8]": 14.5,
    # three more drafters on a VLM (their text path: test_generate.py); the EAGLE chain and
    # tree, the Medusa tree and the layer-skip tree stay
    "test_vlm.py::test_drafters_greedy_equal_plain[small_model]": 2.1,
    "test_vlm.py::test_drafters_greedy_equal_plain[ngram]": 2.0,
    "test_vlm.py::test_drafters_greedy_equal_plain[layer_skip]": 2.4,
    # the short verify's plain mode stays; Medusa keeps one mode per shape, both modes covered
    "test_spec_sampling.py::test_first_tokens_match_target[short_verify-topk5_topp0.8]": 6.0,
    "test_medusa.py::test_sampling_matches_target[chain-topk5_topp0.8]": 3.0,
    "test_medusa.py::test_sampling_matches_target[tree-plain]": 4.7,
    # merge's greedy identity stays (test_hybrid_merge_greedy_equals_ar), so does switch's here
    "test_hybrid.py::test_hybrid_with_a_sized_model_tree_greedy_equals_ar[merge]": 4.6,
    # the early-exiting model tree's skip path is the same in both modes: switch's stays
    "test_hybrid.py::test_hybrid_with_a_sized_model_tree_greedy_equals_ar[merge_early]": 4.6,
    # the sized EAGLE-3 chain stays
    "test_verify_sizing.py::test_sized_trees_greedy_equal_ar[layer_skip_chain]": 3.0,
    # Moved 2026-12-07 (stop 54), one core, to make room for tests/test_storage.py: the
    # bfloat16-stored target's unrolled layout stays (the scan layout reads the same products)
    "test_storage.py::test_bf16_storage_greedy_equals_ar[scan]": 7.1,
    # training-time test steps against incremental drafting: EAGLE-3's stays (the bundled kind)
    "test_train.py::test_ttt_steps_equal_incremental_drafting[1]": 12.8,
    # the drafter state against its cache-free reference: EAGLE-3 with two layers stays
    "test_eagle.py::test_state_follows_cache_free_reference[1-1]": 11.7,
    # Added 2026-12-07 (stop 59): sized drafts decoded one row at a time. The chains sized by
    # their first law alone (small model, EAGLE-3) and the old rule's control stay; the gated
    # chain and the sized tree keep their 8192-row fits (test_sampling_matches_target)
    "test_eagle.py::test_sized_drafts_at_batch_1_match_target[eagle3_gated]": 24.9,
    "test_eagle.py::test_sized_drafts_at_batch_1_match_target[eagle3_tree]": 7.0,
    # Added 2026-12-07 (stop 60): trees whose children are drawn without replacement. The
    # static EAGLE-3 tree keeps its plain mode and its wrong-law control; the hybrid keeps
    # merge (drawn and chain nodes as siblings) and its control (chain nodes left unmarked)
    "test_eagle.py::test_sampling_matches_target[eagle3-static-sampled-topk5_topp0.8]": 9.0,
    # EAGLE-1's static tree draws on the target's vocabulary (EAGLE-3's on its own): both modes
    "test_eagle.py::test_sampling_matches_target[eagle1-static-sampled-plain]": 9.0,
    "test_eagle.py::test_sampling_matches_target[eagle1-static-sampled-topk5_topp0.8]": 9.0,
    "test_hybrid.py::test_hybrid_sampling_matches_target[switch_sampled]": 12.0,
}


def _extended(item) -> bool:
    name = Path(str(item.fspath)).name
    return f"{name}::{item.name}" in EXTENDED or f"{name}::{item.originalname}" in EXTENDED


@pytest.hookimpl(tryfirst=True)  # marks before pytest's -m deselects
def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if _extended(item):
            item.add_marker(pytest.mark.extended)
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable


# A worker's resident size above which a file's end unfreezes the heap (see below).
_UNFREEZE_ABOVE_BYTES = 6 << 30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:  # Linux (CI); elsewhere the heap is unfrozen per file
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True, scope="module")
def _frozen_old_heap():
    """Keep the garbage collector's work proportional to what a test allocates.

    A test worker accumulates millions of long-lived objects (torch, transformers, JAX's
    caches, fixtures), and every full collection walks all of them: the loader's collections
    after each stacked weight (`model._place_consuming`) cost 0.3-1 s each in a busy worker
    (tests/test_models.py alone: 69 s; 50 s with a freeze per file; 28 s with one per test;
    the whole suite: 1,961 -> 1,466 worker-seconds, 755 s on two workers). So each test starts
    with a collection of what the previous test left and then freezes what survives
    (`_frozen_before_test`): later collections examine only objects the test made. The same
    collections still run at the same points. Cyclic garbage among frozen objects (an earlier
    file's module fixtures, once released) is not collected while frozen, so at the end of a
    file the heap is unfrozen and fully collected once the worker holds more than
    `_UNFREEZE_ABOVE_BYTES` (a full collection per file cost 1-8 s each)."""
    gc.collect()
    gc.freeze()
    yield
    try:
        big = _rss_bytes() > _UNFREEZE_ABOVE_BYTES
    except (OSError, ValueError, IndexError):
        big = True
    maps = _map_count()
    many = maps > _map_limit() // 3
    if big or many:
        gc.unfreeze()
        gc.collect()
    if many:
        _release_compiled(maps)


def _map_count() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: nothing to bound
        return 0


def _map_limit() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530  # Linux's default


def _release_compiled(maps: int) -> None:
    """Drop every compiled program of this worker (the next file compiles what it needs).

    Each executable XLA CPU compiles keeps ~500-1,100 memory mappings of its own (measured on
    SmolLM2: one generate program per drafter, 673 -> 4,538 mappings for five; jax.clear_caches()
    gave them all back: 710). A worker that keeps every program of a long run passes Linux's
    vm.max_map_count (65,530 by default), and the next mmap inside XLA's compiler fails: the
    likely cause of the segfaults that killed a worker late in two full runs (its sibling held
    52,263 mappings then; not reproduced on purpose). So at the end of a file past a third of the
    limit, the caches go."""
    import sys

    jax = sys.modules.get("jax")
    if jax is None:
        return
    jax.clear_caches()
    gc.collect()
    log = os.environ.get("SPECJAX_TEST_MAPS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"pid {os.getpid()}: {maps} mappings -> {_map_count()} after clear_caches\n")


@pytest.fixture(autouse=True)
def _frozen_before_test(_frozen_old_heap):
    gc.collect()
    gc.freeze()
    yield


def _is_xdist_controller(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def pytest_configure(config):
    """Torch threads in the processes that run tests, and the JAX compilation cache (below).

    The HF reference models run in the xdist workers next to XLA programs: with its default two
    intra-op threads torch oversubscribes this 2-core machine (its OpenMP threads spin while they
    wait). HF generate on SmolLM2 in test_smollm2 (4 prompts x 64 tokens) took 55 s in the full
    suite with two threads, 25 s with one. Every reference still meets its tolerance. (The xdist
    controller runs no test: it imports neither torch nor transformers, which shortens the
    serial start of the run.)"""
    if not _is_xdist_controller(config):
        _pin_worker(config)
        import torch

        torch.set_num_threads(1)
    _jax_cache(config)


def _pin_worker(config: pytest.Config) -> None:
    """Each xdist worker (and the processes it starts) on cores of its own.

    XLA's CPU client sizes its thread pools by the cores a process may use, so two unpinned
    workers on this 2-core machine run four compute threads (plus compile threads) on two
    cores; the tiny models' operations are too small to gain from a second thread, and the
    threads only contend. Pinned, each worker's XLA runs one thread. Measured on the 2-core VM
    (2026-12-04): tests/test_tree_sampling.py + test_eagle.py on two workers, user time 282 s
    -> 239 s (wall 165 -> 158 s); the whole suite (`-n 2 --dist loadfile`) 859 s unpinned ->
    796 s pinned (1,678 -> 1,546 worker-seconds, user time 24.8 -> 23.0 min). The machine's
    speed drifts between runs (a run of the same suite earlier that day took 1,114 s), so
    compare runs made close together. SPECJAX_TEST_PIN=0 turns it off."""
    worker = getattr(config, "workerinput", None)
    if worker is None or os.environ.get("SPECJAX_TEST_PIN", "1") == "0":
        return
    if not hasattr(os, "sched_setaffinity"):  # not Linux: leave the OS to schedule
        return
    cpus = sorted(os.sched_getaffinity(0))
    n, i = int(worker["workercount"]), int(worker["workerid"][2:])
    if n < 2 or n > len(cpus):  # one worker, or more workers than cores: nothing to split
        return
    try:  # worker i gets every n-th core (one core each with -n 2 on 2 cores)
        os.sched_setaffinity(0, set(cpus[i::n]))
    except OSError:  # a cpuset that refuses: run unpinned
        pass


def _jax_cache(config: pytest.Config) -> None:
    """With SPECJAX_TEST_JAX_CACHE=1: one JAX persistent compilation cache per test session,
    shared by the xdist workers and the processes the tests start (notebook kernels, CLI
    subprocesses), started empty in a fresh temporary directory and removed at the end.

    Off by default: it does not pay here, and writing to it once killed a worker. In a profile of
    the whole suite (2026-12-04, compile events logged per test) the workers wrote 276 programs
    and read back 27, saving 10 s of the 652 s of compilation; the files that start processes
    (test_notebooks, test_cli, test_multidevice, test_cache on two workers) took 147.7 s with the
    cache and 140.3 s without (user time 184.7 s -> 174.3 s). In that profiled run a worker died
    with SIGABRT inside XLA's `executable.serialize()` while writing a test_magpie program to
    the cache (not reproduced alone); xdist then hung at 97%."""
    if hasattr(config, "workerinput") or os.environ.get("SPECJAX_TEST_JAX_CACHE", "0") != "1":
        return  # workers inherit the controller's environment
    path = tempfile.mkdtemp(prefix="specjax-test-jax-cache-")
    config._specjax_jax_cache = path
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    import jax  # may already be imported (then the environment is not read again)

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
    path = getattr(config, "_specjax_jax_cache", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


# Ragged (5, 12, 16, 9 tokens: one prompt bucket of 16), two of them repetitive so that prompt
# lookup has something to find. Token 0 appears on purpose (it is not special here).
RAGGED_PROMPTS = [
    _rng.integers(0, VOCAB, 5).tolist(),
    [7, 8, 9, 10] * 3,
    [63, 54, 56, 94, 28, 82, 67, 0, 39, 86, 55, 3, 77, 73, 85, 17],
    [40, 41, 42] * 3,
]

_FAMILIES = {  # family -> (config class, model class) in transformers (imported when used)
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def build_hf_model(family: str = "llama", seed: int = 0, **overrides):
    """A float32 eval-mode HF causal LM with 2 layers (by default) and O(1)-scale random weights.

    HF's own init (std 0.02, zero biases, unit norms) gives near-uniform attention and tiny
    logits, under which a wrong RoPE or mask could still pass a 1e-4 parity check. So every
    weight is redrawn: embeddings ~ N(0, 1), matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0,
    0.1^2), biases ~ N(0, 1) (non-zero, so a dropped Qwen2 bias is caught).
    """
    import torch
    import transformers

    cfg_cls, model_cls = (getattr(transformers, n) for n in _FAMILIES[family])
    kw = dict(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # named_parameters() yields a tied lm_head/embedding only once.
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(noise)
            elif p.ndim == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:  # torch Linear weight: [out, in]
                p.copy_(noise / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="session")
def make_hf_model():
    """Factory fixture: `make_hf_model(family, seed=0, **config_overrides)` -> HF model."""
    return build_hf_model


def byte_bpe(corpus, size=300):
    """A tiny byte-level BPE tokenizer (trained in milliseconds, no download)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=["<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def target(make_hf_model):
    """The shared tiny target: a 3-layer GQA Llama (vocab 101) without EOS, as specjax model."""
    import specjax

    return specjax.model_from_hf(
        make_hf_model("llama", seed=0, num_hidden_layers=3, eos_token_id=None), name="tiny-llama"
    )


@pytest.fixture(scope="session")
def other(make_hf_model):
    """An independent 1-layer draft model with the target's vocabulary."""
    import specjax

    return specjax.model_from_hf(
        make_hf_model("llama", seed=1, num_hidden_layers=1, eos_token_id=None), name="tiny-draft"
    )


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, make_hf_model):
    """A tiny HF checkpoint directory (2-layer Llama) with a real tokenizer (byte-level BPE) and a
    chat template: what the CLI, autotune and notebook tests load by path."""
    tok = byte_bpe(["the cat sat on the mat. the dog sat on the log. " * 4])
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    hf = make_hf_model(
        "llama", seed=3, vocab_size=len(tok), num_hidden_layers=2, eos_token_id=tok.eos_token_id
    )
    path = str(tmp_path_factory.mktemp("tiny") / "hf")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path
