"""The playground page of `gptn serve` in a real headless browser (Debian's chromium, driven by selenium):
the bars show what `gptn next` computes, a click appends the token, Generate streams a continuation."""

import os
import shutil

import pytest

pytest.importorskip("fastapi", reason="the server is the `serve` extra (in dev)")

from gptn.generate import generate, next_token_probs  # noqa: E402
from gptn.sampling import SamplingConfig  # noqa: E402
from gptn.serve import create_app  # noqa: E402
from test_serve import KEY, _start  # noqa: E402


def _browser():
    """A headless chromium, or a skip (outside CI only) naming what is missing."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium (the dev extra)")
    if missing:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must run the browser test; missing: {', '.join(missing)}")
        pytest.skip(f"no headless browser here: {', '.join(missing)} missing (apt install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_the_playground_shows_next_token_probabilities_and_streams(model, tok, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    srv, port = _start(create_app(model, tok, model_name="tiny", api_key=KEY))
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: "API key" in b.find_element(By.ID, "error").text)  # the page says the key is needed
        browser.find_element(By.ID, "key").send_keys(KEY + Keys.TAB)
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys("the ca")
        bars_for = lambda prompt: lambda b: b.find_element(By.ID, "bars").get_attribute("data-prompt") == prompt  # noqa: E731
        wait.until(bars_for("the ca"))
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        browser.save_screenshot(str(tmp_path / "playground.png"))
        assert (tmp_path / "playground.png").stat().st_size > 1000

        expected = next_token_probs(model, tok, "the ca", top=10)  # what `gptn next` prints
        assert len(bars) == 10
        assert [b.get_attribute("data-token") for b in bars] == [e["token"] for e in expected]
        for bar, e in zip(bars, expected):
            assert float(bar.get_attribute("data-prob")) == pytest.approx(e["prob"], rel=1e-4, abs=1e-6)
            assert bar.find_element(By.CLASS_NAME, "pct").text == f"{100 * e['prob']:.1f}%"

        bars[1].click()  # the second most likely token is appended
        appended = "the ca" + expected[1]["token"]
        wait.until(bars_for(appended))
        assert box.get_attribute("value") == appended

        for name, value in (("temperature", "0"), ("max_tokens", "12")):
            field = browser.find_element(By.ID, name)
            field.clear()
            field.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.find_element(By.ID, "output").get_attribute("data-done") == "true")
        continuation = generate(model, tok, [appended], SamplingConfig(max_new_tokens=12, greedy=True))[0][0]
        assert browser.find_element(By.ID, "output").get_attribute("textContent") == appended + continuation
        coloured = browser.find_elements(By.CSS_SELECTOR, "#output .tok[data-logprob]")
        assert coloured and all(float(s.get_attribute("data-logprob")) <= 0 for s in coloured)
        assert browser.find_element(By.ID, "error").text == ""
    finally:
        browser.quit()
        srv.should_exit = True


def test_the_playground_colours_each_token_by_its_rank(model, tok):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from gptn.detect import token_stats
    browser = _browser()
    srv, port = _start(create_app(model, tok, model_name="tiny"))
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys("the cat sat on the mat")
        browser.find_element(By.ID, "detect").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "ranks").get_attribute("data-done") == "true")
        spans = browser.find_elements(By.CSS_SELECTOR, "#ranks .tok")
        stats = token_stats(model, tok, "the cat sat on the mat")  # what `gptn detect` computes
        assert [int(s.get_attribute("data-rank")) for s in spans] == stats.ranks
        buckets = [s.get_attribute("class").split()[1] for s in spans]
        assert buckets == [("top10" if r <= 10 else "top100" if r <= 100 else "top1000" if r <= 1000 else "rest")
                           for r in stats.ranks]
        assert "P(machine-generated)" in browser.find_element(By.ID, "verdict").text
    finally:
        browser.quit()
        srv.should_exit = True
