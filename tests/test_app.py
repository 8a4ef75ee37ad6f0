"""The local web page (app.py, issue 35): the same probabilities as predict.py on real HAM10000
and PH2 images, a message on each bad file while the rest is scored, limits on size and count,
and, in headless Chromium, an upload end to end with nothing requested outside 127.0.0.1.
Skipped, with the reason, where the page's optional requirements or Chromium are missing."""
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, SHARED_DATA
from test_reference_model import HAM, real_rows

import predict

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                reason="the page's optional requirements are not installed "
                                       "(pip install -r requirements-app.txt, or make app-deps)")
PH2 = SHARED_DATA / "ph2"


def page_args(*flags):
    import app
    return app.parse_args(list(flags))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    import app
    return app.Page(page_args(), tmp_path_factory.mktemp("scratch"))


@pytest.fixture(scope="module")
def real_images():
    ham = [HAM / name for name in real_rows(2, 2)["filename"]]
    ph2 = [PH2 / name for name in pd.read_csv(PH2 / "labels.csv")["filename"].head(2)]
    return ham + ph2


def bad_files(folder):
    """A file that is no image, a JPEG cut short, an image too small to hold a lesion."""
    import cv2
    garbage = folder / "garbage.jpg"
    garbage.write_bytes(b"this is not an image " * 50)
    whole = (HAM / real_rows(1, 0)["filename"].iloc[0]).read_bytes()
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(whole[:len(whole) // 3])
    tiny = folder / "tiny.png"
    cv2.imwrite(str(tiny), np.full((6, 6, 3), 120, np.uint8))
    return [garbage, truncated, tiny]


def test_the_page_gives_predicts_probabilities_and_names_each_bad_file(page, real_images, tmp_path):
    bad = bad_files(tmp_path)
    html_out, messages, table, csv_path, line = page.classify([*map(str, real_images), *map(str, bad)], None, "",
                                                              "", page.start_point, page.start_clinic)
    predict.main(predict.parse_args([*map(str, real_images), "--out", str(tmp_path / "predict.csv")]))
    expected = pd.read_csv(tmp_path / "predict.csv")
    shown = pd.read_csv(csv_path)
    assert list(shown.columns) == list(expected.columns)  # the same CSV as predict.py's
    assert list(shown["file"]) == [p.name for p in real_images]
    np.testing.assert_allclose(shown["malignancy_prob"], expected["malignancy_prob"], atol=1e-5)
    assert list(shown["decision"]) == list(expected["decision"])
    for row in expected.itertuples():  # what the page shows, to the digit predict.py prints
        assert f"<b class='prob'>{row.malignancy_prob:.3f}</b>" in html_out
    for path in bad:
        assert any(line_.startswith(f"- {path.name}: ") for line_ in messages.splitlines()), messages
    assert len(table) == len(real_images)
    assert "recall_bound" in line and "not a diagnosis" in line and "threshold" in line
    assert html_out.count("class='result'") == len(real_images)
    assert "data:image/jpeg;base64," in html_out and "Grad-CAM" in html_out
    # the reference model reads the whole photo squeezed square; its map is shown in the photo's proportions
    import base64
    import re

    import cv2
    maps = re.findall(r'<img alt="Grad-CAM on the whole image" src="data:image/jpeg;base64,([^"]+)"', html_out)
    assert len(maps) == len(real_images)
    for encoded, path in zip(maps, real_images):
        shown_map = cv2.imdecode(np.frombuffer(base64.b64decode(encoded), np.uint8), cv2.IMREAD_COLOR)
        photo = cv2.imread(str(path))
        assert abs(shown_map.shape[1] / shown_map.shape[0] - photo.shape[1] / photo.shape[0]) < 0.02


def test_too_many_or_too_large_files_are_refused_with_a_message(real_images, tmp_path):
    import app
    strict = app.Page(page_args("--max-files", "2", "--max-mb", "0.05"), tmp_path)
    html_out, messages, table, csv_path, _ = strict.classify(list(map(str, real_images[:3])), None, "", "",
                                                             strict.start_point, strict.start_clinic)
    assert html_out == "" and csv_path is None and "at most 2" in messages
    big = [p for p in real_images if p.stat().st_size > 50_000][:1]
    html_out, messages, _, csv_path, _ = strict.classify(list(map(str, big)), None, "", "", strict.start_point,
                                                         strict.start_clinic)
    assert "over the page's limit" in messages and big[0].name in messages and csv_path is None
    _, messages, _, _, _ = strict.classify([], None, "", "", strict.start_point, strict.start_clinic)
    assert "first" in messages


def test_a_bad_model_folder_is_one_line_before_any_page_is_served(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--run", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "nowhere" in out.stderr


# ---------------------------------------------------------------------------------------------
# in a real browser

spec = importlib.util.spec_from_file_location("app_speed", ROOT / "bench" / "app_speed.py")
app_speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app_speed)
browser = pytest.mark.skipif(
    not (app_speed.CHROMIUM and app_speed.CHROMEDRIVER and importlib.util.find_spec("selenium")),
    reason="headless Chromium is not installed (Debian's chromium and chromium-driver, and selenium: make app-deps)")


@browser
def test_in_chromium_an_upload_shows_predicts_probability_and_nothing_leaves_the_machine(real_images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    image, garbage = real_images[0], bad_files(tmp_path)[0]
    temporary = Path(tempfile.gettempdir())
    before = set(temporary.iterdir())
    with app_speed.served() as (address, seconds_up):
        driver = app_speed.chromium()
        try:
            result, seconds_to_result = app_speed.upload(driver, address, [image, garbage])
            WebDriverWait(driver, 30).until(lambda d: garbage.name in d.find_element(By.ID, "messages").text)
            shown_prob = float(result.get_attribute("data-prob"))
            shown_text = result.find_element(By.CSS_SELECTOR, "b.prob").text
            messages = driver.find_element(By.ID, "messages").text
            screenshot = Path(os.environ.get("APP_SCREENSHOT", tmp_path / "page.png"))
            driver.save_screenshot(str(screenshot))
            requested = app_speed.requested_urls(driver)
        finally:
            driver.quit()
        scratch = [p for p in set(temporary.iterdir()) - before if p.name.startswith("lesion-app-")]
        uploads = [p.name for folder in scratch for p in folder.rglob("*") if p.is_file()]
    predict.main(predict.parse_args([str(image), "--out", str(tmp_path / "predict.csv")]))
    expected = pd.read_csv(tmp_path / "predict.csv")["malignancy_prob"].iloc[0]
    assert image.name in uploads and garbage.name in uploads  # while serving, the uploads lie in its scratch folder
    assert shown_prob == pytest.approx(expected, abs=1e-5) and shown_text == f"{expected:.3f}"
    assert f"{garbage.name}: not a readable image" in messages
    assert screenshot.stat().st_size > 10_000
    outside = {url for url in requested if urlparse(url).scheme not in ("data", "blob")
               and urlparse(url).hostname not in ("127.0.0.1", "localhost")}
    assert requested and not outside, f"the page requested: {sorted(outside)}"
    left = {p.name for p in set(temporary.iterdir()) - before}
    assert not {name for name in left if name.startswith("lesion-app-") or name == "gradio"}, left
    print(f"page up {seconds_up:.1f} s after start; result {seconds_to_result:.1f} s after the upload; "
          f"{len(requested)} requests, all to 127.0.0.1")


@browser
def test_two_browsers_at_once_each_get_their_own_result(real_images):
    first, second = real_images[0], real_images[-1]  # a HAM10000 image and a PH2 one
    with app_speed.served() as (address, _):
        drivers = [app_speed.chromium(), app_speed.chromium()]
        try:
            times = [app_speed.start_upload(driver, address, [image]) for driver, image in zip(drivers, (first, second))]
            results = [app_speed.first_result(driver, uploaded)[0] for driver, uploaded in zip(drivers, times)]
            shown = [result.get_attribute("data-file") for result in results]
            counts = [len(driver.find_elements("css selector", "#results .result")) for driver in drivers]
        finally:
            for driver in drivers:
                driver.quit()
    assert shown == [first.name, second.name] and counts == [1, 1]
