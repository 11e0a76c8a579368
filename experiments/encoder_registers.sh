#!/usr/bin/env bash
# Encoder-side registers: RAE-DiT-XL for 80 epochs on SigLIP2-B with test-time registers and on SigLIP2-So400M
# without, with one-round and with recursive test-time registers (4 runs). The SigLIP2-B row without registers
# is main_dit_xl_80ep, run by experiments/main.sh.
#
# Prerequisites (experiments/README.md): the one-round So400M register neurons (dsr.analyze), then latent
# statistics and decoders in $DSR_ARTIFACTS/siglip2_b-ttr/, siglip2_so400m-none/, siglip2_so400m-ttr/ and
# siglip2_so400m-recursive_ttr/.
#
# Hardware: 8-GPU nodes through SLURM (cluster=slurm_8gpu: Hydra's submitit launcher, one job per row, 8 tasks of one
# GPU each; trainer.num_nodes=N as an extra argument asks for N nodes per job). Run this on the login node under
# tmux/nohup: it submits the jobs and waits for them. Running it again resubmits the same rows into the same
# directories (sweep_name=encoder_registers), and every job resumes from its checkpoints/last.ckpt; finished rows stop at once.
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

python -m dsr.train -m cluster=slurm_8gpu logger=wandb sweep_name=encoder_registers \
    experiment=enc_siglip2_b_ttr,enc_so400m,enc_so400m_ttr,enc_so400m_recursive_ttr \
    "$@"
