"""Meta-learned loss reweighting: the meta-net, three look-ahead modes (exact, second_order, head), the reweighter."""
__all__ = ["MetaReweighter"]


def __getattr__(name: str):
    # lazy (PEP 562): the config imports trainer.meta.modes, and must not pay for torch through this package
    if name == "MetaReweighter":
        from trainer.meta.reweighter import MetaReweighter

        return MetaReweighter
    raise AttributeError(f"module 'trainer.meta' has no attribute {name!r}")
