"""Model files, one per registered architecture, in the style of ``timm/models``."""
from .alexnet_spot import *  # noqa: F401,F403
from .alexnet_spot_discriminator import *  # noqa: F401,F403
from .damage_repair_generator import *  # noqa: F401,F403
