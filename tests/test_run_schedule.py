"""One schedule over the whole run: a run-wide lr shape (`over: run`), per-phase multipliers, the
warmup of the parameters a phase adds, and one window order across phases on the same corpus."""

import json
import math

import pytest

from stackwise.cli.plan import plan_rows
from stackwise.config import ConfigError, StackWiseConfig
from stackwise.training import TrainingMachine
from stackwise.training.loader import _permutation
from tests.runs import write_small_corpus

PEAK, FINAL, WARMUP = 2e-3, 2e-4, 0.1
RUN_WIDE = {"schedule": "cosine", "peak": PEAK, "final": FINAL, "warmup": WARMUP, "over": "run"}
GROW = {"grow": {"n": 1, "where": "append", "init": "identity"}}


def run_wide_lr(t):
    """The run-wide cosine written out: linear warmup over t < 0.1, then cosine to FINAL at t = 1."""
    if t < WARMUP:
        return PEAK * t / WARMUP
    progress = (t - WARMUP) / (1 - WARMUP)
    return FINAL + 0.5 * (PEAK - FINAL) * (1 + math.cos(math.pi * progress))


def config(schedule, lr=None, data=None, batch_size=4, seq_len=16, **run):
    return {
        "model": {"d_model": 32, "n_heads": 2, "max_seq_len": 32, "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
        "training": {"batch_size": batch_size, "seq_len": seq_len, "seed": 2, "optimizer": {"lr": lr or dict(RUN_WIDE)}},
        "data": data or {"use_dummy_data": True},
        "schedule": schedule,
        "run": {"eval_every": 1000, "eval_batches": 1, "log_every": 1, **run},
    }


def three_phases(**middle):
    """[0, 0.3) the starting rack; [0.3, 0.6) grows a stack (with `middle` optimizer settings);
    [0.6, 1) grows another."""
    return [
        {"name": "one", "start_t": 0.0, "end_t": 0.3},
        {"name": "two", "start_t": 0.3, "end_t": 0.6, "model_config": {**GROW, "trainable": "all"},
         "optimizer_config": middle},
        {"name": "three", "start_t": 0.6, "end_t": 1.0, "model_config": {**GROW, "trainable": "new"}},
    ]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- the run-wide lr ----------------------------------------------------------------------------


def test_a_run_wide_cosine_gives_the_formula_at_every_step_across_growth(tmp_path):
    machine = TrainingMachine(config(three_phases(), dir=str(tmp_path)), total_steps=20, console=False)
    for step in range(20):
        lr = machine.train_step()["lr"]
        assert lr == pytest.approx(run_wide_lr(step / 20), rel=1e-12, abs=1e-18), step
        assert all(g["lr"] == pytest.approx(lr, rel=1e-12) for g in machine.optim.optimizer.param_groups)
    assert [tr.step for tr in machine.transitions] == [6, 12]  # growth happened: no restart of the shape
    machine.close()
    logged = {r["step"]: r["lr"] for r in metrics(machine.run_dir) if r["kind"] == "step"}
    assert sorted(logged) == list(range(20))
    assert all(logged[k] == pytest.approx(run_wide_lr(k / 20), rel=1e-12, abs=1e-18) for k in logged)


def test_a_phase_multiplier_scales_the_run_wide_value_and_a_phase_lr_replaces_it():
    schedule = three_phases(lr_multiplier=0.5)
    schedule[2]["optimizer_config"] = {"lr": 1e-4}  # its own (per-phase) lr: today's meaning
    machine = TrainingMachine(config(schedule), total_steps=20, run_dir=False, console=False)
    lrs = [machine.train_step()["lr"] for _ in range(20)]
    assert lrs[:6] == pytest.approx([run_wide_lr(k / 20) for k in range(6)], rel=1e-12)
    assert lrs[6:12] == pytest.approx([0.5 * run_wide_lr(k / 20) for k in range(6, 12)], rel=1e-12)
    assert lrs[12:] == [1e-4] * 8


def test_new_parameters_warm_up_while_the_others_follow_the_run_wide_lr():
    # Phase "two" runs steps 6-11 (τ = 0, 1/6, ...) and adds stack 1; its new parameters warm up
    # over half the phase while stack 0, the embedding and the head keep the run-wide lr.
    machine = TrainingMachine(config(three_phases(warmup_new=0.5)), total_steps=20, run_dir=False, console=False)
    for _ in range(6):
        machine.train_step()
    for step in range(6, 12):
        lr = machine.train_step()["lr"]
        assert lr == pytest.approx(run_wide_lr(step / 20), rel=1e-12)
        groups = machine.optim.optimizer.param_groups
        new = [g for g in groups if g.get("new")]
        old = [g for g in groups if not g.get("new")]
        assert {n for g in new for n in g["names"]} == \
            {n for n, p in machine.model.named_parameters() if n.startswith("rack.stacks.1.")}
        assert all(n.startswith("rack.stacks.1.") for g in new for n in g["names"]) and old
        tau = (step - 6) / 6
        assert all(g["lr"] == pytest.approx(lr * min(1.0, tau / 0.5), rel=1e-12, abs=1e-18) for g in new)
        assert all(g["lr"] == pytest.approx(lr, rel=1e-12) for g in old)
        assert all(g["label"].endswith(":new") for g in new)


def test_a_resumed_run_is_exact_with_a_run_wide_lr_new_warmup_and_one_data_order(tmp_path):
    def cfg(name):
        return config(three_phases(warmup_new=0.5, lr_multiplier=0.7), dir=str(tmp_path), name=name)

    full = TrainingMachine(cfg("a"), total_steps=16, console=False).train()
    first = TrainingMachine(cfg("b"), total_steps=16, console=False)
    for _ in range(7):  # one step into phase "two": its new stack is warming up
        first.train_step()
    first.save_checkpoint()
    first.close()
    resumed = TrainingMachine(cfg("b"), total_steps=16, resume=tmp_path / "b", console=False)
    assert resumed.step == 7
    assert resumed.train().losses == full.losses


def test_plan_shows_the_run_wide_lr_at_each_phase_start_and_end():
    rows = plan_rows(StackWiseConfig.from_dict(config(three_phases(lr_multiplier=0.5, warmup_new=0.05))), 20)
    bounds = [(0.0, 0.3), (0.3, 0.6), (0.6, 1.0)]
    scale = [1.0, 0.5, 1.0]
    for row, (start, end), m in zip(rows, bounds, scale, strict=True):
        assert row["lr"].startswith(f"{m * run_wide_lr(start):.1e}→{m * run_wide_lr(end):.1e} (run cosine")
    assert "×0.5" in rows[1]["lr"] and "new params warm up 5%" in rows[1]["lr"]
    assert "×" not in rows[0]["lr"]


def test_per_phase_shapes_keep_their_meaning():
    """The default `over: phase`: each phase's shape restarts at its τ = 0 (today's behaviour)."""
    shape = {"schedule": "linear", "peak": 1e-3, "final": 0.0}
    machine = TrainingMachine(config(three_phases(), lr=shape), total_steps=10, run_dir=False, console=False)
    lrs = [machine.train_step()["lr"] for _ in range(10)]
    assert lrs == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3] * 2 + [1e-3, 7.5e-4, 5e-4, 2.5e-4], rel=1e-12)


@pytest.mark.parametrize(("where", "path"), [
    ({"training": {"optimizer": {"lr": {**RUN_WIDE, "over": "steps"}}}}, "training.optimizer.lr.over"),
    ({"schedule": [{"name": "a", "start_t": 0.0, "end_t": 1.0, "optimizer_config": {"lr": {"peak": 1e-3, "over": 1}}}]},
     "schedule.0.optimizer_config.lr.over"),
    ({"schedule": [{"name": "a", "start_t": 0.0, "end_t": 1.0, "optimizer_config": {"lr_multiplier": 0}}]},
     "schedule.0.optimizer_config.lr_multiplier"),
    ({"training": {"optimizer": {"warmup_new": 1.5}}}, "training.optimizer.warmup_new"),
])
def test_bad_values_are_config_errors_naming_the_field(where, path):
    cfg = config(three_phases())
    for section, value in where.items():
        cfg[section] = {**cfg[section], **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_dict(cfg)
    assert err.value.paths == [path]


# ---- one data order across phases -----------------------------------------------------------------


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two small corpora (about 130 windows of 33 tokens each, at seq_len 32)."""
    a = write_small_corpus(tmp_path_factory.mktemp("a"))
    b = write_small_corpus(tmp_path_factory.mktemp("b"))
    (b / "extra.txt").write_text("another corpus, with words of its own: order, counter, epoch, window.\n" * 8)
    return a, b


def sample_ids_per_step(machine):
    """Train to the end; the sample ids of every step's batch, in step order."""
    seen = []
    draw = machine.data.batch

    def record(step, tau):
        batch = draw(step, tau)
        seen.append(batch.sample_ids.tolist())
        return batch

    machine.data.batch = record
    machine.train()
    return seen


def n_windows(machine, paths, seq_len=32):
    """Training windows of a corpus at seq_len (the loader configured for it)."""
    machine.data.loader.configure(paths=[str(p) for p in paths], seq_len=seq_len)
    return machine.data.loader.n_train_windows


def corpus_run(corpora, schedule, total_steps):
    a, _ = corpora
    cfg = config(schedule, lr=3e-3, data={"paths": [str(a)]}, batch_size=8, seq_len=32)
    return TrainingMachine(cfg, total_steps=total_steps, run_dir=False, console=False)


def growth_on_one_corpus(batch_two=16):
    schedule = three_phases()
    schedule[1]["data_config"] = {"batch_size": batch_two, "objective": "mlm"}  # same corpus, other batch and task
    return schedule


def test_across_transitions_no_window_repeats_before_the_epoch_ends(corpora):
    machine = corpus_run(corpora, growth_on_one_corpus(), total_steps=10)
    steps = sample_ids_per_step(machine)
    n = machine.data.loader.n_train_windows
    ids = [i for step in steps for i in step]
    assert [len(s) for s in steps] == [8] * 3 + [16] * 3 + [8] * 4  # the counter counts samples, not steps
    assert len(ids) == 104 < n
    assert len(set(ids)) == len(ids)  # three phases, one order: all distinct
    assert ids == _permutation(2, 0, 0, n)[:104].tolist()  # the first phase's order, continued


def test_past_an_epoch_the_first_n_samples_are_every_window_once(corpora):
    machine = corpus_run(corpora, growth_on_one_corpus(batch_two=24), total_steps=12)
    ids = [i for step in sample_ids_per_step(machine) for i in step]
    n = machine.data.loader.n_train_windows
    assert len(ids) > n
    assert sorted(ids[:n]) == list(range(n))
    second = ids[n:]
    assert len(set(second)) == len(second)  # the second epoch repeats nothing within itself
    assert second != ids[:len(second)]  # and draws a new permutation


def test_a_phase_on_another_corpus_keeps_its_own_order(corpora):
    schedule = [
        {"name": "a1", "start_t": 0.0, "end_t": 0.25},
        {"name": "b", "start_t": 0.25, "end_t": 0.5, "data_config": {"paths": [str(corpora[1])]}},
        {"name": "a2", "start_t": 0.5, "end_t": 0.75, "model_config": {**GROW, "trainable": "new"}},
        {"name": "a_short", "start_t": 0.75, "end_t": 1.0, "data_config": {"seq_len": 16}},
    ]
    machine = corpus_run(corpora, schedule, total_steps=8)
    steps = sample_ids_per_step(machine)
    a, b = corpora
    n_a, n_b, n_a16 = n_windows(machine, [a]), n_windows(machine, [b]), n_windows(machine, [a], seq_len=16)
    assert n_a != n_b
    on_a = [i for step in steps[:2] + steps[4:6] for i in step]
    on_b = [i for step in steps[2:4] for i in step]
    on_a16 = [i for step in steps[6:] for i in step]
    assert on_a == _permutation(2, 0, 0, n_a)[:32].tolist()  # a2 continues a1's counter
    assert on_b == _permutation(2, 1, 0, n_b)[:16].tolist()  # b: its own order, from its start
    assert on_a16 == _permutation(2, 3, 0, n_a16)[:16].tolist()  # another seq_len: other windows, own order
