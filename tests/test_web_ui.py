"""The browser client, end to end: real Chromium (Playwright) against the real server with the tiny model.

Screenshots of the main states go to tests/artifacts/.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import requests

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
IDLE = "!document.querySelector('#send').classList.contains('stop')"


@pytest.fixture(scope="session")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


CONTEXT = 96  # short replies keep the suite quick


@pytest.fixture
def slow_model(slow_model):
    """The slowed tiny model with a small context, so replies stay short."""
    return dataclasses.replace(slow_model, plan=dataclasses.replace(slow_model.plan, max_context=CONTEXT))


class UI:
    def __init__(self, browser, server, **context):
        self.server = server
        self.context = browser.new_context(accept_downloads=True, **context)
        self.page = self.context.new_page()
        self.dialogs = []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.streams = []  # the JSON bodies the page sent to /stream
        self.page.on("request", lambda r: self.streams.append(r.post_data_json) if r.url.endswith("/stream") else None)
        # Playwright turns on file-chooser interception when the first listener appears; doing it only inside
        # expect_file_chooser races the key press that opens the chooser (Chromium then drops the dialog)
        self.page.on("filechooser", lambda chooser: None)
        self.page.goto(server.url + "/ui/")
        self.page.wait_for_selector("#conv-list li")

    def send(self, text, prefix=None, wait=True):
        if prefix is not None:
            if not self.page.is_visible("#prefix"):
                self.page.click("#toggle-prefix")  # the answer prefix field is folded away until asked for
            self.page.fill("#prefix", prefix)
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")
        if wait:
            self.idle()

    def idle(self):
        self.page.wait_for_function(IDLE, timeout=60000)

    def greedy(self):
        """Temperature 0 through the advanced panel's slider."""
        self.page.click("#toggle-advanced")
        self.page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")

    def bot_texts(self):
        return self.page.eval_on_selector_all(".msg.bot .body", "els => els.map(e => e.textContent)")

    def shot(self, name):
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


@pytest.fixture
def ui(browser, serve, engine_for, slow_model):
    made = []

    def make(engine=None, **context):
        server = serve(engine or engine_for(slow_model))
        made.append(UI(browser, server, **context))
        return made[-1]

    yield make
    for u in made:
        u.context.close()


def test_send_streams_the_reply_progressively(ui, engine_for, tiny_model):
    u = ui()
    u.greedy()
    u.page.evaluate("""() => { window.seen = [];
        new MutationObserver(() => { const b = document.querySelector('.msg.bot .body');
            if (b) window.seen.push(b.textContent); })
        .observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true}); }""")
    u.send("你好")
    seen = u.page.evaluate("window.seen")
    assert len(set(seen)) >= 20  # many partial replies, not one at the end
    assert u.streams[-1] == {"query": "你好", "history": [], "answer_prefix": "", "max_length": CONTEXT,
                             "top_p": 0.7, "temperature": 0, "delta": True}
    from server.engine.budget import GenerationRequest
    expected = engine_for(tiny_model).submit(GenerationRequest(query="你好", max_length=CONTEXT, temperature=0)).wait()
    assert u.bot_texts()[-1].strip() == expected.text  # rendered Markdown ends with a newline
    assert "tokens/s" in u.page.inner_text("#status")
    u.shot("chat")


def test_stop_mid_reply(ui):
    u = ui()
    u.send("hi", wait=False)
    u.page.wait_for_function("document.querySelector('.msg.bot .body')?.textContent.length > 3")
    u.page.click("#send")  # the send button is the stop button while generating
    u.idle()
    assert "已停止" in u.page.inner_text("#status")
    assert u.server.engine.running_id is None
    u.send("again", wait=False)
    u.page.wait_for_function("document.querySelectorAll('.msg.bot').length == 2")
    u.page.keyboard.press("Escape")
    u.idle()
    assert "已停止" in u.page.inner_text("#status")


def test_regenerate_amend_revert(ui):
    u = ui()
    u.send("第一个问题")
    u.send("第二个问题", prefix="好的，")
    u.page.click("#regenerate")
    u.idle()
    assert u.streams[-1]["query"] == "第二个问题" and u.streams[-1]["answer_prefix"] == "好的，"
    assert len(u.streams[-1]["history"]) == 1
    u.page.click("#amend")
    assert u.page.input_value("#input") == "第二个问题" and u.page.input_value("#prefix") == "好的，"
    assert len(u.bot_texts()) == 1
    u.page.click("#revert")
    assert u.bot_texts() == []


def test_edited_answer_is_what_the_next_request_sends(ui):
    u = ui()
    u.send("Q1")
    u.page.click(".msg.bot .edit")
    u.page.fill(".edit-area", "我改过的回答")
    u.page.click(".pair-actions .save")
    u.page.click(".msg.user .edit")
    u.page.fill(".edit-area", "改过的问题")
    u.page.click(".pair-actions .save")
    u.send("Q2")
    assert u.streams[-1]["history"] == [["改过的问题", "我改过的回答"]]


def test_the_next_turn_from_the_page_reuses_the_conversation(ui, engine_for, eos_checkpoint, caplog):
    """The page sends the history as it shows it; the server's prefix cache finds the earlier turn in it."""
    import re

    from server.model.loader import load_model
    from tests.conftest import cpu_plan

    caplog.set_level("INFO", logger="server.requests")
    engine = engine_for(load_model(eos_checkpoint, cpu_plan()))
    u = ui(engine)  # every reply ends at once: short turns
    u.send("第一个问题")
    u.send("第二个问题")
    assert u.streams[-1]["history"] == [["第一个问题", ""]]
    counts = []
    for _ in range(50):  # bounded: each line is written as its job ends
        counts = [tuple(map(int, m)) for m in re.findall(r"/stream prompt=(\d+) cached=(\d+)", caplog.text)]
        if len(counts) == 2:
            break
        u.page.wait_for_timeout(20)
    (first_prompt, first_cached), (second_prompt, second_cached) = counts
    start = len(engine.loaded.tokenizer.conversation_start())  # in the prefix cache from the start
    assert first_cached == start and first_prompt - 1 <= second_cached < second_prompt


def test_answer_prefix_leads_the_reply(ui):
    u = ui()
    u.send("写一首诗", prefix="春眠不觉晓，")
    assert u.bot_texts()[-1].startswith("春眠不觉晓，")
    assert u.streams[-1]["answer_prefix"] == "春眠不觉晓，"


def test_reload_keeps_everything(ui):
    u = ui()
    u.send("记住我")
    u.page.click("#style-precise")
    u.page.click("#new-conv")
    u.send("第二个对话")
    before = u.page.eval_on_selector_all("#conv-list li .title span:first-child", "els => els.map(e => e.textContent)")
    u.page.reload()
    u.page.wait_for_selector(".msg.bot")
    after = u.page.eval_on_selector_all("#conv-list li .title span:first-child", "els => els.map(e => e.textContent)")
    assert after == before == ["第二个对话", "记住我"]
    u.page.click("#conv-list li:nth-child(2)")
    assert u.page.inner_text(".msg.user .body") == "记住我"
    assert "on" in u.page.get_attribute("#style-precise", "class")


def test_export_import_round_trip(ui, tmp_path):
    u = ui()
    u.send("导出我")
    with u.page.expect_download() as download:
        u.page.click("#export-all")
    path = tmp_path / "export.json"
    download.value.save_as(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["convs"][0]["pairs"][0]["q"] == "导出我"
    with u.page.expect_download() as md:
        u.page.click("#export-md")
    md_path = tmp_path / "one.md"
    md.value.save_as(md_path)
    assert "导出我" in md_path.read_text(encoding="utf-8")

    fresh = ui()  # a new browser profile: empty store
    assert fresh.bot_texts() == []
    fresh.page.set_input_files("#import-file", str(path))
    fresh.page.wait_for_selector(".msg.bot .body.md")
    u.page.wait_for_selector(".msg.bot .body.md")
    assert fresh.page.inner_text(".msg.user .body") == "导出我"
    assert fresh.bot_texts() == u.bot_texts()


def test_conversation_list_rename_duplicate_delete_undo_reorder(ui):
    u = ui()
    u.send("甲")
    u.page.click("#new-conv")
    u.send("乙")
    titles = lambda: u.page.eval_on_selector_all("#conv-list li .title span:first-child",  # noqa: E731
                                                 "els => els.map(e => e.textContent)")
    assert titles() == ["乙", "甲"]
    assert "甲" in u.page.inner_text("#conv-list li:nth-child(2) .preview") or u.page.inner_text(
        "#conv-list li:nth-child(2) .preview")
    u.page.click("#conv-list li:nth-child(1) .rename")
    u.page.fill(".rename-input", "改名了")
    u.page.press(".rename-input", "Enter")
    assert titles() == ["改名了", "甲"]
    u.page.click("#conv-list li:nth-child(2) .duplicate")
    assert titles() == ["改名了", "甲", "甲 (2)"]
    u.page.click("#conv-list li:nth-child(3) .delete")
    assert titles() == ["改名了", "甲"]
    u.page.click("#toast-action")  # undo
    assert titles() == ["改名了", "甲", "甲 (2)"]
    u.page.drag_and_drop("#conv-list li:nth-child(3)", "#conv-list li:nth-child(1)")
    assert titles() == ["甲 (2)", "改名了", "甲"]
    u.page.reload()
    u.page.wait_for_selector("#conv-list li")
    assert titles() == ["甲 (2)", "改名了", "甲"]


def test_mobile_viewport_uses_a_drawer(ui):
    u = ui(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    u.send("手机上")
    sidebar_left = lambda: u.page.eval_on_selector("#sidebar", "e => e.getBoundingClientRect().right")  # noqa: E731
    assert sidebar_left() <= 0  # hidden off-screen
    assert u.page.is_visible("#open-drawer")
    u.page.click("#open-drawer")
    u.page.wait_for_function("document.querySelector('#sidebar').getBoundingClientRect().left >= 0")
    u.shot("mobile-drawer")
    u.page.click("#new-conv")
    u.page.wait_for_function("document.querySelector('#sidebar').getBoundingClientRect().right <= 0")
    assert u.page.is_visible("#input")


def test_html_in_model_output_is_text_never_markup(ui):
    u = ui()
    attack = "<img src=x onerror=alert(1)>"
    u.send("hi", prefix=attack)
    u.page.wait_for_timeout(500)  # the Markdown render of the finished answer has landed
    assert u.bot_texts()[-1].startswith(attack)
    assert u.page.eval_on_selector_all("#messages img", "els => els.length") == 0
    u.page.reload()
    u.page.wait_for_selector(".msg.bot")
    u.page.wait_for_timeout(500)
    assert u.page.eval_on_selector_all("#messages img", "els => els.length") == 0
    assert u.dialogs == []


def test_markdown_code_tables_and_copy(ui, tmp_path):
    u = ui()
    answer = "看代码：\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- 一\n- 二"
    path = tmp_path / "md.json"
    path.write_text(json.dumps({"convs": [{"title": "md", "pairs": [{"q": "q", "a": answer}]}]}), encoding="utf-8")
    u.page.set_input_files("#import-file", str(path))
    u.page.wait_for_selector(".md pre .copy")
    assert u.page.eval_on_selector(".md pre code", "e => e.querySelectorAll('span').length") > 0  # highlighted
    assert u.page.inner_text(".md table td") == "1"
    assert u.page.eval_on_selector_all(".md li", "els => els.length") == 2


def test_error_banners_busy_overflow_offline(ui, engine_for, slow_model):
    u = ui(engine_for(slow_model, max_queue=0))  # every request finds the queue full
    u.send("排队")
    assert "服务器忙" in u.page.inner_text("#banner")
    assert u.page.input_value("#input") == "排队" and u.bot_texts() == []  # nothing lost
    u.page.fill("#input", "hello world " * 200)
    u.page.press("#input", "Enter")
    u.idle()
    assert "问题太长" in u.page.inner_text("#banner") and f"（上下文 {CONTEXT}）" in u.page.inner_text("#banner")
    u.shot("error-banner")
    u.server.close()  # the server goes away mid-session
    u.page.wait_for_function("document.querySelector('#banner-text').textContent.includes('无法连接')",
                             timeout=15000)


def test_loading_state_is_shown(browser, serve):
    from server.engine import Engine

    engine = Engine()
    engine.set_state("downloading", progress=0.25)
    u = UI(browser, serve(engine))
    u.page.wait_for_function("document.querySelector('#banner-text').textContent.includes('25.0%')")
    engine.set_state("error", error="missing config.json")
    u.page.wait_for_function("document.querySelector('#banner-text').textContent.includes('missing config.json')")
    u.context.close()


def test_server_notices_are_shown_until_acted_on(ui, engine_for, slow_model):
    """What the server asks the person to do (e.g. install CUDA torch for their GPU) stays visible on the page."""
    engine = engine_for(slow_model)
    notice = "检测到 NVIDIA 显卡 RTX 3060，但当前 torch 是 CPU 版 / An NVIDIA GPU (RTX 3060) is present … setup_offline.bat"
    engine.add_notice(notice)
    u = ui(engine)
    u.page.wait_for_function("document.querySelector('#notice').textContent.includes('setup_offline.bat')")
    assert u.page.is_visible("#notice") and u.page.inner_text("#notice") == notice
    u.send("你好")  # chatting does not hide it
    assert u.page.is_visible("#notice")
    u.shot("gpu-notice")


def test_broken_store_does_not_brick_the_page(ui):
    u = ui()

    def store_then_open(value):  # written from another page of the server, since the chat page saves on leaving
        u.page.goto(u.server.url + "/health")
        u.page.evaluate("v => localStorage.setItem('chatglm2.state.v1', v)", value)
        u.page.goto(u.server.url + "/ui/")

    store_then_open("{broken")
    u.page.wait_for_selector("#conv-list li")
    assert "损坏" in u.page.inner_text("#banner")
    store_then_open(json.dumps({"convs": [{"pairs": "x"}, {"title": 7, "pairs": [{"q": "ok", "a": "fine"}, {"q": 1}]}],
                                "active": "nope"}))
    u.page.wait_for_selector(".msg.user")
    assert u.page.inner_text(".msg.user .body") == "ok"
    u.send("still works")
    assert len(u.bot_texts()) == 2


def test_english_switch_and_context_meter(ui):
    u = ui()
    u.page.wait_for_function(f"document.querySelector('#meter-text').textContent.includes('/ {CONTEXT} tokens')")
    u.page.click("#lang")
    assert u.page.inner_text("#send") == "Send" and u.page.inner_text("#new-conv") == "+ New chat"
    for i in range(3):
        u.send(f"question number {i} hello world")
    u.page.fill("#input", "x")
    u.page.wait_for_function("document.querySelector('#meter').classList.contains('warn')")
    assert "oldest rounds will be dropped" in u.page.inner_text("#meter-text")
    u.send("one more")
    assert u.page.eval_on_selector_all(".msg.user.dropped", "els => els.length") > 0


def test_manifest_and_icons_make_it_installable(server):
    manifest = requests.get(server.url + "/ui/manifest.webmanifest").json()
    assert manifest["display"] == "standalone" and manifest["start_url"] == "/ui/" and manifest["id"] == "/ui/"
    assert {icon["purpose"] for icon in manifest["icons"]} == {"any", "maskable"}
    for icon in manifest["icons"]:
        r = requests.get(server.url + icon["src"])
        size = int(icon["sizes"].split("x")[0])
        assert r.headers["Content-Type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(r.content[16:20], "big") == size
    assert requests.get(server.url + "/").json() == {"message": "Server started", "success": True}


@pytest.fixture
def foreign_page():
    """A page on another origin, http://evil.test:<port>/ (mapped to 127.0.0.1 in the browser only)."""
    import http.server
    import threading

    html = b"""<!doctype html><script>
    async function call(url) {
      try { const r = await fetch(url, {method: "POST", body: JSON.stringify({text: "hi"})});
            return "read " + r.status + " " + (await r.text()); }
      catch (e) { return "blocked"; }
    }</script>"""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://evil.test:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_page_from_another_origin_cannot_use_the_api_unless_allowed(browser, serve, engine_for, tiny_model,
                                                                        foreign_page):
    mapped = browser.browser_type.launch(executable_path=CHROMIUM, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--host-resolver-rules=MAP evil.test 127.0.0.1"])  # the foreign name stays in this browser, on loopback
    try:
        for allow, expected in ((None, "blocked"), (foreign_page, "read 200")):
            server = serve(engine_for(tiny_model), allow_origin=allow)
            page = mapped.new_page()
            page.goto(foreign_page + "/")
            result = page.evaluate(f"call('{server.url}/tokenize')")
            assert result.startswith(expected), result
            page.close()
    finally:
        mapped.close()


# -- issue: no lost replies, no request storms, list and keyboard, presets, feedback -------------------------------
def stream_until(u, chars):
    u.page.wait_for_function(f"(document.querySelector('.msg.bot:last-of-type .body')?.textContent.length || 0) > {chars}")


def test_reload_mid_reply_keeps_the_partial_reply(ui):
    u = ui()
    u.send("一个长回答", wait=False)
    stream_until(u, 20)
    u.page.wait_for_timeout(1100)  # past the save throttle: at least one save happened while streaming
    shown = u.page.inner_text(".msg.bot .body")
    u.page.reload()
    u.page.wait_for_selector(".msg.bot")
    stored = u.page.evaluate("JSON.parse(localStorage.getItem('chatglm2.state.v1')).convs[0].pairs[0].a")
    assert len(stored) >= 20 and shown.startswith(stored[:20])  # the partial reply survived the reload
    assert u.page.text_content(".msg.bot .body")[:10] == stored[:10]  # and is shown


def test_a_server_that_is_down_is_not_flooded_with_render_requests(ui, tmp_path):
    u = ui()
    renders = []
    u.page.on("request", lambda r: renders.append(r.url) if r.url.endswith("/ui/render") else None)
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"convs": [{"title": "md", "pairs": [{"q": "q", "a": "**粗体** 文字"}]}]}),
                    encoding="utf-8")
    u.server.close()
    u.page.set_input_files("#import-file", str(path))
    u.page.wait_for_selector(".msg.bot")
    u.page.wait_for_timeout(3000)
    assert 1 <= len(renders) <= 5  # tried, then backing off (it used to be ~170 a second)
    assert u.page.inner_text(".msg.bot .body") == "**粗体** 文字"  # readable as plain text meanwhile


def test_sending_while_the_server_is_down_keeps_the_question(ui):
    u = ui()
    u.server.close()
    u.send("别丢了我的问题", prefix="好的，")
    assert u.page.input_value("#input") == "别丢了我的问题" and u.page.input_value("#prefix") == "好的，"
    assert u.bot_texts() == [] and "开启API服务.bat" in u.page.inner_text("#banner")
    stored = u.page.evaluate("JSON.parse(localStorage.getItem('chatglm2.state.v1')).convs[0].pairs")
    assert stored == []


def test_reading_earlier_text_is_not_interrupted_by_new_tokens(ui, tmp_path):
    u = ui(viewport={"width": 1280, "height": 500})
    long_answer = "\n\n".join(f"第 {i} 段：" + "很长的回答。" * 20 for i in range(30))
    path = tmp_path / "long.json"
    path.write_text(json.dumps({"convs": [{"title": "long", "pairs": [{"q": "q", "a": long_answer}]}]}),
                    encoding="utf-8")
    u.page.set_input_files("#import-file", str(path))
    u.page.wait_for_selector(".msg.bot")
    u.send("再来一个", wait=False)
    stream_until(u, 5)
    u.page.eval_on_selector("#messages", "e => { e.scrollTop = 100; e.dispatchEvent(new Event('scroll')); }")
    u.page.wait_for_function("!document.querySelector('#new-text').hidden")  # new text arrives below
    assert u.page.eval_on_selector("#messages", "e => e.scrollTop") == 100  # the reader stays where they are
    u.page.click("#new-text")
    assert u.page.eval_on_selector("#messages", "e => e.scrollHeight - e.scrollTop - e.clientHeight") < 40
    u.page.click("#send")  # stop
    u.idle()


def test_a_reply_lost_with_the_server_says_so_without_question_marks(ui):
    u = ui()
    u.send("hi", wait=False)
    stream_until(u, 3)
    u.server.close()
    u.idle()
    status = u.page.inner_text("#status")
    assert "?" not in status and "连接中断" in status
    assert len(u.bot_texts()[-1]) >= 3  # the partial reply stays


def test_row_actions_leave_the_title_its_width_and_double_click_renames(ui):
    u = ui()
    u.send("一个相当长的对话标题，用来检查宽度是否足够")
    row = u.page.eval_on_selector("#conv-list li", "e => e.getBoundingClientRect().width")
    title = u.page.eval_on_selector("#conv-list li .title", "e => e.getBoundingClientRect().width")
    assert title > row - 30  # ✎ ❐ ✕ no longer sit in the middle of the row
    u.page.click("#new-conv")
    u.page.dblclick("#conv-list li:nth-child(2) .title")
    u.page.fill(".rename-input", "双击改名")
    u.page.press(".rename-input", "Enter")
    assert u.page.inner_text("#conv-list li:nth-child(2) .title") == "双击改名"


def test_keyboard_alone_switches_chats_renames_and_imports(ui):
    u = ui()
    u.send("第一个")
    u.page.click("#new-conv")
    u.send("第二个")
    u.page.focus("#conv-list li:nth-child(1)")
    u.page.keyboard.press("ArrowDown")
    u.page.keyboard.press("Enter")
    assert u.page.inner_text(".msg.user .body") == "第一个"
    u.page.keyboard.press("F2")
    u.page.keyboard.type("键盘改名")
    u.page.keyboard.press("Enter")
    assert u.page.inner_text("#conv-list li:nth-child(2) .title") == "键盘改名"
    u.page.focus("#export-all")
    u.page.keyboard.press("Tab")
    assert u.page.evaluate("document.activeElement.id") == "import-all"  # reachable by Tab
    with u.page.expect_file_chooser() as chooser:
        u.page.keyboard.press("Enter")
    assert chooser.value is not None


def test_ctrl_enter_adds_a_line(ui):
    u = ui()
    u.page.fill("#input", "第一行")
    u.page.press("#input", "Control+Enter")
    u.page.keyboard.type("第二行")
    assert u.page.input_value("#input") == "第一行\n第二行" and u.bot_texts() == []


def test_phone_layout_tap_targets_drawer_and_header(ui):
    u = ui(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    u.page.click("#open-drawer")
    u.page.click("#lang")  # English: the longer labels
    u.page.click("#scrim", position={"x": 370, "y": 400})  # beside the drawer: closes it
    u.send("手机")
    assert u.page.eval_on_selector("#conv-title", "e => e.getBoundingClientRect().width") > 100
    assert u.page.evaluate("document.querySelector('#sidebar').inert")  # closed drawer: out of the Tab order
    sizes = u.page.eval_on_selector_all(
        "#top button:not([hidden]), #composer .row button, .msg .tools button, .pair-actions button",
        "els => els.filter(e => e.offsetParent).map(e => [e.getBoundingClientRect().width, e.getBoundingClientRect().height])")
    assert sizes and all(w >= 40 and h >= 40 for w, h in sizes), sizes
    u.shot("mobile")
    u.page.click("#open-drawer")
    u.page.wait_for_function("!document.querySelector('#sidebar').inert")
    u.page.tap("#conv-list li:nth-child(1)")  # the middle of a row opens the chat, no action button
    u.page.wait_for_function("document.querySelector('#sidebar').getBoundingClientRect().right <= 0")
    assert u.page.eval_on_selector_all(".rename-input", "els => els.length") == 0


def test_switching_chats_while_a_reply_streams(ui):
    u = ui()
    u.send("长回答", wait=False)
    stream_until(u, 3)
    u.page.click("#new-conv")  # allowed: the reply keeps streaming into its own chat
    assert u.bot_texts() == [] and u.page.is_disabled("#send")
    assert "另一个对话" in u.page.inner_text("#status")
    u.page.click("#conv-list li:nth-child(2)")
    u.idle()
    assert len(u.bot_texts()[0]) > 3 and not u.page.is_disabled("#send")


def test_presets_start_a_chat_and_a_chat_can_become_one(ui):
    u = ui()
    assert u.page.is_visible("#empty")
    u.page.click("#empty .preset:has-text('猫娘')")
    assert u.page.inner_text("#conv-title") == "猫娘" and "喵" in u.bot_texts()[0]
    u.send("你好呀")
    u.page.click("#save-preset")
    u.page.click("#presets summary")
    assert u.page.eval_on_selector_all("#preset-list .own-preset .preset", "els => els.map(e => e.textContent)") == ["猫娘"]
    u.page.click("#preset-list .own-preset .preset")
    assert len(u.bot_texts()) == 2  # both rounds of the saved chat


def test_empty_state_shows_the_model_and_examples(ui):
    u = ui()
    u.page.wait_for_function("document.querySelector('#empty .facts').textContent.includes('cpu')")
    assert f"{CONTEXT} tokens" in u.page.inner_text("#empty .facts")
    assert "chatglm2-6b" in u.page.inner_text("#empty .facts")  # the name /health gives (the folder's config)
    u.page.click("#empty .example >> nth=0")
    assert u.page.input_value("#input") == "用三句话介绍一下你自己"


def test_queued_and_thinking_feedback(ui, engine_for, slow_model):
    engine = engine_for(slow_model, max_batch=1)
    u = ui(engine)
    from server.engine.budget import GenerationRequest
    blocker = engine.submit(GenerationRequest(query="占着模型", max_new_tokens=60))
    u.send("我排队", wait=False)
    u.page.wait_for_function("document.querySelector('#status').textContent.includes('排队中')")
    assert u.page.is_visible(".msg.bot .typing")  # the typing indicator until the first words
    engine.interrupt(blocker.id)
    u.idle()
    assert "完成" in u.page.inner_text("#status")


def test_icon_buttons_have_labels_and_messages_can_be_copied(ui):
    u = ui()
    u.context.grant_permissions(["clipboard-read", "clipboard-write"])
    u.send("复制我")
    for selector in ("#regenerate", "#amend", "#revert", "#export-md", "#clear-conv", "#toggle-advanced",
                     ".msg.bot .copy-msg", ".msg.bot .edit"):
        assert u.page.get_attribute(selector, "aria-label"), selector
    u.page.click(".msg.user .copy-msg")
    assert u.page.evaluate("navigator.clipboard.readText()") == "复制我"
    assert not u.page.is_visible("#prefix")  # folded away until asked for
    u.page.click("#toggle-prefix")
    assert u.page.is_visible("#prefix")


def test_theme_switch_applies_to_banners(ui):
    u = ui()
    u.page.click("#theme")  # system -> light
    u.page.click("#theme")  # light -> dark
    assert u.page.get_attribute("html", "data-theme") == "dark"
    u.page.click("#empty .preset:has-text('文字冒险')")
    u.send("1")
    u.shot("dark")
    u.server.close()
    u.page.wait_for_selector("#banner:not([hidden])", timeout=15000)
    background = u.page.eval_on_selector("#banner", "e => getComputedStyle(e).backgroundColor")
    assert sum(int(x) for x in background[background.index("(") + 1:-1].split(",")[:3]) < 300  # dark
    u.page.reload()
    assert u.page.get_attribute("html", "data-theme") == "dark"  # remembered


def test_links_open_apart_and_images_wait_for_a_click(ui, tmp_path):
    u = ui()
    fetched = []
    u.page.on("request", lambda r: fetched.append(r.url) if "tracker.example" in r.url else None)
    answer = "[文档](https://example.com/doc) ![pixel](http://tracker.example/p.gif)"
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"convs": [{"title": "l", "pairs": [{"q": "q", "a": answer}]}]}), encoding="utf-8")
    u.page.set_input_files("#import-file", str(path))
    u.page.wait_for_selector(".md a")
    assert u.page.get_attribute(".md a", "target") == "_blank"
    assert u.page.get_attribute(".md a", "rel") == "noopener noreferrer"
    u.page.wait_for_timeout(300)
    assert fetched == [] and u.page.eval_on_selector_all("#messages img", "els => els.length") == 0
    u.page.route("http://tracker.example/**", lambda route: route.fulfill(status=204))
    u.page.click(".remote-image")
    u.page.wait_for_selector("#messages img")
    assert fetched  # loaded only now, on request


def test_the_installed_page_opens_without_the_server_and_says_how_to_start_it(ui):
    u = ui()
    u.page.wait_for_function("navigator.serviceWorker.controller !== null || "
                             "navigator.serviceWorker.ready.then(() => true)")
    u.page.evaluate("navigator.serviceWorker.ready")
    u.page.reload()  # now controlled by the worker, which keeps the app shell
    u.page.wait_for_function("navigator.serviceWorker.controller !== null")
    u.server.close()
    u.page.reload()
    u.page.wait_for_selector("#conv-list li")
    u.page.wait_for_function("document.querySelector('#banner-text').textContent.includes('开启API服务.bat')",
                             timeout=15000)


def test_the_first_question_alone_too_long_is_warned_and_drop_marks_go_with_revert(ui):
    u = ui()
    u.page.fill("#input", "太长了 " * 80)
    u.page.wait_for_function("document.querySelector('#meter').classList.contains('warn')")
    assert "问题太长" in u.page.inner_text("#meter-text")
    u.page.fill("#input", "")
    for i in range(3):
        u.send(f"question number {i} hello world")
    u.send("one more")
    assert u.page.eval_on_selector_all(".msg.user.dropped", "els => els.length") > 0
    u.page.click("#revert")
    assert u.page.eval_on_selector_all(".msg.user.dropped", "els => els.length") == 0


def test_the_page_on_a_front_end_says_when_its_backend_is_away_and_goes_on_after(
        browser, serve, serve_standin, front_for, engine_for, slow_model, monkeypatch):
    """A front end (--backend) over a stand-in engine: chat works, the engine goes away (the page says so in
    Chinese and keeps the question), the engine comes back on its port (the page goes on by itself)."""
    from server.engine.budget import GenerationRequest
    from server.upstream import pool
    from tests.wine_helpers import free_port

    monkeypatch.setattr(pool, "BACKOFF_SECONDS", 0.2)
    monkeypatch.setattr(pool, "PROBE_EVERY_SECONDS", 0.1)
    engine = engine_for(slow_model)
    port = free_port()
    upstream = serve_standin(engine)
    upstream.close()
    upstream = serve(engine, app=upstream.standin.app(), port=port)
    front = front_for(engine, standin=upstream)
    u = UI(browser, serve(front))
    try:
        u.greedy()
        u.send("你好")
        expected = engine.submit(GenerationRequest(query="你好", max_length=CONTEXT, temperature=0)).wait()
        assert u.bot_texts()[-1].strip() == expected.text
        upstream.close()  # the engine behind the front end goes away
        u.send("还在吗")
        u.page.wait_for_function("document.querySelector('#banner-text').textContent.includes('后端推理服务无响应')")
        assert u.page.input_value("#input") == "还在吗" and len(u.bot_texts()) == 1  # nothing lost
        u.shot("backend-away")
        serve(engine, app=upstream.app, port=port)  # back on the same port
        u.page.wait_for_function("document.querySelector('#banner').hidden", timeout=20000)
        u.page.press("#input", "Enter")
        u.idle()
        assert len(u.bot_texts()) == 2 and u.bot_texts()[-1].strip()
    finally:
        u.context.close()


def test_the_page_is_styled_and_runs_where_mimetypes_says_text_plain(ui, monkeypatch):
    """Windows registries often map .js and .css to text/plain, which Python's mimetypes reads; a stylesheet of
    that type is refused by the browser. The server names the page's types itself."""
    import mimetypes

    real = mimetypes.guess_type
    monkeypatch.setattr(mimetypes, "guess_type", lambda url, strict=True: ("text/plain", None)
                        if str(url).endswith((".js", ".css", ".html")) else real(url, strict))
    u = ui()  # (it waits for the conversation list, which app.js fills)
    styled = u.page.evaluate("""() => [...document.styleSheets].some(
        s => s.href && s.href.endsWith('app.css') && s.cssRules.length > 20)""")
    assert styled
    u.send("你好")
    assert u.bot_texts() and u.bot_texts()[-1]


def test_the_page_is_es_modules_and_the_service_worker_keeps_each():
    """app.js is the entry module; every module it reaches is in the service worker's shell list, so the
    installed page opens while the server is down."""
    import re

    from server.web.page import STATIC

    assert '<script type="module" src="/ui/app.js">' in (STATIC / "index.html").read_text(encoding="utf-8")
    reached, todo = set(), ["app.js"]
    while todo:
        name = todo.pop()
        reached.add(name)
        source = (STATIC / name).read_text(encoding="utf-8")
        todo += [m for m in re.findall(r'^import \{[^}]*\} from "\./([\w-]+\.js)";$', source, re.M)
                 if m not in reached]
    modules = {p.name for p in STATIC.glob("*.js")} - {"sw.js"}
    assert reached == modules  # no module left unused
    shell = re.search(r"const FILES = \[(.*?)\];", (STATIC / "sw.js").read_text(encoding="utf-8"), re.S).group(1)
    assert {f"/ui/{name}" for name in modules} <= set(re.findall(r'"([^"]+)"', shell))
