"""The web demo in a real browser: launchers/web_demo.py serves a tiny synthetic-world bundle, headless
Chromium (Debian's, driven by selenium) types a prompt, generates, moves one reward slider, generates
again with the same seed (the image must change), moves it back (the first image must come back);
and best-of-N on the model's pixel rewards, without a browser."""
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_geneval import SYNTHETIC_KEYS, tiny_synthetic_bundle

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    bundle = tiny_synthetic_bundle(tmp_path / "bundle")
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "launchers/web_demo.py", "--model", str(bundle), "--device", "cpu",
                                 "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the demo server did not answer within 180 s"
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp()
    # no background connections: this machine's network is closed
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shown_image(driver, previous_src=None) -> tuple:
    """(src, pixels) of the output image once it is there (and differs from previous_src)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        imgs = d.find_elements(By.CSS_SELECTOR, "#image img")
        src = imgs[0].get_attribute("src") if imgs else None
        return src if src and src != previous_src else False

    src = WebDriverWait(driver, 120).until(ready, "no new image came back")
    with urllib.request.urlopen(src, timeout=10) as r:
        return src, np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


@pytest.mark.slow
def test_the_page_generates_and_a_reward_slider_changes_the_image(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.implicitly_wait(60)
    browser.get(server)
    for key in SYNTHETIC_KEYS:  # a slider per reward, for s+ and for s-
        browser.find_element(By.ID, f"s_plus_{key}")
        browser.find_element(By.ID, f"s_minus_{key}")
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("a photo of a red circle")
    generate = browser.find_element(By.ID, "generate")
    generate.click()
    src1, first = shown_image(browser)
    assert first.shape == (256, 256, 3) and first.std() > 0  # the 16 px sample, enlarged
    slider = browser.find_element(By.CSS_SELECTOR, "#s_plus_sharpness_score input[type=range]")
    number = browser.find_element(By.CSS_SELECTOR, "#s_plus_sharpness_score input[type=number]")
    assert float(number.get_attribute("value")) == 1.0
    slider.send_keys(Keys.HOME)  # s+ sharpness 1 -> 0, seed unchanged
    assert float(number.get_attribute("value")) == 0.0
    generate.click()
    src2, second = shown_image(browser, src1)
    assert np.abs(second.astype(int) - first).max() > 0, "moving the s+ slider did not change the image"
    slider.send_keys(Keys.END)  # back to 1: the same seed and dials give the first image again
    generate.click()
    _, third = shown_image(browser, src2)
    assert np.array_equal(third, first)


def test_best_of_n_keeps_the_candidate_its_reward_scores_highest(tmp_path):
    from miro_scale.evaluation.rewards import RewardEvaluator
    from miro_scale.sampling import MiroPipeline
    from miro_scale.web_demo import DemoModel, default_select_rewards

    pipe = MiroPipeline.from_pretrained(str(tiny_synthetic_bundle(tmp_path / "bundle")))
    keys = default_select_rewards(pipe.cfg.model.reward_keys)
    assert keys == SYNTHETIC_KEYS and default_select_rewards(["aesthetic_score", "sharpness_score"]) == []
    demo = DemoModel(pipe, RewardEvaluator(keys))
    dials = dict(positive={k: 1.0 for k in keys}, negative={k: 0.0 for k in keys}, guidance=1.5, steps=2, seed=3)
    best, info = demo.generate("a photo of a red circle", best_of=4, select="contrast_score", **dials)
    assert "best of 4 by contrast_score" in info
    contrast = demo.evaluator.rewards[keys.index("contrast_score")]
    candidates = [demo.generate("a photo of a red circle", **{**dials, "seed": 3 + k})[0] for k in range(4)]
    scores = [float(contrast.score(contrast.view.prepare([c]))[0]) for c in candidates]
    kept = int(info.split("candidate ")[1].split()[0])
    assert kept == int(np.argmax(scores)) and np.array_equal(np.asarray(best), np.asarray(candidates[kept]))
    with pytest.raises(ValueError, match="enter a prompt"):
        demo.generate(" ", **dials)
    with pytest.raises(ValueError, match="reward to select on"):
        demo.generate("a circle", best_of=2, select="aesthetic_score", **dials)
