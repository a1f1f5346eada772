"""The run configuration: a YAML file plus dotted command-line overrides, checked against one schema.

Every error names the file (and line) or the override it came from and the key; an unknown key
suggests the nearest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import HaloConfig, get_preset

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(ValueError):
    """A bad run configuration; the message says where and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


MODEL_FIELDS = {f.name for f in dataclasses.fields(HaloConfig)}


class ModelSection(BaseModel):
    """`preset` plus any HaloConfig field beside it (checked by HaloConfig itself)."""

    model_config = ConfigDict(extra="allow")
    preset: str = "tiny"

    def halo_config(self, seed: int) -> HaloConfig:
        fields = dict(self.model_extra or {})
        fields.setdefault("seed", seed)
        try:
            return get_preset(self.preset, **fields)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from e


class BlendEntry(_Section):
    path: str
    weight: float = Field(gt=0)


class DataSection(_Section):
    path: Optional[str] = None
    blend: Optional[list[BlendEntry]] = None
    verify_checksums: bool = True  # hash every shard against the manifest at start (false: sizes only)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.blend is None):
            raise ValueError("give exactly one of data.path (a prepared directory) or data.blend "
                             "(a list of {path, weight})")
        if self.blend is not None and not self.blend:
            raise ValueError("data.blend is empty")
        return self

    def sources(self) -> list[tuple[str, float]]:
        if self.path is not None:
            return [(self.path, 1.0)]
        return [(b.path, b.weight) for b in self.blend]


class TrainSection(_Section):
    seq_len: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    grad_accum: Optional[int] = Field(default=None, gt=0)  # None: global_batch_size / (micro_batch_size * world)
    global_batch_size: Optional[int] = Field(default=None, gt=0)
    steps: int = Field(gt=0)
    exit_at_step: Optional[int] = Field(default=None, gt=0)  # this invocation saves and exits 0 after this step
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    grad_clip: float = Field(default=1.0, ge=0)  # 0: no clipping
    activation_checkpointing: int = Field(default=0, ge=0)  # 0 none, 1 every layer, k every k-th layer
    compile: bool = False  # torch.compile the model and loss as one graph (block by block with act. ckpt); ZeRO 0-2
    max_nonfinite_steps: int = Field(default=10, ge=0)  # NaN/inf loss or gradient: skipped; exit 3 past this many
    peak_tflops: Optional[float] = Field(default=None, gt=0)  # per device, for MFU; None: known GPUs only
    check_memory: bool = True  # refuse a run whose memory estimate exceeds the device's free memory
    peer_timeout: float = Field(default=60, gt=0)  # s without a heartbeat before a rank counts as lost (exit 5)


class OptimSection(_Section):
    lr: float = Field(default=3e-4, gt=0)
    min_lr: float = Field(default=3e-5, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(default=100, ge=0)
    decay_fraction: float = Field(default=0.2, gt=0, le=1)  # wsd: the last fraction of steps decays


class EvalSection(_Section):
    interval: int = Field(default=0, ge=0)  # 0: only at the end
    samples: int = Field(default=64, ge=0)  # validation samples per evaluation (0: never evaluate)


class CheckpointSection(_Section):
    interval: int = Field(default=1000, gt=0)
    keep_last: int = Field(default=3, gt=0)
    dir: Optional[str] = None  # default: <run.dir>/checkpoints
    resume: bool = True
    allow_inexact_zero3_reshard: bool = False  # see docs/training.md: a ZeRO-3 resume on another world size


class RunSection(_Section):
    dir: str
    name: Optional[str] = None


class DeepSpeedSection(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload: bool = False  # ZeRO-2/3 optimizer (and ZeRO-3 parameter) offload to CPU
    config: Optional[str] = None  # a DeepSpeed JSON to start from instead of ds_configs/zero<N>.json
    extra: dict[str, Any] = Field(default_factory=dict)  # merged last into the DeepSpeed config


class LoggingSection(_Section):
    progress_bar: bool = True  # a tqdm bar when stdout is a terminal; plain lines otherwise or when false
    log_interval: int = Field(default=10, gt=0)  # steps per plain console line (means over those steps)
    wandb_project: Optional[str] = None  # wandb is used only when this is set
    wandb_entity: Optional[str] = None
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = None  # None: $WANDB_MODE, else online
    tensorboard: bool = False
    profile_steps: Optional[list[int]] = None  # [first, last]: torch.profiler over these steps -> RUN_DIR/profile/

    @model_validator(mode="after")
    def _profile_steps_are_a_range(self):
        steps = self.profile_steps
        if steps is not None and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            raise ValueError(f"logging.profile_steps={steps}: give [first, last] with 1 <= first <= last, "
                             "e.g. [5, 7]")
        return self


class DebugSection(_Section):
    inject_nonfinite_steps: list[int] = Field(default_factory=list)  # steps whose loss is set to NaN (tests)
    inject_nonfinite_grad_steps: list[int] = Field(default_factory=list)  # finite loss, NaN gradients (last rank)
    kill_during_save_step: Optional[int] = None  # SIGKILL itself mid-save at this step (tests)
    fail_save: Optional[list[int]] = None  # [step, rank]: that rank's checkpoint files fail to write (tests)

    @model_validator(mode="after")
    def _fail_save_is_step_and_rank(self):
        if self.fail_save is not None and (len(self.fail_save) != 2 or min(self.fail_save) < 0):
            raise ValueError(f"debug.fail_save={self.fail_save}: give [step, rank], e.g. [4, 1]")
        return self


class RunConfig(_Section):
    seed: int = 1234
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    train: TrainSection
    optim: OptimSection = Field(default_factory=OptimSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    run: RunSection
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    debug: DebugSection = Field(default_factory=DebugSection)

    @model_validator(mode="after")
    def _compile_needs_unpartitioned_weights(self):
        if self.train.compile and self.deepspeed.zero_stage == 3:
            raise ValueError("train.compile=true works with deepspeed.zero_stage 0, 1 or 2, not 3 "
                             "(ZeRO-3 gathers weights in hooks that a compiled block would bypass)")
        return self

    @model_validator(mode="after")
    def _profiled_steps_are_run(self):
        steps = self.logging.profile_steps
        if steps and steps[1] > self.train.steps:
            raise ValueError(f"logging.profile_steps={steps} ends after the last step (train.steps="
                             f"{self.train.steps}): the profile would never be written; end it at most there")
        return self

    def halo_config(self) -> HaloConfig:
        return self.model.halo_config(self.seed)

    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run.dir) / "checkpoints"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- known keys, for unknown-key errors --------------------------------------------------------------


def _known_keys(model: type[BaseModel], prefix: str = "") -> dict[str, type[BaseModel] | None]:
    """Dotted key -> the section class it opens (None for a leaf)."""
    out: dict[str, type[BaseModel] | None] = {}
    for name, field in model.model_fields.items():
        key = prefix + name
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out[key] = sub
            out.update(_known_keys(sub, key + "."))
        else:
            out[key] = None
    return out


KNOWN_KEYS = _known_keys(RunConfig)
KNOWN_KEYS.update({f"model.{name}": None for name in MODEL_FIELDS})
OPEN_KEYS = ("deepspeed.extra", "data.blend")  # free-form below these


def _check_keys(tree: dict, where: "_Where", prefix: str = "") -> None:
    for key, value in tree.items():
        dotted = prefix + str(key)
        if dotted not in KNOWN_KEYS:
            near = difflib.get_close_matches(dotted, list(KNOWN_KEYS), n=1, cutoff=0.6)
            hint = f"; did you mean '{near[0]}'?" if near else "; known keys are listed in docs/training.md"
            raise ConfigError(f"{where.of(dotted)}: unknown key '{dotted}'{hint}")
        if isinstance(value, dict) and dotted not in OPEN_KEYS and KNOWN_KEYS[dotted] is not None:
            _check_keys(value, where, dotted + ".")
        elif isinstance(value, dict) and KNOWN_KEYS[dotted] is None and dotted not in OPEN_KEYS:
            raise ConfigError(f"{where.of(dotted)}: '{dotted}' takes a value, not a mapping")


class _Where:
    """Where each dotted key was set: a file line or a command-line override."""

    def __init__(self, path: Path | None):
        self.path, self.lines, self.overrides = path, {}, {}

    def read_lines(self, text: str) -> None:
        def walk(node, prefix):
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    dotted = prefix + str(k.value)
                    self.lines[dotted] = k.start_mark.line + 1
                    walk(v, dotted + ".")

        walk(yaml.compose(text), "")

    def of(self, dotted: str) -> str:
        for key, override in reversed(self.overrides.items()):
            if key == dotted or key.startswith(dotted + "."):
                return f"command-line override '{override}'"
        for key in _prefixes(dotted):
            if key in self.lines:
                return f"{self.path}:{self.lines[key]}"
        return str(self.path) if self.path else "config"


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


# ---- loading --------------------------------------------------------------------------------------


def resolve_config_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    recipe = RECIPES_DIR / (name if name.endswith((".yaml", ".yml")) else name + ".yaml")
    if recipe.is_file():
        return recipe
    recipes = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name}' is neither a file nor a built-in recipe ({recipes})")


def apply_override(tree: dict, override: str, where: _Where) -> None:
    if "=" not in override:
        raise ConfigError(f"command-line override '{override}': expected key.path=value, e.g. train.steps=100")
    dotted, raw = override.split("=", 1)
    dotted = dotted.strip()
    where.overrides[dotted] = override
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"command-line override '{override}': value is not valid YAML ({e})") from e
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command-line override '{override}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_run_config(config: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    tree: dict = {}
    where = _Where(None)
    if config is not None:
        path = resolve_config_path(str(config))
        where = _Where(path)
        text = path.read_text()
        try:
            tree = yaml.safe_load(text) or {}
            where.read_lines(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train:, ...)")
    for override in overrides:
        apply_override(tree, override, where)
    _check_keys(tree, where)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            dotted = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where.of(dotted)}: '{dotted}': {err['msg']}")
        raise ConfigError("invalid run configuration:\n" + "\n".join(lines)) from None
    halo = cfg.halo_config()
    if cfg.train.seq_len > halo.max_seq_len:
        raise ConfigError(f"{where.of('train.seq_len')}: train.seq_len={cfg.train.seq_len} exceeds the model's "
                          f"max_seq_len={halo.max_seq_len}; set model.max_seq_len or shorten train.seq_len")
    return cfg
