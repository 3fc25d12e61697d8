"""The chat page in headless Chromium (Debian's chromium and chromedriver, driven by selenium): it loads, sends a
message, shows the answer as it streams, keeps the conversation across turns and starts a new one. A screenshot
is saved under the test's tmp_path."""

import shutil
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (pip install -e '.[serve]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the dev extra)")

from selenium.webdriver.common.by import By  # noqa: E402
from tritonchat.engine.engine import Engine  # noqa: E402
from tritonchat.scripts import chat_web  # noqa: E402

from tests.scripts.test_chat_web import MODEL, model, serve, tok  # noqa: E402, F401 (the fixtures)

pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver") or shutil.which("chromedriver", path="/usr/lib/chromium")
    if browser is None or driver is None:
        pytest.skip("no Chromium with chromedriver found (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture
def browser():
    binary, driver = find_browser()
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900",
                "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def wait_for(cond, timeout=30.0, what="a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_chat_page_in_headless_chromium(model, tok, browser, tmp_path):  # noqa: F811
    engine = Engine(model, tok, page_size=16, max_batch_size=8, max_seq_len=256, impl="torch")
    step = engine.step

    def slow_step():  # 30 ms a token, so the page is seen mid-answer
        time.sleep(0.03)
        return step()

    engine.step = slow_step
    app = chat_web.create_app(engine, chat_web.ServerConfig(model_name=MODEL))
    with serve(app) as url:
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def greedy(messages):
            r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
            return r.choices[0].message.content

        browser.get(url + "/")
        assert browser.title == "tritonchat"
        for field, value in (("temperature", "0"), ("max_tokens", "40"), ("top_k", "0")):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)

        def bubbles(kind):
            return browser.find_elements(By.CSS_SELECTOR, f"#log .msg.{kind}")

        def answer_text():
            b = bubbles("assistant")
            return b[-1].text if b else ""

        def idle():
            return browser.find_element(By.ID, "send").is_enabled()

        def ask(text):
            box = browser.find_element(By.ID, "input")
            box.send_keys(text)
            browser.find_element(By.ID, "send").click()
            seen = set()
            wait_for(lambda: not idle(), 10, "the request to start")
            while not idle():
                seen.add(answer_text())
                time.sleep(0.01)
            return answer_text(), seen

        first, seen = ask("hello there")
        want = greedy([{"role": "user", "content": "hello there"}])
        assert first == want.strip() and first
        partial = {s for s in seen if s and s != first}
        assert partial and all(first.startswith(s) for s in partial), "no streamed text seen before the end"
        browser.save_screenshot(str(tmp_path / "chat_web_streaming.png"))

        # a second turn carries the first (multi-turn), and matches the API given the same history
        second, _ = ask("how are you")
        history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": want},
                   {"role": "user", "content": "how are you"}]
        assert second == greedy(history).strip()
        assert len(bubbles("user")) == 2 and len(bubbles("assistant")) == 2
        browser.save_screenshot(str(tmp_path / "chat_web.png"))

        browser.find_element(By.ID, "new").click()
        assert bubbles("user") == [] and bubbles("assistant") == []
        again, _ = ask("hello there")
        assert again == first and len(bubbles("assistant")) == 1
        assert (tmp_path / "chat_web.png").stat().st_size > 1000


def test_the_page_shows_calculator_calls(tok, browser, tmp_path):  # noqa: F811
    from tests.engine.test_engine import ScriptedModel
    from tests.scripts.test_chat_web import tool_transcript

    _, transcript = tool_transcript(tok, "what is it")
    engine = Engine(ScriptedModel(transcript, tok.get_vocab_size()), tok, max_seq_len=128, impl="torch")
    with serve(chat_web.create_app(engine, chat_web.ServerConfig(model_name=MODEL))) as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "input").send_keys("what is it")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: browser.find_element(By.ID, "send").is_enabled()
                 and browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant"), 30, "the answer")
        answer = browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")[-1]
        tools = [el.text for el in answer.find_elements(By.CSS_SELECTOR, ".tool")]
        assert tools == ["calc: 12*7", "= 84"] and answer.text.startswith("fine") and answer.text.endswith("thanks")
        browser.save_screenshot(str(tmp_path / "chat_web_tool.png"))
