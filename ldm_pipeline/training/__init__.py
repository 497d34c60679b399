"""Training the three parts (CLIP, VAE, UNet) and LoRAs on one shared loop (`loop`), run by `plan` from
JSON configs. Only trainers import this package.
"""
