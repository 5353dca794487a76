"""`pag serve` on a real local Ray Serve (serving/app.py): the HTTP API, its 4xx errors naming the field, the
page at `/`, OpenAPI at /docs, and the render + score deployment composed behind the ingress. Tiny random run."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from argparse import Namespace

import pytest

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, tiny_run):
    from ray import serve

    from serving.cli import start

    url = start(Namespace(checkpoint=str(tiny_run), host="127.0.0.1", port=_free_port(), no_render=False,
                          policy_replicas=1, scorer_replicas=1, scorer_gpus=0, refine=True, refine_gpus=0,
                          ray_address=None))
    yield url
    serve.shutdown()


def _call(url: str, body: dict | None = None) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            raw, status, kind = res.read().decode(), res.status, res.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        raw, status, kind = err.read().decode(), err.code, err.headers.get("content-type", "")
    return status, json.loads(raw) if "json" in kind else raw


def test_health_info_page_and_docs(server, tiny_run):
    assert _call(server + "/healthz")[1]["ok"] is True
    status, info = _call(server + "/v1/info")
    assert status == 200 and info["run"] == "served" and info["render"] is True and info["preset"] == "tiny"
    assert info["refine"] is True
    status, page = _call(server + "/")
    assert status == 200 and '<form id="form">' in page and "/v1/rewrite" in page
    status, spec = _call(server + "/openapi.json")
    assert status == 200 and "/v1/rewrite" in spec["paths"] and "/v1/refine" in spec["paths"]


def test_a_chosen_rewrite_is_refined_by_bounded_ipgo(server):
    status, out = _call(server + "/v1/refine", {"text": "a cat on a sofa, oil painting", "iterations": 2})
    assert status == 200 and len(out["curve"]) == 2 and out["best_reward"] == max(out["curve"])
    before, after = out["images"]["before"], out["images"]["after"]
    assert before.startswith("data:image/png;base64,") and after != before
    status, err = _call(server + "/v1/refine", {"text": "a cat", "iterations": 51})
    assert status == 422 and err["detail"][0]["loc"] == ["body", "iterations"]
    status, err = _call(server + "/v1/refine", {"text": " ".join(["cat"] * 80)})
    assert status == 422 and err["detail"][0]["loc"] == ["body", "text"] and "82 CLIP tokens" in err["detail"][0]["msg"]


def test_rewrites_by_sampling_and_by_beam_search(server):
    body = {"prompt": "a cat on a sofa", "n": 3, "seed": 5}
    status, out = _call(server + "/v1/rewrite", body)
    assert status == 200 and len(out["rewrites"]) == 3 and "plain" not in out
    assert _call(server + "/v1/rewrite", body)[1] == out  # same seed, same rewrites
    status, beam = _call(server + "/v1/rewrite", {"prompt": "a cat on a sofa", "n": 4, "decode": "beam"})
    assert status == 200 and len({r["text"] for r in beam["rewrites"]}) == 4


def test_rendered_rewrites_come_with_pictures_and_scores(server):
    status, out = _call(server + "/v1/rewrite", {"prompt": "a red house", "n": 2, "render": True})
    assert status == 200, out
    assert out["plain"]["images"][0].startswith("data:image/png;base64,")
    for card in out["rewrites"]:
        assert card["images"] and set(card["scores"]) >= {"reward", "aes_gain", "rel", "aes", "clip"}


@pytest.mark.parametrize("body, field, says", [
    ({"prompt": "a cat", "n": 99}, "n", "less than or equal to 16"),
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"prompt": " ".join(["cat"] * 80)}, "prompt", "82 CLIP tokens; the limit is 77"),
    ({"prompt": "a cat", "decode": "greedy"}, "decode", "'sample' or 'beam'"),
])
def test_a_bad_request_is_a_422_naming_the_field(server, body, field, says):
    status, out = _call(server + "/v1/rewrite", body)
    assert status == 422
    (error,) = out["detail"]
    assert error["loc"][-1] == field and says in error["msg"]


def test_the_page_in_a_real_browser(server, tmp_path):
    """Debian's chromium and chromedriver (.ci/run installs them) through selenium: type a prompt, ask for two
    rendered rewrites, see the plain card and two rewrite cards with pictures and scores, refine the first by IPGO
    and see its before/after pictures. A screenshot is saved
    on failure (its path in the message), and to $PAG_SERVE_SCREENSHOT when set (docs/serve.png is one)."""
    import os
    import shutil

    chromedriver = shutil.which("chromedriver")
    if chromedriver is None or shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    shot = tmp_path / "page.png"
    try:
        driver.get(server + "/")
        driver.find_element(By.ID, "prompt").send_keys("a red house by a lake")
        n = driver.find_element(By.ID, "n")
        n.clear()
        n.send_keys("2")
        driver.find_element(By.ID, "render").click()
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 180).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.rewrite")) == 2)
        plain = driver.find_element(By.CSS_SELECTOR, ".card.plain")
        assert plain.find_elements(By.TAG_NAME, "img")
        for card in driver.find_elements(By.CSS_SELECTOR, ".card.rewrite"):
            assert card.find_elements(By.TAG_NAME, "img")
            assert "reward" in card.find_element(By.CLASS_NAME, "scores").text
        assert driver.find_element(By.ID, "error").text == ""
        first = driver.find_elements(By.CSS_SELECTOR, ".card.rewrite")[0]
        first.find_element(By.CLASS_NAME, "refine").click()  # this server refines: IPGO on that rewrite
        WebDriverWait(driver, 180).until(lambda d: len(first.find_elements(By.CSS_SELECTOR, ".refined img")) == 2)
        assert "IPGO reward" in first.find_element(By.CLASS_NAME, "refined").text
        assert not first.find_elements(By.CLASS_NAME, "refine")
        if os.environ.get("PAG_SERVE_SCREENSHOT"):
            driver.save_screenshot(os.environ["PAG_SERVE_SCREENSHOT"])
    except Exception:
        driver.save_screenshot(str(shot))
        raise AssertionError(f"the page test failed; screenshot: {shot}")
    finally:
        driver.quit()
