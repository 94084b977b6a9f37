"""The HTTP layer: the Flask app and waitress, request validation, the original (seed) API, the OpenAI API, the
chat page and the relay of job events to clients. It never imports torch (tests/test_layers.py)."""
