"""What keeps a call safe and small: argument checks before any work (`checks`), memory-fit and
non-finite guards (`guards`), and the memory helpers for small GPUs (`memory`).
"""

from .guards import NonFiniteError
