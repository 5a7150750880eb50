"""Name -> class registry of the quantizers (a leaf module: it imports no quantizer).

Each quantizer module registers its class where it is defined::

    @register_quantizer("simvq")
    class SimVQ(Quantizer): ...

and configs then build it by name with :func:`build_quantizer`. A class may define a
``build_kwargs(kwargs) -> kwargs`` classmethod to translate factory keywords (FSQ maps ``codebook_size``
to ``levels``). The registry fills as the modules are imported; ``import simvq.quantizers`` imports them all.
"""

from __future__ import annotations

import inspect

QUANTIZERS: dict[str, type] = {}


def register_quantizer(name: str):
    """Class decorator: make the class buildable as ``build_quantizer(name, ...)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a quantizer name must be a non-empty string, got {name!r}")

    def decorator(cls: type) -> type:
        if QUANTIZERS.get(name, cls) is not cls:
            raise ValueError(f"quantizer name {name!r} is already registered to {QUANTIZERS[name].__name__}")
        QUANTIZERS[name] = cls
        return cls

    return decorator


def build_quantizer(name: str, **kwargs):
    """Construct the quantizer called ``name`` with its keyword arguments.

    Names: ``"simvq"``, ``"vq"``, ``"ema_vq"``, ``"factorized_vq"``, ``"lc_vq"``, ``"fsq"``, ``"lfq"``,
    ``"ibq"``, ``"residual"`` (and any registered later). For ``"fsq"``, ``codebook_size`` may be given instead of
    ``levels`` and is mapped through :func:`~simvq.quantizers.fsq.fsq_levels_for`. Unknown names raise
    ``ValueError``, unknown keywords ``TypeError``; both list the valid choices.
    """
    if not isinstance(name, str) or name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; valid names: {', '.join(QUANTIZERS)}")
    cls = QUANTIZERS[name]
    translate = getattr(cls, "build_kwargs", None)
    if translate is not None:
        kwargs = translate(dict(kwargs))
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [p for p in params if p != "self"]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"quantizer {name!r} got unknown argument(s) {unknown}; valid arguments: {valid}")
    return cls(**kwargs)
