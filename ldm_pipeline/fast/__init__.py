"""The fast path: the UNet compiled ahead of time (AOTInductor, cached on disk) or with `torch.compile`."""

from .compile import CompiledUNet, compile_unet
