"""The training loop: data by consumed_samples, DeepSpeed steps, evaluation, checkpoints, stop requests."""

from __future__ import annotations

import enum
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.loader import TrainLoader, checksum_problems, open_stream
from ..model import HaloSModel
from . import distributed
from .checkpoint import CheckpointError, Checkpointer, NonFiniteWeightsError, TrainerState, check_same_shape, seed_all
from .checkpoint.checkpointer import gather_objects
from .engine import BatchPlan, batch_plan, build_engine
from .metrics import MetricsLogger, check_logging_packages, memory_gb, peak_flops, truncate_metrics
from .peers import PeerWatch
from .preflight import check_before_start
from .profiling import StepProfiler
from .run_config import ConfigError, RunConfig
from .run_lock import RunLock, RunLockError
from .schedule import learning_rate
from .signals import EXIT_NONFINITE, EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED, StopRequest


class NonFinite(enum.Enum):
    LOSS = "loss"
    GRADIENT = "gradient"


@dataclass
class StepResult:
    loss: float  # mean over the global batch
    nonfinite: NonFinite | None  # the update was skipped, and why
    stop_requested: bool  # on any rank
    grad_norm: float | None


class _PoisonGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients (debug.inject_nonfinite_grad_steps)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class GradientWatch:
    """The sum of every gradient the backward passes produce, kept on the device (no host sync): a NaN
    or inf anywhere makes it non-finite (finite gradients never sum past 3e38). Hooks on the parameters
    see each micro-batch's gradient before DeepSpeed reduces or partitions it, so the check is the same
    at every ZeRO stage and precision. fp16 runs have none: an overflow there is the loss scaler's job."""

    def __init__(self, params, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float32, device=device)
        self.handles = [p.register_hook(self._add) for p in params if p.requires_grad]

    def _add(self, grad: torch.Tensor) -> None:
        self.total += torch.sum(grad, dtype=torch.float32)

    def reset(self) -> None:
        self.total.zero_()

    def nonfinite(self) -> torch.Tensor:
        return (~torch.isfinite(self.total)).double()


def step_record(state: TrainerState, result: StepResult, lr: float, seconds: float, tokens_per_step: int,
                mfu: float | None) -> dict:
    """One line of metrics.jsonl."""
    skipped = result.nonfinite is not None
    record = {
        "step": state.step, "loss": None if skipped else result.loss, "lr": lr,
        "consumed_samples": state.consumed_samples, "tokens": state.tokens,
        "grad_norm": None if skipped else result.grad_norm, "tokens_per_s": tokens_per_step / seconds,
        "mfu": mfu, "mem_gb": memory_gb(), "step_time": seconds,
    }
    if skipped:
        record["skipped"] = True
        record["nonfinite"] = result.nonfinite.value
    return record


class Trainer:
    def __init__(self, cfg: RunConfig, info: distributed.RankInfo):
        self.cfg, self.info = cfg, info
        self.plan: BatchPlan = batch_plan(cfg, info.world_size)  # before anything starts
        check_logging_packages(cfg)
        self.halo = cfg.halo_config()
        sources = cfg.data.sources()
        try:
            self.train_stream = open_stream(sources, "train", cfg.train.seq_len, cfg.seed, shuffle=True,
                                            model_vocab_size=self.halo.vocab_size)
            self.val_stream = open_stream(sources, "validation", cfg.train.seq_len, cfg.seed, shuffle=False)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data: {e}") from e
        self.run_dir = Path(cfg.run.dir)
        self.device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        distributed.init(info, self.device.type)
        self.lock = None
        self.peers = PeerWatch(info.rank, info.world_size, info.master_addr, info.master_port,
                               cfg.train.peer_timeout, before_exit=self.release).start()
        try:
            self.lock = self._lock_run_dir()
            self._build()
        except BaseException:
            self.peers.stop(None)
            self.release()
            raise

    def _lock_run_dir(self) -> RunLock | None:
        """Rank 0 takes run.dir's lock before anything is written there; every rank learns the outcome."""
        lock, refusal = None, None
        if self.info.is_main:
            lock = RunLock(self.run_dir)
            try:
                note = lock.acquire()
                if note:
                    self.say(note)
            except RunLockError as e:
                lock, refusal = None, str(e)
        refusal = gather_objects(refusal)[0]
        if refusal is not None:
            raise RunLockError(refusal)
        return lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _build(self) -> None:
        cfg, info = self.cfg, self.info
        check_before_start(cfg, self.halo, self.plan, self.device, self.train_stream, say=self.say)
        self._verify_shards()
        if info.is_main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        seed_all(cfg.seed)
        model = HaloSModel(self.halo)
        self.flops_per_token = model.flops_per_token(cfg.train.seq_len)
        self.num_parameters = model.num_parameters()
        self.checkpointer = Checkpointer(cfg.checkpoint_dir(), info.rank, info.world_size, cfg.checkpoint.keep_last,
                                         say=self.say, kill_during_save_step=cfg.debug.kill_during_save_step,
                                         fail_save=cfg.debug.fail_save)
        newest = self.checkpointer.newest_state() if cfg.checkpoint.resume else None
        if newest is not None:  # a different model shape is refused before any memory is spent on it
            check_same_shape(newest[0], newest[1].model, self.halo)
        previous = self.checkpointer.reshard_from(cfg.deepspeed.zero_stage, cfg.train.precision) \
            if cfg.checkpoint.resume else None
        self.universal = previous is not None
        if self.universal and 3 in (previous.zero_stage, cfg.deepspeed.zero_stage) \
                and not cfg.checkpoint.allow_inexact_zero3_reshard:
            raise CheckpointError(
                f"the checkpoint to resume was written by {previous.world_size} ranks with ZeRO-{previous.zero_stage}; "
                f"this run has {info.world_size} ranks with ZeRO-{cfg.deepspeed.zero_stage}. DeepSpeed 0.19 reshards "
                "ZeRO-3 weights exactly but not its optimizer state (the next losses drift by ~1e-3), so halo-train "
                f"refuses: resume on {previous.world_size} ranks with ZeRO-{previous.zero_stage}, or accept it with "
                "checkpoint.allow_inexact_zero3_reshard=true")
        if self.universal:
            self.say(f"resuming a checkpoint of world size {previous.world_size}, ZeRO-{previous.zero_stage} on world "
                     f"size {info.world_size}, ZeRO-{cfg.deepspeed.zero_stage}: its partitioned state is resharded")
        self.engine, self.optimizer, self.ds_config = build_engine(cfg, model, self.plan, self.device,
                                                                   universal=self.universal)
        self.gradients = None if cfg.train.precision == "fp16" else \
            GradientWatch(self.engine.module.parameters(), self.device)
        self.loader = TrainLoader(self.train_stream, self.plan.micro_batch_size, info.rank, info.world_size)
        self.peak = peak_flops(cfg.train.peak_tflops)
        self.warned_no_eval = False
        self.profiler = StepProfiler(cfg.logging.profile_steps, self.run_dir, info.rank, self.device)

    def _verify_shards(self) -> None:
        """Every shard file against the manifest's SHA-256, the files shared out over the ranks (the sizes
        were checked when the shards were opened)."""
        if not self.cfg.data.verify_checksums:
            return
        datasets = self.train_stream.datasets + (self.val_stream.datasets if self.val_stream else [])
        t0 = time.perf_counter()
        problems = [p for part in gather_objects(checksum_problems(datasets, self.info.rank, self.info.world_size))
                    for p in part]
        if problems:
            more = f" (and {len(problems) - 1} more shard file(s))" if len(problems) > 1 else ""
            raise ConfigError(f"data: {problems[0]}{more}")
        count = sum(len(d.checksummed_files()) for d in datasets)
        if count:
            self.say(f"{count} shard files match their manifest checksums ({time.perf_counter() - t0:.1f} s; "
                     "data.verify_checksums=false skips this)")

    def say(self, message: str) -> None:
        if self.info.is_main:
            print(f"[halo-train] {message}", flush=True)

    # ---- one optimizer step ----------------------------------------------------------------------
    def train_step(self, state: TrainerState, stop: StopRequest) -> StepResult:
        """The ranks exchange one small tensor per step (the step's one host sync), after the last backward
        and before the optimizer update, so that all skip a non-finite step together."""
        ga, debug, rank = self.plan.grad_accum, self.cfg.debug, self.info.rank
        totals = torch.zeros(4, dtype=torch.float64, device=distributed.collective_device())
        # loss sum, non-finite losses, non-finite gradients, stop votes
        nan_loss = (state.step + 1) in debug.inject_nonfinite_steps and rank == 0
        nan_grad = (state.step + 1) in debug.inject_nonfinite_grad_steps and rank == self.info.world_size - 1
        if self.gradients is not None:
            self.gradients.reset()
        norm = None
        self.engine.train()
        for micro_step in range(ga):
            inputs, labels = self.loader.micro_batch(state.consumed_samples, micro_step)
            _, loss = self.engine(inputs.to(self.device), labels=labels.to(self.device), return_logits=False)
            if nan_loss and micro_step == 0:
                loss = loss * float("nan")
            if nan_grad and micro_step == 0:
                loss = _PoisonGradient.apply(loss)
            value = loss.detach().double()
            totals[0] += value
            totals[1] += (~torch.isfinite(value)).double()
            self.engine.backward(loss)
            if micro_step == ga - 1:
                if self.gradients is not None:
                    totals[2] = self.gradients.nonfinite()
                totals[3] = float(stop.requested)
                dist.all_reduce(totals, op=dist.ReduceOp.SUM)
                loss_sum, bad_losses, bad_gradients, stop_votes = totals.tolist()  # the step's one host sync
                nonfinite = NonFinite.LOSS if bad_losses else NonFinite.GRADIENT if bad_gradients else None
                self.optimizer.skip_next = nonfinite is not None
                norm = self._plain_grad_norm() if nonfinite is None else None
            self.engine.step()
        self.optimizer.skip_next = False
        if norm is None and nonfinite is None and self.engine.get_global_grad_norm() is not None:
            norm = float(self.engine.get_global_grad_norm())
        return StepResult(loss_sum / (ga * self.info.world_size), nonfinite, stop_votes > 0, norm)

    def _plain_grad_norm(self) -> float | None:
        """The global gradient norm before clipping where DeepSpeed reports none (ZeRO-0 in fp32, whose
        gradients are whole and already averaged over ranks after the last backward)."""
        if self.engine.zero_optimization_stage() != 0 or self.cfg.train.precision != "fp32":
            return None
        grads = [p.grad.double().pow(2).sum() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).sum().sqrt()) if grads else None

    # ---- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float] | None:
        """(validation loss, perplexity) over the first eval.samples validation samples, or None."""
        per_round = self.plan.micro_batch_size * self.info.world_size
        rounds = self.cfg.eval.samples // per_round
        if self.val_stream is None or rounds == 0:
            if self.cfg.eval.samples and not self.warned_no_eval:
                self.warned_no_eval = True
                why = "the data has no validation split" if self.val_stream is None else \
                    f"eval.samples={self.cfg.eval.samples} < micro_batch_size x world size = {per_round}"
                self.say(f"no evaluation: {why}")
            return None
        mb, rank = self.plan.micro_batch_size, self.info.rank
        self.engine.eval()
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        for k in range(rounds):
            start = k * per_round + rank * mb
            tokens = torch.from_numpy(self.val_stream.samples(start, mb)).to(self.device)
            _, loss = self.engine(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False)
            total += loss.double()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        self.engine.train()
        val_loss = float(total) / (rounds * self.info.world_size)
        return val_loss, math.exp(min(val_loss, 700.0))

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        cfg, plan = self.cfg, self.plan
        state = self.checkpointer.resume(self.engine, self.halo, self.universal) if cfg.checkpoint.resume else None
        if state is None:
            state = TrainerState()
            self.say(f"starting a new run in {self.run_dir}")
        else:
            self.say(f"resumed from step {state.step} (consumed_samples {state.consumed_samples})")
            before, now = state.run_config, cfg.model_dump(mode="json")
            changed = [k for k in ("seed", "data") if before.get(k) != now.get(k)]
            changed += [f"train.{k}" for k in ("seq_len", "steps") if before.get("train", {}).get(k) != now["train"][k]]
            if changed:
                self.say(f"note: {', '.join(changed)} changed since the checkpoint: the sample stream or the "
                         "learning-rate schedule is not the one this run started with")
        state.world_size, state.zero_stage = self.info.world_size, cfg.deepspeed.zero_stage
        state.model, state.run_config = self.halo.to_dict(), cfg.model_dump(mode="json")
        if self.info.is_main:
            truncate_metrics(self.run_dir, state.step)
            self.say(f"model {self.num_parameters / 1e6:.2f}M parameters; global batch {plan.global_batch_size} = "
                     f"micro {plan.micro_batch_size} x accum {plan.grad_accum} x world {plan.world_size}; "
                     f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.train.precision}, {self.device.type}")
        dist.barrier()
        logger = MetricsLogger(self.run_dir, self.info.is_main, cfg, cfg.train.steps, state.step)
        stop = StopRequest(announce=self.info.is_main).install()
        try:
            return self._loop(state, logger, stop)
        finally:
            stop.uninstall()
            logger.close()

    def _newest_finite(self) -> str:
        """Where a run stopped for non-finite numbers goes on from, for its exit message."""
        good = self.checkpointer.last_good
        if good is None:
            return f"no checkpoint was written: lower optim.lr (now {self.cfg.optim.lr:g}) and start again"
        return (f"the newest checkpoint, {good}, has finite weights: rerun with a lower optim.lr (now "
                f"{self.cfg.optim.lr:g}) to resume from it, or check the data")

    def _loop(self, state: TrainerState, logger: MetricsLogger, stop: StopRequest) -> int:
        cfg, plan = self.cfg, self.plan
        o = cfg.optim
        tokens_per_step = plan.global_batch_size * cfg.train.seq_len
        while state.step < cfg.train.steps:
            lr = learning_rate(state.step, lr=o.lr, min_lr=o.min_lr, total_steps=cfg.train.steps,
                               warmup_steps=o.warmup_steps, schedule=o.schedule, decay_fraction=o.decay_fraction)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.profiler.before_step(state.step + 1)
            t0 = time.perf_counter()
            result = self.train_step(state, stop)
            seconds = time.perf_counter() - t0
            state.step += 1
            self.profiler.after_step(state.step)
            state.consumed_samples += plan.global_batch_size
            state.tokens += tokens_per_step
            state.nonfinite_steps += result.nonfinite is not None
            mfu = self.flops_per_token * tokens_per_step / seconds / (self.peak * plan.world_size) \
                if self.peak else None
            record = step_record(state, result, lr, seconds, tokens_per_step, mfu)
            if result.nonfinite is not None:
                logger.write(f"step {state.step}: non-finite {result.nonfinite.value}, update skipped "
                             f"({state.nonfinite_steps} so far, limit {cfg.train.max_nonfinite_steps})")
            last = state.step == cfg.train.steps
            if (cfg.eval.interval and state.step % cfg.eval.interval == 0) or last:
                evaluated = self.evaluate()
                if evaluated is not None:
                    record["val_loss"], record["val_ppl"] = evaluated
            logger.log(record)
            if state.nonfinite_steps > cfg.train.max_nonfinite_steps:
                logger.write(f"stopping: {state.nonfinite_steps} steps had a non-finite loss or gradient (limit "
                             f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); {self._newest_finite()}")
                return EXIT_NONFINITE
            exit_now = state.step == cfg.train.exit_at_step and not last
            if state.step % cfg.checkpoint.interval == 0 or last or result.stop_requested or exit_now:
                try:
                    self.checkpointer.save(self.engine, state)
                except NonFiniteWeightsError as e:
                    logger.write(f"stopping: {e}; {self._newest_finite()}")
                    return EXIT_NONFINITE
            if exit_now and not result.stop_requested:
                logger.write(f"train.exit_at_step={state.step} reached: checkpoint saved; rerun without it to go on")
                return EXIT_OK
            if result.stop_requested and not last:
                logger.write(f"stop requested ({stop.signal_name or 'on another rank'}): checkpoint of step "
                             f"{state.step} saved; rerun the same command to resume (exit {EXIT_PREEMPTED})")
                return EXIT_PREEMPTED
        logger.write(f"training done: step {state.step}, {state.tokens:,} tokens; checkpoint "
                     f"{self.cfg.checkpoint_dir() / f'step_{state.step:08d}'}")
        return EXIT_OK


def run_training(cfg: RunConfig, info: distributed.RankInfo) -> int:
    trainer = Trainer(cfg, info)  # holds run.dir's lock and watches the other ranks from here on
    code = None
    try:
        code = trainer.run()
        trainer.peers.stop(code)  # before the barrier: no rank watches once rank 0, the store's server, ends
        dist.barrier()
    except Exception as error:
        # what a collective raises when a peer is gone (gloo: RuntimeError, NCCL: DistBackendError); then
        # say which peer, not a traceback. Other errors (out of memory, a checkpoint's, ...) are this rank's own
        collective = type(error) is RuntimeError or isinstance(error, dist.DistError)
        why = trainer.peers.loss() if collective else None
        if why is None:
            raise
        here = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        print(f"halo-train: rank {info.rank}: error: {why}; stopped (exit {EXIT_PEER_LOST}; here: "
              f"{type(error).__name__}{': ' + here if here else ''}). Rerun the same command to resume from the "
              "newest checkpoint", file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    finally:
        trainer.peers.stop(code)
        trainer.release()
    dist.destroy_process_group()
    return code
