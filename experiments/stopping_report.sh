#!/usr/bin/env bash
# Regenerates the stopping-criteria and ablation tables of docs/RESULTS.md on this 2-core CPU.
#
#   bash experiments/stopping_report.sh            # every grid, then the summaries
#   bash experiments/stopping_report.sh summaries  # only the summaries, from the rows so far
#
# CPU protocol: 128x128 centre crops, Gaussian noise drawn once per image and sigma (numpy seed
# from the file name, sigma and --noise_seed 0) and clipped to [0, 1]; skip network of width 32
# (5 scales); Adam 0.01, input jitter 1/30, EMA 0.99; 2000 iterations. Every grid resumes where
# it stopped, so run the script again after an interruption. The rows are kept in the repository
# (docs/results/stopping/rows/*.jsonl): commit them as they come, so that a run spread over
# several sessions or machines loses nothing. Their curves and images (.npz, for the figures) go
# to runs/arrays/stopping/rows/<name>/, which git ignores: copy them along with the rows.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=../shared/data
OUT=docs/results/stopping/rows
COMMON=(--crop=128 --iters=2000 --widths=32 --noise_seed=0)
# The staged method: 2 stages (t = 30, then y), the last with 90% of the iterations, a probe of
# 0.3 sigma in every stage target for the staged criterion.
STAGED=(--schedules=linear --stages=2 --t_max=30 --fresh_eps=false --final_shares=0.9
        --probes=0.3)
SUBSET=$DATA/CSet9/image_Baboon512rgb.png,$DATA/CSet9/image_F16_512rgb.png,$DATA/CSet9/image_House256rgb.png

grid() { python experiments/grid.py "${COMMON[@]}" "$@"; }

if [[ "${1:-}" != summaries ]]; then
  # Main table, criteria and 8-seed ensembles: CSet9 at sigma = 25.
  grid --images=$DATA/CSet9 --sigmas=25 --methods=dip,bm3d --seeds=8 --out=$OUT/cset9_s25.jsonl
  grid --images=$DATA/CSet9 --sigmas=25 --methods=staged --seeds=8 "${STAGED[@]}" \
    --out=$OUT/cset9_s25.jsonl
  grid --images=$DATA/CSet9 --sigmas=25 --methods=ddpm_input,ddpm_input_staged --seeds=1 \
    "${STAGED[@]}" --out=$OUT/cset9_s25.jsonl
  # Other noise levels and the grey set, one seed each (the 6-hour budget).
  grid --images=$DATA/CSet9 --sigmas=15,50 --methods=dip,staged,bm3d --seeds=1 "${STAGED[@]}" \
    --out=$OUT/cset9_s15_50.jsonl
  grid --images=$DATA/Set12 --sigmas=25 \
    --methods=dip,staged,ddpm_input,ddpm_input_staged,bm3d --seeds=1 "${STAGED[@]}" \
    --out=$OUT/set12_s25.jsonl
  # Ablations of the staged method on a 3-image subset (texture, smooth, a 256² source), one
  # seed, one axis at a time (the rows of the base setting are shared).
  ablate() { grid --images=$SUBSET --sigmas=25 --methods=staged --seeds=1 "${STAGED[@]}" "$@" \
    --out=$OUT/ablations.jsonl; }
  ablate --stages=1,2,3
  ablate --t_max=30,60,120
  ablate --final_shares=0.5,0.75,0.9  # at 2 stages, equal shares are 0.5
  # At 2 stages only the first target holds eps (the last is y + probe), and the first stage's
  # eps is the same draw either way, so fresh eps changes nothing there: 3 stages.
  ablate --stages=3 --fresh_eps=false,true
  ablate --schedules=linear,cosine
  ablate --probes=0,0.3
  ablate --nets=skip,hourglass,unet
  ablate --widths=16,32,64
  ablate --losses=mse,mse_ssim
  ablate --sigma_estimated=false,true  # the fit given sigma estimated from the noisy image
fi

summary() {  # name, title; a grid with no rows yet is passed over
  [[ -f $OUT/$1.jsonl ]] || { echo "no rows yet in $OUT/$1.jsonl"; return 0; }
  python experiments/summary.py --results=$OUT/$1.jsonl --out_md=docs/results/stopping/$1.md \
    --fig_dir=docs/results/stopping/$1 --title="$2" --criterion=staged,discrepancy
}
summary cset9_s25 "CSet9, σ = 25: DIP, staged supervision, DDPM input, CBM3D"
summary cset9_s15_50 "CSet9, σ = 15 and 50"
summary set12_s25 "Set12 (grey), σ = 25"
summary ablations "Ablations of the staged method (Baboon, F16, House; σ = 25; one seed)"
