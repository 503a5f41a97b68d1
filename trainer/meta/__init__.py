"""Meta-learned loss reweighting: the meta-net, three look-ahead modes (exact, second_order, head), the reweighter."""
from trainer.meta.reweighter import MetaReweighter

__all__ = ["MetaReweighter"]
