"""Analytics over the accountant's ClickHouse: the report's queries, figures and HTML."""
