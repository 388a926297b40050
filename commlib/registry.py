"""Name -> class registries: one per family of pieces, so configs and the CLI stay in step
without an if/elif chain."""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, List, Type, TypeVar

from commlib.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (lower-case; '-' and '_' are the same) to classes of one family."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._classes: Dict[str, Type[T]] = {}

    @staticmethod
    def _norm(name: str) -> str:
        return name.strip().lower().replace("_", "-")

    def register(self, *names: str) -> Callable[[Type[T]], Type[T]]:
        """Class decorator: ``@COMPRESSORS.register("topk")``."""

        def deco(cls: Type[T]) -> Type[T]:
            for n in names:
                key = self._norm(n)
                if key in self._classes and self._classes[key] is not cls:
                    raise ConfigError(f"{self.family} name {n!r} registered twice")
                self._classes[key] = cls
            if not hasattr(cls, "name") or cls.__dict__.get("name") is None:
                cls.name = self._norm(names[0])  # type: ignore[attr-defined]
            return cls

        return deco

    def get(self, name: str) -> Type[T]:
        key = self._norm(name)
        if key not in self._classes:
            raise ConfigError(
                f"unknown {self.family} {name!r}; known: {', '.join(self.names())}"
            )
        return self._classes[key]

    def build(self, name_or_obj: Any, **options: Any) -> T:
        """Instantiate by name with options, or pass an already built object through."""
        if not isinstance(name_or_obj, str):
            if options:
                raise ConfigError(
                    f"options {sorted(options)} given with a ready {self.family} object; "
                    "set them on the object instead"
                )
            return name_or_obj
        cls = self.get(name_or_obj)
        try:
            return cls(**options)
        except TypeError as exc:  # wrong/unknown option names: say which class refused them
            raise ConfigError(f"{self.family} {name_or_obj!r}: {exc}") from exc

    def names(self) -> List[str]:
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        return self._norm(name) in self._classes
