from .rope import Rope3D, apply_rope
from .transformer import TextContext, WanTransformer
