"""The accountant service: ClickHouse ingest of usage events, task outcomes and artifacts."""
