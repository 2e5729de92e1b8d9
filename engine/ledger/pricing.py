"""Prices: what a unit of work is worth, per model, in integer micro-units of currency.

A UNIT is one token through one layer. A supplier that runs layers [0, 10) of a 30-layer model on
50 tokens did 500 units, a third of what those 50 tokens cost the developer. Prices are quoted the
way developers know them, per million tokens through the whole model, so a unit of model M is
worth ``price(M) / (1e6 * layers(M))``.

Money is integers (micro-units: 1_000_000 make one unit of currency), never floats: sums stay
exact and the ledger's hashes cover exact values. Rounding down per receipt would lose nearly
everything (one decode token through 10 layers is worth a fraction of a micro-unit), so amounts
are taken from cumulative units: ``amount(after) - amount(before)``. The per-receipt amounts then
add up to exactly ``amount(total)``, whatever the receipt sizes.

The configuration is a JSON object ``{"default": PRICE, "<model id>": PRICE, ...}``, PRICE being
integer micro-units per million tokens; ``default`` is required so that no model is ever
silently free.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ConfigError

log = logging.getLogger(__name__)

#: micro-units in one unit of currency
MICRO = 1_000_000
#: prices are per this many tokens
PER_TOKENS = 1_000_000
DEFAULT_KEY = "default"


@dataclass(frozen=True)
class Pricing:
    """Micro-units per million tokens: ``prices[model]`` or else ``default``."""

    default: int
    prices: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in {DEFAULT_KEY: self.default, **self.prices}.items():
            if type(value) is not int or value < 0:
                raise ConfigError(f"price of {name!r} must be a non-negative integer (micro-units), got {value!r}")

    def price(self, model: str) -> int:
        """Micro-units per million tokens of ``model``."""
        return self.prices.get(model, self.default)

    def amount(self, model: str, model_layers: int, units: int) -> int:
        """Micro-units that ``units`` token-layers of a ``model_layers``-layer model are worth, rounded down."""
        if model_layers < 1 or units < 0:
            raise ConfigError(f"cannot price {units} units of a {model_layers}-layer model")
        return units * self.price(model) // (PER_TOKENS * model_layers)

    def amount_between(self, model: str, model_layers: int, before: int, after: int) -> int:
        """What growing the cumulative units from ``before`` to ``after`` earns (exact over a sequence)."""
        return self.amount(model, model_layers, after) - self.amount(model, model_layers, before)

    @classmethod
    def from_dict(cls, data: object) -> Pricing:
        if not isinstance(data, dict) or DEFAULT_KEY not in data:
            raise ConfigError('pricing must be a JSON object with a "default" price and one price per model')
        prices = {str(k): v for k, v in data.items() if k != DEFAULT_KEY}
        return cls(default=data[DEFAULT_KEY], prices=prices)

    @classmethod
    def load(cls, path: Path) -> Pricing:
        """Read a pricing file; any problem is a one-line :class:`ConfigError`."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read pricing {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigError(f"pricing {path} is not JSON: {exc}") from None
        pricing = cls.from_dict(data)
        log.info("pricing from %s: default %d, %d model(s)", path, pricing.default, len(pricing.prices))
        return pricing
