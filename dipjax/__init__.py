"""dipjax: Deep Image Prior with DDPM-staged supervision, in JAX/Flax.

Images are float32 in [0, 1], shape (H, W, C) in the library and (N, H, W, C) inside networks.
One restoration is one call: ``dipjax.restore(dipjax.RestoreConfig(), y, key=...)``
(:mod:`dipjax.pipeline`); the modules below compose on their own.
"""

from dipjax import checkpoint
from dipjax import fit
from dipjax import inputs
from dipjax import io
from dipjax import layers
from dipjax import losses
from dipjax import metrics
from dipjax import nets
from dipjax import noise
from dipjax import operators
from dipjax import physics
from dipjax import pipeline
from dipjax import plots
from dipjax import problems
from dipjax import schedules
from dipjax import stopping
from dipjax import targets

from dipjax.pipeline import degrade
from dipjax.pipeline import Restoration
from dipjax.pipeline import RestoreConfig
from dipjax.pipeline import restore

__version__ = "0.1.0"
