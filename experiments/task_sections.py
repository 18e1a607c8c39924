"""The sections of the task report (experiments/task_report.py): per section its images, crop,
settings (each a dipjax.pipeline.RestoreConfig's task fields) and fits; and how a task's
observation is drawn and scored (shared with experiments/posterior_report.py). No flags.

Every setting is fitted by plain DIP with a share of its measurements held out (the 'holdout'
stop) and, where the observation is noisy, by the staged method with its probe (the 'staged'
stop); each fit traces every criterion that applies, so all stops are read off the same fits.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from dipjax import metrics
from dipjax import pipeline

# Images are paths under the report's --data folder (../shared/data). Set12's images among the
# DIP paper's 11 inpainting images (Papyan et al.'s set): C.man, House, Peppers, Lena, Barbara,
# Boat, Man, Couple.
SET12_IN_DIP = tuple(f"Set12/{i:02d}.png" for i in (1, 2, 3, 8, 9, 10, 11, 12))
SET5 = tuple(f"Set5/HR/{n}.png" for n in ("baby", "bird", "butterfly", "head", "woman"))
SET14 = tuple(f"Set14/{n}.png" for n in (
    "baboon", "barbara", "bridge", "coastguard", "comic", "face", "flowers", "foreman", "lenna",
    "man", "monarch", "pepper", "ppt3", "zebra"))
SR_SETTINGS = {"x4": dict(task="sr", factor=4, reg_noise_std=0.03),
               "x8": dict(task="sr", factor=8, reg_noise_std=0.05)}
CSET9 = tuple(f"CSet9/{n}" for n in (
    "image_Baboon512rgb.png", "image_F16_512rgb.png", "image_House256rgb.png",
    "image_Lena512rgb.png", "image_Peppers512rgb.png", "kodim01.png",
    "kodim02.png", "kodim03.png", "kodim12.png"))
HOLDOUT = 0.05  # share of the measurements held out of every DIP fit of the report


@dataclasses.dataclass(frozen=True)
class Section:
  """One report section: `settings` by name (RestoreConfig fields), each run on every image."""
  images: tuple[str, ...]
  crop: int  # centre crop (0: the whole image, cropped to a multiple of 32 as the DIP repo)
  settings: dict
  iters: int = 2000
  width: int = 32
  seeds: int = 1


SECTIONS = {
    "sr": Section(SET5, 0, SR_SETTINGS),
    "sr_set14": Section(SET14, 0, SR_SETTINGS),
    "inpaint": Section(SET12_IN_DIP, 0, {
        "random50": dict(task="inpaint", mask_kind="random", mask_ratio=0.5)}),
    "deblur": Section(CSET9 + tuple(f"Set12/{i:02d}.png" for i in range(1, 13)), 128, {
        "gauss_1pct": dict(task="deblur", blur="gaussian", sigma=2.55),
        "gauss_3pct": dict(task="deblur", blur="gaussian", sigma=7.65),
        "motion_1pct": dict(task="deblur", blur="motion", blur_size=15, sigma=2.55),
        "motion_3pct": dict(task="deblur", blur="motion", blur_size=15, sigma=7.65)}),
    "poisson": Section(CSET9 + tuple(f"Set12/{i:02d}.png" for i in range(1, 13)), 128, {
        "peak10": dict(task="denoise", noise="poisson", peak=10.0),
        "peak30": dict(task="denoise", noise="poisson", peak=30.0),
        # a raw camera's noise: photon noise plus read noise (Poisson-Gaussian); the other
        # settings restore the same observation with both estimated from it, and as if the
        # noise were white Gaussian of an estimated sigma (a Gaussian-only tool's reading)
        "pg60_read8": dict(task="denoise", noise="poisson", peak=60.0, sigma=8.0),
        "pg60_read8_estimated": dict(task="denoise", noise="poisson", peak=60.0, sigma=8.0,
                                     assume=dict(sigma_known=False)),
        "pg60_read8_as_gaussian": dict(task="denoise", noise="poisson", peak=60.0, sigma=8.0,
                                       assume=dict(noise="gaussian", sigma_known=False))}),
    # camera-like noise: Gaussian, correlated over ~1 pixel (a demosaiced sensor's); the
    # other settings draw the same observation but restore it as if the noise were white, or
    # with its level and correlation estimated from it (a real photo's case)
    "correlated": Section(CSET9 + tuple(f"Set12/{i:02d}.png" for i in range(1, 13)), 128, {
        "corr25": dict(task="denoise", sigma=25.0, noise_corr=0.7),
        "corr25_white": dict(task="denoise", sigma=25.0, noise_corr=0.7,
                             assume=dict(noise_corr=0.0)),
        "corr25_estimated": dict(task="denoise", sigma=25.0, noise_corr=0.7,
                                 assume=dict(sigma_known=False, noise_corr=None))}),
}


def noisy(setting: dict) -> bool:
  """Whether a setting's observation has noise (then the staged method is fitted too)."""
  return setting.get("noise") == "poisson" or setting.get("sigma", 0) > 0


def methods(setting: dict) -> tuple[str, ...]:
  """The methods fitted; a setting with `assume` (fields the restoration takes other than the
  observation's) only the staged method, the one whose probe they change."""
  if "assume" in setting:
    return ("staged",)
  return ("dip", "staged") if noisy(setting) else ("dip",)


def restore_fields(setting: dict) -> dict:
  """The RestoreConfig fields of a setting as the restoration takes them (`assume` applied)."""
  fields = {k: v for k, v in setting.items() if k != "assume"}
  return dict(fields, **setting.get("assume", {}))


def observation_config(config: pipeline.RestoreConfig,
                       setting: dict) -> pipeline.RestoreConfig:
  """The config the setting's observation is drawn with: the restoration's, the fields it
  `assume`s set back to the observation's (the setting's, else RestoreConfig's default)."""
  defaults = {f.name: f.default for f in dataclasses.fields(pipeline.RestoreConfig)}
  return dataclasses.replace(config, **{k: setting.get(k, defaults[k])
                                        for k in setting.get("assume", {})})


def criteria(setting: dict, method: str) -> tuple[str, ...]:
  """The stops traced by a fit: the staged method's own, or every one plain DIP affords."""
  if method == "staged":
    return ("staged", "oracle", "fixed")
  return ("holdout", "oracle", "fixed", "es_wmv") + (("discrepancy",) if noisy(setting) else ())


def observe(config: pipeline.RestoreConfig, clean: np.ndarray, name: str):
  """(observation, mask or None), drawn from a seed of the image's name only."""
  seed = zlib.crc32(name.encode())
  mask = pipeline.make_mask(config, clean.shape, seed) if config.task == "inpaint" else None
  return pipeline.degrade(config, clean, seed=seed, mask=mask), mask


def score(config: pipeline.RestoreConfig, x: np.ndarray, clean: np.ndarray) -> dict[str, float]:
  """PSNR / SSIM of x against clean; for SR also the DIP paper's figure, the luma PSNR with
  `factor` pixels trimmed at each edge (its super-resolution_eval_script.py: BT.601 Y)."""
  found = pipeline.score(x, clean)
  if config.task == "sr":
    found["psnr_y"] = float(metrics.psnr_y(x, clean, config.factor))
  return found
