"""artifact-store: content-addressed, schema-checked artifacts in JetStream (Object Store + KV index)."""
