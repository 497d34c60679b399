"""What a call adds to the model besides text: wrappers that keep the UNet's signature
`unet(x, t, encoder_hidden_states=context)` (the 9-channel inpainting inputs) and the step hooks
that keep what is known (the picture outside the mask).
"""
