"""Offline router work, outside the router service: splitting recorded outcomes (``dataset``),
training router files (``training``) and evaluating policies on recorded calls (``evaluate``).
The router service only loads the files this writes."""
