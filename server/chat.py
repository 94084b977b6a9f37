"""`python -m server chat`: chat in the terminal with streamed replies; Ctrl+C stops a reply, not the chat."""

from __future__ import annotations

from .config import Settings
from .engine import Update
from .engine.budget import ContextOverflow, GenerationRequest
from .startup import make_engine

HELP = "输入问题后回车；clear 清空历史，exit 退出，Ctrl+C 停止当前回答。\n" \
       "Type a question and press Enter; 'clear' forgets the history, 'exit' quits, Ctrl+C stops a reply."


def run_chat(settings: Settings, read=input, write=print) -> int:
    engine, loader = make_engine(settings.replace(max_queue=1, max_batch=1))  # a local model, or --backend
    engine.attach(loader(engine))
    write(HELP)
    history: list[tuple[str, str]] = []
    while True:
        try:
            query = read("\n问 / You: ").strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            break
        if query in ("exit", "quit"):
            break
        if query == "clear":
            history.clear()
            write("(历史已清空 / history cleared)")
            continue
        if not query:
            continue
        try:
            job = engine.submit(GenerationRequest(query=query, history=history))
        except ContextOverflow as exc:
            write(f"(问题太长 / too long: {exc})")
            continue
        write("答 / ChatGLM2: ", end="", flush=True)
        shown = ""
        while True:
            try:
                event = job.next_event()
            except KeyboardInterrupt:  # stop this reply; the finished event still arrives
                engine.interrupt(job.id)
                continue
            if isinstance(event, Update):
                # the reply is stripped as a whole, so print only what extends what is on screen
                if event.text.startswith(shown):
                    write(event.text[len(shown):], end="", flush=True)
                    shown = event.text
                continue
            break
        write(f"\n[{event.finish_reason}]" if event.finish_reason != "stop" else "")
        if event.error:
            write(f"(出错 / error: {event.error})")
        history.append((query, event.text))
    engine.close()
    return 0
