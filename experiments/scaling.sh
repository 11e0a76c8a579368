#!/usr/bin/env bash
# Scaling: LightningDiT-S and -B on SigLIP2-B for 100k iterations at batch 1024, without registers and with
# DSR (4 runs). The DiT-XL points are main_dit_xl_80ep and main_dit_xl_80ep_dsr, run by experiments/main.sh.
#
# Prerequisites (experiments/README.md): latent statistics and decoders in $DSR_ARTIFACTS/siglip2_b-none/ and
# $DSR_ARTIFACTS/siglip2_b-ttr/.
#
# Hardware: 8-GPU nodes through SLURM (cluster=slurm_8gpu: Hydra's submitit launcher, one job per row, 8 tasks of one
# GPU each; trainer.num_nodes=N as an extra argument asks for N nodes per job). Run this on the login node under
# tmux/nohup: it submits the jobs and waits for them. Running it again resubmits the same rows into the same
# directories (sweep_name=scaling), and every job resumes from its checkpoints/last.ckpt; finished rows stop at once.
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

python -m dsr.train -m cluster=slurm_8gpu logger=wandb sweep_name=scaling \
    experiment=scale_dit_s,scale_dit_s_dsr,scale_dit_b,scale_dit_b_dsr \
    "$@"
