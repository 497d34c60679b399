"""Ways of steering each step: the `Guidance` interface, classifier-free guidance, CLIP guidance and
composed prompts (`A AND B`, with regions). `clip_model.Clip` is the CLIP that CLIP guidance and
evaluation share.
"""

from .base import ClassifierFree, Guidance
from .clip import ClipGuidance
from .clip_model import Clip
from .composition import Composed
