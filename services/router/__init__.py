"""The router: picks the tier and model of each step, serves exact repeats from a cache."""
