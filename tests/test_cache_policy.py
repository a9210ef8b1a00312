"""When the trunk activation cache exists: only where a phase's draws repeat a sample (or when
forced), with a spill file that grows with the rows it holds, and a planner that counts what the
phase can fill."""

import pytest
import torch

from stackwise.cli.plan import plan_rows
from stackwise.config import StackWiseConfig
from stackwise.training import TrainingMachine
from stackwise.training.cache import ActivationCache, cache_decision, expected_cache_hits
from stackwise.training.logger import read_metrics
from tests.runs import write_small_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_small_corpus(tmp_path_factory.mktemp("corpus"))  # 130 windows of 33 bytes


def config(tmp_path, corpus, split, **run):
    """Phase 'one' until `split`, then 'two' trains an appended stack on the frozen trunk. RAM
    budget 0: every cached row would go to the spill file."""
    return {
        # untied: a tied embedding trains with its head, and no trunk could be cached (docs/training.md)
        "model": {"d_model": 32, "n_heads": 2, "max_seq_len": 32, "tie_embeddings": False,
                  "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
        "training": {"batch_size": 8, "seq_len": 32, "optimizer": {"lr": 3e-3}, "seed": 1},
        "data": {"paths": [str(corpus)]},
        "schedule": [{"name": "one", "start_t": 0.0, "end_t": split},
                     {"name": "two", "start_t": split, "end_t": 1.0,
                      "model_config": {"grow": {"n": 1, "init": "identity"}, "trainable": "new"}}],
        "run": {"dir": str(tmp_path / "runs"), "eval_every": 1000, "eval_batches": 1, "log_every": 1000,
                "cache_ram_mb": 0, **run},
    }


def cache_events(machine):
    return [e for e in read_metrics(machine.run_dir) if e["kind"] == "cache"]


# ---- the decision -------------------------------------------------------------------------------


def test_hits_are_expected_only_past_an_epoch_boundary():
    assert expected_cache_hits(8_192, 53_930) == 0  # single-epoch pretraining: nothing repeats
    assert expected_cache_hits(53_930, 53_930) == 0
    assert expected_cache_hits(60_000, 53_930) == 60_000 - 53_930
    # From 50,000 draws into the epoch, 3,930 are left: the next draws cross into a new epoch.
    assert expected_cache_hits(3_930, 53_930, offset_in_epoch=50_000) == 0
    assert expected_cache_hits(8_192, 53_930, offset_in_epoch=50_000) == 8_192 - 3_930
    assert expected_cache_hits(10, 0) == 0  # no fixed windows


def test_auto_turns_an_idle_cache_off_and_true_forces_it_with_a_warning():
    args = (1, "clm", 0.15)
    off = cache_decision("auto", *args, phase="two", draws=8_192, n_windows=53_930)
    assert not off.on and off.off == "phase 'two' draws 8,192 samples of 53,930 windows (under one epoch), no sample repeats"
    forced = cache_decision(True, *args, phase="two", draws=8_192, n_windows=53_930)
    assert forced.on and "no hits are expected" in forced.warning
    repeating = cache_decision("auto", *args, phase="two", draws=60_000, n_windows=53_930)
    assert repeating.on and repeating.warning is None and repeating.hits == 6_070
    assert cache_decision(False, *args, phase="two", draws=60_000, n_windows=53_930).off == "run.activation_cache is false"
    # Invalid stays invalid, forced or not: nothing frozen below the trainable stacks.
    assert not cache_decision(True, 0, "clm", 0.15, phase="two", draws=60_000, n_windows=53_930).on


# ---- the machine ----------------------------------------------------------------------------------


def test_a_sub_epoch_frozen_phase_makes_no_cache_and_says_why(tmp_path, corpus):
    machine = TrainingMachine(config(tmp_path, corpus, 0.5), total_steps=8, console=False)
    n = machine.data.loader.n_train_windows
    assert n > 4 * 8  # phase 'two': 4 steps of 8 samples, under one epoch
    machine.train()
    two = cache_events(machine)[-1]
    assert two["phase"] == "two" and two["trunk_stacks"] == 1 and not two["on"]
    # Phase 'two' continues the order phase 'one' started 32 samples in: 32 more stay in its first epoch.
    assert machine.data.settings.get("order_offset", 0) in (0, 32)
    assert two["message"].startswith(f"activation cache off: phase 'two' draws 32 samples of {n} windows (")
    assert two["message"].endswith("no sample repeats") and two["expected_hits"] == 0
    assert machine.cache.cache is None and machine.cache.reason.endswith("no sample repeats")
    assert not (machine.run_dir / "cache").exists()  # no spill file was ever made


def test_a_multi_epoch_frozen_phase_caches_and_hits(tmp_path, corpus):
    machine = TrainingMachine(config(tmp_path, corpus, 0.125), total_steps=24, console=False)
    n = machine.data.loader.n_train_windows
    assert n < 21 * 8  # phase 'two': 21 steps of 8 samples, past one epoch
    while machine.step < 24:
        machine.train_step()
    cache = machine.cache.cache
    assert cache.stats.hits > 0 and 0 < cache.rows <= n  # each sample kept once, then read
    assert int(cache.filled.sum()) == cache.rows
    assert (machine.run_dir / "cache" / "activations.f32").stat().st_size == cache.rows * cache.row_bytes
    two = cache_events(machine)[-1]
    offset = machine.data.settings.get("order_offset", 0)  # what phase 'one' drew of the same order
    assert two["on"] and two["expected_hits"] == expected_cache_hits(21 * 8, n, offset) > 0
    assert two["message"].startswith("activation cache on")
    machine.close()
    assert not (machine.run_dir / "cache" / "activations.f32").exists()


def test_a_forced_cache_on_a_sub_epoch_phase_warns(tmp_path, corpus):
    machine = TrainingMachine(config(tmp_path, corpus, 0.5, activation_cache=True), total_steps=8, console=False)
    machine.train_step()
    machine.train_step()
    for _ in range(5):  # into phase 'two'
        machine.train_step()
    assert machine.cache.active and machine.cache.cache.stats.hits == 0
    two = cache_events(machine)[-1]
    assert two["on"] and "warning: run.activation_cache is true" in two["message"]
    assert "no hits are expected" in two["message"]
    machine.train()


# ---- the rows -----------------------------------------------------------------------------------


def test_the_spill_file_grows_with_the_rows_written_and_reads_back_exactly(tmp_path):
    seq, d = 4, 8
    row_bytes = seq * d * 4
    cache = ActivationCache(1000, seq, d, ram_budget_bytes=2 * row_bytes, spill_dir=tmp_path)  # 2 rows in RAM
    path = tmp_path / "activations.f32"
    assert not path.exists()  # nothing written, nothing on disk
    first = torch.randn(3, seq, d)
    cache.store(torch.tensor([900, 5, 41]), first)
    assert cache.nbytes_ram == 2 * row_bytes and path.stat().st_size == row_bytes
    second = torch.randn(3, seq, d)
    cache.store(torch.tensor([41, 7, 7]), second)  # 41 is kept already, 7 comes twice: one new row
    assert cache.rows == 4 and path.stat().st_size == 2 * row_bytes
    assert path.stat().st_blocks * 512 < 1000 * row_bytes  # not a sparse file of the full size
    got = cache.lookup(torch.tensor([41, 900, 7, 5]))
    want = torch.stack([first[2], first[0], second[1], first[1]])
    assert torch.equal(got, want)  # bit for bit, from RAM and from the file
    assert cache.lookup(torch.tensor([41, 3])) is None and cache.stats.misses == 2
    cache.close()
    assert not path.exists()


# ---- the planner ----------------------------------------------------------------------------------


def plan_cache(total_steps, n_windows, **run):
    cfg = StackWiseConfig.from_dict({
        # untied: a tied embedding trains with its head, and no trunk could be cached (docs/training.md)
        "model": {"d_model": 32, "n_heads": 2, "max_seq_len": 32, "tie_embeddings": False,
                  "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
        "training": {"batch_size": 8, "seq_len": 32, "total_steps": total_steps},
        "data": {"tokenizer": {"kind": "byte"}},
        "schedule": [{"name": "one", "start_t": 0.0, "end_t": 0.5},
                     {"name": "two", "start_t": 0.5, "end_t": 1.0, "model_config": {"grow": {"n": 1}, "trainable": "new"}}],
        "run": run,
    })
    rows = plan_rows(cfg, device="cpu", windows=lambda seq_len: n_windows)
    return [row["memory"].cache for row in rows]


ROW = 32 * 32 * 4  # one cached row: seq_len × d_model fp32


def test_the_planner_counts_no_cache_for_a_sub_epoch_phase():
    assert plan_cache(8, 1000) == [0, 0]  # phase 'two' draws 32 of 1000 windows


def test_the_planner_counts_what_the_phase_can_fill():
    assert plan_cache(100, 130) == [0, 130 * ROW]  # 400 draws: every window, once
    assert plan_cache(8, 1000, activation_cache=True) == [0, 32 * ROW]  # forced: the 32 it draws
    assert plan_cache(100, 130, cache_ram_mb=0) == [0, 0]  # all of it in the file on disk
    assert plan_cache(8, 1000, activation_cache=False) == [0, 0]


def test_a_batch_partly_cached_reads_its_cached_rows_and_computes_only_the_rest(tmp_path, corpus):
    # Phase 'two' crosses its epoch boundary partway: the first batches of the next epoch hold
    # both samples stored in the last epoch and samples not seen since the phase began.
    machine = TrainingMachine(config(tmp_path, corpus, 0.125), total_steps=24, console=False)
    losses, partial = [], 0
    while machine.step < 24:
        before = (machine.cache.cache.stats.hits, machine.cache.cache.stats.misses) if machine.cache.active else (0, 0)
        losses.append(float(machine.train_step()["loss"]))
        if machine.cache.active:
            hits = machine.cache.cache.stats.hits - before[0]
            partial += 0 < hits < hits + machine.cache.cache.stats.misses - before[1]
    assert partial > 0  # some batches mixed cached and computed rows
    # Growth draws its new stack from the global RNG: the reference runs after, not interleaved.
    reference = TrainingMachine(config(tmp_path, corpus, 0.125, name="nocache", activation_cache=False),
                                total_steps=24, console=False)
    expected = [float(reference.train_step()["loss"]) for _ in range(24)]
    assert losses == pytest.approx(expected, rel=1e-5)  # the same computation, rows read or computed
