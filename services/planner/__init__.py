"""planner: runs each task's workflow (a DAG of steps) and publishes its events."""
