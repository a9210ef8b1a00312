"""A run's life on disk, for the TrainingMachine: writing checkpoints, resuming, restoring one.

- `save()`: the training state at this step into a checkpoint (checkpoint.py writes it atomically;
  a sharded run writes DCP shards from every rank). Weights and optimizer state are checked for
  NaN/Inf first: a non-finite checkpoint is never written, the run stops naming the tensors and the
  last good checkpoint. A failed write (a full disk, whatever the library raises) stops the run
  with one message naming the checkpoint, the cause and the intact previous one.
- `resume()`: the newest checkpoint that passes every check (checksums and schema:
  checkpoint.py; finiteness; that it fits this run: `check_fits`) is restored; one that fails is
  reported and an older one used. The config given to the resume is compared with the one on
  record (history.py): changes that would rewrite how the steps so far were made are refused,
  the others are recorded (`config-<step>.yaml`, a `resume` event). Nothing in the run directory
  is written before every check has passed, and a finished run resumed with nothing to do is left
  byte for byte as it was.
- `restore()`: structure first (the model plane of every phase entered so far, replayed), then
  weights, time, data and optimizer planes, RNG and history; last, the position of a run's own
  data stream (`data=ITERABLE`: its loader's state_dict, or a skip forward; training/user_data.py).
- `evaluation_machine()`: a machine holding a run's checkpoint for eval / generate / export /
  consolidate: no lock, nothing written.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stackwise import __version__
from stackwise.config import ConfigError, StackWiseConfig
from stackwise.data.cache import could_write
from stackwise.model import quant
from stackwise.model.lora import flatten_state, load_flat_state, load_nf4_state, nf4_state
from stackwise.training import distributed
from stackwise.training.adapters import ModelAdapter, OptimizerAdapter
from stackwise.training.checkpoint import (
    DCP_DIR,
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
    load_checkpoint,
    load_dcp,
    model_tensors,
    save_dcp,
)
from stackwise.training.checkpoint_schema import optimizer_tensors
from stackwise.training.errors import TrainingError
from stackwise.training.extend import extended_config
from stackwise.training.factories import build_model
from stackwise.training.finite import nonfinite_tensors
from stackwise.training.history import Changes, compare, refusal
from stackwise.training.loader import ProgressiveDataLoader
from stackwise.training.logger import MetricsLogger
from stackwise.training.optimizer import (
    load_state_by_name,
    optimizer_param_names,
    saved_state_by_name,
    state_by_name,
)
from stackwise.training.progressive import with_growth_schedule
from stackwise.training.result import Transition
from stackwise.training.schedule import TimeController

if TYPE_CHECKING:
    from stackwise.training.machine import TrainingMachine


class Lifecycle:
    """The machine's checkpoints and resume (the machine itself is the loop)."""

    def __init__(self, machine: TrainingMachine):
        self.m = machine

    # ---- saving ----------------------------------------------------------------------------

    def save(self) -> Path | None:
        m = self.m
        if m.checkpoints is None:
            return None
        if m.run is not None:
            m.run.check_owner()
        m._check_finite()  # never write a checkpoint after a NaN: the last good one must stay
        m._flush_losses()  # the history travels with the checkpoint
        state, meta = self._state(), self._meta()
        try:
            if m.dist.active:
                path = self._save_sharded(state, meta)
            else:
                optimizer = m.optim.optimizer
                state["optimizer"] = optimizer.state_dict() if optimizer else {}
                tensors, tied = model_tensors(m.model)
                self._refuse_nonfinite([*tensors.items(), *optimizer_tensors(state)])
                path = m.checkpoints.save(m.step, tensors, state, {**meta, "tied": tied})
        except (CheckpointWriteError, OSError) as err:
            good = m.checkpoints.list() if m.dist.is_main else []
            kept = f"the previous checkpoint {good[-1]} is intact" if good else "no earlier checkpoint exists"
            with contextlib.suppress(TrainingError):  # the metrics file may sit on the same full disk
                m.log.record("error", step=m.step, message=f"checkpoint write failed: {err}")
            raise TrainingError(f"writing the checkpoint of step {m.step} failed ({err}); {kept}. "
                                "Free disk space (or fix the folder's permissions) and resume.") from None
        m._saved_step = m.step
        m.log.record("checkpoint", step=m.step, t=m.t, path=str(path))
        m.events.emit("on_checkpoint", Path(path))
        return path

    def _state(self) -> dict[str, Any]:
        m = self.m
        optimizer = m.optim.optimizer
        state = {
            "time": m.time.state_dict(),
            "phase_index": m.phase_index,
            "optimizer_names": optimizer_param_names(optimizer) if optimizer else [],
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
            "losses": torch.tensor(m.losses, dtype=torch.float64),
            "tokens_seen": m.tokens_seen,
            "wall": m._wall,
            "transitions": [asdict(tr) for tr in m.transitions],
            **({"flops": m.flops.total} if m.flops.total is not None else {}),  # training FLOPs so far (exact)
            "last_eval": dict(m.last_eval),
            "metrics_lines": m.log.lines + 1,  # this checkpoint's own record included
        }
        if m.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state()
        data = m.data.state_dict()  # your own data's stream position (built-in data: none needed)
        if data is not None:
            state["data"] = data
        return state

    def _meta(self) -> dict[str, Any]:
        m = self.m
        return {"t": m.t, "phase": m.phase.name, "phase_index": m.phase_index, "total_steps": m.total_steps,
                "rack": m.model.rack.to_spec().to_dict(), "stackwise_version": __version__}

    def _refuse_nonfinite(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """No checkpoint holds NaN/Inf: a run resumed from it could only go on failing."""
        m = self.m
        bad = nonfinite_tensors(named)
        if not distributed.any_true(bool(bad), m.device):
            return
        good = m.checkpoints.list() if m.dist.is_main else []
        kept = f"the last good checkpoint is {good[-1]}" if good else "there is no earlier checkpoint"
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        names = ", ".join(bad[:5]) + more if bad else "(on another rank)"
        message = (f"the weights or optimizer state at step {m.step} hold non-finite values (NaN/Inf) in {names}; "
                   f"the checkpoint was not written ({kept})")
        with contextlib.suppress(TrainingError):
            m.log.record("error", step=m.step, message=message)
        raise TrainingError(message + ": lower the learning rate or enable gradient clipping, and resume from it")

    def _save_sharded(self, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """torchrun: every rank writes its shards of the weights and optimizer state (DCP) into
        rank 0's temporary folder; rank 0 adds the rest and renames the folder into place."""
        m = self.m
        optimizer = m.optim.optimizer
        moments = state_by_name(optimizer) if optimizer else {}
        state["optimizer_layout"] = {
            name: {key: _state_kind(value) for key, value in entries.items()} for name, entries in moments.items()
        }
        tensors = {name: {k: v for k, v in entries.items() if isinstance(v, torch.Tensor)} for name, entries in moments.items()}
        weights = m.model.state_dict()
        # Checked on this rank's shards, before any gather: a gathered NF4 tensor's inner tensors
        # are still in flight (functional collectives) until something waits on them.
        self._refuse_nonfinite([*weights.items(),
                                *((f"optimizer.{n}.{k}", v) for n, entries in tensors.items() for k, v in entries.items())])
        # NF4 weights travel whole, as their plain inner tensors: a 4-bit shard cannot be re-cut
        # for another number of ranks. They are frozen and small; every rank holds the same copy.
        nf4 = {name: distributed.full(t) for name, t in weights.items() if quant.is_nf4(distributed.local(t))}
        dense = {name: t for name, t in weights.items() if name not in nf4}
        tmp = Path(on_main(m.dist, lambda: str(m.checkpoints.begin(m.step)), CheckpointWriteError))
        try:
            save_dcp(tmp / DCP_DIR, {"model": dense, "nf4": flatten_state(nf4), "optim": tensors})
            failed = None
        except CheckpointError as err:  # a full disk on any rank fails the save on every rank
            failed = str(err)
        failed = distributed.broadcast_object(failed)
        if failed:
            if m.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(failed)
        path = on_main(m.dist, lambda: str(m.checkpoints.finish(tmp, m.step, state, meta)), CheckpointWriteError)
        return Path(path)

    # ---- resuming --------------------------------------------------------------------------

    def resume(self) -> None:
        m = self.m
        ckpt, changes = self._restore_newest()
        refusal = m.data.resume_refusal() if ckpt is not None else None
        if refusal:
            raise TrainingError(f"{ckpt.path}: {refusal}")
        if ckpt is not None and m.time.done and m._extended_from is None:
            m._idle = True  # a finished run, nothing to do: every file stays as it is
            return
        kept = None
        if m.dist.is_main:
            # Records written after the checkpoint belong to steps that will run again.
            MetricsLogger.truncate(m.run_dir, ckpt.state["metrics_lines"] if ckpt else 0)
            m.log.close()
            m.log = MetricsLogger(m.run_dir, m.total_steps, console=m.log.console, start_step=m.step)
            if changes or m._extended_from is not None:  # the config the earlier steps ran under stays on record
                kept = m.run.keep_config(m.step)
                m.run.write_file("config.yaml", m.config.to_yaml())
            if m._extended_from is not None:
                m.log.record("extend", step=m.step, t=m.t, from_steps=m._extended_from, to_steps=m.total_steps,
                             previous_config=kept)
                m.log.say(f"extending the run from {m._extended_from} to {m.total_steps} steps "
                          f"(the earlier config is kept as {kept})")
        where = f"from {ckpt.path}" if ckpt else "from step 0: the run stopped before its first checkpoint"
        m.log.record("resume", step=m.step, t=m.t, checkpoint=str(ckpt.path) if ckpt else None,
                     changes=changes.allowed, previous_config=kept)
        m.log.say(f"resumed {where} at step {m.step} (t={m.t:.3f}, phase {m.phase.name})")
        if changes.allowed and m._extended_from is None:
            m.log.say(f"changed on resume (the earlier config is kept as {kept}): " + "; ".join(changes.allowed))
        note = m.data.resume_note() if ckpt is not None else None
        if note is not None:  # your own data: where its stream goes on from (docs/data.md)
            m.log.record("data", step=m.step, event="resume", **note)
            m.log.say(note["message"])
        if m.phase_index >= 0:  # the restored phase goes on with its cache (and compiled stacks)
            m._start_phase_services(m.phase, m.phase_index)

    def _history(self, newest: Checkpoint | None) -> Changes:
        """The given config against the one on record, at the newest intact checkpoint (an older
        one, if that one does not fit, has entered no more phases: what is allowed stays allowed)."""
        m = self.m
        recorded = m._recorded
        if recorded is None:
            return Changes(allowed=["config.yaml: absent from the run directory (written now)"])
        step, index = (newest.step, newest.meta["phase_index"]) if newest else (0, -1)
        changes = compare(recorded, m.config, recorded_steps=recorded.training.total_steps or m.total_steps,
                          given_steps=m.total_steps, step=step, phase_index=index,
                          extending=m._extended_from is not None)
        if changes.refused:
            raise TrainingError(refusal(m.run_dir, changes))
        return changes

    def _restore_newest(self) -> tuple[Checkpoint | None, Changes]:
        """Check the given config against the record, then restore the newest checkpoint that
        passes every check and fits; one that fails while being restored is reported too, and the
        one before it tried on a fresh model. Nothing is written."""
        m = self.m
        if m.dist.active:  # rank 0 picks (and checks), every rank loads that one
            path, changes = on_main(m.dist, self._pick)
            ckpt = load_checkpoint(path) if path else None
            if ckpt is not None:
                self.restore(ckpt)
            return ckpt, changes
        bad: list[str] = []
        skip = self._skipper(bad)
        candidates = self._candidates(skip)
        newest = next(candidates, None)
        changes = self._history(newest)  # refused changes stop the resume here
        for ckpt in itertools.chain([newest] if newest else [], candidates):
            try:
                self.check_fits(ckpt)
            except CheckpointError as err:
                skip(ckpt.path, str(err))
                continue
            try:
                self.restore(ckpt)
                return ckpt, changes
            except CheckpointError as err:
                if m._given_model:
                    raise  # a model object changed half-way cannot be rebuilt for the next try
                skip(ckpt.path, str(err))
                self.reset_planes()
        if bad:
            raise TrainingError(f"{m.run_dir}: every checkpoint is damaged ({'; '.join(bad)}); nothing to resume")
        return None, changes

    def _pick(self) -> tuple[str | None, Changes]:
        bad: list[str] = []
        skip = self._skipper(bad)
        candidates = self._candidates(skip)
        newest = next(candidates, None)
        changes = self._history(newest)
        for ckpt in itertools.chain([newest] if newest else [], candidates):
            try:
                self.check_fits(ckpt)
                return str(ckpt.path), changes
            except CheckpointError as err:
                skip(ckpt.path, str(err))
        if bad:
            raise TrainingError(f"{self.m.run_dir}: every checkpoint is damaged ({'; '.join(bad)}); nothing to resume")
        return None, changes

    def _candidates(self, skip: Any) -> Iterator[Checkpoint]:
        """The intact checkpoints (checksums, schema, finite values), newest first, after tidying
        what a dead process left (we hold the lock, so nothing else is writing)."""
        for note in self.m.checkpoints.recover():
            self.m.log.say(f"checkpoints: {note}")
        return self.m.checkpoints.good(on_bad=skip)

    def _skipper(self, bad: list[str]) -> Any:
        def skip(path: Path, why: str) -> None:
            bad.append(why)
            self.m.log.say(f"skipping damaged checkpoint: {why}")

        return skip

    def check_fits(self, ckpt: Checkpoint) -> None:
        """That a checkpoint (already checked on its own) belongs to this run: run length, phase,
        step, rack structure. Raises CheckpointError, so a resume skips it for an older one."""
        m, meta = self.m, ckpt.meta
        made_for, index, step = meta["total_steps"], meta["phase_index"], meta["step"]
        if made_for != m.total_steps and not _extended_run(m.config, made_for):
            raise CheckpointError(f"{ckpt.path}: made for total_steps={made_for}, this run has {m.total_steps}")
        phases = m.schedule.phases
        if index >= len(phases):
            raise CheckpointError(f"{ckpt.path}: phase_index {index}, but the run has {len(phases)} phases")
        if index >= 0:
            first, end = m.schedule.step_ranges(m.total_steps)[index]
            if meta["phase"] != phases[index].name or not first <= step <= end:
                raise CheckpointError(f"{ckpt.path}: phase {meta['phase']!r} (index {index}) at step {step} does not fit "
                                      f"the run's phase {phases[index].name!r} (steps {first}-{end})")
        elif step != 0:
            raise CheckpointError(f"{ckpt.path}: step {step} but no phase entered")
        if m._planned is not None and meta["rack"] != m._planned[index + 1]:
            raise CheckpointError(f"{ckpt.path}: the rack it holds does not match the config's curriculum")

    def reset_planes(self) -> None:
        """A fresh model and optimizer plane (after a checkpoint failed half-way through restore)."""
        m = self.m
        with torch.random.fork_rng(devices=[]):
            m.model_plane = ModelAdapter(build_model(m.config, vocab_size=m.data.vocab_size), m.config)
        m.model.to(m.device)
        m.optim = OptimizerAdapter(m.config.training.optimizer)
        m.time = TimeController(m.total_steps)
        m.phase_index = -1
        m._forward = m._loss_unit = None

    # ---- restoring -------------------------------------------------------------------------

    def restore(self, ckpt: Checkpoint) -> None:
        try:
            self._restore(ckpt)
        except (ConfigError, CheckpointError, TrainingError):
            raise
        except (KeyError, IndexError, TypeError, ValueError) as err:  # a forged file the schema let through
            raise CheckpointError(f"{ckpt.path}: does not fit this run ({type(err).__name__}: {err})") from None

    def _restore(self, ckpt: Checkpoint) -> None:
        m = self.m
        state = ckpt.state
        self.check_fits(ckpt)
        # Structure first: replay the model plane of every phase entered so far, then the weights.
        index = state["phase_index"]
        for i in range(index + 1):
            m.model_plane.enter_phase(m.schedule.phases[i], i)
        m.model.to(m.device)
        if m.model.rack.to_spec().to_dict() != ckpt.meta["rack"]:
            raise CheckpointError(f"{ckpt.path}: the rack it holds does not match the config's curriculum")
        if not ckpt.sharded:
            _load_weights(m.model, ckpt)  # whole weights go in before FSDP shards the model
        else:
            self._load_sharded_nf4(ckpt)  # so do NF4 weights, stored whole
        # An extended run keeps its step; its phases were rewritten in steps (training/extend.py).
        m.time.load_state_dict({**state["time"], "total_steps": m.total_steps})
        if index >= 0:
            start_step = m.schedule.step_ranges(m.total_steps)[index][0]
            m.data.enter_phase(m.schedule.phases[index], index, start_step)
            m._wrap()
            m.optim.enter_phase(m.model, m.schedule.phases[index], m.model_plane.new_parameters)
            names = optimizer_param_names(m.optim.optimizer)
            if names != state["optimizer_names"]:
                _refuse_frozen_tied_embedding(m, names, state["optimizer_names"], index, ckpt.path)
                raise CheckpointError(f"{ckpt.path}: optimizer parameters differ from the rebuilt optimizer's")
            if ckpt.sharded:
                self._load_sharded(ckpt)
            else:
                saved = saved_state_by_name(state["optimizer"], state["optimizer_names"])
                _check_moments(m.optim.optimizer, saved, ckpt.path)  # a fused kernel would not check
                load_state_by_name(m.optim.optimizer, saved, place=distributed.shard_like)
            m._structure_settled()
        elif ckpt.sharded:
            self._load_sharded(ckpt)
        m.phase_index = index
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), None))
        if "cuda" in state["rng"] and m.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        m.losses = state["losses"].tolist()
        m.tokens_seen = state["tokens_seen"]
        m._wall = state["wall"]
        m.flops.total = state.get("flops")  # absent from checkpoints made before FLOPs were counted
        m.transitions = [Transition(**tr) for tr in state["transitions"]]
        m.last_eval = dict(state["last_eval"])
        m._saved_step = m.step
        m.data.load_state_dict(state.get("data"))  # last: a stateful loader is told only once all else fit

    def _load_sharded_nf4(self, ckpt: Checkpoint) -> None:
        nf4 = {name: torch.empty_like(t) for name, t in nf4_state(self.m.model).items()}
        if nf4:
            load_dcp(ckpt.path / DCP_DIR, {"nf4": nf4})
            load_nf4_state(self.m.model, nf4)

    def _load_sharded(self, ckpt: Checkpoint) -> None:
        """Weights and optimizer state from a DCP checkpoint, read straight into this run's
        layout (whole tensors, or this rank's shards): any number of ranks may have written it."""
        m = self.m
        optimizer = m.optim.optimizer
        params = dict(zip(optimizer_param_names(optimizer), (p for g in optimizer.param_groups for p in g["params"]),
                          strict=True)) if optimizer else {}
        layout = ckpt.state.get("optimizer_layout", {})
        moments = {name: {key: _empty_state(kind, params[name]) for key, kind in keys.items() if kind != "none"}
                   for name, keys in layout.items() if name in params}
        dense = {name: t for name, t in m.model.state_dict().items() if not quant.is_nf4(distributed.local(t))}
        load_dcp(ckpt.path / DCP_DIR, {"model": dense, "optim": moments})
        bad = nonfinite_tensors([*dense.items(), *((f"optimizer.{n}.{k}", v) for n, e in moments.items()
                                                    for k, v in e.items())])
        if distributed.any_true(bool(bad), m.device):
            raise CheckpointError(f"{ckpt.path}: holds non-finite values (NaN/Inf) in {', '.join(bad[:5]) or 'a shard'}")
        if optimizer:
            for name, keys in layout.items():  # entries that are None (SGD without momentum)
                moments.setdefault(name, {}).update({key: None for key, kind in keys.items() if kind == "none"})
            load_state_by_name(optimizer, moments)


# ---- the machine's config on resume, and evaluation ------------------------------------------


def _check_moments(optimizer: torch.optim.Optimizer, saved: dict[str, dict[str, Any]], where: Path) -> None:
    """Each saved moment has its parameter's shape and dtype kind, step counts are ≥ 0 and second
    moments ≥ 0: torch's fused AdamW reads mismatched tensors out of bounds instead of failing."""
    params = dict(zip(optimizer_param_names(optimizer), (p for g in optimizer.param_groups for p in g["params"]),
                      strict=True))
    for name, entries in saved.items():
        param = params.get(name)
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                continue
            if param is None or (value.ndim and tuple(value.shape) != tuple(param.shape)):
                shape = tuple(param.shape) if param is not None else "no such parameter"
                raise CheckpointError(f"{where}: optimizer state {name}.{key} has shape {tuple(value.shape)}, "
                                      f"the parameter {shape}")
            if not value.is_floating_point():
                raise CheckpointError(f"{where}: optimizer state {name}.{key} is not a floating-point tensor")
            if key in ("step", "exp_avg_sq", "max_exp_avg_sq") and value.numel() and bool((value < 0).any()):
                raise CheckpointError(f"{where}: optimizer state {name}.{key} holds negative values")


def _extended_run(config: StackWiseConfig, made_for: int) -> bool:
    """A checkpoint of a shorter run fits an extension of it (training/extend.py): an extended
    config states every phase in steps, so the phases a checkpoint of the first `made_for` steps
    went through have the same steps in both (`check_fits` then checks the phase and step)."""
    phases = config.schedule or []
    return made_for < config.resolved_total_steps() and bool(phases) and all(p.start_step is not None for p in phases)


def resumed_config(config: StackWiseConfig, run_dir: Path, total_steps: int | None,
                   extend: Any) -> tuple[StackWiseConfig, int | None, StackWiseConfig | None, int | None]:
    """(config, total_steps, the config on record, the run length extended from) of a resume:
    the run's own tokenizer, and `--steps N` / `--extend` turned into an extended config."""
    saved = run_dir / "config.yaml"
    recorded = with_run_tokenizer(with_growth_schedule(StackWiseConfig.from_yaml(saved)), run_dir) \
        if saved.is_file() else None
    config = with_run_tokenizer(config, run_dir)
    extended_from = None
    length = config.training.total_steps
    if extend is not None or (length is not None and total_steps not in (None, length)):
        # `--resume RUN --steps N`: the run continues past its end (training/extend.py).
        extended_from = config.resolved_total_steps()
        config, total_steps = extended_config(config, total_steps, extend), None
    return config, total_steps, recorded, extended_from


def with_run_tokenizer(config: StackWiseConfig, run_dir: Path) -> StackWiseConfig:
    """A resumed or evaluated run uses the tokenizer it was trained with, saved in its folder."""
    saved, settings = run_dir / "tokenizer.json", config.data.tokenizer
    if saved.is_file() and (settings.kind == "bpe" or settings.path is not None) and settings.path != str(saved):
        # Also when the config names a file elsewhere (an imported model's folder): the run's
        # copy holds any specials added to it, and the original may be gone.
        return config.with_overrides([f"data.tokenizer.path={str(saved)!r}"])
    return config


def evaluation_machine(cls: type[TrainingMachine], run_dir: Path, checkpoint: Any, data_settings: dict[str, Any]
                       ) -> TrainingMachine:
    """`TrainingMachine.for_evaluation`: reads the run, takes no lock and writes nothing."""
    config = with_run_tokenizer(StackWiseConfig.from_yaml(run_dir / "config.yaml"), run_dir)
    cache = config.data.cache_dir
    if cache and not could_write(Path(cache).expanduser()):  # a run folder copied to another machine
        config = config.with_overrides(["data.cache_dir=null"])  # the default cache ($STACKWISE_CACHE, ~/.cache)
    # The run's tokenizer and weights are all generation needs: no corpus is read until a batch
    # is asked for (scoring reads the corpus it scores, and only that one).
    machine = cls(config, run_dir=False, console=False, restoring=True, data=ProgressiveDataLoader(config, prepare=False))
    life = machine.lifecycle
    if checkpoint is not None:
        life.restore(load_checkpoint(checkpoint))
    else:
        bad: list[str] = []
        for ckpt in CheckpointManager(run_dir).good(on_bad=lambda path, why: bad.append(why), check=life.check_fits):
            try:
                life.restore(ckpt)
                break
            except CheckpointError as err:
                bad.append(str(err))
                life.reset_planes()
        else:
            detail = f" ({'; '.join(bad)})" if bad else ""
            raise CheckpointError(f"{run_dir}: no usable checkpoint{detail}")
    given = {k: v for k, v in data_settings.items() if v is not None}
    if given:
        machine.data.settings = {**machine.data.settings, **given}
        machine.data.loader.configure(**machine.data.settings)
    return machine


# ---- helpers -----------------------------------------------------------------------------------


def on_main(ctx: distributed.DistContext, work: Any, error: type[Exception] = TrainingError) -> Any:
    """Run `work()` on rank 0 and hand its result (or its error, raised as `error`) to every rank."""
    if not ctx.active:
        return work()
    outcome: tuple[Any, str | None] = (None, None)
    if ctx.is_main:
        try:
            outcome = (work(), None)
        except (TrainingError, CheckpointError, ConfigError, OSError) as err:
            outcome = (None, str(err))
    result, failed = distributed.broadcast_object(outcome)
    if failed is not None:
        raise error(failed)
    return result


def _load_weights(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    try:
        load_flat_state(model, ckpt.tensors)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{ckpt.path}: weights do not fit the model: {err}") from None


def _state_kind(value: Any) -> str:
    """How an optimizer state entry is stored: like its parameter, a scalar (step), or None."""
    if value is None:
        return "none"
    return "scalar" if value.ndim == 0 else "param"


def _empty_state(kind: str, param: torch.Tensor) -> torch.Tensor:
    """A tensor for DCP to fill: laid out like the parameter, or a step counter."""
    return torch.zeros_like(param) if kind == "param" else torch.zeros((), dtype=torch.float32)


def _refuse_frozen_tied_embedding(m: Any, names: list[str], saved: list[str], index: int, path: Path) -> None:
    """A checkpoint whose optimizer lacks exactly the tied embedding is no damage: it was made
    when `embedding: auto` froze a tied embedding (and so its head) under a frozen trunk; auto
    now trains it. Said as such (not skipped as damaged, which would resume an older checkpoint)."""
    tied = [name for name, p in m.model.named_parameters() if p is m.model.embedding.tokens.weight]
    if m.model.tied and set(names) - set(saved) == set(tied) and set(saved) <= set(names):
        raise ConfigError([(f"schedule.{index}.model_config.embedding", (
            f"{path} was made with the tied embedding and head frozen under the trunk, what `embedding: auto` "
            "did before it trained a tied head; this config trains them, so the run cannot continue exactly. "
            "Start a new run from its weights (model.init_from: RUN_DIR), with embedding: frozen in the phases "
            "to keep the old behaviour"), "auto")])
