"""my-chatglm2: a local ChatGLM2-6B chat server with a built-in browser client."""

__version__ = "0.1.0"
