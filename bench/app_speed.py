"""How fast the web page answers (issue 35): seconds from starting app.py until the page is served,
and from an upload in headless Chromium until its result shows (with the reference model's
test-time augmentation), one HAM10000 image at a time, each on a freshly loaded page.
Images: HAM10000 images outside the study's test split. Needs the optional requirements
(requirements-app.txt) and Debian's chromium and chromium-driver (make app-deps).
Writes --out (JSON) and prints the figures. The browser test (tests/test_app.py) drives the page
through the functions here.

Example: python bench/app_speed.py --n 10 --out bench/results/app_speed.json
"""
import argparse
import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(*flags, timeout=120):
    """app.py in its own process, as make app starts it; yields (address, seconds until the page
    answered). Raises RuntimeError with the server's output if it ends or never answers."""
    port = free_port()
    started = time.time()
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *flags], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"app.py ended: {server.stdout.read()[-2000:]}")
            try:
                urllib.request.urlopen(address, timeout=2)
                break
            except OSError:
                if time.time() - started > timeout:
                    raise RuntimeError(f"app.py did not answer within {timeout} s")
                time.sleep(0.1)
        yield address, time.time() - started
    finally:
        server.terminate()
        server.wait(timeout=30)


def chromium():
    """Headless Chromium through its chromedriver, logging every network request it makes."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1600", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-default-apps", "--disable-sync"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def start_upload(driver, address, paths):
    """Load the page and drop `paths` on it; returns the time of the upload."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(address)
    field = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
    uploaded = time.time()
    field.send_keys("\n".join(map(str, paths)))
    return uploaded


def first_result(driver, uploaded, timeout=120):
    """(the first result's element, seconds from the upload until it showed)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    result = WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))[0]
    return result, time.time() - uploaded


def upload(driver, address, paths, timeout=120):
    """Drop `paths` on a freshly loaded page and wait for the first result (first_result)."""
    return first_result(driver, start_upload(driver, address, paths), timeout)


def requested_urls(driver):
    """Every address the page asked for since the last call (requests and web sockets)."""
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.add(message["params"].get("request", message["params"]).get("url"))
    return urls


def main(args):
    import pandas as pd
    labels = pd.read_csv(args.shared / "ham10000_full" / "labels.csv")
    images = [args.shared / "ham10000_full" / name for name in labels.loc[labels["split"].isna(), "filename"].head(args.n)]
    with served() as (address, seconds_up):
        driver = chromium()
        try:
            seconds = [upload(driver, address, [image])[1] for image in images]
        finally:
            driver.quit()
    figures = {"page_up_s": round(seconds_up, 2), "images": len(seconds),
               "result_after_upload_s_median": round(statistics.median(seconds), 2),
               "result_after_upload_s_max": round(max(seconds), 2),
               "result_after_upload_s": [round(s, 2) for s in seconds]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10, help="images, each uploaded on its own")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "app_speed.json")
    main(p.parse_args())
