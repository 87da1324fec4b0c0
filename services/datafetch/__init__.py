"""`frugalmesh data fetch`: downloads the recorded public data sets into the cache that
:mod:`services.runtime.data` reads (``fetch``). Only the CLI imports it: no service fetches at run time."""
