"""`shotdistill serve`: an ASGI server that streams an export's shots to many sessions at once.

app.py (routes, errors), stream.py (the WebSocket protocol), sessions.py (sessions and the shared
models), limits.py (the server's bounds), worker.py (the one thread that runs the model), frames.py
(JPEG out, reference images in), metrics.py (Prometheus), page/index.html (the page for a person).
"""
