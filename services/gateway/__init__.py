"""gateway: the OpenAI-compatible HTTP door to the mesh (virtual keys, chat completions, streaming).

``app.py`` wires it; ``routes.py`` serves HTTP; ``openai_wire.py`` is the wire format;
``translate.py`` maps a request to a step and a result to a completion; ``mesh_call.py`` and
``streaming.py`` make the call, once or streamed; ``keys.py`` holds the virtual keys;
``errors.py`` OpenAI's error shape; ``metrics.py`` Prometheus.
"""
