"""The TrainingMachine: the one engine that runs every kind of run along normalized time t ∈ [0, 1].

Each step: find the phase of t (entering it if it is new: DESIGN.md section 5), set the learning
rate at the phase's local time τ, take the batch of this step (a pure function of seed and step),
forward / backward / update, log, evaluate and checkpoint when due, advance time.

A phase transition, in order: log it and checkpoint (the state at the end of the old phase);
model plane (grow, roles); data plane (new stream settings); optimizer plane (rebuild over the
trainable parameters, carrying state over by name); `validate_training_state`.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from stackwise import __version__
from stackwise.config import StackWiseConfig
from stackwise.data.batch import Batch
from stackwise.framework.adapters import DataAdapter, ModelAdapter, OptimizerAdapter
from stackwise.framework.factories import build_data_loader, build_model
from stackwise.model import StackWiseModel, quant
from stackwise.model.lora import flat_state, flatten_state, load_flat_state, load_nf4_state, nf4_state
from stackwise.specs import validate_training_state
from stackwise.training import distributed
from stackwise.training.cache import TrunkCache, cache_off_reason
from stackwise.training.callbacks import Callback, Events, RunView, build_callbacks, frozen
from stackwise.training.checkpoint import (
    DCP_DIR,
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    load_dcp,
    save_dcp,
)
from stackwise.training.extend import extended_config
from stackwise.training.forward import LossForward
from stackwise.training.init_from import initial_optimizer_state, load_initial_weights, resolve_init_from
from stackwise.training.logger import MetricsLogger
from stackwise.training.memory import first_trainable_stack
from stackwise.training.metrics import bits_per_byte
from stackwise.training.optimizer import (
    group_grad_norms,
    load_state_by_name,
    optimizer_param_names,
    saved_state_by_name,
    state_by_name,
)
from stackwise.training.progressive import apply_model_phase, with_growth_schedule
from stackwise.training.schedule import Phase, PhaseSchedule, TimeController, resolve_data


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, unusable run directory, ...); the message says why."""


@dataclass
class Transition:
    step: int
    t: float
    from_phase: str
    to_phase: str


@dataclass
class Planes:
    """The current triplet (Data_t, Model_t, Optimizer_t)."""

    data: DataAdapter
    model: StackWiseModel
    optimizer: torch.optim.Optimizer


@dataclass
class TrainResult:
    final_train_loss: float
    final_val_loss: float | None
    final_val_bpb: float | None
    tokens_seen: int
    steps: int
    wall_time: float
    transitions: list[Transition] = field(default_factory=list)
    run_dir: str | None = None
    losses: list[float] = field(default_factory=list)
    stopped: str | None = None  # the signal that stopped the run early (SIGTERM, SIGINT), if any

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("losses")
        return out


class TrainingMachine:
    """Runs a config (object, dict or YAML path) for `total_steps` steps.

    `run_dir`: where metrics, checkpoints and the resolved config go. Default: a new folder
    `run.dir/run.name` (suffixed -2, -3, ... rather than overwrite). `run_dir=False` keeps
    everything in memory (no files). `resume=RUN_DIR` continues that run from its newest good
    checkpoint. `model` / `data` accept ready-made objects instead of building them.
    `callbacks`: `Callback` objects told of the run's events (docs/events.md), besides the loggers
    named in `run.loggers`.
    """

    def __init__(
        self,
        config: StackWiseConfig | Mapping[str, Any] | str | os.PathLike[str],
        total_steps: int | None = None,
        *,
        run_dir: str | os.PathLike[str] | bool | None = None,
        resume: str | os.PathLike[str] | None = None,
        model: StackWiseModel | None = None,
        data: Any = None,
        console: bool = True,
        callbacks: Sequence[Callback] = (),
        extend: str | os.PathLike[str] | list[dict[str, Any]] | None = None,
        restoring: bool = False,
    ):
        # A new run resolves `model.init_from` (shapes, tokenizer) and later loads its weights; a
        # resumed run (or one `restoring` a checkpoint, as for_evaluation does) has both already.
        fresh = resume is None and not restoring
        config = StackWiseConfig.load(config)
        self.config = with_growth_schedule(resolve_init_from(config) if fresh else config)
        self._extended_from: int | None = None
        if resume is not None:
            self.config = _with_run_tokenizer(self.config, Path(resume))
            recorded = self.config.training.total_steps
            if extend is not None or (recorded is not None and total_steps not in (None, recorded)):
                # `--resume RUN --steps N`: the run continues past its end (training/extend.py).
                self._extended_from = self.config.resolved_total_steps()
                self.config, total_steps = extended_config(self.config, total_steps, extend), None
        elif extend is not None:
            raise TrainingError("extend= continues an existing run: pass resume=RUN_DIR too")
        self.total_steps = self.config.resolved_total_steps(total_steps)
        if self.config.training.total_steps != self.total_steps:
            # The resolved config on disk says how long the run is, so it alone can rerun it.
            self.config = self.config.with_overrides([f"training.total_steps={self.total_steps}"])
        self.schedule = PhaseSchedule.from_config(self.config, self.total_steps)
        self.time = TimeController(self.total_steps)
        self.dist = distributed.setup(self.config.run.distributed, self.config.run.device)
        self._check_distributed(model)
        self.device = _pick_device(self.config.run.device, self.dist)
        # Before any folder is made; a machine restoring a checkpoint for evaluation opens no loggers.
        self.events = Events(build_callbacks(self.config, callbacks, self.dist.is_main, config_loggers=not restoring),
                             self._view, lambda: self.log)
        self.autocast_dtype = _autocast_dtype(self.config.run.precision, self.device)
        if self.config.run.threads:
            torch.set_num_threads(self.config.run.threads)
        self.run_dir = _on_main(self.dist, lambda: _prepare_run_dir(self.config, run_dir, resume))
        if self.run_dir is not None and resume is None and self.dist.is_main:  # a resumed run rewrites it once restored
            self.config.to_yaml(self.run_dir / "config.yaml")
        torch.manual_seed(self.config.training.seed)

        loader = build_data_loader(data if data is not None else self.config,
                                   run_dir=self.run_dir if self.dist.is_main else None)
        self.data = DataAdapter(loader, self.config, self.dist.rank, self.dist.world_size)
        self.model_plane = ModelAdapter(build_model(model or self.config, vocab_size=loader.vocab_size), self.config)
        self._initial_optimizer_state: dict[str, Any] = {}
        if fresh and model is None and self.config.model.init_from:
            source = load_initial_weights(self.config, self.model)
            self._initial_optimizer_state = initial_optimizer_state(self.config, source, self.model)
        self.model.to(self.device)
        self.optim = OptimizerAdapter(self.config.training.optimizer)
        spill = self.run_dir / "cache" if self.run_dir else None
        if spill is not None and self.dist.active:
            spill = spill / f"rank{self.dist.rank}"  # each rank caches its own samples
        self.cache = TrunkCache(self.config.run.cache_ram_mb, spill)
        self._loss_unit: LossForward | None = None  # the step's loss as one module call
        self._forward: torch.nn.Module | None = None  # the same, wrapped for DDP / FSDP2

        self.phase_index = -1
        self.transitions: list[Transition] = []
        self.losses: list[float] = []
        self.tokens_seen = 0
        self.last_eval: dict[str, float] = {}
        self._pending_losses: list[torch.Tensor] = []
        self._window_start = time.perf_counter()
        self._window_tokens = 0
        self._wall = 0.0
        self._saved_step = -1  # the step of the newest checkpoint on disk (saved or resumed from)
        self._first_bad_step = torch.tensor(-1, device=self.device)
        self._bad_group_norms = torch.zeros(0, device=self.device)  # sized per phase
        self._first_trainable = 0  # the lowest stack that trains (set per phase)
        self._grad_norm = torch.zeros(())
        self._config_view: Mapping[str, Any] | None = None
        self.checkpoints = CheckpointManager(self.run_dir, self.config.run.keep_last) if self.run_dir else None
        self.log = self._logger(console)
        if resume is not None:
            self._resume()

    def _logger(self, console: bool) -> MetricsLogger:
        """Metrics and console lines come from rank 0 alone."""
        if self.dist.is_main:
            return MetricsLogger(self.run_dir, self.total_steps, console=console)
        return MetricsLogger(None, self.total_steps, console=False)

    # ---- callbacks (docs/events.md) ---------------------------------------------------------

    def _view(self) -> RunView:
        if self._config_view is None:
            self._config_view = frozen(self.config.to_dict())
        index = self.phase_index if self.phase_index >= 0 else \
            self.schedule.index_at_step(min(self.step, self.total_steps - 1), self.total_steps)
        return RunView(step=self.step, t=self.t, total_steps=self.total_steps, phase=self.schedule.phases[index].name,
                       phase_index=index, run_dir=self.run_dir, config=self._config_view,
                       tokens_seen=self.tokens_seen, last_eval=frozen(self.last_eval))

    def _check_distributed(self, model: StackWiseModel | None) -> None:
        if not self.dist.active:
            return
        if self.config.run.compile:
            raise TrainingError("run.compile is not supported in a distributed run yet; set run.compile=false")
        if self.dist.sharded and model is not None:
            raise TrainingError("run.distributed=fsdp rebuilds the model from the config at each phase; "
                                "pass the model through the config, not as an object")
        parts = self.config.training.grad_accum_steps * self.dist.world_size
        for phase in self.schedule.phases:
            size = resolve_data(self.config, phase, tau=None)["batch_size"]
            if size % parts:
                raise TrainingError(
                    f"phase {phase.name!r}: batch size {size} does not split into {self.dist.world_size} ranks × "
                    f"{self.config.training.grad_accum_steps} micro-batches; make training.batch_size (and any "
                    f"phase data_config.batch_size) a multiple of {parts}")

    # ---- what the machine knows at every step -------------------------------------------

    @property
    def model(self) -> StackWiseModel:
        return self.model_plane.model

    @property
    def step(self) -> int:
        return self.time.step

    @property
    def t(self) -> float:
        return float(self.time.t)

    @property
    def phase(self) -> Phase:
        return self.schedule.phases[self.phase_index] if self.phase_index >= 0 else self.schedule.at(self.t)

    @property
    def planes(self) -> Planes:
        self._sync_phase()
        return Planes(self.data, self.model, self.optim.optimizer)

    # ---- phases -------------------------------------------------------------------------

    def _sync_phase(self) -> None:
        """Enter the phase of the current step if it is not the active one."""
        if self.time.done:
            return
        index = self.schedule.index_at_step(self.step, self.total_steps)
        if index == self.phase_index:
            return
        transition = None
        if self.phase_index >= 0:
            # The checkpoint holds the end of the old phase; a run resumed from it redoes this
            # transition, so it is saved before the transition is recorded.
            if self.config.run.checkpoint_at_transitions and self._saved_step != self.step:
                self.save_checkpoint()
            old, new = self.schedule.phases[self.phase_index].name, self.schedule.phases[index].name
            transition = Transition(self.step, self.t, old, new)
            self.transitions.append(transition)
            self.log.record("transition", step=self.step, t=self.t, **{"from": old, "to": new})
            self.log.say(f"phase {old} → {new} at step {self.step} (t={self.t:.3f})")
        self._enter_phase(index)
        if transition is not None:
            self.events.emit("on_phase_transition", replace(transition))

    def _enter_phase(self, index: int) -> None:
        self._check_finite()  # a fault of the old phase is reported before its structure changes
        phase = self.schedule.phases[index]
        start_step = self.schedule.step_ranges(self.total_steps)[index][0]
        if self.dist.sharded and self._forward is not None:
            self._gather_plain_model()
        self.model_plane.enter_phase(phase, index)
        self.model.to(self.device)
        self.data.enter_phase(phase, index, start_step)
        self._wrap()
        self.optim.enter_phase(self.model, phase)
        if self._initial_optimizer_state:  # model.init_from_optimizer: the source's moments, once
            load_state_by_name(self.optim.optimizer, self._initial_optimizer_state, place=distributed.shard_like)
            self._initial_optimizer_state = {}
        self._structure_settled()
        self.phase_index = index
        try:
            validate_training_state(self.data.spec(), self.model_plane.spec(), self.optim.spec())
        except ValueError as err:
            raise TrainingError(f"phase {phase.name!r} (step {self.step}) does not fit together:\n{err}") from None
        self._start_phase_services(phase, index)

    def _structure_settled(self) -> None:
        """After the model plane and optimizer of a phase are in place (entered or restored):
        what the step derives from them is computed once here, not on every step."""
        self._first_trainable = first_trainable_stack(self.model)
        self._loss_unit.first_trainable = self._first_trainable
        self._bad_group_norms = torch.zeros(len(self.optim.optimizer.param_groups), device=self.device)

    def _wrap(self) -> None:
        """This phase's model as the unit that computes a micro-batch's loss: called as is in one
        process, wrapped by DDP, or sharded by FSDP2 (blocks, then the rest as the root unit).
        DDP is rebuilt at every phase because it fixes its set of trainable parameters."""
        agree = (lambda hit: distributed.all_true(hit, self.device)) if self.dist.sharded else (lambda hit: hit)
        self._loss_unit = LossForward(self.model, self.cache, first_trainable_stack(self.model), agree)
        blocks = [block for stack in self.model.rack for block in stack.blocks]
        self._forward = distributed.wrap(self._loss_unit, blocks, self.dist, self.device)

    def _gather_plain_model(self) -> None:
        """FSDP2: a phase may grow, freeze or quantize stacks, which sharded modules cannot do, so
        the weights are gathered whole into a freshly built model of the same structure (its
        throwaway initialisation under a forked RNG, so the run's random stream is untouched);
        `_wrap` shards it again once the phase has changed it. Optimizer state stays sharded and
        is handed over by parameter name."""
        whole = distributed.full_state_dict(self.model)
        with torch.random.fork_rng(devices=[]):
            plain = build_model(self.config, vocab_size=self.data.vocab_size)
            for i in range(self.phase_index + 1):
                apply_model_phase(plain, self.schedule.phases[i].model, i, self.config)
        load_flat_state(plain, flatten_state(whole))
        self.model_plane.model = plain.to(self.device)

    def _start_phase_services(self, phase: Phase, index: int) -> None:
        """Compile new stacks (run.compile) and open the phase's activation cache."""
        if self.config.run.compile:
            compile_stacks(self.model)
        self._open_cache(phase, index)

    def _open_cache(self, phase: Phase, index: int) -> None:
        first = self._first_trainable
        settings = self.data.settings
        reason = cache_off_reason(self.config.run.activation_cache, first, settings["objective"], settings["mask_rate"])
        context = (self.model_plane.trunk_version, index)
        message = self.cache.enter(context, reason, self.data.loader.n_train_windows, settings["seq_len"], self.model.cfg.d_model)
        self.log.record("cache", step=self.step, phase=phase.name, trunk_stacks=first, message=message)
        self.log.say(message)

    # ---- one step -----------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """Run exactly one step; returns its step index, t, phase, loss (a tensor) and lr."""
        if self.time.done:
            raise TrainingError(f"the run is over: all {self.total_steps} steps have run")
        self.events.begin()
        self.events.raise_pending()  # on_run_start failed: no step runs
        started = time.perf_counter()
        self._sync_phase()
        step, t, phase = self.step, self.t, self.phase
        tau = phase.local_time(t)
        lr = self.optim.set_lr(tau)
        batch = self.data.batch(step, tau)
        loss = self._update(batch)
        self._pending_losses.append(loss)
        self.tokens_seen += batch.n_tokens * self.dist.world_size  # every rank's slice is as large
        self._window_tokens += batch.n_tokens * self.dist.world_size
        self.time.advance()
        self._wall += time.perf_counter() - started
        self._after_step(step, t, phase, lr)
        if self.events.callbacks:
            # The loss is on the host only if this step's window was flushed (log or checkpoint).
            value = self.losses[-1] if not self._pending_losses and self.losses else None
            self.events.emit("on_step_end", {"step": step, "t": t, "phase": phase.name, "lr": lr,
                                       "tokens": self.tokens_seen, "loss": value})
        self.events.raise_pending()
        return {"step": step, "t": t, "phase": phase.name, "loss": loss, "lr": lr}

    def _update(self, batch: Batch) -> torch.Tensor:
        """Forward, backward (over grad_accum_steps micro-batches), clip, optimizer step."""
        optimizer = self.optim.optimizer
        self._train_mode()
        parts = self.config.training.grad_accum_steps
        total = torch.zeros((), device=self.device)
        denominator = self._loss_denominator(batch)
        for i, micro in enumerate(_split(batch, parts)):
            micro = micro.to(self.device, non_blocking=True)
            with distributed.no_gradient_sync(self._forward, self.dist, sync=i == parts - 1):
                with self._autocast():
                    loss_sum = self._forward(micro)
                loss = loss_sum / denominator
                loss.backward()
            total += loss.detach()
        norm, group_norms = group_grad_norms(optimizer, self.optim.cfg.grad_clip, sharded=self.dist.sharded)
        self._grad_norm = norm
        finite = torch.isfinite(total) & torch.isfinite(norm)
        if self.dist.active:  # every rank takes (or skips, or stops at) the same update
            finite = distributed.all_reduce(finite.to(torch.int32), "min").bool()
        if self.config.run.on_nonfinite == "skip_step":
            if not bool(finite):  # the one host sync per step this mode costs
                optimizer.zero_grad(set_to_none=True)
                self.log.record("skip", step=self.step, t=self.t, phase=self.phase.name,
                                groups=self._group_labels(torch.isfinite(group_norms)))
                return total
        else:
            # Remember the first non-finite step and its group norms on the device; the run
            # stops at the next host sync (log step or checkpoint), naming that step.
            first = self._first_bad_step < 0
            self._first_bad_step = torch.where(first & ~finite, self.step, self._first_bad_step)
            self._bad_group_norms = torch.where(first & ~finite, group_norms, self._bad_group_norms)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    def _loss_denominator(self, batch: Batch) -> float | torch.Tensor:
        """The step's loss is Σ ce·w over the whole (global) batch divided by its target count,
        so accumulation and data parallelism both equal one big batch. DDP and FSDP average
        gradients over the ranks, so each rank divides by (global count / ranks)."""
        if not self.dist.active:
            return batch.n_target_tokens
        count = torch.tensor(float(batch.n_target_tokens), device=self.device, dtype=torch.float64)
        return (distributed.all_reduce(count, "sum") / self.dist.world_size).float()

    def _group_labels(self, finite: torch.Tensor) -> list[str]:
        groups = self.optim.optimizer.param_groups
        return [g.get("label", str(i)) for i, (g, ok) in enumerate(zip(groups, finite.tolist(), strict=True)) if not ok]

    def _check_finite(self) -> None:
        """Stop if a non-finite loss or gradient appeared since the last check (a host sync)."""
        bad_step = int(self._first_bad_step)
        if bad_step < 0:
            return
        phase = self.schedule.phase_at_step(bad_step, self.total_steps).name
        groups = self._group_labels(torch.isfinite(self._bad_group_norms)) or ["(the loss itself)"]
        message = (f"non-finite loss or gradient at step {bad_step} (t={bad_step / self.total_steps:.4f}, phase {phase!r}), "
                   f"parameter groups {groups}; no checkpoint was written after it")
        self.log.record("error", step=bad_step, phase=phase, groups=groups, message=message)
        raise TrainingError(message + ": lower the learning rate, enable gradient clipping, or set run.on_nonfinite=skip_step")

    def _train_mode(self) -> None:
        """Training mode for what trains; the frozen trunk below it runs as in evaluation (no
        dropout), which keeps its output a pure function of the sample, hence cacheable."""
        self.model.train()
        first = self._first_trainable
        if first > 0:
            self.model.embedding.eval()
            for stack in list(self.model.rack)[:first]:
                stack.eval()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- logging, evaluation, checkpoints -----------------------------------------------

    def _after_step(self, step: int, t: float, phase: Phase, lr: float) -> None:
        done = self.step
        phase_end = self.schedule.step_ranges(self.total_steps)[self.phase_index][1]
        if done % self.config.run.log_every == 0 or done == phase_end or done == self.total_steps:
            self._log_window(step, t, phase, lr)
        if done % self.config.run.eval_every == 0 or done == phase_end:
            self.evaluate()
        every = self.config.run.checkpoint_every
        if every and done % every == 0 and done != self.total_steps:
            self.save_checkpoint()

    def _flush_losses(self) -> list[float]:
        """The losses of the steps since the last flush, moved to the host (one sync per logged
        window, not per step); under torchrun each rank's share is summed into the global batch's."""
        if not self._pending_losses:
            return []
        values = distributed.all_reduce(torch.stack(self._pending_losses), "mean").tolist()
        self._pending_losses.clear()
        self.losses.extend(values)
        return values

    def _log_window(self, step: int, t: float, phase: Phase, lr: float) -> None:
        values = self._flush_losses()
        self._check_finite()
        loss = values[-1]
        elapsed = time.perf_counter() - self._window_start
        record = dict(
            step=step, t=t, phase=phase.name, loss=loss, loss_mean=sum(values) / len(values), lr=lr,
            tokens=self.tokens_seen, tokens_per_s=self._window_tokens / max(elapsed, 1e-9),
            grad_norm=float(self._grad_norm), trainable_params=self.model.num_parameters(trainable_only=True),
            peak_mem_mb=_peak_memory_mb(self.device),
        )
        self.log.step(**record)
        self.events.emit("on_log", record)
        self._window_start, self._window_tokens = time.perf_counter(), 0

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Loss and bits per byte on the validation split, in the current phase's data settings."""
        self.model.eval()
        if self._forward is None:  # a machine that has not entered a phase yet
            self._wrap()
        batches = list(self.data.validation(max_batches or self.config.run.eval_batches))
        rank, ranks = self.dist.rank, self.dist.world_size
        mine = batches[rank::ranks]
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, targets, bytes
        # Under torchrun the ranks share the batches; all make the same number of calls (FSDP
        # gathers weights collectively), a rank without a batch left scoring a copy it ignores.
        for i in range(-(-len(batches) // ranks)):
            batch = (mine[i] if i < len(mine) else batches[0]).to(self.device)
            with self._autocast():
                nats = self._forward(batch).double()
            if i < len(mine):
                totals[0] += nats
                totals[1] += batch.n_target_tokens
                totals[2] += batch.n_target_bytes
        total_nats, n_targets, n_bytes = distributed.all_reduce(totals, "sum").tolist()
        result = {"val_loss": total_nats / max(n_targets, 1), "val_bpb": bits_per_byte(total_nats, n_bytes) if n_bytes else float("nan")}
        self.last_eval = result
        self.log.record("eval", step=self.step, t=self.t, phase=self.phase.name, **result)
        self.log.say(f"eval at step {self.step}: val loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits/byte")
        self.events.emit("on_eval", dict(result))
        return result

    def train(self) -> TrainResult:
        """Run to t = 1 (from wherever the machine stands) and return the result.

        SIGTERM or SIGINT (Ctrl-C) stop the run gracefully: the current step finishes, a
        checkpoint is written, and the result says `stopped`; a second Ctrl-C interrupts at once.
        """
        self.stopped = None
        try:
            self.events.begin()
            self.events.raise_pending()
            with _StopSignals() as stop:
                # Under torchrun a signal may reach the ranks at different steps: all stop together.
                while not self.time.done and not distributed.any_true(stop.signal is not None, self.device):
                    self.train_step()
                self.stopped = stop.signal or ("SIGTERM" if not self.time.done else None)
            if self.stopped:
                self.save_checkpoint()
                where = f"; resume with: stackwise train --resume {self.run_dir}" if self.run_dir else ""
                self.log.record("stop", step=self.step, t=self.t, signal=self.stopped)
                self.log.say(f"stopped by {self.stopped} after {self.step} steps{where}")
                self.events.emit("on_stop", self.stopped)
            else:
                if self.losses and not self.last_eval:
                    self.evaluate()
                if self._saved_step != self.step:
                    self.save_checkpoint()
            self.events.raise_pending()
        except BaseException as err:
            self.events.exception(err)
            raise
        finally:
            self.cache.close()
            self.log.close()
        result = self.result()
        self.events.emit("on_run_end", result)
        self.events.raise_pending()
        return result

    def result(self) -> TrainResult:
        return TrainResult(
            final_train_loss=self.losses[-1] if self.losses else float("nan"),
            final_val_loss=self.last_eval.get("val_loss"),
            final_val_bpb=self.last_eval.get("val_bpb"),
            tokens_seen=self.tokens_seen,
            steps=self.step,
            wall_time=self._wall,
            transitions=list(self.transitions),
            run_dir=str(self.run_dir) if self.run_dir else None,
            losses=list(self.losses),
            stopped=getattr(self, "stopped", None),
        )

    # ---- checkpoint and resume ----------------------------------------------------------

    @classmethod
    def for_evaluation(cls, run_dir: str | os.PathLike[str], *, checkpoint: str | os.PathLike[str] | None = None,
                       **data_settings: Any) -> TrainingMachine:
        """A machine holding a finished (or interrupted) run's newest good checkpoint (or the
        given `checkpoint` folder), for evaluation, generation or export, in one process whatever
        number of ranks wrote it. Nothing in the run directory is written. `data_settings`
        (paths, objective, mask_rate, mask_range, seq_len, ...) replace those of the checkpoint's
        phase, e.g. to score a run on another corpus or with another masking."""
        run_dir = Path(run_dir)
        config = _with_run_tokenizer(StackWiseConfig.from_yaml(run_dir / "config.yaml"), run_dir)
        if checkpoint is not None:
            ckpt = load_checkpoint(checkpoint)
        else:
            bad: list[str] = []
            ckpt = CheckpointManager(run_dir).latest_good(on_bad=lambda path, why: bad.append(why))
            if ckpt is None:
                detail = f" ({'; '.join(bad)})" if bad else ""
                raise CheckpointError(f"{run_dir}: no usable checkpoint{detail}")
        machine = cls(config, run_dir=False, console=False, restoring=True)
        machine._restore(ckpt)
        given = {k: v for k, v in data_settings.items() if v is not None}
        if given:
            machine.data.settings = {**machine.data.settings, **given}
            machine.data.loader.configure(**machine.data.settings)
        return machine

    def save_checkpoint(self) -> Path | None:
        if self.checkpoints is None:
            return None
        self._check_finite()  # never write a checkpoint after a NaN: the last good one must stay
        self._flush_losses()  # the history travels with the checkpoint
        optimizer = self.optim.optimizer
        state = {
            "time": self.time.state_dict(),
            "phase_index": self.phase_index,
            "optimizer_names": optimizer_param_names(optimizer) if optimizer else [],
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "tokens_seen": self.tokens_seen,
            "wall": self._wall,
            "transitions": [asdict(tr) for tr in self.transitions],
            "last_eval": dict(self.last_eval),
            "metrics_lines": self.log.lines + 1,  # this checkpoint's own record included
        }
        if self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state()
        meta = {
            "t": self.t,
            "phase": self.phase.name,
            "phase_index": self.phase_index,
            "total_steps": self.total_steps,
            "rack": self.model.rack.to_spec().to_dict(),
            "stackwise_version": __version__,
        }
        try:
            if self.dist.active:
                path = self._save_sharded(state, meta)
            else:
                state["optimizer"] = optimizer.state_dict() if optimizer else {}
                path = self.checkpoints.save(self.step, flat_state(self.model), state, meta)
        except OSError as err:
            good = self.checkpoints.list()
            kept = f"the previous checkpoint {good[-1]} is intact" if good else "no earlier checkpoint exists"
            self.log.record("error", step=self.step, message=f"checkpoint write failed: {err}")
            raise TrainingError(f"writing the checkpoint of step {self.step} failed ({err}); {kept}. "
                                "Free disk space (or fix the folder's permissions) and resume.") from None
        self._saved_step = self.step
        self.log.record("checkpoint", step=self.step, t=self.t, path=str(path))
        self.events.emit("on_checkpoint", Path(path))
        return path

    def _save_sharded(self, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """torchrun: every rank writes its shards of the weights and optimizer state (DCP) into
        rank 0's temporary folder; rank 0 adds the rest and renames the folder into place."""
        tmp = Path(_on_main(self.dist, lambda: str(self.checkpoints.begin(self.step))))
        optimizer = self.optim.optimizer
        moments = state_by_name(optimizer) if optimizer else {}
        state["optimizer_layout"] = {
            name: {key: _state_kind(value) for key, value in entries.items()} for name, entries in moments.items()
        }
        tensors = {name: {k: v for k, v in entries.items() if isinstance(v, torch.Tensor)} for name, entries in moments.items()}
        weights = self.model.state_dict()
        # NF4 weights travel whole, as their plain inner tensors: a 4-bit shard cannot be re-cut
        # for another number of ranks. They are frozen and small; every rank holds the same copy.
        nf4 = {name: distributed.full(t) for name, t in weights.items() if quant.is_nf4(distributed.local(t))}
        dense = {name: t for name, t in weights.items() if name not in nf4}
        try:
            save_dcp(tmp / DCP_DIR, {"model": dense, "nf4": flatten_state(nf4), "optim": tensors})
            failed = None
        except CheckpointError as err:  # a full disk on any rank fails the save on every rank
            failed = str(err)
        failed = distributed.broadcast_object(failed)
        if failed:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(failed)
        path = _on_main(self.dist, lambda: str(self.checkpoints.finish(tmp, self.step, state, meta)), OSError)
        return Path(path)

    def _resume(self) -> None:
        ckpt = self._newest_good_checkpoint()
        if ckpt is not None:
            self._restore(ckpt)
        if self.dist.is_main:
            # Records written after the checkpoint belong to steps that will run again.
            MetricsLogger.truncate(self.run_dir, ckpt.state["metrics_lines"] if ckpt else 0)
            self.log.close()
            self.log = MetricsLogger(self.run_dir, self.total_steps, console=self.log.console)
            if self._extended_from is not None:  # the config the earlier steps ran under stays on record
                kept = self.run_dir / f"config-{self.step:06d}.yaml"
                shutil.copy2(self.run_dir / "config.yaml", kept)
                self.log.record("extend", step=self.step, t=self.t, from_steps=self._extended_from,
                                to_steps=self.total_steps, previous_config=kept.name)
                self.log.say(f"extending the run from {self._extended_from} to {self.total_steps} steps "
                             f"(the earlier config is kept as {kept.name})")
            self.config.to_yaml(self.run_dir / "config.yaml")
        if self.phase_index >= 0:  # the restored phase goes on with its cache (and compiled stacks)
            self._start_phase_services(self.phase, self.phase_index)
        where = f"from {ckpt.path}" if ckpt else "from step 0: the run stopped before its first checkpoint"
        self.log.record("resume", step=self.step, t=self.t, checkpoint=str(ckpt.path) if ckpt else None)
        self.log.say(f"resumed {where} at step {self.step} (t={self.t:.3f}, phase {self.phase.name})")

    def _newest_good_checkpoint(self) -> Checkpoint | None:
        """Rank 0 tidies the checkpoint folder and picks the newest good checkpoint; every rank
        then loads that one."""

        def pick() -> str | None:
            for note in self.checkpoints.recover():
                self.log.say(f"checkpoints: {note}")
            bad: list[str] = []

            def skip(path: Path, why: str) -> None:
                bad.append(why)
                self.log.say(f"skipping damaged checkpoint: {why}")

            ckpt = self.checkpoints.latest_good(on_bad=skip)
            if ckpt is None and bad:
                raise TrainingError(f"{self.run_dir}: every checkpoint is damaged ({'; '.join(bad)}); nothing to resume")
            return str(ckpt.path) if ckpt else None

        path = _on_main(self.dist, pick)
        return load_checkpoint(path) if path else None

    def _restore(self, ckpt: Checkpoint) -> None:
        state = ckpt.state
        made_for = ckpt.meta.get("total_steps")
        if made_for != self.total_steps and made_for != self._extended_from:
            raise CheckpointError(f"{ckpt.path}: made for total_steps={made_for}, this run has {self.total_steps}; "
                                  f"to continue a run past its end use --steps N (docs/interop.md)")
        # Structure first: replay the model plane of every phase entered so far, then the weights.
        index = state["phase_index"]
        for i in range(index + 1):
            self.model_plane.enter_phase(self.schedule.phases[i], i)
        self.model.to(self.device)
        if self.model.rack.to_spec().to_dict() != ckpt.meta["rack"]:
            raise CheckpointError(f"{ckpt.path}: the rack it holds does not match the config's curriculum")
        if not ckpt.sharded:
            _load_weights(self.model, ckpt)  # whole weights go in before FSDP shards the model
        else:
            self._load_sharded_nf4(ckpt)  # so do NF4 weights, stored whole
        # An extended run keeps its step; its phases were rewritten in steps (training/extend.py).
        self.time.load_state_dict({**state["time"], "total_steps": self.total_steps})
        if index >= 0:
            start_step = self.schedule.step_ranges(self.total_steps)[index][0]
            self.data.enter_phase(self.schedule.phases[index], index, start_step)
            self._wrap()
            self.optim.enter_phase(self.model, self.schedule.phases[index])
            if optimizer_param_names(self.optim.optimizer) != state["optimizer_names"]:
                raise CheckpointError(f"{ckpt.path}: optimizer parameters differ from the rebuilt optimizer's")
            if ckpt.sharded:
                self._load_sharded(ckpt)
            else:
                saved = saved_state_by_name(state["optimizer"], state["optimizer_names"])
                load_state_by_name(self.optim.optimizer, saved, place=distributed.shard_like)
            self._structure_settled()
        elif ckpt.sharded:
            self._load_sharded(ckpt)
        self.phase_index = index
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), None))
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        self.losses = state["losses"].tolist()
        self.tokens_seen = state["tokens_seen"]
        self._wall = state["wall"]
        self.transitions = [Transition(**tr) for tr in state["transitions"]]
        self.last_eval = dict(state["last_eval"])
        self._saved_step = self.step

    def _load_sharded_nf4(self, ckpt: Checkpoint) -> None:
        nf4 = {name: torch.empty_like(t) for name, t in nf4_state(self.model).items()}
        if nf4:
            load_dcp(ckpt.path / DCP_DIR, {"nf4": nf4})
            load_nf4_state(self.model, nf4)

    def _load_sharded(self, ckpt: Checkpoint) -> None:
        """Weights and optimizer state from a DCP checkpoint, read straight into this run's
        layout (whole tensors, or this rank's shards): any number of ranks may have written it."""
        optimizer = self.optim.optimizer
        params = dict(zip(optimizer_param_names(optimizer), (p for g in optimizer.param_groups for p in g["params"]),
                          strict=True)) if optimizer else {}
        layout = ckpt.state.get("optimizer_layout", {})
        moments = {name: {key: _empty_state(kind, params[name]) for key, kind in keys.items() if kind != "none"}
                   for name, keys in layout.items() if name in params}
        dense = {name: t for name, t in self.model.state_dict().items() if not quant.is_nf4(distributed.local(t))}
        load_dcp(ckpt.path / DCP_DIR, {"model": dense, "optim": moments})
        if optimizer:
            for name, keys in layout.items():  # entries that are None (SGD without momentum)
                moments.setdefault(name, {}).update({key: None for key, kind in keys.items() if kind == "none"})
            load_state_by_name(optimizer, moments)


# ---- helpers --------------------------------------------------------------------------------


def _split(batch: Batch, parts: int) -> list[Batch]:
    if parts == 1:
        return [batch]
    size = batch.batch_size // parts
    out = []
    for i in range(parts):
        sl = slice(i * size, (i + 1) * size if i < parts - 1 else None)
        out.append(replace(
            batch, input_ids=batch.input_ids[sl], labels=batch.labels[sl], loss_mask=batch.loss_mask[sl],
            loss_weight=batch.loss_weight[sl], sample_ids=batch.sample_ids[sl],
            mask_rates=None if batch.mask_rates is None else batch.mask_rates[sl],
        ))
    return out


def _state_kind(value: Any) -> str:
    """How an optimizer state entry is stored: like its parameter, a scalar (step), or None."""
    if value is None:
        return "none"
    return "scalar" if value.ndim == 0 else "param"


def _empty_state(kind: str, param: torch.Tensor) -> torch.Tensor:
    """A tensor for DCP to fill: laid out like the parameter, or a step counter."""
    return torch.zeros_like(param) if kind == "param" else torch.zeros((), dtype=torch.float32)


def _on_main(ctx: distributed.DistContext, work: Any, error: type[Exception] = TrainingError) -> Any:
    """Run `work()` on rank 0 and hand its result (or its error, raised as `error`) to every rank."""
    if not ctx.active:
        return work()
    outcome: tuple[Any, str | None] = (None, None)
    if ctx.is_main:
        try:
            outcome = (work(), None)
        except (TrainingError, CheckpointError, OSError) as err:
            outcome = (None, str(err))
    result, failed = distributed.broadcast_object(outcome)
    if failed is not None:
        raise error(failed)
    return result


def _load_weights(model: StackWiseModel, ckpt: Checkpoint) -> None:
    try:
        load_flat_state(model, ckpt.tensors)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{ckpt.path}: weights do not fit the model: {err}") from None


class _StopSignals:
    """Turn SIGTERM/SIGINT into a request to stop after the current step (main thread only)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out now
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def compile_stacks(model: StackWiseModel) -> None:
    """torch.compile each stack once (new stacks are compiled when they appear)."""
    for stack in model.rack:
        if getattr(stack, "_compiled_call_impl", None) is None:
            stack.compile()


def _with_run_tokenizer(config: StackWiseConfig, run_dir: Path) -> StackWiseConfig:
    """A resumed or evaluated run uses the tokenizer it was trained with, saved in its folder."""
    saved, settings = run_dir / "tokenizer.json", config.data.tokenizer
    if saved.is_file() and (settings.kind == "bpe" or settings.path is not None) and settings.path != str(saved):
        # Also when the config names a file elsewhere (an imported model's folder): the run's
        # copy holds any specials added to it, and the original may be gone.
        return config.with_overrides([f"data.tokenizer.path={str(saved)!r}"])
    return config


def _pick_device(name: str, ctx: distributed.DistContext) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("run.device is 'cuda' but no CUDA device is available; use run.device=cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", ctx.local_rank) if ctx.active else torch.device("cuda")


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    # bf16 is a CUDA setting: on CPUs without AMX it runs 8-35x slower than fp32.
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _prepare_run_dir(config: StackWiseConfig, run_dir: Any, resume: Any) -> Path | None:
    if run_dir is False:
        if resume is not None:
            raise TrainingError("resume needs a run directory")
        return None
    if resume is not None:
        path = Path(resume)
        if not (path / "config.yaml").is_file() and not (path / "checkpoints").is_dir():
            raise TrainingError(f"{path}: not a run directory (no config.yaml, no checkpoints); nothing to resume")
        return path
    if run_dir is not None:
        path = Path(run_dir)
    else:
        base = Path(config.run.dir) / config.run.name
        path, n = base, 2
        while path.exists() and any(path.iterdir()):  # never overwrite an earlier run
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
    if path.exists() and (path / "checkpoints").exists():
        raise TrainingError(f"{path} already holds a run; resume it with --resume {path} or choose another run directory")
    path.mkdir(parents=True, exist_ok=True)
    return path
