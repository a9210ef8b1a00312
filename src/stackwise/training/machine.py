"""The TrainingMachine: the one engine that runs every kind of run along normalized time t ∈ [0, 1].

Each step: find the phase of t (entering it if it is new: DESIGN.md section 5), set the learning
rate (a phase's shape at its local time τ, a run-wide shape at t), take the batch of this step (a
pure function of seed and step; phases on one corpus continue one window order),
forward / backward / update, log, evaluate and checkpoint when due, advance time.

A phase transition, in order: log it and checkpoint (the state at the end of the old phase);
model plane (grow, roles); data plane (new stream settings); optimizer plane (rebuild over the
trainable parameters, carrying state over by name); `validate_training_state`.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stackwise.config import StackWiseConfig
from stackwise.data.batch import Batch
from stackwise.model import StackWiseModel
from stackwise.model.lora import flatten_state, load_flat_state
from stackwise.specs import validate_training_state
from stackwise.training import distributed
from stackwise.training.adapters import DataAdapter, ModelAdapter, OptimizerAdapter
from stackwise.training.cache import CacheDecision, TrunkCache, cache_decision
from stackwise.training.callbacks import Callback, Events, RunView, build_callbacks, frozen
from stackwise.training.checkpoint import CheckpointManager
from stackwise.training.errors import TrainingError
from stackwise.training.factories import build_data_loader, build_model
from stackwise.training.finite import UpdateUndo, group_params_finite
from stackwise.training.fits import check_fits
from stackwise.training.flops import FlopsMeter, peak_flops
from stackwise.training.forward import LossForward
from stackwise.training.init_from import (
    find_source,
    initial_optimizer_state,
    load_initial_weights,
    resolve_init_from,
    start_summary,
)
from stackwise.training.lifecycle import (
    Lifecycle,
    evaluation_machine,
    on_main,
    resumed_config,
    with_run_tokenizer,
)
from stackwise.training.logger import MetricsLogger
from stackwise.training.memory import first_trainable_stack
from stackwise.training.metrics import bits_per_byte
from stackwise.training.optimizer import group_grad_norms, load_state_by_name
from stackwise.training.progressive import apply_model_phase, with_growth_schedule
from stackwise.training.result import Planes, TrainResult, Transition
from stackwise.training.run_dir import RunDirectory
from stackwise.training.schedule import Phase, PhaseSchedule, TimeController, resolve_time
from stackwise.training.signals import StopSignals
from stackwise.training.structure import planned_racks

__all__ = ["Planes", "TrainResult", "TrainingError", "TrainingMachine", "Transition"]


class TrainingMachine:
    """Runs a config (object, dict or YAML path) for `total_steps` steps.

    `run_dir`: where metrics, checkpoints and the resolved config go. Default: a new folder
    `run.dir/run.name` (suffixed -2, -3, ... rather than overwrite). `run_dir=False` keeps
    everything in memory (no files). `resume=RUN_DIR` continues that run from its newest good
    checkpoint. `model` / `data` accept ready-made objects instead of building them; `data` may
    also be your own iterable of token-id batches (a DataLoader, an IterableDataset, a generator),
    with `val_data` its validation batches (docs/data.md, "Your own data"). The machine
    holds the run directory's lock until `train()` returns (`close()` releases it earlier); a
    start that fails leaves nothing behind (training/run_dir.py).
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
        val_data: Any = None,
        console: bool = True,
        callbacks: Sequence[Callback] = (),
        extend: str | os.PathLike[str] | list[dict[str, Any]] | None = None,
        restoring: bool = False,
    ):
        # A new run resolves `model.init_from` (shapes, tokenizer) and later loads its weights; a
        # resumed run (or one `restoring` a checkpoint, as for_evaluation does) has both already.
        fresh = resume is None and not restoring
        self._resolve(StackWiseConfig.load(config), total_steps, resume, extend, fresh, data)
        self.dist = distributed.setup(self.config.run.distributed, self.config.run.device)
        distributed.check_run(self.dist, self.config, self.schedule, given_model=model is not None)
        self.device = distributed.pick_device(self.config.run.device, self.dist)
        # Every phase's model plane replayed on a shapes-only model: a phase that cannot be applied
        # is a config error now, before anything is created, not once the earlier phases trained.
        self._given_model = model is not None
        if fresh and not self._given_model:  # sizes the device cannot hold (run.memory_check: false skips)
            check_fits(self.config, self.total_steps, self.device.type)
        self._planned = None if self._given_model else planned_racks(self.config, self.total_steps)
        # Before any folder is made; a machine restoring a checkpoint for evaluation opens no loggers.
        self.events = Events(build_callbacks(self.config, callbacks, self.dist.is_main, config_loggers=not restoring),
                             self._view, lambda: self.log)
        self.autocast_dtype = _autocast_dtype(self.config.run.precision, self.device)
        if self.config.run.threads:
            torch.set_num_threads(self.config.run.threads)
        self.lifecycle = Lifecycle(self)
        self.run = self._open_run_dir(run_dir, resume)
        try:
            self._build(model, data, console, fresh, resume is not None, val_data)
        except BaseException:
            if hasattr(self, "log"):
                self.log.close()
            if self.run is not None:
                self.run.abandon()  # a failed start leaves nothing behind
            raise

    def _resolve(self, config: StackWiseConfig, total_steps: int | None, resume: Any, extend: Any, fresh: bool,
                 data: Any = None) -> None:
        """The run's config, length, schedule and clock (a resume: the run's own, extended by
        `--steps N` / `--extend`, and the config on record to compare with)."""
        # model.init_from is read once (a run source: its whole checkpoint) for the shapes and the weights.
        self._init_source = find_source(config.model.init_from) if fresh and config.model.init_from else None
        self.config = with_growth_schedule(resolve_init_from(config, self._init_source) if fresh else config)
        self._recorded: StackWiseConfig | None = None  # a resumed run's config on record
        self._extended_from: int | None = None
        if resume is not None:
            if self.config.uses_time_units():  # tokens/epochs to steps first, so --steps N extends as for steps
                given = with_run_tokenizer(self.config, Path(resume))
                self.config = resolve_time(given, None if given.training.length else total_steps, data)
            self.config, total_steps, self._recorded, self._extended_from = \
                resumed_config(self.config, Path(resume), total_steps, extend)
        elif extend is not None:
            raise TrainingError("extend= continues an existing run: pass resume=RUN_DIR too")
        # Time in tokens or epochs becomes steps here, once, before anything depends on the run
        # length; the config on disk then says how long the run is and where each phase starts in
        # steps, so it alone reruns and resumes it exactly (docs/schedule.md).
        self.config = resolve_time(self.config, total_steps, data)
        self.total_steps = self.config.training.total_steps
        self.schedule = PhaseSchedule.from_config(self.config, self.total_steps)
        self.time = TimeController(self.total_steps)

    def _open_run_dir(self, run_dir: Any, resume: Any) -> RunDirectory | None:
        """Rank 0 opens and locks the run directory (training/run_dir.py); every rank learns its path."""
        if run_dir is False:
            if resume is not None:
                raise TrainingError("resume needs a run directory")
            self.run_dir = None
            return None
        opened: list[RunDirectory] = []

        def open_dir() -> str:
            opened.append(RunDirectory.reopen(resume) if resume is not None else RunDirectory.create(self.config.run, run_dir))
            return str(opened[0].path)

        self.run_dir = Path(on_main(self.dist, open_dir))
        return opened[0] if opened else None

    def _build(self, model: StackWiseModel | None, data: Any, console: bool, fresh: bool, resuming: bool,
               val_data: Any = None) -> None:
        if self.run is not None and not resuming:
            self.run.write_file("config.yaml", self.config.to_yaml())  # a resumed run writes it once checked
        torch.manual_seed(self.config.training.seed)
        # The tokenizer is saved with a new run; a resumed one has it (and must not rewrite it).
        keep_tokenizer = self.run is not None and not (resuming and (self.run_dir / "tokenizer.json").exists())
        if val_data is not None and data is None:
            raise TrainingError("val_data= goes with data= (your own training data); the built-in corpora "
                                "have their own validation split (data.val_fraction)")
        # `data`: a ready loader, or your own iterable of token-id batches (training/user_data.py).
        loader = build_data_loader(data if data is not None else self.config, val_data=val_data,
                                   run_dir=self.run_dir if keep_tokenizer else None)
        # total_steps: phases on one corpus continue one window order (schedule.data_orders).
        self.data = DataAdapter(loader, self.config, self.dist.rank, self.dist.world_size, total_steps=self.total_steps)
        self.model_plane = ModelAdapter(build_model(model or self.config, vocab_size=loader.vocab_size), self.config)
        self._initial_optimizer_state: dict[str, Any] = {}
        started_from = None
        if fresh and model is None and self.config.model.init_from:
            source = load_initial_weights(self.config, self.model, self._init_source)
            self._initial_optimizer_state, dropped = initial_optimizer_state(self.config, source, self.model)
            started_from = start_summary(self.config, source, self.model, self.data.tokenizer,
                                         len(self._initial_optimizer_state), dropped)
        self._init_source = None  # its tensors are in the model now
        self.model.to(self.device)
        self.optim = OptimizerAdapter(self.config.training.optimizer)
        spill = self.run_dir / "cache" if self.run_dir else None
        if spill is not None and self.dist.active:
            spill = spill / f"rank{self.dist.rank}"  # each rank caches its own samples
        self.cache = TrunkCache(self.config.run.cache_ram_mb, spill)
        self._init_state()
        self.checkpoints = CheckpointManager(self.run_dir, self.config.run.keep_last) if self.run_dir else None
        # Metrics and console lines come from rank 0 alone; a resume opens metrics.jsonl once checked.
        self.log = MetricsLogger(self.run_dir if self.dist.is_main and not resuming else None, self.total_steps,
                                 console=console and self.dist.is_main)
        self._peak_flops = peak_flops(self.device, self.autocast_dtype)  # for MFU (CUDA, a GPU the table knows)
        if self.device.type == "cuda" and self._peak_flops is None:
            self.log.say(f"MFU: the peak FLOP/s of {torch.cuda.get_device_name(self.device)} is not in the table "
                         "(docs/training.md, \"Compute (FLOPs)\"): no MFU is shown")
        if started_from is not None:  # model.init_from: what was loaded, added and brought along
            self.log.record("init_from", step=0, **{k: v for k, v in started_from.items() if k != "message"})
            self.log.say(started_from["message"])
        if resuming:
            self.lifecycle.resume()

    def _init_state(self) -> None:
        """What the machine tracks from step to step, as at step 0."""
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
        self.flops = FlopsMeter()  # the run's training FLOPs (training/flops.py)
        self._saved_step = -1  # the step of the newest checkpoint on disk (saved or resumed from)
        self._first_bad_step = torch.tensor(-1, device=self.device)
        self._bad_group_norms = torch.zeros(0, device=self.device)  # sized per phase
        self._first_trainable = 0  # the lowest stack that trains (set per phase)
        self._grad_norm = torch.zeros(())
        self._config_view: Mapping[str, Any] | None = None
        self._idle = False  # a finished run resumed with nothing left to run

    def checkpoints_newest(self) -> Path | None:
        """The newest checkpoint folder on disk (None without a run directory or checkpoint)."""
        listed = self.checkpoints.list() if self.checkpoints else []
        return listed[-1] if listed else None

    def close(self) -> None:
        """Close the metrics file and the cache, and release the run directory (train() does this)."""
        self.cache.close()
        self.log.close()
        if self.run is not None:
            self.run.release()

    # ---- callbacks (docs/events.md) ---------------------------------------------------------

    def _view(self) -> RunView:
        if self._config_view is None:
            self._config_view = frozen(self.config.to_dict())
        index = self.phase_index if self.phase_index >= 0 else \
            self.schedule.index_at_step(min(self.step, self.total_steps - 1), self.total_steps)
        return RunView(step=self.step, t=self.t, total_steps=self.total_steps, phase=self.schedule.phases[index].name,
                       phase_index=index, run_dir=self.run_dir, config=self._config_view,
                       tokens_seen=self.tokens_seen, last_eval=frozen(self.last_eval))

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
        self.optim.enter_phase(self.model, phase, self.model_plane.new_parameters, self.model_plane.state_sources)
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
        self.flops.enter(self.model)
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
        """Say what the phase's roles hide, compile new stacks (run.compile) and open the phase's
        activation cache."""
        if self.model.tied and phase.model.head == "trainable" and not self.model.embedding.tokens.weight.requires_grad:
            # `head: trainable` cannot hold for a head that is the embedding's own matrix.
            self.log.say(f"phase {phase.name}: the head is tied to the embedding, which is frozen, so the head does "
                         "not train (embedding: auto or trainable trains both, through the trunk; "
                         "model.tie_embeddings: false gives the head its own matrix)")
        if self.config.run.compile:
            compile_stacks(self.model)
        self._open_cache(phase, index)

    def _open_cache(self, phase: Phase, index: int) -> None:
        first = self._first_trainable
        settings = self.data.settings
        n_windows = self.data.loader.n_train_windows
        start, end = self.schedule.step_ranges(self.total_steps)[index]
        # The cache fills from now (a resumed phase starts it empty): it pays only if the draws
        # left in the phase repeat a sample, i.e. cross an epoch of the window order they continue
        # (order_offset: what earlier phases drew of it; schedule.data_orders).
        draws = (end - self.step) * settings["batch_size"]
        done = settings.get("order_offset", 0) + (self.step - start) * settings["batch_size"]
        decision = CacheDecision(off=self.data.cache_off_reason) if self.data.cache_off_reason else cache_decision(
            self.config.run.activation_cache, first, settings["objective"], settings["mask_rate"], phase=phase.name,
            draws=draws, n_windows=n_windows, offset_in_epoch=done % max(1, n_windows))
        context = (self.model_plane.trunk_version, index)
        message = self.cache.enter(context, decision, n_windows, settings["seq_len"], self.model.cfg.d_model)
        self.log.record("cache", step=self.step, phase=phase.name, trunk_stacks=first, on=decision.on,
                        draws=decision.draws, windows=decision.windows, expected_hits=decision.hits, message=message)
        # said where a cache could matter (a frozen trunk below the trainable stacks) or was asked for
        if first > 0 or self.config.run.activation_cache is True:
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
        lr = self.optim.set_lr(t)  # a phase's shape at τ, a run-wide one at t (docs/schedule.md)
        batch = self.data.batch(step, tau)
        cached_before = self._cache_counts()
        loss = self._update(batch)
        hits, misses = (after - before for after, before in zip(self._cache_counts(), cached_before, strict=True))
        self.flops.add_step(batch, self.config.training.grad_accum_steps, self.dist.world_size, hits, hits + misses)
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
        skip = self.config.run.on_nonfinite == "skip_step"
        if skip:  # what the update changes is kept, so a poisoning update can be taken back
            undo = self.__dict__.setdefault("_undo", UpdateUndo())
            undo.save(optimizer)
        try:
            optimizer.step()
        except RuntimeError as err:
            if skip:
                undo.restore(optimizer)
            if "overflow" not in str(err):
                raise
            # SGD with an lr beyond the weights' dtype: "value cannot be converted to type float without overflow"
            raise TrainingError(f"the update of step {self.step} (phase {self.phase.name!r}, lr {max(g['lr'] for g in optimizer.param_groups):g}) "
                                f"failed: {err}; lower the learning rate") from None
        # The updated weights, checked on the device (finite.py): a finite gradient times a huge
        # learning rate can still turn them into Inf/NaN, and no checkpoint may hold those.
        weights_ok = group_params_finite(optimizer, self.device)
        if self.dist.active:  # every rank takes (or skips, or stops at) the same update
            flags = distributed.all_reduce(torch.cat([finite.view(1), weights_ok]).to(torch.int32), "min").bool()
            finite, weights_ok = flags[0], flags[1:]
        ok = finite & weights_ok.all()
        if skip:
            if not bool(ok):  # the one host sync per step this mode costs
                undo.restore(optimizer)
                optimizer.zero_grad(set_to_none=True)
                grads_ok = bool(finite)
                groups = self._group_labels(torch.isfinite(group_norms) if not grads_ok else weights_ok)
                self.log.record("skip", step=self.step, t=self.t, phase=self.phase.name, groups=groups,
                                cause="loss or gradient" if not grads_ok else "weights")
                return total
        else:
            # Remember the first non-finite step and its group norms on the device (-inf marks a
            # group whose weights the update made non-finite); the run stops at the next host
            # sync (log step or checkpoint), naming that step.
            first = self._first_bad_step < 0
            self._first_bad_step = torch.where(first & ~ok, self.step, self._first_bad_step)
            marked = torch.where(finite & ~weights_ok, -torch.inf, group_norms)
            self._bad_group_norms = torch.where(first & ~ok, marked, self._bad_group_norms)
        optimizer.zero_grad(set_to_none=True)
        return total

    def _cache_counts(self) -> tuple[int, int]:
        """The activation cache's hits and misses so far in this phase (host counters; under
        torchrun this rank's, standing for every rank's)."""
        stats = self.cache.cache.stats if self.cache.active else None
        return (stats.hits, stats.misses) if stats is not None else (0, 0)

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
        """Stop if a non-finite loss, gradient or updated weight appeared since the last check (a host sync)."""
        bad_step = int(self._first_bad_step)
        if bad_step < 0:
            return
        phase = self.schedule.phase_at_step(bad_step, self.total_steps).name
        where = f"step {bad_step} (t={bad_step / self.total_steps:.4f}, phase {phase!r})"
        poisoned = self._group_labels(~torch.isneginf(self._bad_group_norms))  # see _update
        if poisoned:  # loss and gradients were finite; the update itself overflowed
            groups = poisoned
            message = (f"the update of {where} made the weights of parameter groups {groups} non-finite (NaN/Inf); "
                       "no checkpoint was written after it")
        else:
            groups = self._group_labels(torch.isfinite(self._bad_group_norms)) or ["(the loss itself)"]
            message = f"non-finite loss or gradient at {where}, parameter groups {groups}; no checkpoint was written after it"
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
            peak_mem_mb=_peak_memory_mb(self.device), wall_s=self._wall, **self.flops.window(elapsed, self._peak_flops),
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
        if not self.data.has_validation:  # your own data without val_data=: said once, nothing scored
            if not getattr(self, "_said_no_validation", False):
                self._said_no_validation = True
                message = "no validation data (val_data=): evaluation is skipped"
                self.log.record("data", step=self.step, event="no_validation", message=message)
                self.log.say(f"data: {message}")
            return {}
        batches = list(self.data.validation(max_batches or self.config.run.eval_batches))
        rank, ranks = self.dist.rank, self.dist.world_size
        mine = batches[rank::ranks]
        calls = -(-len(batches) // ranks)
        if self.data.user is not None:  # your own data: each rank scores its own loader's batches
            mine = batches
            calls = int(distributed.all_reduce(torch.tensor(float(len(mine)), device=self.device), "max"))
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, targets, bytes
        # Under torchrun the ranks share the batches; all make the same number of calls (FSDP
        # gathers weights collectively), a rank without a batch left scoring a copy it ignores.
        for i in range(calls):
            batch = (mine[i] if i < len(mine) else batches[0]).to(self.device)
            with self._autocast():
                nats = self._forward(batch).double()
            if i < len(mine):
                totals[0] += nats
                totals[1] += batch.n_target_tokens
                totals[2] += batch.n_target_bytes
        total_nats, n_targets, n_bytes = distributed.all_reduce(totals, "sum").tolist()
        result = {"val_loss": total_nats / max(n_targets, 1), "val_bpb": bits_per_byte(total_nats, n_bytes) if n_bytes else float("nan")}
        if self.data.user is not None:  # your own data: perplexity; bits per byte only with a known tokenizer
            result["val_ppl"] = math.exp(result["val_loss"]) if result["val_loss"] < 700 else float("nan")
            if not self.data.knows_bytes:
                del result["val_bpb"]
        self.last_eval = result
        self.log.record("eval", step=self.step, t=self.t, phase=self.phase.name, tokens=self.tokens_seen, wall_s=self._wall,
                        **self.flops.fields(),
                        **result)
        quality = f"{result['val_bpb']:.4f} bits/byte" if "val_bpb" in result else f"perplexity {result['val_ppl']:.2f}"
        self.log.say(f"eval at step {self.step}: val loss {result['val_loss']:.4f}, {quality}")
        self.events.emit("on_eval", dict(result))
        return result

    def train(self) -> TrainResult:
        """Run to t = 1 (from wherever the machine stands) and return the result.

        SIGTERM or SIGINT (Ctrl-C) stop the run gracefully: the current step finishes, a
        checkpoint is written, and the result says `stopped`; a second Ctrl-C interrupts at once.
        """
        self.stopped = None
        if self._idle:  # a finished run resumed: nothing to run, nothing to write
            self.close()
            return self.result()
        if self.run is not None:
            self.run.check_owner()
        try:
            self.events.begin()
            self.events.raise_pending()
            with StopSignals() as stop:
                # Under torchrun a signal may reach the ranks at different steps: all stop together.
                while not self.time.done and not distributed.any_true(stop.signal is not None, self.device):
                    self.train_step()
                self.stopped = stop.signal or ("SIGTERM" if not self.time.done else None)
            if self.stopped:
                # A stop on a step that already wrote its checkpoint does not write (or record) it twice.
                path = self.save_checkpoint() if self._saved_step != self.step else self.checkpoints_newest()
                self.log.record("stop", step=self.step, t=self.t, signal=self.stopped)
                # The outcome ("stopped by ...; resume with ...") is the caller's to report: the CLI prints it.
                self.log.say(f"{self.stopped} received: the run stops at step {self.step}"
                             + (f" (checkpoint {path})" if path else ""))
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
            self.close()
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
            nothing_to_do=self._idle,
        )

    # ---- checkpoint and resume (training/lifecycle.py) -----------------------------------

    @classmethod
    def for_evaluation(cls, run_dir: str | os.PathLike[str], *, checkpoint: str | os.PathLike[str] | None = None,
                       **data_settings: Any) -> TrainingMachine:
        """A machine holding a finished (or interrupted) run's newest good checkpoint (or the
        given `checkpoint` folder), for evaluation, generation or export, in one process whatever
        number of ranks wrote it. It takes no lock and writes nothing in the run directory.
        `data_settings` (paths, objective, mask_rate, mask_range, seq_len, ...) replace those of
        the checkpoint's phase, e.g. to score a run on another corpus or with another masking."""
        return evaluation_machine(cls, Path(run_dir), checkpoint, data_settings)

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current step (None without a run directory)."""
        return self.lifecycle.save()


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


def compile_stacks(model: StackWiseModel) -> None:
    """torch.compile each stack once (new stacks are compiled when they appear)."""
    for stack in model.rack:
        if getattr(stack, "_compiled_call_impl", None) is None:
            stack.compile()


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
