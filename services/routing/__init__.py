"""The routing core: the table (`deploy/routing.toml`), `pick_model`, `PinningError`, the tier
ladder and the policies that decide a step's model. Pure decisions over a `StepRequest` and the
catalogue, with no NATS: the router service acts on them, the planner's pre-flight estimate and
the offline evaluation call them directly."""
