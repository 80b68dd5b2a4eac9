"""diffsampler's solvers inside other tools' sampling loops.

* :mod:`diffsampler.integrations.k_diffusion`: ``sampler(name, **options)`` returns a function with
  k-diffusion's sampler signature ``fn(model, x, sigmas, extra_args=None, callback=None,
  disable=None)``, which ComfyUI (``comfy.samplers.KSAMPLER``) and Forge take as custom samplers.
* :mod:`diffsampler.integrations.diffusers`: ``DiffSamplerScheduler``, a diffusers scheduler that
  runs a diffsampler solver inside any diffusers pipeline (``pipe.scheduler = ...``).

Running a whole pipeline with diffsampler's own loop is :func:`diffsampler.pipelines.run`.
The submodules are imported on use, so ``import diffsampler`` does not load diffusers.
"""
