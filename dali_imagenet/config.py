"""The training configuration: one dataclass holds every default; YAML files and `--set` only override."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from dali_imagenet.data.partition import SHUFFLE_BUFFER
from dali_imagenet.data.preprocess import (
    CROP_FRACTION,
    CROP_MODES,
    HW_DECODER_LOAD,
    HYBRID_HUFFMAN_THRESHOLD,
    INTERPOLATIONS,
    TRAIN_CROP_MIN_AREA,
)
from dali_imagenet.errors import DaliImagenetError


class ConfigError(DaliImagenetError):
    """A bad config file or override; the message is one line."""


@dataclass
class TrainConfig:
    # model
    arch: str = "resnet50"  # resnet10 | resnet18 | resnet34 | resnet50 | resnet101 | resnet152 | timm:NAME (any)
    width: int = 64  # our ResNets' first-stage channels (x2 each stage after; model.WIDTH); less: tests, demos
    drop_path: float = 0.1  # stochastic depth of the last block; rises linearly from 0 with depth
    zero_init_last_bn: bool = True  # each residual branch starts as identity
    blurpool: bool = False  # blur (3x3 binomial) before each strided conv; same weights, so still torchvision's keys
    channels_last: bool = True  # NHWC memory for model and input: tensor-core convs without transposes
    compile: bool = False  # torch.compile the model (~1 min of compile time on a GPU, once per image size)
    cuda_graph: bool = False  # GPU: capture the whole train step as one CUDA graph (static shapes; no launch cost)
    # data
    image_size: int = 224  # px, side of the random-resized train crop (at the end of the ramp, if any)
    min_image_size: int = 0  # px, train crop side up to ramp_start_epoch; 0: image_size throughout
    ramp_start_epoch: int = 0  # epochs at min_image_size before the size starts to grow
    ramp_end_epoch: int = 0  # epoch from which the size is image_size
    image_size_step: int = 32  # px, sizes on the ramp are multiples of this (one compiled graph each)
    crop_min_area: float = TRAIN_CROP_MIN_AREA  # a train crop covers this to 100 % of the image (short runs: more)
    val_image_size: int = 224  # px, centre crop for validation (may differ from the train size)
    val_crop_fraction: float = CROP_FRACTION  # val: the crop's share of the resized shorter side (224 of 256)
    val_interpolation: str = "bilinear"  # val resize filter: bilinear | bicubic (a timm arch: its own)
    val_crop_mode: str = "center"  # val: center | squash | border, as timm's (preprocess.py; a timm arch: its own)
    val_flip: bool = False  # test-time augmentation: average the logits of each image and its mirror
    image_mean: str = ""  # "r,g,b" on 0-1 pixel values, subtracted before the model; "": the arch's (ImageNet's)
    image_std: str = ""  # "r,g,b", divided by; "": the arch's. A timm arch's size, crop, mean and std are its own
    batch_size: int = 128  # images per step per process (the global batch is this x world size)
    loader_threads: int = 4  # DALI CPU threads / DataLoader workers per process
    hw_decoder_load: float = HW_DECODER_LOAD  # GPU: share of JPEGs for the hardware decoder; 0: nvJPEG's hybrid path
    # px; GPU, nvJPEG without its hardware decoder: larger JPEGs take the GPU-assisted Huffman decoder, smaller
    # ones the host's (on the loader threads); 0: all the GPU-assisted one (which still largely uses the CPU)
    hybrid_huffman_threshold: int = HYBRID_HUFFMAN_THRESHOLD
    shuffle_buffer: int = SHUFFLE_BUFFER  # samples mixed by the train reader (shards are shuffled when written)
    # optimisation
    epochs: int = 90
    lr: float = 0.1  # peak LR at the reference batch; scaled as lr x global_batch / lr_reference_batch
    lr_reference_batch: int = 128  # images
    lr_schedule: str = "cosine"  # cosine | linear (to min_lr at the last step); both after the warmup
    min_lr: float = 1e-5  # LR at the end of the schedule
    warmup_epochs: float = 5.0  # linear warmup from ~0 to the peak LR
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4  # not applied to BatchNorm parameters and biases
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.2  # 0 turns mixup off
    cutmix_alpha: float = 1.0  # 0 turns cutmix off
    mix_switch_prob: float = 0.5  # with both on: probability that a batch uses cutmix
    ema_decay: float = 0.0  # per optimizer step, e.g. 0.9998; 0: no EMA of the weights
    ema_warmup_power: float = 0.75  # decay at step s is min(ema_decay, 1 - (1 + s)^-power)
    # precision
    amp_dtype: str = "bfloat16"  # "bfloat16" | "float16" (GPU, with a GradScaler) | "float32" (no autocast)
    # bookkeeping
    seed: int = 0
    deterministic: bool = False  # cuDNN deterministic algorithms (slower); for exact-resume checks
    log_every: int = 50  # steps between host syncs for logging and NaN checks
    val_every: int = 1  # epochs between validations; 0: only at the end
    checkpoint_minutes: float = 15.0  # minutes between mid-epoch checkpoints; a spot reclaim loses at most this
    max_steps: int = 0  # stop (with a checkpoint) after this global step; 0: train all epochs
    max_minutes: float = 0.0  # stop (with a checkpoint) after this many minutes in this process; 0: no limit
    s3_flush_timeout_s: float = 90.0  # at exit, how long to wait for pending uploads (spot notice: 120 s)
    s3_resume_timeout_s: float = 120.0  # at start, how long S3 failures are retried before the run stops
    lease_seconds: float = 300.0  # the run's hold on its --s3 prefix lasts this long past its last renewal
    spot_poll_seconds: float = 5.0  # between checks of EC2's spot notice (it comes ~120 s ahead of a reclaim)
    wandb_project: str = "dali-imagenet"
    price_per_hour: float = 0.8048  # US$ per machine-hour: AWS g6.xlarge on demand, us-east-1 Linux (list price, 2025)
    spot_price_per_hour: float = 0.0  # US$ per machine-hour on spot, when known (it changes by the hour); 0: unknown
    s3_get_price_per_1000: float = 0.0004  # US$ per 1,000 GET/HEAD requests (S3 Standard, us-east-1)
    s3_put_price_per_1000: float = 0.005  # US$ per 1,000 PUT/COPY/POST/LIST requests
    cross_region_price_per_gb: float = 0.02  # US$ per GB between the bucket's region and the instance's
    # budget (train.py --budget-hours/--budget-dollars): the schedule that fits, chosen from rates measured at start
    budget_hours: float = 0.0  # machine-hours for the whole run; 0: no budget (the config's epochs)
    budget_dollars: float = 0.0  # US$ at price_per_hour; with budget_hours, the smaller of the two
    budget_reserve: float = 0.05  # share of the budget held back for the rates' noise: how far behind is tolerated
    budget_relaunches: float = 0.0  # expected spot relaunches, each costing budget_relaunch_minutes
    budget_relaunch_minutes: float = 10.0  # a relaunch: new machine, staging, start-up, compile, work since checkpoint
    budget_measure_share: float = 0.03  # at most this share of the budget goes to measuring the rates

    def train_image_size(self, epoch: int) -> int:
        from dali_imagenet.training.schedule import image_size_at

        return image_size_at(epoch, image_size=self.image_size, min_image_size=self.min_image_size,
                             ramp_start_epoch=self.ramp_start_epoch, ramp_end_epoch=self.ramp_end_epoch,
                             step=self.image_size_step)

    def validates_after(self, epoch: int) -> bool:
        """Whether epoch `epoch` (1-based) ends with a validation: every `val_every`, and the last."""
        return bool(self.val_every and epoch % self.val_every == 0) or epoch == self.epochs

    @property
    def network(self) -> str:
        from dali_imagenet.training.archs import network_name

        return network_name(self.arch, self.width)

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) on 0-1 pixel values: the config's, else the arch's own (ImageNet's for ours)."""
        from dali_imagenet.training.archs import input_defaults

        defaults = input_defaults(self.arch)
        return _triple(self.image_mean) or defaults.mean, _triple(self.image_std) or defaults.std

    def validate(self) -> None:
        from dali_imagenet.training.archs import problem
        from dali_imagenet.training.precision import AMP_DTYPES

        arch_problem = problem(self.arch, self.width)
        checks = [
            (arch_problem is None, arch_problem),
            (all(_triple(v) is not None or v == "" for v in (self.image_mean, self.image_std))
             and all(x > 0 for x in _triple(self.image_std) or (1,)),
             "image_mean and image_std are three numbers, r,g,b on 0-1 pixel values (std > 0), or empty"),
            (self.amp_dtype in AMP_DTYPES, f"amp_dtype must be one of {', '.join(AMP_DTYPES)}"),
            (self.lr_schedule in ("cosine", "linear"), "lr_schedule must be cosine or linear"),
            (self.batch_size > 0 and self.epochs > 0 and self.image_size > 0 and self.val_image_size > 0,
             "batch_size, epochs, image_size, val_image_size must be > 0"),
            (self.min_image_size == 0 or (0 < self.min_image_size <= self.image_size and self.image_size_step > 0
                                          and self.ramp_start_epoch <= self.ramp_end_epoch),
             "a size ramp needs 0 < min_image_size <= image_size, ramp_start_epoch <= ramp_end_epoch, "
             "image_size_step > 0"),
            (0 <= self.hw_decoder_load <= 1, "hw_decoder_load must be in [0, 1]"),
            (0 <= self.hybrid_huffman_threshold <= 10**9, "hybrid_huffman_threshold must be in [0, 1e9] px"),
            (0 < self.val_crop_fraction <= 1 and 0 < self.crop_min_area <= 1,
             "val_crop_fraction and crop_min_area must be in (0, 1]"),
            (self.val_interpolation in INTERPOLATIONS and self.val_crop_mode in CROP_MODES,
             f"val_interpolation must be one of {', '.join(INTERPOLATIONS)}; "
             f"val_crop_mode one of {', '.join(CROP_MODES)}"),
            (0 <= self.drop_path < 1 and 0 <= self.label_smoothing < 1,
             "drop_path and label_smoothing must be in [0, 1)"),
            (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup_alpha and cutmix_alpha must be >= 0"),
            (0 <= self.ema_decay < 1 and self.ema_warmup_power > 0,
             "ema_decay must be in [0, 1), ema_warmup_power > 0"),
            (self.lr > 0 and self.min_lr >= 0 and self.warmup_epochs >= 0, "lr > 0, min_lr >= 0, warmup_epochs >= 0"),
            (self.log_every > 0, "log_every must be > 0"),
            (self.ramp_start_epoch >= 0 and self.ramp_end_epoch >= 0 and self.image_size_step > 0,
             "ramp_start_epoch and ramp_end_epoch must be >= 0, image_size_step > 0"),
            (self.loader_threads >= 1 and self.shuffle_buffer >= 1,
             "loader_threads and shuffle_buffer must be >= 1"),
            (self.lr_reference_batch > 0, "lr_reference_batch must be > 0 (images: the LR is scaled by batch / it)"),
            (0 <= self.momentum < 1 and self.weight_decay >= 0, "momentum must be in [0, 1), weight_decay >= 0"),
            (self.momentum > 0 or not self.nesterov, "nesterov needs momentum > 0 (or set nesterov: false)"),
            (0 <= self.mix_switch_prob <= 1, "mix_switch_prob must be in [0, 1]"),
            (self.seed >= 0, "seed must be >= 0"),
            (self.val_every >= 0 and self.max_steps >= 0, "val_every and max_steps must be >= 0 (0: at the end; no "
                                                          "limit)"),
            (self.checkpoint_minutes >= 0 and self.max_minutes >= 0,
             "checkpoint_minutes (0: after every step) and max_minutes (0: no limit) must be >= 0"),
            (self.s3_flush_timeout_s >= 0 and self.s3_resume_timeout_s >= 0 and self.spot_poll_seconds > 0,
             "s3_flush_timeout_s and s3_resume_timeout_s must be >= 0, spot_poll_seconds > 0"),
            (bool(self.wandb_project.strip()), "wandb_project must not be empty"),
            (self.lease_seconds >= 3, "lease_seconds must be >= 3 (it is renewed every third of it)"),
            (min(self.budget_hours, self.budget_dollars, self.budget_relaunches, self.budget_relaunch_minutes) >= 0
             and 0 <= self.budget_reserve < 0.5 and 0 < self.budget_measure_share < 0.5,
             "budget_hours, budget_dollars, budget_relaunches, budget_relaunch_minutes must be >= 0; budget_reserve "
             "in [0, 0.5), budget_measure_share in (0, 0.5)"),
            (min(self.price_per_hour, self.spot_price_per_hour, self.s3_get_price_per_1000, self.s3_put_price_per_1000,
                 self.cross_region_price_per_gb) >= 0, "prices must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


# What a resumed run may set differently from the run it continues: how it runs, logs and is
# paid for, not what it learns (the schedule, the data, the recipe). Any other field that differs
# makes `--resume auto` refuse: a fixed S3 prefix must not continue another config's run.
CHANGEABLE_ON_RESUME = ("compile", "cuda_graph", "loader_threads", "hw_decoder_load", "hybrid_huffman_threshold",
                        "log_every", "val_every",
                        "checkpoint_minutes", "max_steps", "max_minutes", "s3_flush_timeout_s", "s3_resume_timeout_s",
                        "lease_seconds", "spot_poll_seconds", "wandb_project", "price_per_hour", "spot_price_per_hour",
                        "s3_get_price_per_1000", "s3_put_price_per_1000", "cross_region_price_per_gb",
                        "budget_hours", "budget_dollars", "budget_reserve", "budget_relaunches",
                        "budget_relaunch_minutes", "budget_measure_share")
# What a budget chose (training/budget.py's Schedule): a budget run's resume takes these from its
# checkpoint, whatever the config file says.
BUDGET_SCHEDULE = ("epochs", "ramp_start_epoch", "ramp_end_epoch", "warmup_epochs")


def differences(saved: dict, config: TrainConfig) -> list[str]:
    """The fields, beyond `CHANGEABLE_ON_RESUME`, in which the run `saved` (a run's config as
    saved; fields it predates take their defaults) differs from `config`: "name: saved -> now"."""
    before = to_dict(from_dict(saved))
    now = to_dict(config)
    chosen = BUDGET_SCHEDULE if before["budget_hours"] > 0 or before["budget_dollars"] > 0 else ()
    return [f"{key} {before[key]!r} -> {now[key]!r}" for key in now
            if key not in CHANGEABLE_ON_RESUME and key not in chosen and before[key] != now[key]]


def _field_types() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)


def _coerce(key: str, value, kind: type):
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, bool) and kind in (int, float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}") from None


def apply_overrides(config: TrainConfig, values: dict, where: str) -> TrainConfig:
    types = _field_types()
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(types)})")
        setattr(config, key, _coerce(key, value, types[key]))
    return config


def parse_set(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        overrides[key.strip()] = value.strip()
    return overrides


def _triple(text: str) -> tuple[float, float, float] | None:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        return None
    return values if len(values) == 3 else None


# A timm arch brings its own input: these fields take its values unless the config sets them.
ARCH_INPUT_FIELDS = ("image_size", "val_image_size", "val_crop_fraction", "image_mean", "image_std",
                     "val_interpolation", "val_crop_mode")


def with_arch_inputs(config: TrainConfig, set_keys: set[str]) -> TrainConfig:
    """`config` with a timm arch's input size, validation crop (fraction, mode, interpolation) and
    mean/std where the config did not set them (our ResNets keep the dataclass's ImageNet defaults)."""
    from dali_imagenet.training.archs import input_defaults, is_timm, problem

    if not is_timm(config.arch) or problem(config.arch):
        return config
    defaults = input_defaults(config.arch)
    values = {"image_size": defaults.image_size, "val_image_size": defaults.image_size,
              "val_crop_fraction": defaults.crop_fraction, "image_mean": ",".join(map(str, defaults.mean)),
              "image_std": ",".join(map(str, defaults.std)), "val_interpolation": defaults.interpolation,
              "val_crop_mode": defaults.crop_mode}
    for key in ARCH_INPUT_FIELDS:
        if key not in set_keys:
            setattr(config, key, values[key])
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    config = TrainConfig()
    set_keys: set[str] = set()
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        apply_overrides(config, values, str(path))
        set_keys |= set(values)
    sets = parse_set(list(overrides))
    apply_overrides(config, sets, "--set")
    with_arch_inputs(config, set_keys | set(sets))
    config.validate()
    return config


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def from_dict(values: dict) -> TrainConfig:
    """A run's config as saved in its checkpoint; keys this version does not know are ignored."""
    types = _field_types()
    return apply_overrides(TrainConfig(), {k: v for k, v in values.items() if k in types}, "checkpoint config")
