"""The mesh's economics: break-evens and experiments measured on its own traffic and recorded outcomes."""
