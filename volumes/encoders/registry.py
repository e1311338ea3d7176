"""The encoder registry: each family of slice encoders registers the names it builds.

``@register_encoder_family("cnn", accepts=...)`` on a class; :func:`build_slice_encoder`
asks the families in the order they registered (DINOv2/DINOv3 ViTs, timm CNNs, the zoo)
and builds the first that accepts the name. A new family is one decorated class, not an
edit of the builder (the aggregators' registry, :mod:`volumes.aggregators.factory`, works
the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from volumes.errors import ConfigError

__all__ = ["EncoderFamily", "build_slice_encoder", "encoder_families", "register_encoder_family"]

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class EncoderFamily:
    """One family: its name, the class that builds it, which names it takes, an example for messages."""

    name: str
    cls: type
    accepts: Callable[[str], bool]
    example: str
    listing: str


_FAMILIES: list[EncoderFamily] = []


def register_encoder_family(name: str, *, accepts: Callable[[str], bool], example: str,
                            listing: str) -> Callable[[T], T]:
    """Class decorator: the class builds every encoder name ``accepts`` says yes to.

    ``example`` and ``listing`` (the function that lists the family's names) go into the
    error message for an unknown name.
    """
    def register(cls: T) -> T:
        if any(family.name == name and family.cls is not cls for family in _FAMILIES):
            raise ValueError(f"encoder family {name!r} is registered already")
        if not any(family.cls is cls for family in _FAMILIES):
            _FAMILIES.append(EncoderFamily(name, cls, accepts, example, listing))
        return cls
    return register


def encoder_families() -> list[EncoderFamily]:
    """The registered families, in the order :func:`build_slice_encoder` asks them.

    Each family registers when its module is imported; ``volumes.encoders`` (imported before
    this module, as its package) imports all of them. The families take disjoint names.
    """
    return list(_FAMILIES)


def build_slice_encoder(name: str, **kwargs: Any):
    """The slice encoder of ``name``, built by the first family that accepts it.

    Raises:
        ConfigError: no family takes ``name`` (the message names each family with an example).
    """
    families = encoder_families()
    for family in families:
        if family.accepts(name):
            return family.cls(name, **kwargs)
    raise ConfigError("encoder", name, " or ".join(f"a {f.name} ({f.listing}, e.g. {f.example})" for f in families))
