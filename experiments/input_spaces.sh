#!/usr/bin/env bash
# Input spaces: diffusion registers in every input space the paper tests. This script runs the rows no other table
# has: RAE-DiT-XL on DINOv2-B with its trained registers, +- 36 diffusion registers (80 epochs at batch 1024),
# SiT-XL/2 on SD-VAE latents, +- 36 diffusion registers (SiT's 400K iterations at batch 256), and JiT-H/16 on pixels,
# +- 36 diffusion registers (JiT's recipe, 80 epochs at batch 1024) (6 runs). The SigLIP2-B rows of the table are
# main_dit_xl_80ep, diff_regs_36, enc_siglip2_b_ttr and main_dit_xl_80ep_dsr, run by main.sh,
# diffusion_registers.sh and encoder_registers.sh.
#
# Prerequisites (experiments/README.md): latent statistics and decoder in $DSR_ARTIFACTS/dinov2_b_reg-trained/, and
# the SD-VAE (stabilityai/sd-vae-ft-ema) in the Hugging Face cache; the VAE and pixel rows need neither statistics nor
# decoder.
#
# Hardware: 8-GPU nodes through SLURM (cluster=slurm_8gpu: Hydra's submitit launcher, one job per row, 8 tasks of one
# GPU each; trainer.num_nodes=N as an extra argument asks for N nodes per job). Run this on the login node under
# tmux/nohup: it submits the jobs and waits for them. Running it again resubmits the same rows into the same
# directories (sweep_name=input_spaces), and every job resumes from its checkpoints/last.ckpt; finished rows stop at once.
#
# Environment it expects:
#   SLURM_PARTITION, SLURM_ACCOUNT (and SLURM_QOS if your cluster needs one)   read by conf/cluster/slurm_8gpu.yaml
#   IMAGENET_TRAIN_DIR   the ImageNet train ImageFolder (data.dataset.root)
#   DSR_ARTIFACTS        latent statistics and decoders per (encoder, encoder registers); default ./artifacts
#   WANDB_PROJECT, WANDB_ENTITY   the W&B project and entity (logger=wandb); WANDB_MODE=offline to sync later
#   HF_HOME              the Hugging Face cache holding the encoder weights (nothing is downloaded)
#   DSR_FID_REFERENCE, DSR_INCEPTION_WEIGHTS   ADM reference batch and Inception weights for the online FID
#   DSR_OUTPUT_ROOT      where runs go (default ./outputs)
#
# Extra arguments are passed to dsr.train and apply to every row, e.g. `data.micro_batch_size=64` (gradient
# accumulation when 128 images per GPU do not fit) or `trainer.precision=bf16-mixed`; arguments that change what is
# trained (anything but where/how it runs) also change the run directory.
# Afterwards: 50K samples and FID per row, see experiments/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m dsr.train -m cluster=slurm_8gpu logger=wandb sweep_name=input_spaces \
    experiment=input_dinov2_b_reg,input_dinov2_b_reg_dsr,input_vae_sit_xl,input_vae_sit_xl_diff,input_jit_h,input_jit_h_dsr \
    "$@"
