"""Component configs in the diffusers folder layout (no weights), installed as ldm_pipeline.configs.

sd15/ and sd21/ hold the architectures of Stable Diffusion 1.5 and 2.1; the single-file loader
and `ldm_pipeline.components.build_random` read them.
"""
