"""The training loop: data by consumed_samples, DeepSpeed steps, evaluation, checkpoints, stop requests."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.loader import TrainLoader, open_stream
from ..model import HaloSModel
from . import distributed
from .checkpoint import CheckpointError, Checkpointer, TrainerState, check_same_shape, seed_all
from .engine import BatchPlan, batch_plan, build_engine
from .metrics import MetricsLogger, check_logging_packages, memory_gb, peak_flops, truncate_metrics
from .preflight import check_before_start
from .profiling import StepProfiler
from .run_config import ConfigError, RunConfig
from .schedule import learning_rate
from .signals import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, StopRequest


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
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self.device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        distributed.init(info, self.device.type)
        check_before_start(cfg, self.halo, self.plan, self.device, self.train_stream, say=self.say)

        seed_all(cfg.seed)
        model = HaloSModel(self.halo)
        self.flops_per_token = model.flops_per_token(cfg.train.seq_len)
        self.num_parameters = model.num_parameters()
        self.checkpointer = Checkpointer(cfg.checkpoint_dir(), info.rank, info.world_size, cfg.checkpoint.keep_last,
                                         say=self.say)
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
        self.engine, self.optimizer, self.ds_config = build_engine(cfg, model, self.plan, self.device, universal=self.universal)
        self.loader = TrainLoader(self.train_stream, self.plan.micro_batch_size, info.rank, info.world_size)
        self.peak = peak_flops(cfg.train.peak_tflops)
        self.warned_no_eval = False
        self.profiler = StepProfiler(cfg.logging.profile_steps, self.run_dir, info.rank, self.device)

    def say(self, message: str) -> None:
        if self.info.is_main:
            print(f"[halo-train] {message}", flush=True)

    # ---- one optimizer step ----------------------------------------------------------------------
    def train_step(self, state: TrainerState, stop: StopRequest) -> tuple[float, bool, bool, float | None]:
        """(mean loss over the global batch, non-finite anywhere, stop requested anywhere, grad norm).
        The ranks exchange one small tensor per step, before the optimizer update, so that all skip it together."""
        ga = self.plan.grad_accum
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, non-finite count, stop
        inject = (state.step + 1) in self.cfg.debug.inject_nonfinite_steps and self.info.rank == 0
        norm = None
        self.engine.train()
        for micro_step in range(ga):
            inputs, labels = self.loader.micro_batch(state.consumed_samples, micro_step)
            _, loss = self.engine(inputs.to(self.device), labels=labels.to(self.device), return_logits=False)
            if inject and micro_step == 0:
                loss = loss * float("nan")
            value = loss.detach().double()
            totals[0] += value
            totals[1] += (~torch.isfinite(value)).double()
            self.engine.backward(loss)
            if micro_step == ga - 1:
                totals[2] = float(stop.requested)
                dist.all_reduce(totals, op=dist.ReduceOp.SUM)
                loss_sum, nonfinite, stop_votes = totals.tolist()  # the step's one host sync
                self.optimizer.skip_next = nonfinite > 0
                norm = self._plain_grad_norm()
            self.engine.step()
        self.optimizer.skip_next = False
        if norm is None and self.engine.get_global_grad_norm() is not None:
            norm = float(self.engine.get_global_grad_norm())
        return loss_sum / (ga * self.info.world_size), nonfinite > 0, stop_votes > 0, norm

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
        stop = StopRequest().install()
        try:
            return self._loop(state, logger, stop)
        finally:
            stop.uninstall()
            logger.close()

    def _loop(self, state: TrainerState, logger: MetricsLogger, stop: StopRequest) -> int:
        cfg, plan = self.cfg, self.plan
        o = cfg.optim
        tokens_per_step = plan.global_batch_size * cfg.train.seq_len
        saved_step = state.step
        while state.step < cfg.train.steps:
            lr = learning_rate(state.step, lr=o.lr, min_lr=o.min_lr, total_steps=cfg.train.steps,
                               warmup_steps=o.warmup_steps, schedule=o.schedule, decay_fraction=o.decay_fraction)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.profiler.before_step(state.step + 1)
            t0 = time.perf_counter()
            loss, nonfinite, stop_requested, grad_norm = self.train_step(state, stop)
            seconds = time.perf_counter() - t0
            state.step += 1
            self.profiler.after_step(state.step)
            state.consumed_samples += plan.global_batch_size
            state.tokens += tokens_per_step
            state.nonfinite_steps += nonfinite
            tokens_per_s = tokens_per_step / seconds
            record = {
                "step": state.step, "loss": None if nonfinite else loss, "lr": lr,
                "consumed_samples": state.consumed_samples, "tokens": state.tokens,
                "grad_norm": None if nonfinite else grad_norm, "tokens_per_s": tokens_per_s,
                "mfu": self.flops_per_token * tokens_per_s / (self.peak * plan.world_size) if self.peak else None,
                "mem_gb": memory_gb(), "step_time": seconds,
            }
            if nonfinite:
                record["skipped"] = True
                logger.write(f"step {state.step}: non-finite loss, update skipped "
                             f"({state.nonfinite_steps} so far, limit {cfg.train.max_nonfinite_steps})")
            last = state.step == cfg.train.steps
            if (cfg.eval.interval and state.step % cfg.eval.interval == 0) or last:
                evaluated = self.evaluate()
                if evaluated is not None:
                    record["val_loss"], record["val_ppl"] = evaluated
            logger.log(record)
            if state.nonfinite_steps > cfg.train.max_nonfinite_steps:
                logger.write(f"stopping: {state.nonfinite_steps} steps had a non-finite loss (limit "
                             f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); the last checkpoint "
                             f"(step {saved_step}) is intact; lower optim.lr or check the data")
                return EXIT_NONFINITE
            exit_now = state.step == cfg.train.exit_at_step and not last
            if state.step % cfg.checkpoint.interval == 0 or last or stop_requested or exit_now:
                self.checkpointer.save(self.engine, state, kill_at_step=cfg.debug.kill_during_save_step)
                saved_step = state.step
            if exit_now and not stop_requested:
                logger.write(f"train.exit_at_step={state.step} reached: checkpoint saved; rerun without it to go on")
                return EXIT_OK
            if stop_requested and not last:
                logger.write(f"stop requested ({stop.signal_name or 'on another rank'}): checkpoint of step "
                             f"{state.step} saved; rerun the same command to resume (exit {EXIT_PREEMPTED})")
                return EXIT_PREEMPTED
        logger.write(f"training done: step {state.step}, {state.tokens:,} tokens; checkpoint "
                     f"{self.cfg.checkpoint_dir() / f'step_{state.step:08d}'}")
        return EXIT_OK


def run_training(cfg: RunConfig, info: distributed.RankInfo) -> int:
    trainer = Trainer(cfg, info)
    code = trainer.run()
    dist.barrier()
    dist.destroy_process_group()
    return code
