"""The demo's report in a real browser: headless Chromium loads report.html and every figure in it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from batchnorm import cli
from tests.experiments.test_demo import TINY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# after the page has loaded: how many images there are, and how many decoded to a picture
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0);
  document.body.setAttribute("data-probe", `${loaded.length}/${images.length}/${document.title}`);
});
</script></body>"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
def test_report_renders_with_every_figure_in_chromium(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["demo", *TINY, "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE))
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
         probed.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    found = re.search(r'data-probe="(\d+)/(\d+)/([^"]*)"', result.stdout)
    assert found, f"the page did not finish loading: {result.stderr[-1500:]}"
    loaded, total, title = int(found.group(1)), int(found.group(2)), found.group(3)
    # 9 figures, small_batch, shift, smoothness, noisy_bn, population; 6 thumbnails in the story
    assert total == page.count("<img ") == 14 + 6 and loaded == total, (loaded, total)
    assert title == "batchnorm demo: digits"
    shutil.copy(out / "report.html", tmp_path / "kept.html")  # what the browser saw stays readable on failure
