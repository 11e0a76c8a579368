#!/usr/bin/env bash
# The affordable pixel-space rows: JiT-B/16 on 256 px ImageNet for 200 epochs with JiT's recipe and sampler (CFG 3.0 on
# its interval), +- 36 diffusion registers joining with the in-context class tokens at block 4 of 12 (2 runs). JiT
# reports gFID-50K 4.37 for this setting; the DSR paper's pixel rows (JiT-H) are in input_spaces.sh.
#
# Prerequisites: none beyond ImageNet (JiT reads the images; no latent statistics, no decoder).
#
# Hardware: 8-GPU nodes through SLURM (cluster=slurm_8gpu: Hydra's submitit launcher, one job per row, 8 tasks of one
# GPU each; trainer.num_nodes=N as an extra argument asks for N nodes per job). Run this on the login node under
# tmux/nohup: it submits the jobs and waits for them. Running it again resubmits the same rows into the same
# directories (sweep_name=jit), and every job resumes from its checkpoints/last.ckpt; finished rows stop at once.
#
# Environment it expects:
#   SLURM_PARTITION, SLURM_ACCOUNT (and SLURM_QOS if your cluster needs one)   read by conf/cluster/slurm_8gpu.yaml
#   IMAGENET_TRAIN_DIR   the ImageNet train ImageFolder (data.dataset.root)
#   DSR_ARTIFACTS        unused by these rows (no latent statistics or decoder); default ./artifacts
#   WANDB_PROJECT, WANDB_ENTITY   the W&B project and entity (logger=wandb); WANDB_MODE=offline to sync later
#   DSR_FID_REFERENCE, DSR_INCEPTION_WEIGHTS   ADM reference batch and Inception weights for the online FID
#   DSR_OUTPUT_ROOT      where runs go (default ./outputs)
#
# Extra arguments are passed to dsr.train and apply to every row, e.g. `data.micro_batch_size=64`.
# Afterwards: python -m dsr.tune (EMA x guidance scale on 8K samples), then 50K samples and FID, experiments/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m dsr.train -m cluster=slurm_8gpu logger=wandb sweep_name=jit \
    experiment=jit_b_200ep,jit_b_200ep_dsr \
    "$@"
