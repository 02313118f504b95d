"""The loader benchmark runs end to end at a tiny size (numbers are not checked)."""
import json

from miro_scale.data import bench


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "r.json"
    bench.main(["--num-samples", "16", "--resolution", "32", "--source-resolution", "48",
                "--batch-size", "8", "--workers", "0", "--threads", "1", "--no-wds", "--out", str(out)])
    rep = json.loads(out.read_text())
    kinds = {(r["loader"], r["device"]) for r in rep["results"]}
    assert ("pil_dataloader", "cpu") in kinds
    assert all(r["images"] == 16 for r in rep["results"])
    for k in ("device", "versions", "date", "command", "config", "summary"):
        assert k in rep
    assert "img/s" in capsys.readouterr().out
