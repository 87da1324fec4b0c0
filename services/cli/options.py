"""Option types the commands share: a bad value is a usage error before anything starts."""

from __future__ import annotations

import click

POSITIVE = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE = click.FloatRange(min=0)
