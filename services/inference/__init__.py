"""The inference core shared by local-inference and cloud-inference: backends, replay, the metered handler."""
