"""The run record and the HTML report, built from a real (small) pipeline run on digits, and the search section
from a real quick search's folder (the session fixture ``searched``)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import accuracy

import repconv
from repconv.convert.graph import count_flops, count_params, example_input
from repconv.convert.replacement import replaced_units
from repconv.errors import InputFileError, OutputError
from repconv.report import (
    RUN_FILE,
    SEARCH_FILE,
    SEARCH_PLOT,
    ParityRecord,
    PlanRow,
    RunRecord,
    Stage,
    bench_rows,
    read_run,
    read_search,
    write_report,
)
from repconv.runtime.measure import machine_info


def _timings(model: torch.nn.Module, batch: int, repeats: int = 15) -> dict:
    """Measured latencies in the bench JSON's timing format (what `repconv bench --json` writes)."""
    x = example_input((3, 32, 32), batch=batch)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    t = torch.tensor(times)
    median = float(t.median())
    return {"batch": batch, "latencies_ms": times, "median_ms": median, "p90_ms": float(t.quantile(0.9)),
            "mean_ms": float(t.mean()), "throughput": batch * 1e3 / median}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_checkpoint) -> Path:
    """A run directory holding a real original and replacement model, their measured figures and latencies."""
    out = tmp_path_factory.mktemp("run")
    original_path = out / "original.repconv.safetensors"
    shutil.copy(digits_checkpoint, original_path)
    original = repconv.load(original_path)
    conv = repconv.convert(original_path, output=out / "replacement.repconv.safetensors")
    round_trip = repconv.api.check_round_trip(conv, conv.output)
    x = example_input((3, 32, 32), batch=1)
    run = RunRecord(title="test run", data={"name": "digits", "split": "val", "images": 359,
                                            "input_size": [3, 32, 32]}, machine=machine_info("cpu"))
    run.add(Stage("original", "model", None, original_path.name, original_path.stat().st_size, accuracy(original),
                  count_params(original), count_params(original), count_flops(original, x) // 2))
    s = conv.summary
    run.add(Stage("replacement", "converted", "replacement", conv.output.name, conv.output.stat().st_size,
                  accuracy(conv.model), s.params_after, s.trainable_params, s.macs_after,
                  [ParityRecord("in-memory conversion", round_trip, round_trip, None, "reloaded vs in memory")]))
    run.plan = [PlanRow("replacement", u, [m.prev, m.next], {"a": m.a.item(), "b": m.b.item()})
                for u, m in replaced_units(conv.model).items()]
    targets = [{"label": label, "path": str(out / label), "backend": "torch",
                "timings": [_timings(model, batch) for batch in (1, 4)]}
               for label, model in (("original.repconv.safetensors", original),
                                    ("replacement.repconv.safetensors", conv.model))]
    run.bench = {"machine": machine_info("cpu"), "targets": targets}
    run.save(out)
    return out


def test_run_record_round_trip(run_dir):
    run = read_run(run_dir)
    assert [s.name for s in run.stages] == ["original", "replacement"]
    assert run.stages[0].val_acc >= 0.95  # the digits model is trained to ~99%
    assert run.stages[1].params < run.stages[0].params
    assert run.plan and all(set(r.scalars) == {"a", "b"} for r in run.plan)
    assert run.stages[1].parity[0].max_abs < 1e-5
    assert len(bench_rows(run.bench)) == 4
    assert json.loads((run_dir / RUN_FILE).read_text())["format"] == "repconv-run"


def test_report_is_self_contained_html(run_dir, tmp_path):
    path = write_report(run_dir, tmp_path / "r.html")
    text = path.read_text()
    assert "<!DOCTYPE html>" in text
    assert not re.search(r"(src|href)=\"(https?:)?//", text), "the report must not fetch anything"
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 3  # accuracy, params/MACs, latency
    for b64 in images:
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    run = read_run(run_dir)
    for row in run.plan:
        assert row.unit in text and f"{row.scalars['a']:.4f}" in text
    assert f"{100 * run.stages[0].val_acc:.2f}%" in text


def test_report_cli(run_dir, tmp_path, run_cli):
    code, out, err = run_cli("report", run_dir, "-o", tmp_path / "cli.html", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert Path(data["report"]).is_file()
    rep = next(s for s in data["stages"] if s["name"] == "replacement")
    assert 0 < rep["params_ratio"] < 1 and rep["macs_ratio"] == pytest.approx(1.0)
    code, out, _ = run_cli("report", run_dir)
    assert code == 0 and (run_dir / "report.html").is_file() and "replacement" in out


def _pngs(text: str) -> list[bytes]:
    return [base64.b64decode(b64) for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


def test_report_of_a_search_folder(searched, tmp_path, run_cli):
    from repconv.search.run import PLOT_FILE, RESULT_FILE

    assert (SEARCH_FILE, SEARCH_PLOT) == (RESULT_FILE, PLOT_FILE)  # the report reads what the search writes
    out, res = searched
    rows = json.loads((out / SEARCH_FILE).read_text())["pareto"]
    assert {r["kind"] for r in rows} == {"predicted", "original", "searched"}
    assert all(r["latency_ms"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    text = write_report(out, tmp_path / "search.html").read_text()
    assert 'id="search"' in text and 'id="stages"' not in text  # no run.json: the search alone
    assert not re.search(r"(src|href)=\"(https?:)?//", text)
    assert _pngs(text) == [(out / SEARCH_PLOT).read_bytes()]  # pareto.png, inlined as it is
    table = text.split('<table class="pareto">')[1].split("</table>")[0]
    assert table.count("<tr>") == len(rows) + 1  # the header and one row per point
    searched_row = next(r for r in table.split("<tr>") if "<td>searched</td>" in r)
    assert f"{res.measured_latency_ms:.3f}" in searched_row and f"{100 * res.agreement:.2f}%" in searched_row
    for unit, candidate in res.selection.choice.items():
        assert f"{unit}: {candidate}" in text
    assert not (out / "report.html").exists()
    code, stdout, err = run_cli("report", out, "-o", tmp_path / "cli.html", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["search_rows"] == len(rows) and summary["stages"] == []


def test_report_of_a_run_with_a_search(run_dir, searched, tmp_path):
    both = shutil.copytree(run_dir, tmp_path / "both")
    for name in (SEARCH_FILE, SEARCH_PLOT):
        shutil.copy(searched[0] / name, both / name)
    text = write_report(both, tmp_path / "r.html").read_text()
    assert 'id="stages"' in text and 'id="search"' in text
    images = _pngs(text)
    assert len(images) == 4 and images[-1] == (both / SEARCH_PLOT).read_bytes()  # accuracy, size, latency, pareto
    (both / SEARCH_PLOT).write_bytes(b"not a png")
    assert read_search(both).plot is None
    assert "Pareto plot (pareto.png): nothing to plot" in write_report(both, tmp_path / "r2.html").read_text()


def test_report_bad_input(tmp_path, run_cli):
    with pytest.raises(InputFileError, match="does not exist"):
        read_run(tmp_path / "nowhere")
    (tmp_path / RUN_FILE).write_text("{not json")
    with pytest.raises(InputFileError, match="not valid JSON"):
        read_run(tmp_path)
    (tmp_path / RUN_FILE).write_text(json.dumps({"stages": []}))
    with pytest.raises(InputFileError, match="not a repconv run record"):
        read_run(tmp_path)
    (tmp_path / RUN_FILE).write_text(json.dumps(RunRecord().to_dict()))
    code, _, err = run_cli("report", tmp_path, "-o", tmp_path / "missing-folder" / "r.html")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(OutputError):
        write_report(tmp_path, tmp_path / "missing-folder" / "r.html")
    assert not list(tmp_path.glob("*.part"))
    (tmp_path / SEARCH_FILE).write_text("{not json")
    with pytest.raises(InputFileError, match=r"search\.json' is not valid JSON"):
        write_report(tmp_path, tmp_path / "r.html")
    (tmp_path / SEARCH_FILE).write_text("[1, 2]")
    with pytest.raises(InputFileError, match="not a search result"):
        write_report(tmp_path, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------- a real browser


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


_PROBE = """<script>window.addEventListener('load', () => {
  for (const img of document.images) {
    img.setAttribute('data-decoded', img.complete && img.naturalWidth > 0 ? 'yes' : 'no');
    img.setAttribute('data-size', img.naturalWidth + 'x' + img.naturalHeight);
  }
  document.body.setAttribute('data-loaded', 'yes');
});</script>"""


@pytest.mark.browser
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium / google-chrome on PATH: install one (apt-get install chromium) to run this test")
    page = tmp_path / "probe.html"  # the report plus a probe script that records how each image decoded
    page.write_text(write_report(run_dir, tmp_path / "r.html").read_text().replace("</body>", _PROBE + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         env=env).stdout
    assert 'data-loaded="yes"' in dom, "the page did not finish loading in chromium"
    run = read_run(run_dir)
    for row in run.plan:
        assert re.search(rf"<td>{re.escape(row.unit)}</td>", dom)
    sizes = re.findall(r'data-size="(\d+)x(\d+)"', dom)
    assert len(sizes) == 3 and all(int(w) > 100 and int(h) > 50 for w, h in sizes)
    assert dom.count('data-decoded="yes"') == 3
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()], capture_output=True,
                   timeout=120, env=env)
    assert shot.is_file() and shot.stat().st_size > 10_000
