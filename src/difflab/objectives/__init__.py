"""The objectives the engine (:mod:`difflab.engine`) trains, one module each:

- :mod:`~difflab.objectives.diffusion`: the diffusion / flow-matching loss of a run config (SPEC §3, §4, §6);
- :mod:`~difflab.objectives.latent`: the same on an autoencoder's scaled latents (SPEC §5);
- :mod:`~difflab.objectives.matryoshka`: an image and its half-size version jointly, trained progressively (SPEC §5);
- :mod:`~difflab.objectives.autoencoder`: the KL autoencoder of latent diffusion (SPEC §5);
- :mod:`~difflab.objectives.classifier`: the noise-conditional classifier of classifier guidance (SPEC §7);
- :mod:`~difflab.objectives.distillation`: velocity regression on fixed (noise, data) pairs — reflow and
  one-step distillation of a rectified flow (SPEC §6).
"""
