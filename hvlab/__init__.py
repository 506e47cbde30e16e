"""hvlab: HunyuanVideo, taken apart into inspectable units.

    import hvlab
    pipe = hvlab.load_toy()                      # the shipped toy model, a HunyuanVideoPipeline
    out = pipe("a red circle moving right", seed=0)

Submodules follow the architecture, one unit per file (``hvlab.rope``, ``hvlab.blocks``, ``hvlab.model``,
``hvlab.scheduler``, ``hvlab.vae``, ...). Imports are lazy so ``import hvlab`` stays fast.
"""
__version__ = "0.1.0"

_LAZY = {
    "load_toy": ("hvlab.toy.model", "load_toy"),
    "load_pipeline": ("hvlab.loading", "load_pipeline"),
    "HunyuanVideoPipeline": ("hvlab.pipeline", "HunyuanVideoPipeline"),
    "GenerationSettings": ("hvlab.runs", "GenerationSettings"),
    "HYVideoDiffusionTransformer": ("hvlab.model", "HYVideoDiffusionTransformer"),
    "HYVideoConfig": ("hvlab.model", "HYVideoConfig"),
    "params_count": ("hvlab.model", "params_count"),
    "AutoencoderKLCausal3D": ("hvlab.vae", "AutoencoderKLCausal3D"),
    "FlowMatchDiscreteScheduler": ("hvlab.scheduler", "FlowMatchDiscreteScheduler"),
    "PROMPT_TEMPLATE": ("hvlab.prompts", "PROMPT_TEMPLATE"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hvlab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
