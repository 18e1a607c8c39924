"""dipjax: Deep Image Prior with DDPM-staged supervision, in JAX/Flax."""
