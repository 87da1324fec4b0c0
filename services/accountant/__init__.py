"""The accountant service: budgets, reservations, kill-switch authority, pacing, ClickHouse ingest."""
