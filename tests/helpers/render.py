"""Render a report page in headless Chromium and take a screenshot (is the page readable offline?)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html_path: str, png_path: str, width: int = 1200, height: int = 2400, timeout: float = 120) -> str:
    """Screenshot of ``html_path`` as headless Chromium renders it, with no network access."""
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--proxy-server=127.0.0.1:9",  # offline: any fetch would fail
            f"--window-size={width},{height}",
            f"--screenshot={os.path.abspath(png_path)}",
            "file://" + os.path.abspath(html_path),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not os.path.isfile(png_path):
        raise RuntimeError(f"chromium could not render {html_path}: {done.stderr.strip()[-300:]}")
    return png_path
