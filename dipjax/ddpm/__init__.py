"""A small epsilon-prediction DDPM that dipjax trains itself: U-Net, diffusion maths, training,
restoration.

``unet`` holds the network (:class:`unet.EpsUNet`) and its config, ``diffusion`` the pure
functions of a :class:`dipjax.schedules.Schedule` (loss, posterior, DDIM and ancestral samplers,
and the [0, 1] <-> [-1, 1] image conversions), ``solvers`` the restorations (the DDPM alone,
DIP -> DDPM, DIP-guided), ``train`` the train state, the scanned step, the patch sampler and the
``.npz`` weights format.
"""
