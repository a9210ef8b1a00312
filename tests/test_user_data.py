"""Your own data: DataLoaders, generators and IterableDatasets of token ids as a run's data plane."""

import json
import pydoc_data.topics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from stackwise.data import ByteTokenizer, DataError
from stackwise.framework import BatchSpec, DataAdapter, build_data_loader
from stackwise.training import Phase, TrainingMachine
from stackwise.training.machine import TrainingError
from stackwise.training.user_data import UserData

T, B = 32, 8
MASK = ByteTokenizer.mask_id


@pytest.fixture(scope="module")
def windows():
    """Real text: CPython's documentation topics as byte-tokenizer ids, cut into (T+1)-windows."""
    topics = pydoc_data.topics.topics
    text = "\n".join(topics[k] for k in sorted(topics))[:120_000]
    ids = torch.tensor(ByteTokenizer().encode(text), dtype=torch.int64)
    n = len(ids) // (T + 1)
    return ids[: n * (T + 1)].view(n, T + 1)


def config(tmp_path=None, steps=None, **over):
    cfg = {
        "model": {"vocab_size": 259, "d_model": 32, "n_heads": 2, "max_seq_len": 64,
                  "architecture": {"n_stacks": 2, "blocks_per_stack": 1}},
        "training": {"batch_size": B, "seq_len": T, "optimizer": {"lr": 3e-3}, "seed": 1},
        "data": {},
        "run": {"log_every": 5, "eval_every": 1000, "eval_batches": 2,
                **({"dir": str(tmp_path / "runs")} if tmp_path else {})},
    }
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def records(run_dir, kind, **fields):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind and fields.items() <= r.items()]


def test_a_dataloader_of_real_text_trains(windows, capsys):
    loader = DataLoader(TensorDataset(windows[:-16]), batch_size=B, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(windows[-16:]), batch_size=B)
    machine = TrainingMachine(config(), total_steps=30, run_dir=False, data=loader, val_data=val)
    result = machine.train()
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 1.0, (first, last)  # from ~ln(259) = 5.6 towards text statistics
    assert result.tokens_seen == 30 * B * T
    # No tokenizer is known: loss and perplexity, no bits per byte.
    assert result.final_val_bpb is None
    assert machine.last_eval["val_ppl"] == pytest.approx(torch.tensor(result.final_val_loss).exp().item())
    assert "perplexity" in capsys.readouterr().err


def test_an_mlm_phase_masks_your_batches_and_scores_only_masked_positions(windows, tmp_path):
    ByteTokenizer().save(tmp_path)  # a known tokenizer: the [MASK] id and bits per byte
    cfg = config(data={"tokenizer": {"path": str(tmp_path / "tokenizer.json")}}, schedule=[
        {"name": "causal", "start_t": 0.0, "end_t": 0.5},
        {"name": "masked", "start_t": 0.5, "end_t": 1.0, "task": "mlm", "data_config": {"mask_rate": 0.3}}])
    loader = DataLoader(TensorDataset(windows), batch_size=B)  # in order: batch k is windows[kB:(k+1)B]
    machine = TrainingMachine(cfg, total_steps=6, run_dir=False, console=False, data=loader,
                              val_data=[windows[-B:]])
    seen = []
    draw = machine.data.batch
    machine.data.batch = lambda step, tau: seen.append(draw(step, tau)) or seen[-1]
    machine.train()
    for k, batch in enumerate(seen):
        original = windows[k * B:(k + 1) * B]
        if k < 3:  # clm: the windows shifted, every position scored
            assert batch.objective == "clm" and batch.loss_mask.all()
            assert torch.equal(batch.input_ids, original[:, :-1]) and torch.equal(batch.labels, original[:, 1:])
            continue
        tokens = original[:, :-1]
        assert batch.objective == "mlm" and batch.attention_mode == "bidirectional"
        assert (batch.input_ids == MASK).any()
        changed = batch.input_ids != tokens
        assert not (changed & ~batch.loss_mask).any()  # only selected positions are touched...
        assert torch.equal(batch.labels[batch.loss_mask], tokens[batch.loss_mask])  # ...and scored, on the originals
        assert batch.loss_weight[~batch.loss_mask].eq(0).all()
        assert 0.15 < batch.loss_mask.float().mean() < 0.45
    assert machine.last_eval["val_bpb"] > 0  # the tokenizer gives byte counts


def test_a_generator_of_dicts_with_labels_and_attention_mask(windows):
    def batches():
        for k in range(100):
            ids = windows[k * B:(k + 1) * B, :T].clone()
            mask = torch.ones_like(ids)
            mask[:, T - 5:] = 0  # right padding
            ids[:, T - 5:] = ByteTokenizer.pad_id
            labels = ids.clone()
            labels[:, :3] = -100  # HF: not scored
            yield {"input_ids": ids, "labels": labels, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    machine = TrainingMachine(config(), total_steps=4, run_dir=False, console=False, data=batches())
    machine.train_step()
    batch = machine.data.batch(1, 0.0)
    ids = windows[B:2 * B, :T]
    # Position t predicts labels[t+1]; scored unless that label is -100 or padding; the last has no target.
    expected = torch.zeros(B, T, dtype=torch.bool)
    expected[:, 2:T - 6] = True
    assert torch.equal(batch.loss_mask, expected) and batch.partial_loss
    assert torch.equal(batch.labels[expected], ids[:, 1:][expected[:, :-1]])
    assert batch.n_target_tokens == int(expected.sum())
    # The machine's loss is HF's masked cross-entropy.
    machine.model.eval()
    with torch.no_grad():
        nats = machine._forward(batch)
        logits = machine.model(batch.input_ids)
        hf_labels = torch.where(expected, batch.labels, torch.full_like(batch.labels, -100))
        manual = F.cross_entropy(logits.flatten(0, 1), hf_labels.flatten(), ignore_index=-100, reduction="sum")
    assert nats.item() == pytest.approx(manual.item(), rel=1e-5)
    machine.train_step()
    assert machine.step == 2


def test_an_iterable_dataset_works_and_grad_accum_splits_its_batches(windows):
    class Windows(IterableDataset):
        def __iter__(self):
            for k in range(len(windows) // B):
                yield windows[k * B:(k + 1) * B]

    one = TrainingMachine(config(), total_steps=3, run_dir=False, console=False, data=Windows()).train()
    two = TrainingMachine(config(training={"grad_accum_steps": 2}), total_steps=3, run_dir=False, console=False,
                          data=Windows()).train()
    assert one.losses == pytest.approx(two.losses, rel=1e-4)
    assert one.final_val_loss is None  # no val_data: evaluation skipped


class Stateful:
    """A tiny stateful loader (the protocol of torchdata's StatefulDataLoader)."""

    def __init__(self, windows):
        self.windows, self.next, self.served = windows, 0, []

    def __iter__(self):
        while self.next + B <= len(self.windows):
            self.served.append(self.next)
            self.next += B
            yield self.windows[self.next - B:self.next]
        self.next = 0

    def state_dict(self):
        return {"next": self.next}

    def load_state_dict(self, state):
        self.next = state["next"]


def run_killed_and_resumed(tmp_path, make_data, steps=10, kill_at=4):
    """(uninterrupted losses, resumed losses, resumed machine, its data): the second run is stopped
    after `kill_at` steps with its checkpoint on disk, and resumed in a new machine."""
    full = TrainingMachine(config(tmp_path / "a"), total_steps=steps, console=False, data=make_data()).train()
    first = TrainingMachine(config(tmp_path / "b"), total_steps=steps, console=False, data=make_data())
    for _ in range(kill_at):
        first.train_step()
    first.save_checkpoint()
    first.close()  # the process dies here: nothing else is written
    data = make_data()
    resumed = TrainingMachine(config(tmp_path / "b"), total_steps=steps, resume=first.run_dir, data=data)
    return full.losses, resumed.train().losses, resumed, data


def test_a_loader_with_state_dict_resumes_at_its_position(windows, tmp_path, capsys):
    full, resumed, machine, data = run_killed_and_resumed(tmp_path, lambda: Stateful(windows[:40]))
    assert resumed == full
    assert data.served[0] == 4 * B  # restored, not read again from the start (40 rows: a new pass at step 5)
    (note,) = records(machine.run_dir, "data", event="resume")
    assert note["resume"] == "restored" and note["batches"] == 4
    assert "state_dict was restored" in capsys.readouterr().err


def test_a_loader_state_a_checkpoint_cannot_read_back_is_refused(windows, tmp_path):
    class NumpyState(Stateful):
        def state_dict(self):
            return {"next": np.int64(self.next), "order": np.arange(3)}

    machine = TrainingMachine(config(tmp_path), total_steps=4, console=False, data=NumpyState(windows[:40]))
    machine.train_step()
    with pytest.raises(DataError, match=r"state_dict\(\) cannot be stored in a checkpoint.*numpy"):
        machine.save_checkpoint()
    machine.close()


def test_a_plain_generator_is_skipped_forward_on_resume_and_says_so(windows, tmp_path, capsys):
    def generator():
        return (windows[k * B:(k + 1) * B] for k in range(10))

    full, resumed, machine, _ = run_killed_and_resumed(tmp_path, generator)
    assert resumed == full  # a deterministic stream: skipping forward gives the same run
    (note,) = records(machine.run_dir, "data", event="resume")
    assert note["resume"] == "skip" and note["batches"] == 4
    assert "4 batches already seen are skipped" in capsys.readouterr().err
    assert records(machine.run_dir, "data", event="no_validation")
    with pytest.raises(TrainingError, match="trained on your own data"):  # resumed without data=
        TrainingMachine(config(tmp_path / "b"), total_steps=10, resume=machine.run_dir, console=False)


def test_restart_mode_and_a_one_shot_generator_that_runs_out(windows):
    data = UserData((windows[k * B:(k + 1) * B] for k in range(3)), BatchSpec(B, T, 259), on_resume="restart")
    note = data.load_state_dict({"kind": "user", "position": 2, "epoch": 0, "epoch_batches": 2, "rng": data._rng})
    assert note["resume"] == "restart" and "restarts from its first batch" in note["message"]
    for step in range(3):
        assert torch.equal(data.batch_at(step).input_ids, windows[step * B:(step + 1) * B, :T])
    with pytest.raises(DataError, match=r"ran out after 3 batches.*can be read once"):
        data.batch_at(3)


def bad(batch, at=0):
    good = torch.randint(0, 50, (4, 9))
    adapter = DataAdapter([good] * at + [batch], BatchSpec(4, 8, 50))
    for step in range(at):
        adapter.batch(step, 0.0)
    with pytest.raises(DataError) as err:
        adapter.batch(at, 0.0)
    return str(err.value)


def test_bad_batches_are_data_errors_that_name_the_problem():
    assert "batch 2 of your data: input_ids holds token id 50 at row 1, position 3" in \
        bad(torch.zeros(4, 9, dtype=torch.int64).index_put_((torch.tensor(1), torch.tensor(3)), torch.tensor(50)), at=2)
    assert "model.vocab_size" in bad(torch.full((4, 9), 77))
    assert "negative" in bad(torch.full((4, 9), -1))
    assert "torch.float32 tensor; token ids must be integers" in bad(torch.rand(4, 9))
    assert "1-D tensor" in bad(torch.zeros(9, dtype=torch.int64)) and "add the batch dimension" in bad(torch.zeros(9, dtype=torch.int64))
    assert "empty" in bad(torch.zeros(0, 9, dtype=torch.int64))
    assert "rows of 12 ids" in bad(torch.zeros(4, 12, dtype=torch.int64))
    assert "drop_last=True" in bad(torch.zeros(3, 9, dtype=torch.int64))
    assert "without 'input_ids'" in bad({"ids": torch.zeros(4, 9, dtype=torch.int64)})
    assert "labels has shape (4, 8)" in bad({"input_ids": torch.zeros(4, 9, dtype=torch.int64),
                                             "labels": torch.zeros(4, 8, dtype=torch.int64)})
    assert "no position is scored" in bad({"input_ids": torch.zeros(4, 9, dtype=torch.int64),
                                           "labels": torch.full((4, 9), -100)})
    assert "got str" in bad("not a batch")
    with pytest.raises(DataError, match="yielded no batch"):
        DataAdapter([], BatchSpec(4, 8, 50)).batch(0, 0.0)


def test_config_mismatches_fail_before_the_first_step(windows):
    loader = DataLoader(TensorDataset(windows), batch_size=B)
    no_vocab = config()
    del no_vocab["model"]["vocab_size"]
    with pytest.raises(DataError, match=r"model\.vocab_size is required"):
        TrainingMachine(no_vocab, total_steps=2, run_dir=False, data=loader)
    longer = config(schedule=[{"name": "a", "start_t": 0.0, "end_t": 0.5},
                              {"name": "b", "start_t": 0.5, "end_t": 1.0, "data_config": {"seq_len": 64}}])
    with pytest.raises(DataError, match=r"phase 'b' asks for seq_len 64 \(schedule\[1\].data_config.seq_len\)"):
        TrainingMachine(longer, total_steps=2, run_dir=False, data=loader)
    with pytest.raises(DataError, match=r"mlm.*\[MASK\] id is unknown"):
        TrainingMachine(config(data={"objective": "mlm"}), total_steps=2, run_dir=False, data=loader)
    with pytest.raises(TypeError, match="iterable of batches"):
        TrainingMachine(config(), total_steps=2, run_dir=False, data=windows)  # one tensor, not batches of it


def test_build_data_loader_returns_the_adapter_ready_object(windows):
    spec = BatchSpec(batch_size=B, seq_len=T, vocab_size=259, objective="diffusion", attention_mode="bidirectional")
    loader = DataLoader(TensorDataset(windows), batch_size=B)
    data = build_data_loader(loader, spec, tokenizer=ByteTokenizer())
    assert isinstance(data, UserData) and data.get_batch_spec() == spec
    adapter = DataAdapter(data)
    adapter.enter_phase(Phase("noise", 0.0, 1.0, task="diffusion", data={"mask_range": (0.5, 0.5)}), 0, 0)
    batch = adapter.batch(0, 0.0)
    assert batch.objective == "diffusion" and (batch.input_ids == MASK).float().mean() == pytest.approx(0.5, abs=0.1)
    assert batch.n_target_tokens == B * T and batch.n_target_bytes == B * T  # every id is one byte
    # The same object drives a machine (its vocabulary and shapes agree with the config).
    machine = TrainingMachine(config(), total_steps=2, run_dir=False, console=False, data=data)
    assert machine.train().steps == 2
