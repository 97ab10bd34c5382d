"""A name -> factory registry, shared by latent encoders and feature extractors."""
from __future__ import annotations

from typing import Callable, Dict, Generic, Tuple, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: Dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a class or factory under ``name``."""
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory
        return decorator

    def names(self) -> Tuple[str, ...]:
        return tuple(sorted(self._factories))

    def build(self, name: str, **kwargs) -> T:
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._factories[name](**kwargs)
