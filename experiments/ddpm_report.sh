#!/usr/bin/env bash
# Regenerates the DDPM section of docs/RESULTS.md (issue 10) on this 2-core CPU: trains the
# shipped colour model, fine-tunes a grey one from it, runs the report for both.
#
#   bash experiments/ddpm_report.sh            # every step (each resumes where it stopped)
#   bash experiments/ddpm_report.sh summary    # only the summary, from the rows so far
#
# Training reads only ../shared/data/train (disjoint from every test set). Each training run
# checkpoints every 500 steps and resumes when run again with the same flags; the report's rows
# are keyed by their settings and the weights' digest, so an interrupted run never repeats one.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=../shared/data
OUT=docs/results/ddpm/report  # rows, summary: committed as they come; arrays (git-ignored):
                              # runs/arrays/ddpm/report/rows/
mkdir -p docs/results/ddpm

if [[ "${1:-}" != summary ]]; then
  # The shipped colour model: 32 channels, levels 1,2,2,2, 64² patches, batch 8, timesteps
  # drawn half from [1, 250] (the range denoising uses), 12k steps (1.26-1.5 steps/s measured
  # idle: 2.2-2.7 h; 0.70-0.75 steps/s on the slower machine of 2026-11-25: 4.4-4.8 h).
  # Skipped while assets/ddpm_colour.npz exists (it ships, trained by these lines on
  # 2026-11-25): delete it to train again.
  if [[ ! -f assets/ddpm_colour.npz ]]; then
    python experiments/train_ddpm.py --workdir=runs/ddpm --data=$DATA/train --t_hi=250 \
      --frac_hi=0.5 --steps=12000
    cp runs/ddpm/ema_weights.npz assets/ddpm_colour.npz
    cp runs/ddpm/loss.png docs/results/ddpm/loss_colour.png
  fi
  python experiments/ddpm_report.py --weights=assets/ddpm_colour.npz --out_dir=$OUT
  # Grey images: the colour model with the grey image replicated (the report's default), against
  # a grey model fine-tuned from it on the luma of the same training images.
  python experiments/train_ddpm.py --grey --init_weights=assets/ddpm_colour.npz \
    --workdir=runs/ddpm_grey --data=$DATA/train --t_hi=250 --frac_hi=0.5 --warmup=0 \
    --steps=2000
  cp runs/ddpm_grey/loss.png docs/results/ddpm/loss_grey.png
  python experiments/ddpm_report.py --weights=runs/ddpm_grey/ema_weights.npz \
    --sets=$DATA/Set12 --hybrids= --gen_images=0 --out_dir=$OUT
fi
python experiments/ddpm_report.py --summary --out_dir=$OUT --gen_psnr=30
