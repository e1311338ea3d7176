"""Headless Chromium on the OHIF viewer, for tests/test_viewer_ohif.py and scripts/viewer_screenshots.py.

Debian's ``chromium`` and ``chromium-driver`` (installed by scripts/setup_viewer.sh) driven by
selenium; no browser is downloaded at run time (the driver's path is given, so Selenium
Manager is never asked). What the page shows is read two ways: the text a person sees, and
OHIF's own services (``window.services``, ``window.cornerstone``), which the built viewer
exposes: the loaded segmentation's segments and the labelmap it draws over each CT image.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMEDRIVER = "chromedriver"


def ohif_folder() -> Path:
    from volumes.pacs.viewer import OHIF_VERSION

    return ROOT / ".viewer" / f"ohif-{OHIF_VERSION}"


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    for tool, package in (("chromium", "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if shutil.which(tool) is None:
            return f"{tool} not installed (run scripts/setup_viewer.sh: apt-get install {package})"
    if importlib.util.find_spec("selenium") is None:
        return "selenium not installed (the dev extra, or scripts/setup_viewer.sh)"
    if not (ohif_folder() / "index.html").is_file():
        return f"OHIF is not installed in {ohif_folder()} (run scripts/setup_viewer.sh)"
    return None


# the labelmap OHIF draws over each CT image: per referenced image, per segment, the voxel count and
# the sum of rows and columns (an in-plane flip or shift changes the centroid, not the count)
_LABELMAP_JS = """
const seg = services.segmentationService.getSegmentations()[0];
const lm = seg.representationData.Labelmap;
const out = {};
lm.imageIds.forEach((id, i) => {
  const image = cornerstone.cache.getImage(id);
  if (!image) { out[lm.referencedImageIds[i]] = null; return; }
  const px = image.getPixelData(), columns = image.columns, stats = {};
  for (let k = 0; k < px.length; k++) {
    const v = px[k];
    if (!v) continue;
    const s = stats[v] || (stats[v] = [0, 0, 0]);
    s[0] += 1; s[1] += Math.floor(k / columns); s[2] += k % columns;
  }
  out[lm.referencedImageIds[i]] = stats;
});
return JSON.stringify(out);
"""


class OhifPage:
    """One headless Chromium window on the viewer."""

    def __init__(self, width: int = 1400, height: int = 900):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                         "--disable-gpu-sandbox", "--no-first-run"):
            options.add_argument(argument)
        options.binary_location = shutil.which("chromium")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(shutil.which(CHROMEDRIVER)), options=options)
        self.logs: list[dict] = []

    def close(self) -> None:
        self.driver.quit()

    # ------------------------------------------------------------------ reading the page
    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def wait(self, condition, what: str, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = condition()
            except Exception:  # the page is still building: try again
                value = None
            if value:
                return value
            time.sleep(0.3)
        self.driver.save_screenshot(str(ROOT / "runs" / "ohif_timeout.png")) if (ROOT / "runs").is_dir() else None
        raise AssertionError(f"OHIF: {what} not seen in {timeout} s; the page reads:\n{self.text()[-2000:]}")

    def console(self) -> list[dict]:
        """Every console entry so far (the driver hands each out once, so they are kept)."""
        self.logs += self.driver.get_log("browser")
        return self.logs

    def errors(self) -> list[str]:
        return [e["message"] for e in self.console() if e["level"] == "SEVERE"]

    def script(self, code: str) -> Any:
        return self.driver.execute_script(code)

    # ------------------------------------------------------------------ actions
    def open_study(self, url: str) -> None:
        self.driver.get(url)
        self.wait(lambda: "I:" in self.text(), "the first CT image (its 'I:' overlay)")
        self._click_all("//*[text()='Skip all']")  # the first-visit tour

    def _click_all(self, xpath: str) -> int:
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.XPATH, xpath)
        for element in found:
            element.click()
        return len(found)

    def double_click_series(self, description: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        element = self.wait(lambda: self.driver.find_elements(By.XPATH, f"//*[contains(text(), {json.dumps(description)})]"),
                            f"the series '{description}' in the study browser")[0]
        ActionChains(self.driver).double_click(element).perform()

    def load_seg(self, description: str) -> dict:
        """Double-click the SEG, answer 'Yes' to OHIF's 'open this Segmentation?', wait until it is drawn."""
        from selenium.webdriver.common.by import By

        self.double_click_series(description)
        yes = "//button[normalize-space()='Yes']"
        self.wait(lambda: self.driver.find_elements(By.XPATH, yes), "OHIF's 'open this Segmentation?' prompt")
        self._click_all(yes)
        segmentation = self.wait(lambda: json.loads(self.script(
            "const s = services.segmentationService.getSegmentations();"
            "return JSON.stringify(s.length ? {label: s[0].label, segments: Object.values(s[0].segments)"
            ".filter(x => x).map(x => ({index: x.segmentIndex, label: x.label}))} : null);")),
            "the loaded segmentation in OHIF's segmentation service")
        self.wait(lambda: all(v is not None for v in self.labelmap().values()), "every labelmap image in the cache")
        return segmentation

    def labelmap(self) -> dict[str, dict[str, list[int]]]:
        """Referenced CT imageId -> segment index -> [voxels, sum of rows, sum of columns]."""
        return json.loads(self.script(_LABELMAP_JS))

    def load_sr(self, description: str) -> list[dict]:
        """Double-click the SR; the measurements OHIF read from it (tracking identifier, labels, coordinates)."""
        self.double_click_series(description)
        return self.wait(lambda: json.loads(self.script(
            "const ds = services.displaySetService.getActiveDisplaySets().filter(d => d.Modality === 'SR' && d.isLoaded"
            f" && d.SeriesDescription.startsWith({json.dumps(description)}));"
            "return JSON.stringify(ds.length ? ds[0].measurements.map(m => ({id: m.TrackingIdentifier, labels: m.labels,"
            " coords: m.coords.length})) : null);")), "the SR's measurements in OHIF")

    def screenshot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path


def seg_frame_stats(seg_path: str | Path) -> dict[str, dict[str, list[int]]]:
    """The same statistics from the SEG file we sent: source SOP Instance UID -> segment -> [n, rows, cols]."""
    import numpy as np
    import pydicom

    seg = pydicom.dcmread(seg_path)
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    out: dict[str, dict[str, list[int]]] = {}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        sop = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        number = str(int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber))
        rows, columns = np.nonzero(frame)
        if rows.size:
            out.setdefault(sop, {})[number] = [int(rows.size), int(rows.sum()), int(columns.sum())]
    return out
