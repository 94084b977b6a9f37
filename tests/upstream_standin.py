"""A loopback stand-in for an OpenAI-compatible engine, framed exactly as vLLM frames its answers, that generates
with the project's own Engine (the tiny model): so a front end in front of it must answer what the local
server answers, token for token.

vLLM's framing, as documented for its OpenAI-compatible server (`/v1/models`, `/v1/completions`):
- `GET /v1/models`: {"object": "list", "data": [{"id", "object": "model", "created", "owned_by": "vllm", "root",
  "parent": null, "max_model_len", "permission": [...]}]}
- a streamed completion: one `data: {json}` line and a blank line per event, each {"id": "cmpl-…", "object":
  "text_completion", "created", "model", "choices": [{"index": 0, "text": delta, "logprobs": null,
  "finish_reason": null, "stop_reason": null}], "usage": null}; the last choice event carries finish_reason
  "stop" or "length" (and stop_reason: the stop string, or null); with stream_options.include_usage one more
  event with "choices": [] and the usage; then `data: [DONE]`.
- errors: HTTP 400 (bad request) or 429/503 with {"error": {"message", "type", "param", "code"}}; an error
  during a stream is one `data: {"error": {...}}` event followed by `data: [DONE]`.

Knobs for the tests: `token_ids=False` refuses a prompt of token ids (as engines that take only text do),
`fail_midway` sends an error event after that many text events, `status` answers every completion with it.
"""

from __future__ import annotations

import json
import time

from flask import Flask, Response, jsonify, request

from server.engine import Engine, EngineBusy, Finished, Job
from server.engine.budget import FittedPrompt, GenerationRequest
from server.web.relay import client_watcher, follow


class StandIn:
    def __init__(self, engine: Engine, name: str = "chatglm2-export", token_ids: bool = True):
        self.engine = engine
        self.name = name
        self.token_ids = token_ids
        self.fail_midway: int | None = None
        self.status: int | None = None
        self.requests: list[dict] = []  # every completion request body, as received

    def prompt_ids(self, prompt) -> list[int]:
        tok = self.engine.loaded.tokenizer
        if isinstance(prompt, list):
            return prompt
        # what a Hugging Face tokenizer with ChatGLM2's added special tokens does with the text
        assert prompt.startswith("[gMASK]sop"), prompt[:20]
        return tok.prompt_prefix() + tok.sp.encode(prompt[len("[gMASK]sop"):])

    def app(self) -> Flask:
        app = Flask(__name__)

        def error(status: int, message: str):
            kind = "BadRequestError" if status < 500 else "ServiceUnavailableError"
            return jsonify({"error": {"message": message, "type": kind, "param": None, "code": status}}), status

        @app.get("/v1/models")
        def models():
            return jsonify({"object": "list", "data": [{
                "id": self.name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                "root": self.name, "parent": None, "max_model_len": self.engine.max_context,
                "permission": [{"id": "modelperm-1", "object": "model_permission", "allow_sampling": True}]}]})

        @app.post("/v1/completions")
        def completions():
            body = request.get_json()
            self.requests.append(body)
            if self.status:
                return error(self.status, f"stand-in answers {self.status}")
            if body.get("model") != self.name:
                return error(404, f"The model `{body.get('model')}` does not exist.")
            prompt = body["prompt"]
            if isinstance(prompt, list) and not self.token_ids:
                return error(400, "prompt must be a string")
            vocab = self.engine.loaded.model.config.vocab_size
            if any(int(i) >= vocab for i in body.get("logit_bias") or {}):  # as vLLM refuses them
                return error(400, "token_id(s) in logit_bias contain out-of-vocab token ids")
            ids = self.prompt_ids(prompt)
            if len(ids) + body["max_tokens"] > self.engine.max_context:
                return error(400, f"This model's maximum context length is {self.engine.max_context} tokens.")
            job = Job(request=GenerationRequest(query="", temperature=body.get("temperature", 1.0),
                                                top_p=body.get("top_p", 1.0), seed=body.get("seed"),
                                                stop=body.get("stop") or [], top_k=max(body.get("top_k", 0), 0),
                                                min_p=body.get("min_p", 0.0),
                                                presence_penalty=body.get("presence_penalty", 0.0),
                                                frequency_penalty=body.get("frequency_penalty", 0.0),
                                                repetition_penalty=body.get("repetition_penalty", 1.0),
                                                logit_bias={int(i): b for i, b in
                                                            (body.get("logit_bias") or {}).items()}),
                      prompt=FittedPrompt(ids=ids, dropped_rounds=0, max_new_tokens=body["max_tokens"]))
            try:
                self.engine.enqueue(job)
            except EngineBusy as exc:
                return error(429, str(exc))
            include_usage = (body.get("stream_options") or {}).get("include_usage")
            return Response(self.stream(job, include_usage, client_watcher(request.environ)),
                            content_type="text/event-stream")

        return app

    def stream(self, job: Job, include_usage: bool, watch):
        head = {"id": f"cmpl-{job.id}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}

        def event(choices, usage=None) -> bytes:
            return f"data: {json.dumps({**head, 'choices': choices, 'usage': usage}, ensure_ascii=False)}\n\n".encode()

        def choice(text, finish=None):
            return [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}]

        sent, events = "", 0
        for update in follow(self.engine, job, watch, "/v1/completions"):
            if self.fail_midway is not None and events >= self.fail_midway:
                self.engine.interrupt(job.id)
                failure = {"error": {"message": "stand-in engine failed", "type": "InternalServerError",
                                     "param": None, "code": 500}}
                yield f"data: {json.dumps(failure)}\n\n".encode()
                yield b"data: [DONE]\n\n"
                return
            if isinstance(update, Finished):
                yield event(choice(update.generated[len(sent):], update.finish_reason))
                if include_usage:
                    yield event([], {"prompt_tokens": update.prompt_tokens,
                                     "total_tokens": update.prompt_tokens + update.completion_tokens,
                                     "completion_tokens": update.completion_tokens,
                                     "prompt_tokens_details": {"cached_tokens": update.cached_tokens}})
                yield b"data: [DONE]\n\n"
                return
            if len(update.generated) > len(sent):
                yield event(choice(update.generated[len(sent):]))
                sent = update.generated
                events += 1
