"""The paper presets and configs against the released scripts' settings (docs/paper-fidelity.md).

Each expected value is re-derived here from the script's own arithmetic, not copied from our configs.
"""

import math
from pathlib import Path

import pytest

from sinkdlm.config import load_config
from sinkdlm.eval import presets

CONFIGS = Path(__file__).parents[1] / "configs"
SMDM_SEED = 3407  # fabric.seed_everything(3407) in every SMDM training script
# sft/finetune_mdm_gsm8k.py: max_step = int(769240 * epoch / bs), micro-batch 16, lr 2e-4, min lr / 10
GSM8K_EXAMPLES, SFT_EPOCHS, SFT_BATCH, SFT_MICRO, SFT_LR = 769_240, 10, 256, 16, 2e-4
# pretrain/train_mdm.py: max_step = int(flops * 1e12 / (6 * N_millions * batch * 2048)), micro-batch 8 for 472
N_472_MILLIONS, FLOPS, PRETRAIN_BATCH, PRETRAIN_MICRO, SEQ = 471.90656, 300, 256, 8, 2048


def test_gsm8k_sft_recipe_is_the_scripts_256_by_10_epochs():
    cfg = load_config(CONFIGS / "sft_gsm8k_paper.yaml")
    steps = int(GSM8K_EXAMPLES * SFT_EPOCHS / SFT_BATCH)
    assert steps == 30048
    assert (cfg.steps(), cfg.train.global_batch, cfg.train.micro_batch) == (steps, SFT_BATCH, SFT_MICRO)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_frac) == (SFT_LR, SFT_LR / 10, 0.01)
    assert max(int(cfg.optim.warmup_frac * steps), cfg.optim.warmup_min_steps) == int(steps * 0.01)  # 300, as SMDM
    assert (cfg.seq_len, cfg.train.seed, cfg.train.objective, cfg.train.eps) == (256, SMDM_SEED, "sft", 1e-3)


@pytest.mark.parametrize("variant", ["plain", "gate", "sink"])
def test_pretraining_configs_are_smdms_472_run(variant):
    cfg = load_config(CONFIGS / f"paper_472_{variant}.yaml")
    smdm_steps = int(FLOPS * 1e12 / (6 * N_472_MILLIONS * PRETRAIN_BATCH * SEQ))
    assert abs(cfg.steps() - smdm_steps) <= 1  # SMDM rounds N to millions with 6 decimals
    assert (cfg.train.global_batch, cfg.train.micro_batch, cfg.seq_len) == (PRETRAIN_BATCH, PRETRAIN_MICRO, SEQ)
    assert (cfg.train.seed, cfg.train.eps, cfg.train.random_length_prob) == (SMDM_SEED, 1e-3, 0.0)
    optim = cfg.optim
    assert (optim.lr, optim.min_lr, optim.warmup_frac, optim.warmup_min_steps) == (2e-4, 2e-5, 0.01, 100)
    assert math.isclose(cfg.model.non_embedding_params() / 1e6, N_472_MILLIONS, abs_tol=1e-6)


def test_likelihood_paper_preset_is_eval_mdm_sh():
    paper = presets.LIKELIHOOD_PRESETS["paper"]
    assert (paper.mc_num, paper.eps, paper.add_bos) == (1024, 0.0, True)
    # eval_mdm.sh: nll_type and cfg (the guidance weight) per task (LAMBADA: lambada_standard)
    assert paper.tasks == {"arc_easy": ("mc", 0.6), "race": ("mc", 0.7), "hellaswag": ("mc", 0.7),
                           "social_iqa": ("mc", 0.6), "piqa": ("chain_rule", 0.6), "openbookqa": ("chain_rule", 1.6),
                           "boolq": ("chain_rule", 1.6), "lambada_standard": ("chain_rule", 1.1),
                           "lambada_openai": ("chain_rule", 1.1)}
    default = presets.LIKELIHOOD_PRESETS["default"]
    assert (default.eps, default.add_bos, default.tasks) == (1e-3, False, {})
