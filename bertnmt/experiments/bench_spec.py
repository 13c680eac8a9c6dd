"""What one benchmark run measures (:class:`BenchSpec`), its variants, and its training config."""
from __future__ import annotations

from dataclasses import dataclass

from bertnmt.core.paths import CONF_DIR

TRAIN_VARIANTS = ["plain", "fused_cached", "fused_live", "fused_finetune", "marian", "plain_bf16"]
DECODE_VARIANTS = ["decode_plain", "decode_fused_cached", "decode_fused", "decode_marian"]
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "V100": 125e12}


@dataclass
class BenchSpec:
    model: str = "small"  # a conf/model option, or "big" (d 1024, FFN 4096, 16 heads, 6+6)
    bert: str = "minilm"  # a conf/bert option
    random_bert: bool = False  # a random encoder of the same config (GPU machines without the weights)
    data: str = "multi30k_en_de"
    sentences: int = 3000  # training pairs prepared for the benchmark (data.train_limit)
    max_tokens: int = 2048
    steps: int = 12  # timed optimizer updates per training variant
    warmup: int = 3  # untimed updates first
    decode_sents: int = 480
    decode_len: int = 16  # every hypothesis is forced to this many tokens (+ eos)
    decode_tokens: int = 0  # decoding's token budget per batch (eval.max_tokens; 0 = the device's default)
    check_every: int = 0  # decoding steps between checks for done sentences (eval.check_every; 0 = by device)
    beam: int = 5
    device: str = "cpu"
    bf16: bool = False  # autocast to bf16 (always on with CUDA)
    compile: bool = False  # torch.compile the NMT model (training variants)
    threads: int = 0  # torch.set_num_threads; 0 = torch's default
    repeat: int = 2  # run the whole list this many times, interleaved; keep each variant's fastest run
    overrides: str = ""  # extra Hydra overrides, space-separated (e.g. "bert.path=/models/minilm data=custom ...")


def compose_cfg(spec: BenchSpec):
    """The training Config of the benchmark (Hydra compose of conf/, then typed)."""
    from hydra import compose, initialize_config_dir

    from bertnmt.core.config import register_configs, to_config

    register_configs()
    model = "iwslt" if spec.model == "big" else spec.model
    overrides = [f"model={model}", f"bert={spec.bert}", f"data={spec.data}", f"data.train_limit={spec.sentences}",
                 f"data.max_tokens={spec.max_tokens}", "trainer.progress=false", "trainer.tensorboard=false",
                 f"trainer.device={spec.device}"]
    if spec.model == "big":
        overrides += ["model.d_model=1024", "model.ffn_dim=4096", "model.heads=16", "model.name=big"]
    overrides += spec.overrides.split()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))
