"""The observation's noise: its models (:class:`GaussianNoise`, :class:`PoissonNoise`), adding
it, estimating its level, its clipped moments, and the probe-SURE estimate of a fit's error that
needs no ground truth.

Images are float32 (H, W, C) in [0, 1]; sigma is a std in the same units (25 / 255 for
sigma = 25).
"""

from __future__ import annotations

import dataclasses
import math

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
MAX_CORRELATION = 8.0  # the widest noise correlation kernel, std in pixels


@dataclasses.dataclass(frozen=True)
class GaussianNoise:
  """Gaussian noise on the measurement, clipped to [0, 1] as DIP's protocol (and an 8-bit
  sensor) does: y = clip(A x + sigma n, 0, 1), n ~ N(0, 1) white, or correlated between
  neighbouring pixels as a camera's demosaicing and processing leave it (:func:`correlate`).

  sigma: the std of each entry in [0, 1] units (25 / 255 for sigma = 25); None when unknown (a
  real noisy photo): :meth:`level` then estimates it from the observation.
  correlation: the std in pixels of the Gaussian kernel that correlates the noise
  (:func:`correlation_kernel`); 0: white; None when unknown: :meth:`width` then estimates it
  from the observation (:func:`estimate_noise`).
  """
  sigma: float | None = None
  correlation: float | None = 0.0

  def __post_init__(self):
    if self.sigma is not None and not (math.isfinite(self.sigma) and 0 <= self.sigma <= 1):
      raise ValueError(f"sigma must be a finite number in [0, 1] (25 / 255 for sigma = 25), "
                       f"got {self.sigma}")
    if self.correlation is not None and not (
        math.isfinite(self.correlation) and 0 <= self.correlation <= MAX_CORRELATION):
      raise ValueError(f"correlation is a kernel's std in pixels in [0, {MAX_CORRELATION}], "
                       f"got {self.correlation}")

  def sample(self, rng: np.random.Generator, ax: np.ndarray) -> np.ndarray:
    """clip(ax + sigma n, 0, 1) of the noise-free measurement `ax` (float32; it may overshoot
    [0, 1], e.g. a Lanczos down-sampling of an edge); `rng` is advanced."""
    if self.sigma is None or self.correlation is None:
      raise ValueError("cannot add noise of an unknown sigma or correlation")
    ax = np.asarray(ax, np.float32)
    if not self.correlation:
      return add_noise(rng, ax, self.sigma) if self.sigma else np.clip(ax, 0, 1)
    n = correlate(rng.standard_normal(ax.shape, dtype=np.float32), self.correlation)
    return np.clip(ax + np.float32(self.sigma) * np.asarray(n), 0, 1)

  def width(self, y: np.ndarray) -> float:
    """The noise's correlation width in observation y (h, w, C): `correlation`, or estimated
    from y (:func:`estimate_noise`) when unknown."""
    return self.correlation if self.correlation is not None else estimate_noise(y)[1]

  def level(self, y: np.ndarray) -> float:
    """The std of the noise in observation y (h, w, C): sigma, or estimated from y
    (:func:`estimate_sigma` at the noise's :meth:`width`) when unknown."""
    return self.sigma if self.sigma is not None else estimate_sigma(y, self.width(y))

  def std_map(self, y: np.ndarray) -> np.ndarray:
    """The noise's std per entry of observation y (h, w, C): :meth:`level` everywhere."""
    return np.full(np.shape(y), self.level(y), np.float32)


@dataclasses.dataclass(frozen=True)
class PoissonNoise:
  """Photon (shot) noise with optional Gaussian read noise, clipped to [0, 1]:
  y = clip(Poisson(peak A x) / peak + sigma n, 0, 1), `peak` the photon count of a white pixel
  (lower: noisier), `sigma` the read noise std in [0, 1] units (0: pure Poisson)."""
  peak: float
  sigma: float = 0.0

  def __post_init__(self):
    if not (math.isfinite(self.peak) and self.peak > 0):
      raise ValueError(f"peak must be a positive finite photon count, got {self.peak}")
    if not (math.isfinite(self.sigma) and 0 <= self.sigma <= 1):
      raise ValueError(f"sigma must be a finite number in [0, 1], got {self.sigma}")

  def sample(self, rng: np.random.Generator, ax: np.ndarray) -> np.ndarray:
    """A noisy observation of the noise-free measurement `ax` (float32); `rng` is advanced."""
    ax = np.clip(np.asarray(ax, np.float64), 0, None)
    y = rng.poisson(self.peak * ax) / self.peak
    if self.sigma:
      y = y + self.sigma * rng.standard_normal(y.shape)
    return np.clip(y, 0, 1).astype(np.float32)

  def level(self, y: np.ndarray) -> float:
    """The noise's root-mean-square std over observation y: sqrt(mean(y) / peak + sigma^2)
    (the variance of Poisson(peak a) / peak is a / peak)."""
    return float(np.sqrt(max(float(np.mean(y)), 0.0) / self.peak + self.sigma**2))

  def std_map(self, y: np.ndarray) -> np.ndarray:
    """The noise's std per entry of observation y (h, w, C), estimated from y alone:
    sqrt(max(y, 0) / peak + sigma^2), unbiased in variance (E y = A x, PURE's estimate of the
    photon noise's variance), floored at a tenth of one photon's step 1 / peak so that black
    pixels keep a defined std."""
    var = np.maximum(np.asarray(y, np.float64), 0.0) / self.peak + self.sigma**2
    return np.sqrt(np.maximum(var, (0.1 / self.peak) ** 2)).astype(np.float32)


NoiseModel = GaussianNoise | PoissonNoise


def add_noise(rng_or_seed: np.random.Generator | int, x: np.ndarray,
              sigma: float) -> np.ndarray:
  """clip(x + sigma * N(0, 1), 0, 1) as float32, like the DIP code's ``get_noisy_image``.

  Args:
    rng_or_seed: a numpy Generator (advanced in place) or an int seed.
    x: image in [0, 1] (or a measurement slightly beyond), any shape, finite.
    sigma: noise standard deviation in [0, 1] units (e.g. 25 / 255), in [0, 1].
  """
  if not 0 <= sigma <= 1:
    raise ValueError(f"sigma is a std in [0, 1] units (25 / 255 for sigma = 25), got {sigma}")
  x = np.asarray(x, np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"add_noise takes finite images, got {np.sum(~np.isfinite(x))} NaN or "
                     "infinite values")
  rng = np.random.default_rng(rng_or_seed)
  noise = rng.standard_normal(np.shape(x), dtype=np.float32)
  return np.clip(x + np.float32(sigma) * noise, 0, 1)


def correlation_kernel(width: float) -> np.ndarray:
  """The (2r + 1, 2r + 1) Gaussian kernel of std `width` pixels (r = ceil(4 width)) that
  correlates white noise, scaled to unit energy (its squares sum to 1) so that the correlated
  noise keeps the white noise's variance per entry; width 0: [[1]] (white)."""
  if width == 0:
    return np.ones((1, 1), np.float32)
  t = np.arange(-math.ceil(4 * width), math.ceil(4 * width) + 1)
  g = np.exp(-t.astype(np.float64) ** 2 / (2 * width**2))
  kernel = np.outer(g, g)
  return (kernel / np.sqrt(np.sum(kernel**2))).astype(np.float32)


def correlate(white: Array | np.ndarray, width: float) -> Array | np.ndarray:
  """White noise (..., H, W, C) correlated by :func:`correlation_kernel`, circularly (by FFT):
  stationary, each entry of the same variance as before (the kernel, wrapped onto H x W, is
  rescaled to unit energy), independent between channels. width 0: `white` itself. A NumPy
  array is correlated on the host (the same numbers on every backend), a JAX array by JAX."""
  xp = np if isinstance(white, np.ndarray) else jnp
  white = xp.asarray(white, xp.float32)
  if width == 0:
    return white
  h, w = white.shape[-3:-1]
  kernel = correlation_kernel(width).astype(np.float64)
  r = kernel.shape[0] // 2
  wrapped = np.zeros((h, w))
  rows, cols = np.meshgrid(np.arange(-r, r + 1) % h, np.arange(-r, r + 1) % w, indexing="ij")
  np.add.at(wrapped, (rows, cols), kernel)
  wrapped /= np.sqrt(np.sum(wrapped**2))
  response = np.fft.rfft2(wrapped)[:, :, None]
  if xp is jnp:
    response = jnp.asarray(response, jnp.complex64)
  return xp.fft.irfft2(xp.fft.rfft2(white, axes=(-3, -2)) * response, s=(h, w),
                       axes=(-3, -2)).astype(xp.float32)


def _diagonal_differences(y: np.ndarray, lag: int, stride: int = 1) -> np.ndarray:
  """y's (H, W, C) diagonal second differences at `lag` pixels,
  (y[i, j] - y[i, j + lag] - y[i + lag, j] + y[i + lag, j + lag]) / 2 at every `stride`-th
  (i, j): (ceil((H - lag) / stride), ceil((W - lag) / stride), C); lag 1, stride 2: the finest
  diagonal Haar band, one entry per 2 x 2 block."""
  h, w = y.shape[0] - lag, y.shape[1] - lag
  return (y[:h:stride, :w:stride] - y[:h:stride, lag:lag + w:stride]
          - y[lag:lag + h:stride, :w:stride] + y[lag:lag + h:stride, lag:lag + w:stride]) / 2.0


def _diagonal_band(y: np.ndarray, lag: int, stride: int = 1) -> float:
  """Donoho's MAD std of y's :func:`_diagonal_differences`, per channel, averaged over
  channels."""
  d = _diagonal_differences(y, lag, stride)
  return float(np.mean(np.median(np.abs(d), axis=(0, 1)) / 0.6744897501960817))


def _band_gain(width: float, lag: int) -> float:
  """The share of a unit-variance noise's variance, correlated by :func:`correlation_kernel`,
  that :func:`_diagonal_band` at `lag` keeps (1 for white noise)."""
  kernel = correlation_kernel(width).astype(np.float64)
  n = kernel.shape[0]
  combined = np.zeros((n + lag, n + lag))
  for (i, j), sign in (((0, 0), 1), ((0, lag), -1), ((lag, 0), -1), ((lag, lag), 1)):
    combined[i:i + n, j:j + n] += sign * kernel / 2.0
  return float(np.sum(combined**2))


def _check_image(y: Array | np.ndarray, what: str, side: int) -> np.ndarray:
  y = np.asarray(y, np.float64)
  if y.ndim != 3 or y.shape[0] < side or y.shape[1] < side:
    raise ValueError(f"{what} needs an image (H, W, C) with H, W >= {side}, got {y.shape}")
  if not np.all(np.isfinite(y)):
    raise ValueError(f"{what} needs a finite image, got {np.sum(~np.isfinite(y))} NaN or "
                     "infinite values")
  return y


def estimate_sigma(y: Array | np.ndarray, correlation: float = 0.0) -> float:
  """Noise std of an image with additive Gaussian noise, from the image alone.

  Donoho's MAD estimator on the finest diagonal Haar wavelet coefficients,
  sigma = median|HH| / 0.6745, per channel, averaged over channels. Image structure biases it
  slightly upwards (edges leak into HH); on natural images at sigma >= 15/255 it is typically
  within a few percent. Correlated noise (a camera's) is weaker in that band: with
  `correlation` (the width of :func:`correlation_kernel`) the band's std is divided by the
  share of the noise it keeps; without, correlated noise reads low (0.4 sigma at width 0.7).

  Args:
    y: (H, W, C) image in [0, 1] units, H and W >= 2.
    correlation: the noise's correlation width in pixels; 0: white.

  Returns:
    sigma in the image's units.
  """
  y = _check_image(y, "estimate_sigma", 2)
  return _diagonal_band(y, 1, stride=2) / math.sqrt(_band_gain(correlation, 1))


# The correlation widths estimate_noise tells apart: below 0.4 the leak of image structure into
# the bands reads as much (white noise reads 0.3-0.4), above 1 the noise is too weak in both.
WHITE_BELOW = 0.4
ESTIMATED_WIDTHS = np.linspace(WHITE_BELOW, 1.0, 61)


def estimate_noise(y: Array | np.ndarray) -> tuple[float, float]:
  """(sigma, correlation width) of Gaussian noise that may be correlated (a camera's), from
  the image alone: the ratio of the MAD stds of diagonal second differences at lags 2 and 1
  (:func:`_diagonal_band`) grows with the width of :func:`correlation_kernel` as the noise's
  share of each band does, which fixes the width; then :func:`estimate_sigma` at that width.
  Image structure leaks more into the lag-2 band: white noise reads width 0.3-0.4, so widths
  below WHITE_BELOW (0.4) count as white (0); widths above ~0.8, whose noise is weak in both
  bands, read low, and the estimate stops at 1 (with a warning): beyond it the sigma
  correction (x4.5 at 1) would amplify the leak. The 256² centre crops of CSet9 at sigma = 25:
  white reads 0 (sigma 23.9-26.1), width 0.5 reads 0.50-0.52 and 0.7 reads 0.65-0.70 (sigma
  24.5-26.8, kodim01's texture 28.5-28.9), 1.0 reads 0.70-0.91 (sigma 19-25).

  Args:
    y: (H, W, C) image in [0, 1] units, H and W >= 3.

  Returns:
    (sigma in the image's units, width in pixels: 0 or in [0.4, 1]).
  """
  y = _check_image(y, "estimate_noise", 3)
  fine = _diagonal_band(y, 1)
  if fine <= 0:
    return 0.0, 0.0
  ratios = [math.sqrt(_band_gain(w, 2) / _band_gain(w, 1)) for w in ESTIMATED_WIDTHS]
  ratio = _diagonal_band(y, 2) / fine
  width = float(np.interp(ratio, ratios, ESTIMATED_WIDTHS, left=0.0))
  if ratio > ratios[-1]:
    logging.warning("the noise looks correlated beyond a width of %.1f pixels (or the image is "
                    "smooth, up-sampled or compressed): its width is taken as %.1f",
                    ESTIMATED_WIDTHS[-1], ESTIMATED_WIDTHS[-1])
  return estimate_sigma(y, width), width


MAX_PEAK = 1e5  # the largest photon count estimate_poisson_gaussian reports (a ~ 0: Gaussian)
MIN_BLOCKS = 1024  # 2 x 2 blocks (over the channels) estimate_poisson_gaussian needs
MIN_SPAN = 0.1  # the range of levels it needs to tell photon noise from read noise


def _box_mean(x: np.ndarray, size: int) -> np.ndarray:
  """The mean of x (h, w) over the size x size window from size // 2 before each entry to
  size - 1 - size // 2 after it (edges replicated): (h, w)."""
  before = size // 2
  padded = np.pad(x, ((before, size - 1 - before),) * 2, mode="edge")
  sums = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1))
  sums[1:, 1:] = np.cumsum(np.cumsum(padded, 0), 1)
  return (sums[size:, size:] - sums[:-size, size:] - sums[size:, :-size]
          + sums[:-size, :-size]) / size**2


def estimate_poisson_gaussian(y: Array | np.ndarray, bins: int = 16) -> tuple[float, float]:
  """(peak, read sigma) of Poisson-Gaussian noise (a raw camera's: :class:`PoissonNoise`), from
  the image alone, by the noise's variance as a linear function of the level, var(x) =
  x / peak + sigma^2 (Foi et al., 2008, simplified). Each 2 x 2 block's diagonal difference
  (y00 - y01 - y10 + y11) / 2 has the variance of the block's noise; the blocks are binned by
  the level around them (the mean over 6 x 6 pixels), each bin's variance taken within 3 std
  (edges and texture a minority; not MAD, which photon counts at a low peak step; bins of
  mostly equal pixels, flat or saturated, left out), and the line fitted by least squares,
  weighted by the model's variance, to the bins clear of clipping (2 std below the image's
  white, whose level may sit under 1, and 2 read-noise stds above its black, with 3 photons
  or more), peak and sigma kept non-negative. Channels share the model. Image structure reads
  as a little extra read noise, as for :func:`estimate_sigma`.

  Args:
    y: (H, W, C) finite image in [0, 1] units, at least MIN_BLOCKS 2 x 2 blocks over its
      channels (e.g. 64 x 64 grey) with levels spanning MIN_SPAN or more.
    bins: level bins (equal counts; fewer on small images).

  Returns:
    (peak: photons at a white pixel, up to MAX_PEAK where the noise does not grow with the
    level; sigma: the read noise std in [0, 1] units).

  Raises:
    ValueError: too small an image, or too narrow a range of levels clear of clipping to tell
      the two noises apart.
  """
  y = _check_image(y, "estimate_poisson_gaussian", 2)
  h, w = y.shape[0] // 2 * 2, y.shape[1] // 2 * 2
  diff = np.moveaxis(_diagonal_differences(y, 1, stride=2), -1, 0).ravel()  # channel by channel
  level = np.concatenate([_box_mean(y[:h, :w, c], 6)[1::2, 1::2].ravel()  # 6 x 6 around a block
                          for c in range(y.shape[-1])])
  if level.size < MIN_BLOCKS:
    raise ValueError(f"estimate_poisson_gaussian needs {MIN_BLOCKS} 2 x 2 blocks over the "
                     f"channels (e.g. 64 x 64 grey), got an image of {y.shape}")
  bins = min(bins, level.size // 64)
  edges = np.quantile(level, np.linspace(0, 1, bins + 1))
  which = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, bins - 1)
  at, var, count = [], [], []
  for b in range(bins):
    d = diff[which == b]
    if d.size >= 16 and np.mean(d == 0) < 0.5:
      at.append(level[which == b].mean())
      var.append(_clipped_variance(d))
      count.append(d.size)
  at, var, count = np.array(at), np.array(var), np.array(count)
  if not at.size or var.max() < 1e-8:  # no noise (std < 0.03 / 255): a clean or flat image
    return MAX_PEAK, 0.0
  black, white = float(y.min()), float(y.max())
  std = np.sqrt(var)
  keep = (at - black > 2 * std) & (white - at > 2 * std)
  if keep.sum() < 3 or np.ptp(at[keep]) < MIN_SPAN:  # strong noise: photon noise is not cut at 0
    keep = white - at > 2 * std
  def fit(keep: np.ndarray, model: np.ndarray) -> tuple[float, float]:
    span = np.ptp(at[keep]) if keep.any() else 0.0
    if span < MIN_SPAN:
      raise ValueError(f"estimate_poisson_gaussian: the image's levels clear of clipping span "
                       f"{span:.2f} (< {MIN_SPAN}): too narrow to tell photon from read noise")
    weight = count[keep] / np.maximum(model[keep], 1e-12) ** 2  # 1 / a variance's variance
    return _nonnegative_line(at[keep], var[keep], weight / weight.max())

  slope, offset = fit(keep, np.maximum(var, 0.1 * np.median(var)))  # no bin takes over
  for _ in range(3):  # the bins clear of clipping by the model, weighted by its variance
    model = slope * at + offset
    keep = ((white - at > 2 * np.sqrt(model)) & (at - black > 2 * math.sqrt(offset))
            & (slope * 3 <= at))
    slope, offset = fit(keep, model)
  peak = MAX_PEAK if slope * MAX_PEAK <= 1 else 1.0 / slope
  return float(peak), float(math.sqrt(offset))


def _clipped_variance(d: np.ndarray, rounds: int = 5) -> float:
  """The variance of zero-mean d without its outliers (edges): the mean square of the entries
  within 3 std, the std re-estimated from those `rounds` times, corrected for the Gaussian's
  share cut off (E[z^2 | |z| < 3] = 0.9733). Unlike MAD it is not stepped on discrete data
  (photon counts at a low peak)."""
  var = float(np.mean(d**2))
  if var == 0:
    return 0.0
  for _ in range(rounds):
    var = float(np.mean(d[np.abs(d) < 3 * np.sqrt(var)] ** 2)) / 0.97333
  return var


def _nonnegative_line(x: np.ndarray, v: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
  """(slope, offset) >= 0 of the weighted least-squares line v ~ slope x + offset."""
  design = np.stack([x, np.ones_like(x)], 1) * np.sqrt(weight)[:, None]
  slope, offset = np.linalg.lstsq(design, v * np.sqrt(weight), rcond=None)[0]
  if slope < 0:
    return 0.0, float(np.sum(weight * v) / np.sum(weight))
  if offset < 0:
    return float(np.sum(weight * x * v) / np.sum(weight * x * x)), 0.0
  return float(slope), float(offset)


def clipped_noise_moments(x: Array, sigma: Array, lower: bool = True) -> tuple[Array, Array]:
  """Mean and variance of the error e = clip(x + sigma n, 0, 1) - x, n ~ N(0, 1), elementwise.

  Clipping (DIP's protocol, and every sensor) makes the noise smaller and biased near 0 and 1:
  with a = -x / sigma, b = (1 - x) / sigma and Phi, phi the normal cdf and pdf,
  E e = sigma (phi(a) - phi(b)) - x Phi(a) + (1 - x)(1 - Phi(b)) and
  E e^2 = sigma^2 (Phi(b) - Phi(a) + a phi(a) - b phi(b)) + x^2 Phi(a) + (1 - x)^2 (1 - Phi(b)).
  lower=False clips at 1 only (a = -inf): Poisson noise, which has no mass below 0, saturating
  at white (its std `sigma` per entry, in the Gaussian approximation).
  """
  a, b = -x / sigma, (1.0 - x) / sigma
  pdf = lambda u: jnp.exp(-0.5 * u * u) / jnp.sqrt(2.0 * jnp.pi)
  sf_b = jax.scipy.special.ndtr(-b)
  cdf_a, pdf_a, a_pdf_a = jax.scipy.special.ndtr(a), pdf(a), a * pdf(a)
  if not lower:
    cdf_a, pdf_a, a_pdf_a = 0.0, 0.0, 0.0
  mean = sigma * (pdf_a - pdf(b)) - x * cdf_a + (1.0 - x) * sf_b
  second = (sigma**2 * (1.0 - cdf_a - sf_b + a_pdf_a - b * pdf(b)) + x**2 * cdf_a
            + (1.0 - x) ** 2 * sf_b)
  return mean, second - mean**2


def noise_std(y: Array, sigma: Array | float, proxy: Array | None = None,
              lower: bool = True) -> Array:
  """The std of y's noise e = y - x as the discrepancy principle needs it, sqrt(E mean e^2):
  () float32. sigma for additive noise; for y inside [0, 1], taken as clipped there (DIP's
  protocol, and every sensor), the clipped noise's sqrt(mean(bias^2 + variance))
  (:func:`clipped_noise_moments`) at x ~ `proxy` (default y; a denoised estimate is closer):
  at sigma = 50/255, 10-25% below sigma^2 in energy on natural images.

  Args:
    y: (..., H, W, C) the observation in [0, 1] units.
    sigma: its noise std before clipping, [0, 1] units: a scalar, or per entry (y's shape;
      Poisson noise, :meth:`PoissonNoise.std_map`).
    proxy: y's shape, a stand-in for the clean image x; None: y.
    lower: whether clipping at 0 censors the noise (False for Poisson noise:
      :func:`clipped_noise_moments`).
  """
  y = jnp.asarray(y, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  proxy = y if proxy is None else jnp.clip(jnp.asarray(proxy, jnp.float32), 0.0, 1.0)
  bias, var = clipped_noise_moments(proxy, jnp.where(sigma > 0, sigma, 1.0), lower)
  clipped = (jnp.min(y) >= 0.0) & (jnp.max(y) <= 1.0) & jnp.all(sigma > 0)
  return jnp.sqrt(jnp.where(clipped, jnp.mean(bias**2 + var), jnp.mean(sigma**2)))


def fitted_fraction(measured: Array, reference: Array, noise: Array) -> Array:
  """Fraction of the known noise `noise` (added to `reference`) that `measured` reproduces."""
  energy = jnp.sum(noise**2)
  fitted = jnp.sum((measured - reference) * noise) / jnp.where(energy > 0, energy, 1.0)
  return jnp.where(energy > 0, fitted, jnp.nan)


def sure_mse(measured: Array, target: Array, noise: Array, probe: Array, scale: Array,
             sigma: Array, clipped: Array | bool = False, lower: bool = True) -> Array:
  """Mean squared error of `measured` against the stage's noise-free target a x, without x.

  The stage target is x_k = a (x + e) + m: the observation y = x + e with unknown noise e, and
  known noise m that contains the probe a p (p = c sigma eps, fixed for the whole fit). With
  f = `measured`, expanding |f - a x|^2 = |(f - x_k) + a e + m|^2, the cross terms of e with m
  cancel exactly and

    mean (f - a x)^2 = mean (f - x_k)^2 + 2 mean (f - a y) m - mean m^2
                       - a^2 mean e^2 + 2 a mean (f - a x) e.

  Only the last two terms are unknown. For white noise e = sigma n they are a^2 sigma^2
  (2 lambda - 1), where lambda is the fraction of the noise the output has fitted. The network
  cannot tell the probe from the unknown noise (both white, in every target in a fixed ratio),
  so it fits both at the same rate, which the probe measures: lambda = mean (f - a y) a p /
  mean (a p)^2 (SURE, Stein's unbiased risk estimate, with the divergence read off the probe
  instead of by perturbing the fit). If y was `clipped` to [0, 1], e has a bias mu(x) (fitted
  like the image) and a variance V(x) (fitted at rate lambda), and the terms are
  a^2 (mean mu^2 - mean V + 2 lambda mean V). mu and V are :func:`clipped_noise_moments` at
  x ~ y, the observation: fixed for the fit, so the proxy's error shifts the estimate by a
  nearly constant amount and leaves its minimum in place. (At x ~ f / a, the current output,
  a blurry early output moved the estimate: at sigma = 50 on a 128^2 Baboon crop the criterion
  stopped 1.32 dB below the peak, against 0.04 dB with x ~ y.)

  The sampling error of lambda (chance correlations with p, of order 1 / (c sqrt(N))) is almost
  fixed for a fit: it shifts the estimate by a nearly constant offset and leaves its minimum
  where it is (the estimate can even be slightly negative).

  Any operator A (f = A applied to the network's output, x = A x_true): every quantity lives in
  measurement space, so the estimate is of mean (A f_net - a A x)^2, the error the data can
  tell. What A removes (its null space: masked pixels, frequencies above the SR cut-off, the
  blur's zeros) no estimate from y alone can measure; for noisy observations the fit's
  overfitting is the noise it reproduces in A f_net, which is what this error grows with. Its
  minimum can fall later than the image error's: noise fitted where A is small (a blur's high
  frequencies) is amplified in the image but weighs little here. (Weighting by (A A^T)^(-1/2),
  the error in range(A^T), would undo that but divides by those small singular values and
  multiplies the probe's sampling error with them: not used.)

  Heteroscedastic noise (Poisson, PURE's setting): with per-entry variances s^2 (`sigma` an
  array; s^2 = y / peak + read^2, unbiased for Poisson) and the probe drawn as c s eps,
  lambda = <f - a y, a p> / |a p|^2 estimates tr(J S) / tr(S) (J the fit's response to its
  target, S = diag(s^2)) and 2 a^2 lambda mean s^2 is the unknown term 2 a^2 tr(J S) / N: exact
  for a fit linear in its target (tests/test_fit.py) and Gaussian noise of that varying std; for
  Poisson noise, whose identity is PURE's rather than Stein's, a first-order match (unbiased
  in tests/test_fit.py where nothing saturates), with `lower` False: a Poisson observation is
  clipped at white only. Its clipped variance, taken from the Gaussian moments at the noisy y,
  falls 9-11% short of the truth at peak 10 with 5-8% of the pixels saturated, 3-5% at peak 30
  (synthetic images, 2026-12-07), which weakens the 2 lambda term as much and can only move the
  stop later. Shapes: images (h, w, C); scale, clipped scalars; sigma a scalar or (h, w, C).
  """
  reference = target - noise  # a y
  lam = fitted_fraction(measured, reference, scale * probe)
  return (jnp.mean((measured - target) ** 2) + 2.0 * jnp.mean((measured - reference) * noise)
          - jnp.mean(noise**2)
          + scale**2 * sure_noise_terms(jnp.clip(reference / scale, 0.0, 1.0), sigma, lam,
                                        clipped, lower))


def sure_noise_terms(y: Array, sigma: Array, noise_fit: Array, clipped: Array | bool,
                     lower: bool = True) -> Array:
  """The unknown noise's terms of :func:`sure_mse` per a^2, the only ones that depend on sigma:
  sigma^2 (2 lambda - 1), or mean mu^2 - mean V + 2 lambda mean V for a `clipped` y (the
  censored noise's moments at y). So an estimate made with one sigma is re-made with another
  by swapping these terms (``experiments/summary.py`` does, after the fact).

  Args:
    y: (h, w, C) the observation in [0, 1] units.
    sigma: its noise std (before clipping): a scalar, or per entry (y's shape).
    noise_fit: lambda, the fraction of the probe the output has fitted: any shape.
    clipped: whether y was clipped to [0, 1], a scalar.
    lower: whether the clipping at 0 censored the noise (not for Poisson noise).

  Returns:
    noise_fit's shape.
  """
  bias, var = clipped_noise_moments(y, sigma, lower)
  bias2 = jnp.where(clipped, jnp.mean(bias**2), 0.0)
  var = jnp.where(clipped, jnp.mean(var), jnp.mean(jnp.asarray(sigma) ** 2))
  return bias2 - var + 2.0 * noise_fit * var
