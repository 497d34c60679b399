"""Adapters that change the model's weights: LoRA (load, weigh, fuse, unload) in `lora`; its files in `files`."""
