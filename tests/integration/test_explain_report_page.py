"""The explanation and evaluation report (ml/report.py) in a real browser: headless Chromium
renders it, the screenshot is not blank, every <img> decoded and no script raised.

The report itself has no scripts; the test adds a probe (first in <head>, so it sees every
error) that records uncaught errors and, on load, each image's naturalWidth into the DOM,
which ``--dump-dom`` hands back. No cluster is needed."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from kubeloop_pipelines.ml import counterfactuals as cf
from kubeloop_pipelines.ml import lime_explain as lx
from kubeloop_pipelines.ml import pdp
from kubeloop_pipelines.ml.explain import Explanation
from kubeloop_pipelines.ml.report import ReportInputs, build_report

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make system-deps installs it)"
)
FEATURES = ["decisive", "noise_a", "noise_b"]
CLASSES = ["no", "yes"]
PROBE = """<script>
window.__errors = [];
window.onerror = function (message) { window.__errors.push(String(message)); };
window.addEventListener('load', function () {
  var out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({
    errors: window.__errors,
    images: Array.prototype.map.call(document.images, function (i) {
      return {alt: i.alt, complete: i.complete, width: i.naturalWidth};
    })
  });
  document.body.appendChild(out);
});
</script>"""


def _report() -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = LogisticRegression(C=50.0).fit(x, y)

    def predict(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(model.predict_proba(np.asarray(rows, dtype=np.float64)), dtype=np.float32)

    test = x[300:]
    importance = np.abs(model.coef_[0]).astype(np.float64)
    explanation = Explanation(
        "permutation", FEATURES, importance, "|coefficient|", np.zeros((3, 3)), test[:3],
        ["yes", "no", "yes"],
    )  # fmt: skip
    history = {"train_loss": [0.7, 0.4, 0.3, 0.25], "val_loss": [0.72, 0.45, 0.33, 0.3]}
    evaluation: dict[str, Any] = {
        "metrics": {"accuracy": 0.97, "f1": 0.96},
        "gates": [{"metric": "f1", "text": "f1=0.96>=0.9", "passed": True}],
        "gatesPassed": True, "gateSummary": "f1=0.96>=0.9 ✓",
        "verdict": {"verdict": "good fit", "explanation": "both losses fell and stayed close"},
        "confusion": {"labels": CLASSES, "matrix": [[48, 2], [1, 49]]},
    }  # fmt: skip
    inputs = ReportInputs(
        title="Explanation and evaluation report",
        evaluation=evaluation,
        history=history,
        explanation=explanation,
        dependence=pdp.dependence_curves(
            predict, test, x, features=FEATURES, chosen=[0, 1], task="classification",
            classes=CLASSES,
        ),
        lime=lx.lime_tabular(predict, x, test[:2], features=FEATURES, task="classification",
                             classes=CLASSES, num_samples=300),
        counterfactuals=cf.counterfactuals(predict, test[:3], x, features=FEATURES,
                                           classes=CLASSES, candidates=[0, 1]),
        optimization={"objective": "accuracy", "chosen": "baseline", "variants": [
            {"name": "baseline", "status": "kept", "score": 0.97, "latency_ms": 0.2,
             "speedup": 1.0, "reason": ""}]},
        notes=["a note"],
    )  # fmt: skip
    return build_report(inputs)


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _probe(dom: subprocess.CompletedProcess[str]) -> Any:
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the probe did not run: {dom.stdout[-1000:]}\n{dom.stderr[-1000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_the_probe_sees_broken_images_and_script_errors(tmp_path: Path) -> None:
    """The checks below can fail: a page with an undecodable image and a throwing script."""
    page = tmp_path / "broken.html"
    page.write_text(
        f"<!doctype html><html><head>{PROBE}</head><body><p>x</p>"
        '<img alt="bad" src="data:image/png;base64,AAAA"><script>undefinedCall();</script>'
        "</body></html>"
    )
    probe = _probe(_chromium("--dump-dom", page.as_uri()))
    assert probe["images"] == [{"alt": "bad", "complete": True, "width": 0}]
    assert any("undefinedCall" in error for error in probe["errors"]), probe


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    page = _report()
    assert "<script" not in page  # the report is static; the probe below is the test's
    probed = tmp_path / "report.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))

    dom = _chromium("--dump-dom", probed.as_uri())
    probe = _probe(dom)
    assert probe["errors"] == []
    assert "Uncaught" not in dom.stderr
    alts = [image["alt"] for image in probe["images"]]
    expected = {"confusion matrix", "learning curves", "explanation importance",
                "partial dependence"}  # fmt: skip
    assert set(alts) == expected, alts
    broken = [image for image in probe["images"] if not image["complete"] or image["width"] <= 0]
    assert broken == []

    shot = tmp_path / "report.png"
    taken = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", probed.as_uri())
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.is_file(), taken.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    non_white = np.mean(np.any(pixels < 245, axis=2))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert non_white > 0.03, non_white  # text, tables and plots, not an empty page
    assert colours > 50, colours  # the plots' colours, not only black text on white
